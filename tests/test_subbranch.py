"""Contract tests of the sub-branch strategies, on tiny real timm models."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY_RESNET, tiny_vit_kwargs
from timm.layers import DropPath
from torch import nn

from masksub_lightning import masking
from masksub_lightning.subbranch import (
    SUB_BRANCHES,
    Dropout,
    DropPathSub,
    Mask,
    MaskToken,
    PixelMask,
    SubBranch,
    TokenMask,
    UnsupportedModelError,
    build_sub_branch,
    register_sub_branch,
)


def vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", num_classes=4, **tiny_vit_kwargs(**kw)).train()


def resnet():
    return timm.create_model("resnet18", num_classes=4, **TINY_RESNET).train()


def swin():
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=4,
        img_size=64,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        window_size=4,
    ).train()


class _Boom(RuntimeError):
    pass


def _explode(*_):
    raise _Boom


# ------------------------------------------------------------------------------------------------ registry
def test_known_kinds_are_registered():
    assert {"mask", "token_mask", "pixel_mask", "mask_token", "dropout", "droppath", "none"} <= set(
        SUB_BRANCHES
    )


def test_unknown_kind_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown sub-branch 'masking'.*droppath.*mask.*none"):
        build_sub_branch("masking")


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, "0.5"])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        build_sub_branch("mask", ratio)


def test_model_the_kind_cannot_handle_says_which_kinds_can():
    with pytest.raises(
        UnsupportedModelError, match=r"'dropout' cannot handle ResNet.*no dropout.*can handle.*droppath"
    ):
        build_sub_branch("dropout", 0.2).setup(resnet())
    with pytest.raises(UnsupportedModelError, match=r"token masking needs a ViT"):
        build_sub_branch("token_mask").setup(resnet())
    with pytest.raises(UnsupportedModelError, match=r"NHWC"):
        build_sub_branch("mask_token").setup(vit())


def test_a_new_kind_is_a_small_registered_class():
    @register_sub_branch("test_flip")
    class Flip(SubBranch):
        def forward(self, model, images):
            return model(images.flip(-1))

    try:
        branch = build_sub_branch("test_flip", 0.1)
        assert isinstance(branch, Flip) and branch.name == "test_flip" and branch.ratio == 0.1
    finally:
        SUB_BRANCHES.pop("test_flip")


# ---------------------------------------------------------------------------------------------- token mask
@pytest.mark.parametrize(("ratio", "reg_tokens"), [(0.5, 0), (0.3, 2), (0.75, 0)])
def test_token_mask_keeps_prefix_and_int_L_times_keep_patches(ratio, reg_tokens):
    model = vit(reg_tokens=reg_tokens)
    prefix = model.num_prefix_tokens
    assert prefix == 1 + reg_tokens
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("tokens", args[0]))
    images = torch.randn(3, 3, 32, 32)
    branch = build_sub_branch("mask", ratio)
    branch.setup(model)
    branch.forward(model, images)

    num_patches = 16  # (32 / 8) ** 2
    expected_keep = max(1, int(num_patches * (1 - ratio)))
    tokens = seen["tokens"]
    assert tokens.shape == (3, prefix + expected_keep, 32)
    with torch.no_grad():
        full = model._pos_embed(model.patch_embed(images))  # (B, prefix + L, D)
    torch.testing.assert_close(tokens[:, :prefix], full[:, :prefix], rtol=0, atol=0)
    keep = branch._impl.last_keep_indices
    assert keep.shape == (3, expected_keep)
    for b in range(3):
        assert len(set(keep[b].tolist())) == expected_keep  # distinct patches, drawn per sample
        torch.testing.assert_close(tokens[b, prefix:], full[b, prefix + keep[b]], rtol=0, atol=0)
    # pixel view for visualisation: exactly the dropped patches
    assert branch.last_mask.shape == (3, 32, 32)
    assert int(branch.last_mask[0].sum()) == (num_patches - expected_keep) * 64


def test_token_draws_are_uniform_per_sample():
    model = vit()
    branch = TokenMask(0.5)
    branch.setup(model)
    counts = torch.zeros(16)
    for _ in range(200):
        branch.forward(model, torch.randn(2, 3, 32, 32))
        counts += torch.bincount(branch.last_keep_indices.flatten(), minlength=16)
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.full((16,), 1 / 16), atol=0.02)  # 3200 draws: sd of a freq ~0.004


def test_token_mask_restores_patch_drop_even_after_an_exception():
    model = vit(patch_drop_rate=0.1)
    original = model.patch_drop
    branch = TokenMask(0.5)
    model.blocks[1].register_forward_hook(_explode)
    with pytest.raises(_Boom):
        branch.forward(model, torch.randn(2, 3, 32, 32))
    assert model.patch_drop is original and original.prob == 0.1


def test_eva_style_models_get_indices():
    model = timm.create_model("eva02_tiny_patch14_224", num_classes=4, img_size=28, depth=1).train()
    assert model.patch_drop is None
    branch = build_sub_branch("mask", 0.5)
    branch.setup(model)
    assert branch.forward(model, torch.randn(2, 3, 28, 28)).shape == (2, 4)
    assert branch._impl.last_keep_indices.shape == (2, 2)  # int(4 * 0.5)
    assert model.patch_drop is None


# ---------------------------------------------------------------------------------------------- pixel mask
def test_pixel_mask_zeroes_round_G_r_whole_cells_per_sample():
    images = torch.randn(4, 3, 64, 48) + 5.0  # no pixel is zero by chance
    branch = PixelMask(0.5, cell_size=16)
    with branch.perturbed(resnet(), images) as masked:
        pass
    mask = branch.last_mask
    assert mask.shape == (4, 64, 48) and mask.dtype == torch.bool
    assert torch.equal(masked == 0, mask.unsqueeze(1).expand_as(masked))  # True = masked = zeroed
    cells = mask.view(4, 4, 16, 3, 16).permute(0, 1, 3, 2, 4).reshape(4, 12, 256)
    assert torch.all(cells.all(-1) | ~cells.any(-1))  # each cell is all masked or all kept
    assert cells.all(-1).sum(-1).tolist() == [6, 6, 6, 6]  # round(12 * 0.5)
    assert not torch.equal(mask[0], mask[1])  # independent per sample


def test_partial_cells_and_rounding():
    assert masking.grid_shape((224, 224), 32) == (7, 7)
    assert masking.num_masked_cells(49, 0.5) == 25  # 24.5 rounds half up
    assert masking.grid_shape((40, 40), 32) == (2, 2)
    images = torch.ones(2, 3, 40, 40)
    branch = PixelMask(0.25, cell_size=32)
    with branch.perturbed(resnet(), images) as masked:
        pass
    assert branch.last_mask.shape == (2, 40, 40)
    assert (masked == 0).any()


def test_mask_picks_token_drop_for_vit_and_pixels_otherwise():
    branch_vit, branch_cnn, branch_swin = Mask(0.5), Mask(0.5), Mask(0.5)
    branch_vit.setup(vit())
    branch_cnn.setup(resnet())
    branch_swin.setup(swin())
    assert isinstance(branch_vit._impl, TokenMask)
    assert isinstance(branch_cnn._impl, PixelMask)
    assert isinstance(branch_swin._impl, PixelMask)


# ---------------------------------------------------------------------------------------------- mask token
def test_mask_token_replaces_regions_after_patch_embedding():
    model = swin()
    branch = MaskToken(0.5, cell_size=16)  # 4 x 4 tokens at stride 4
    branch.setup(model)
    token = model.patch_embed.masksub_mask_token
    assert token.shape == (16,) and token.requires_grad
    images = torch.randn(2, 3, 64, 64)
    out = {}
    model.patch_embed.register_forward_hook(lambda m, a, o: out.__setitem__("tokens", o), prepend=False)
    with torch.no_grad():
        clean = model.patch_embed(images)
        with branch.perturbed(model, images) as x:
            model(x)
    tokens = out["tokens"]  # after our replacement hook
    token_mask = branch.last_mask[:, ::4, ::4]  # (B, 16, 16)
    assert token_mask.sum().item() == 2 * 8 * 16  # 8 of 16 regions, 16 tokens each
    torch.testing.assert_close(tokens[token_mask], token.detach().expand(int(token_mask.sum()), 16))
    torch.testing.assert_close(tokens[~token_mask], clean[~token_mask])
    with torch.no_grad():  # main branch untouched afterwards
        torch.testing.assert_close(model.patch_embed(images), clean)


# ------------------------------------------------------------------------------------------ dropout/droppath
def _rates(model):
    return [(n, m.p) for n, m in model.named_modules() if isinstance(m, nn.Dropout)], [
        (n, m.drop_prob) for n, m in model.named_modules() if isinstance(m, DropPath)
    ]


def test_dropout_sets_block_dropouts_only_and_restores_them_exactly():
    model = vit(drop_rate=0.1, proj_drop_rate=0.05, attn_drop_rate=0.02, pos_drop_rate=0.03)
    before = _rates(model)
    branch = Dropout(0.3)
    branch.setup(model)
    during = {}
    model.blocks[1].register_forward_hook(lambda *_: during.update(_rates(model)[0]))
    branch.forward(model, torch.randn(2, 3, 32, 32))
    block_rates = {n: p for n, p in during.items() if n.startswith("blocks.")}
    assert block_rates and set(block_rates.values()) == {0.3}
    assert during["pos_drop"] == 0.03 and during["head_drop"] == 0.1  # outside the blocks: untouched
    assert _rates(model) == before


def test_dropout_restores_after_an_exception():
    model = vit(proj_drop_rate=0.05)
    before = _rates(model)
    model.blocks[0].register_forward_hook(_explode)
    with pytest.raises(_Boom):
        Dropout(0.4).forward(model, torch.randn(2, 3, 32, 32))
    assert _rates(model) == before


@pytest.mark.parametrize("make", [vit, resnet], ids=["vit", "resnet"])
def test_droppath_makes_identity_slots_switchable_and_restores(make):
    model = make() if make is resnet else make(drop_path_rate=0.1)
    state_keys = set(model.state_dict())
    branch = DropPathSub(0.25)
    branch.setup(model)
    assert set(model.state_dict()) == state_keys  # no new weights
    layers = [m for m in model.modules() if isinstance(m, DropPath)]
    assert len(layers) == 4  # 2 ViT blocks x 2 paths, or 4 ResNet blocks
    before = _rates(model)[1]
    seen = []
    last = model.blocks[-1] if make is vit else model.layer4
    last.register_forward_hook(lambda *_: seen.append([m.drop_prob for m in layers]))
    branch.forward(model, torch.randn(2, 3, 32, 32))
    assert seen == [[0.25] * len(layers)]
    assert _rates(model)[1] == before
    last.register_forward_hook(_explode)
    with pytest.raises(_Boom):
        branch.forward(model, torch.randn(2, 3, 32, 32))
    assert _rates(model)[1] == before


def test_droppath_with_rate_zero_keeps_the_main_branch_output():
    model = vit()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
        DropPathSub(0.5).setup(model)
        after = model(images)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
