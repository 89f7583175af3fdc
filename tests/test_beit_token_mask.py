"""The ``beit_token_mask`` sub-branch on tiny real timm BEiT / BEiT v2 models.

The reference forward below re-implements the sub-branch from the model's parameters (tokens gathered, each block's
full relative position bias built from its table and gathered at [cls] + kept tokens with advanced indexing, the
attention written out), so that it does not share code with ``masksub_lightning/method/beit_tokens.py``.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_vit_kwargs
from test_module import assert_relative_error_below, reference_gradient, run_one_step
from test_subbranch import structure

from masksub_lightning import MaskSubModule
from masksub_lightning.method import beit_tokens
from masksub_lightning.method.subbranch import (
    BeitTokenMaskSubBranch,
    TokenMaskSubBranch,
    UnsupportedModelError,
    build_sub_branch,
)

TINY_BEIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
# BEiT v2 as timm builds it (a table per block, no absolute position embedding), the pre-training layout (one
# shared table), and BEiT v1 with an absolute position embedding on top of per-block tables.
VARIANTS = {
    "v2": {},
    "shared": dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
    "abs_pos": dict(use_abs_pos_emb=True),
    "shared_and_own": dict(use_shared_rel_pos_bias=True),
}


def beit(variant: str = "v2", **kw):
    model = timm.create_model(
        "beitv2_base_patch16_224", num_classes=4, **TINY_BEIT, **VARIANTS[variant], **kw
    ).train()
    with torch.no_grad():  # timm starts every table at zero: give the bias something to get wrong
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith("gamma_1") or name.endswith("gamma_2"):
                p.normal_(0.0, 0.5)
        model.head.weight.normal_(0.0, 1.0)  # timm scales the head by 0.001: logits of order 1 to compare
    return model


def vit():
    return timm.create_model("vit_tiny_patch16_224", num_classes=4, **tiny_vit_kwargs()).train()


# ------------------------------------------------------------------------------------ independent reference
def embedded_tokens(model, images):
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    return x + model.pos_embed if model.pos_embed is not None else x


def full_bias(table, index):
    """(heads, T, T) from a (distances, heads) table and its (T, T) index."""
    return table[index].permute(2, 0, 1)


def manual_attention(attn, x, bias):
    batch, tokens, dim = x.shape
    qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    qkv = F.linear(x, attn.qkv.weight, qkv_bias).reshape(batch, tokens, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return attn.proj(out)


def beit_with_kept_tokens(model, images, keep, bias_index=None):
    """The sub-branch forward for given kept patch indices ``keep`` (B, K); ``bias_index`` (B, 1 + K): where the
    bias is read instead of the kept tokens' own positions (to show that a wrong gather is seen)."""
    tokens = embedded_tokens(model, images)
    index = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)  # (B, 1 + K): class token first
    x = torch.stack([tokens[b, index[b]] for b in range(len(index))])
    at = index if bias_index is None else bias_index
    rows, cols = at[:, :, None], at[:, None, :]
    shared = None
    if model.rel_pos_bias is not None:
        shared = full_bias(
            model.rel_pos_bias.relative_position_bias_table, model.rel_pos_bias.relative_position_index
        )
    for block in model.blocks:
        attn = block.attn
        bias = torch.zeros(attn.num_heads, tokens.shape[1], tokens.shape[1])
        if attn.relative_position_bias_table is not None:
            bias = bias + full_bias(attn.relative_position_bias_table, attn.relative_position_index)
        if shared is not None:
            bias = bias + shared
        kept_bias = bias[:, rows, cols].transpose(0, 1)  # (B, heads, 1 + K, 1 + K)
        x = x + block.gamma_1 * manual_attention(attn, block.norm1(x), kept_bias)
        x = x + block.gamma_2 * block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x))


# ---------------------------------------------------------------------------------------- (a) the count law
@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.75])
def test_keeps_the_class_token_and_int_L_times_keep_patches(ratio):
    model = beit()
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("tokens", args[0]))
    images = torch.randn(3, 3, 32, 32)
    branch = build_sub_branch("mask", ratio, model=model)
    branch.setup(model)
    branch.forward(model, images)

    expected_keep = max(1, int(16 * (1 - ratio)))  # 16 = (32 / 8) ** 2 patches
    tokens, keep = seen["tokens"], branch.last_keep_indices
    assert tokens.shape == (3, 1 + expected_keep, 32) and keep.shape == (3, expected_keep)
    with torch.no_grad():
        full = embedded_tokens(model, images)
    torch.testing.assert_close(tokens[:, 0], full[:, 0], rtol=0, atol=0)  # the class token, always kept
    for b in range(3):
        assert len(set(keep[b].tolist())) == expected_keep  # distinct patches, drawn per sample
        torch.testing.assert_close(tokens[b, 1:], full[b, 1 + keep[b]], rtol=0, atol=0)
    assert branch.last_mask.shape == (3, 32, 32)
    assert int(branch.last_mask[0].sum()) == (16 - expected_keep) * 64
    assert len({tuple(k.sort().values.tolist()) for k in keep}) > 1  # independent per sample


def test_draws_are_uniform_per_sample():
    model = beit()
    branch = BeitTokenMaskSubBranch(0.5)
    branch.setup(model)
    counts = torch.zeros(16)
    with torch.no_grad():
        for _ in range(200):
            branch.forward(model, torch.randn(2, 3, 32, 32))
            counts += torch.bincount(branch.last_keep_indices.flatten(), minlength=16)
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.full((16,), 1 / 16), atol=0.02)  # 3200 draws: sd of a freq ~0.004


# ----------------------------------------------------------------------------- (b) against the reference
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_sub_branch_forward_equals_the_reference(variant, fused):
    model = beit(variant)
    for block in model.blocks:
        block.attn.fused_attn = fused  # SDPA with the bias as attn_mask, or timm's explicit softmax
    images = torch.randn(4, 3, 32, 32)
    branch = BeitTokenMaskSubBranch(0.5)
    branch.setup(model)
    sub = branch.forward(model, images)
    reference = beit_with_kept_tokens(model, images, branch.last_keep_indices)
    torch.testing.assert_close(sub, reference, rtol=1e-5, atol=1e-5)
    # The bias of the first 1 + K positions (no gather) gives other logits: the comparison can fail.
    keep = branch.last_keep_indices
    ungathered = torch.arange(1 + keep.shape[1]).expand(len(keep), -1)
    assert not torch.allclose(sub, beit_with_kept_tokens(model, images, keep, ungathered), atol=1e-3)
    # The main branch is timm's forward, switch installed or not.
    fresh = beit(variant)
    fresh.load_state_dict(model.state_dict())
    for block in fresh.blocks:
        block.attn.fused_attn = fused
    with torch.no_grad():
        torch.testing.assert_close(model(images), fresh(images), rtol=0, atol=0)


def test_the_gather_of_a_bias_picks_the_pairs_of_each_sample():
    bias = torch.randn(1, 3, 5, 5)
    index = torch.tensor([[0, 4, 2], [0, 1, 3]])
    out = beit_tokens.gather_pair_bias(bias, index)
    assert out.shape == (2, 3, 3, 3)
    for b, h, s, t in [(0, 0, 1, 2), (1, 2, 2, 0), (0, 1, 0, 1), (1, 0, 1, 1)]:
        assert out[b, h, s, t] == bias[0, h, index[b, s], index[b, t]]


# ------------------------------------------------------------------------------- (c) the applied gradient
@pytest.mark.parametrize("variant", ["v2", "shared"])
def test_masksub_step_applies_the_formula_gradient(variant):
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    module = MaskSubModule(
        "beitv2_base_patch16_224",
        num_classes=4,
        model_kwargs={**TINY_BEIT, **VARIANTS[variant]},
        sub_branch="mask",
        sub_ratio=0.5,
        optimizer="sgd",
        lr=0.1,
        weight_decay=0.0,
    )
    assert type(module.sub_branch) is BeitTokenMaskSubBranch
    with torch.no_grad():  # non-zero tables, so that their gradients are those of a real bias
        for name, p in module.model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0.0, 0.5)
    before, grads = run_one_step(module, images, labels)
    keep = module.sub_branch.last_keep_indices
    assert keep.shape == (6, 8)
    reference = reference_gradient(
        before.train(), images, labels, lambda m: beit_with_kept_tokens(m, images, keep)
    )
    assert_relative_error_below(grads, reference)
    tables = [k for k in reference if "relative_position_bias_table" in k]
    assert tables and all(reference[k].abs().sum() > 0 for k in tables)


# ------------------------------------------------------------------------------------- (d) the lifecycle
class _Boom(RuntimeError):
    pass


def _explode(*_):
    raise _Boom


def test_an_exception_inside_leaves_no_trace():
    model = beit("shared_and_own")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        clean = model(images)
    branch = BeitTokenMaskSubBranch(0.5)
    branch.setup(model)
    switch = beit_tokens.find_switch(model)
    handle = model.blocks[1].register_forward_hook(_explode)
    with pytest.raises(_Boom):
        branch.forward(model, images)
    handle.remove()
    assert switch.ratio is None and switch.token_index is None
    assert all("masksub_token_index" not in vars(b.attn) for b in model.blocks)
    with torch.no_grad():  # the main branch after the failed sub-branch: full tokens, timm's bias
        torch.testing.assert_close(model(images), clean, rtol=0, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_teardown_leaves_the_model_as_timm_built_it(variant):
    torch.manual_seed(0)
    model = beit(variant)
    fresh, names = structure(model), [(n, type(m)) for n, m in model.named_modules()]
    images = torch.randn(2, 3, 32, 32)
    branch = build_sub_branch("mask", 0.5, model=model)
    branch.setup(model)
    branch.setup(model)  # a second setup installs nothing twice
    assert len(model.pos_drop._forward_hooks) == 1
    assert {type(b.attn) for b in model.blocks} == (
        {beit_tokens.KeptTokenAttention} if variant != "shared" else {timm.models.beit.Attention}
    )
    assert list(model.state_dict()) == fresh[0]  # installed: the same state-dict keys
    branch.forward(model, images).sum().backward()
    branch.teardown(model)
    assert structure(model) == fresh and [(n, type(m)) for n, m in model.named_modules()] == names
    model.eval()
    reference = beit(variant).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)
    branch.teardown(model)  # teardown twice: nothing left to remove
    assert structure(model) == fresh


def test_refuses_to_run_before_setup_and_under_gradient_checkpointing():
    with pytest.raises(RuntimeError, match=r"BeitTokenMaskSubBranch is not set up on this model: call setup"):
        BeitTokenMaskSubBranch(0.5).forward(beit(), torch.randn(1, 3, 32, 32))
    model = beit()
    model.set_grad_checkpointing(True)
    with pytest.raises(UnsupportedModelError, match=r"gradient checkpointing recomputes the blocks"):
        BeitTokenMaskSubBranch(0.5).setup(model)
    model.set_grad_checkpointing(False)
    branch = BeitTokenMaskSubBranch(0.5)
    branch.setup(model)
    model.set_grad_checkpointing(True)
    with pytest.raises(RuntimeError, match=r"beit_token_mask: gradient checkpointing"):
        branch.forward(model, torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------------------------- (e) which kind, where
def test_mask_resolves_to_the_beit_kind_on_beit_models_only():
    for variant in VARIANTS:
        branch = build_sub_branch(
            "mask", 0.3, model=beit(variant), cell_size=16
        )  # cell_size accepted, unused
        assert (
            type(branch) is BeitTokenMaskSubBranch
            and branch.name == "beit_token_mask"
            and branch.ratio == 0.3
        )
    v1 = timm.create_model("beit_base_patch16_224", num_classes=4, **TINY_BEIT)
    assert type(build_sub_branch("mask", 0.5, model=v1)) is BeitTokenMaskSubBranch
    assert type(build_sub_branch("mask", 0.5, model=vit())) is TokenMaskSubBranch


def package_kinds_named(message):
    """The kinds an UnsupportedModelError lists, less those other test modules register (test_*)."""
    listed = message.split("Kinds that can handle this model: ")[1].split(", ")
    return [kind for kind in listed if not kind.startswith("test_")]


def test_the_vit_kind_on_a_beit_and_the_beit_kind_on_a_vit_are_refused_naming_the_kinds_that_can():
    with pytest.raises(UnsupportedModelError) as err:
        build_sub_branch("token_mask").setup(beit())
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        "sub-branch 'token_mask' cannot handle Beit: token masking"
    )
    assert package_kinds_named(message) == [
        "mask",
        "none",
        "pixel_mask",
        "beit_token_mask",
        "dropout",
        "droppath",
    ]
    with pytest.raises(UnsupportedModelError) as err:
        build_sub_branch("beit_token_mask").setup(vit())
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "sub-branch 'beit_token_mask' cannot handle VisionTransformer: beit_token_mask needs a timm BEiT model"
    )
    assert package_kinds_named(message) == ["mask", "none", "pixel_mask", "token_mask", "dropout", "droppath"]
