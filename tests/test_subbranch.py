"""Contract tests of the sub-branch strategies, on tiny real timm models."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY_RESNET, make_loader, quiet_trainer, tiny_vit_kwargs
from timm.layers import DropPath
from torch import nn

from masksub_lightning import MaskSubModule, masking
from masksub_lightning.method.subbranch import (
    SUB_BRANCHES,
    BeitTokenMaskSubBranch,
    DropoutSubBranch,
    DropPathSubBranch,
    MaskTokenSubBranch,
    NoSubBranch,
    PixelMaskSubBranch,
    SubBranch,
    SwitchableDropPath,
    SwitchablePatchDropout,
    TokenMaskSubBranch,
    UnsupportedModelError,
    build_sub_branch,
    register_sub_branch,
    sub_branch_names,
)


def vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", num_classes=4, **tiny_vit_kwargs(**kw)).train()


def beit():
    return timm.create_model("beitv2_base_patch16_224", num_classes=4, **tiny_vit_kwargs()).train()


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
        sub_branch_names()
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
    for taken in ("mask", "dropout"):  # a model-dependent name and a kind's name cannot be registered again
        with pytest.raises(ValueError, match=rf"{taken!r} is already registered"):
            register_sub_branch(taken)(type("Other", (SubBranch,), {}))
    assert SUB_BRANCHES["dropout"] is DropoutSubBranch and "mask" not in SUB_BRANCHES


# ---------------------------------------------------------------------------------------------- token mask
@pytest.mark.parametrize(("ratio", "reg_tokens"), [(0.5, 0), (0.3, 2), (0.75, 0)])
def test_token_mask_keeps_prefix_and_int_L_times_keep_patches(ratio, reg_tokens):
    model = vit(reg_tokens=reg_tokens)
    prefix = model.num_prefix_tokens
    assert prefix == 1 + reg_tokens
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("tokens", args[0]))
    images = torch.randn(3, 3, 32, 32)
    branch = build_sub_branch("mask", ratio, model=model)
    branch.setup(model)
    branch.forward(model, images)

    num_patches = 16  # (32 / 8) ** 2
    expected_keep = max(1, int(num_patches * (1 - ratio)))
    tokens = seen["tokens"]
    assert tokens.shape == (3, prefix + expected_keep, 32)
    with torch.no_grad():
        full = model._pos_embed(model.patch_embed(images))  # (B, prefix + L, D)
    torch.testing.assert_close(tokens[:, :prefix], full[:, :prefix], rtol=0, atol=0)
    keep = branch.last_keep_indices
    assert keep.shape == (3, expected_keep)
    for b in range(3):
        assert len(set(keep[b].tolist())) == expected_keep  # distinct patches, drawn per sample
        torch.testing.assert_close(tokens[b, prefix:], full[b, prefix + keep[b]], rtol=0, atol=0)
    # pixel view for visualisation: exactly the dropped patches
    assert branch.last_mask.shape == (3, 32, 32)
    assert int(branch.last_mask[0].sum()) == (num_patches - expected_keep) * 64


def test_token_draws_are_uniform_per_sample():
    model = vit()
    branch = TokenMaskSubBranch(0.5)
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
    branch = TokenMaskSubBranch(0.5)
    branch.setup(model)
    switch = model.patch_drop
    assert (
        isinstance(switch, SwitchablePatchDropout) and switch.prob == 0.1
    )  # the model's own rate, main branch
    model.blocks[1].register_forward_hook(_explode)
    with pytest.raises(_Boom):
        branch.forward(model, torch.randn(2, 3, 32, 32))
    assert model.patch_drop is switch and switch.prob == 0.1
    branch.teardown(model)
    assert model.patch_drop is original and original.prob == 0.1


def test_eva_style_models_get_indices():
    model = timm.create_model("eva02_tiny_patch14_224", num_classes=4, img_size=28, depth=1).train()
    assert model.patch_drop is None
    branch = build_sub_branch("mask", 0.5, model=model)
    branch.setup(model)
    assert branch.forward(model, torch.randn(2, 3, 28, 28)).shape == (2, 4)
    assert branch.last_keep_indices.shape == (2, 2)  # int(4 * 0.5)
    assert model.patch_drop.prob == 0.0 and model.patch_drop.return_indices
    branch.teardown(model)
    assert model.patch_drop is None


# ---------------------------------------------------------------------------------------------- pixel mask
def test_pixel_mask_zeroes_round_G_r_whole_cells_per_sample():
    images = torch.randn(4, 3, 64, 48) + 5.0  # no pixel is zero by chance
    branch = PixelMaskSubBranch(0.5, cell_size=16)
    with branch.perturbed(resnet(), images) as masked:
        pass
    mask = branch.last_mask
    assert mask.shape == (4, 64, 48) and mask.dtype == torch.bool
    assert torch.equal(masked == 0, mask.unsqueeze(1).expand_as(masked))  # True = masked = zeroed
    cells = mask.view(4, 4, 16, 3, 16).permute(0, 1, 3, 2, 4).reshape(4, 12, 256)
    assert torch.all(cells.all(-1) | ~cells.any(-1))  # each cell is all masked or all kept
    assert cells.all(-1).sum(-1).tolist() == [6, 6, 6, 6]  # round(12 * 0.5)
    assert not torch.equal(mask[0], mask[1])  # independent per sample


def test_rounding_of_the_masked_cell_count():
    assert masking.grid_shape((224, 224), 32) == (7, 7)
    assert masking.num_masked_cells(49, 0.5) == 25  # 24.5 rounds half up
    assert masking.tiling_cell_size((224, 224), 32) == 32  # the paper's 7 x 7 grid


def _per_sample_fraction(branch, model, size, batch=8):
    images = torch.randn(batch, 3, *size) + 5.0  # no pixel is zero by chance
    with branch.perturbed(model, images) as masked:
        pass
    zeroed = (masked == 0).all(1)  # (B, H, W)
    assert torch.equal(zeroed, branch.last_mask)
    return zeroed.flatten(1).float().mean(1)


@pytest.mark.parametrize(
    ("size", "cell_size", "ratio", "cell", "fraction"),
    [
        ((32, 32), 32, 0.5, 16, 0.5),  # CIFAR at native size: 2 x 2 cells of 16 px, not one cell masked whole
        ((40, 40), 32, 0.25, 20, 0.25),  # 2 x 2 cells of 20 px, not partial 32 px cells
        ((64, 48), 32, 0.5, 16, 0.5),  # 32 does not divide 48: 4 x 3 cells of 16 px
        ((224, 224), 32, 0.5, 32, 25 / 49),
    ],
)
def test_pixel_cells_tile_the_image_so_every_sample_gets_the_ratio(size, cell_size, ratio, cell, fraction):
    branch = PixelMaskSubBranch(ratio, cell_size=cell_size)
    fractions = _per_sample_fraction(branch, nn.Identity(), size)
    assert branch.last_cell_size == cell
    torch.testing.assert_close(fractions, torch.full_like(fractions, fraction))


def test_cell_sizes_that_cannot_keep_the_ratio_are_rejected_with_the_sizes_that_fit():
    branch = PixelMaskSubBranch(0.5, cell_size=32)
    branch.setup(resnet())  # a CNN takes any size: checked at the first call
    with pytest.raises(
        ValueError, match=r"cell_size=32 cannot mask 227x227 images.*tile.*at least 4.*: none"
    ):
        branch.forward(nn.Identity(), torch.randn(1, 3, 227, 227))
    with pytest.raises(
        ValueError, match=r"cell_size=32 cannot mask 28x28 images.*at least half.*\[14, 7, 4, 2\]"
    ):
        branch.forward(nn.Identity(), torch.randn(1, 3, 28, 28))
    # A model that takes one size only (strict patch embedding): rejected at setup, before any step.
    with pytest.raises(ValueError, match=r"cannot mask 28x28 images"):
        build_sub_branch("pixel_mask", 0.5, cell_size=32).setup(vit(img_size=28, patch_size=7))
    build_sub_branch("pixel_mask", 0.5, cell_size=14).setup(vit(img_size=28, patch_size=7))
    with pytest.raises(ValueError, match=r"cell_size must be a positive int"):
        build_sub_branch("mask", 0.5, model=vit(), cell_size=0)  # checked even where it is not used


def test_the_image_size_is_checked_before_any_batch():
    with pytest.raises(
        ValueError,
        match=r"^pixel_mask: cell_size=32 cannot mask 28x28 images at ratio 0.5: .*"
        r"\[14, 7, 4, 2\]; set sub_branch_kwargs.cell_size to one of them",
    ):
        PixelMaskSubBranch(0.5, cell_size=32).check_image_size(28)
    PixelMaskSubBranch(0.5, cell_size=14).check_image_size(28)  # one of the sizes named: accepted
    with pytest.raises(
        ValueError, match=r"cell_size=32 cannot mask 52x52 images \(13x13 tokens at stride 4\)"
    ):
        MaskTokenSubBranch(0.5, cell_size=32).check_image_size((52, 52), swin())
    for kind in ("token_mask", "dropout", "none"):  # no cells: any size
        build_sub_branch(kind, 0.5).check_image_size(37, vit())


def test_mask_token_regions_follow_the_same_rule():
    model = swin()  # 64 px, stride 4: 16 x 16 tokens
    wide = MaskTokenSubBranch(0.5, cell_size=64)  # one 16-token region would cover the image: 8-token ones
    wide.setup(model)
    assert wide.region_for((64, 64), 4) == 8
    with torch.no_grad():
        wide.forward(model, torch.randn(3, 3, 64, 64))
    assert wide.last_mask.flatten(1).float().mean(1).tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(
        ValueError, match=r"cell_size=128 cannot mask 64x64 images \(16x16 tokens at stride 4\)"
    ):
        MaskTokenSubBranch(0.5, cell_size=128).setup(swin())  # strict patch embedding: at setup
    with pytest.raises(
        ValueError, match=r"52x52 images \(13x13 tokens.*Cell sizes that tile 52x52 into >= 4 cells: none"
    ):
        MaskTokenSubBranch(0.5, cell_size=32).region_for((52, 52), 4)


def test_mask_resolves_to_the_concrete_kind_for_the_model():
    assert type(build_sub_branch("mask", 0.5, model=vit())) is TokenMaskSubBranch
    eva = timm.create_model("eva02_tiny_patch14_224", num_classes=4, img_size=28, depth=1)
    assert type(build_sub_branch("mask", 0.5, model=eva)) is TokenMaskSubBranch
    cnn = build_sub_branch("mask", 0.3, model=resnet(), cell_size=16)
    assert type(cnn) is PixelMaskSubBranch and (cnn.ratio, cnn.cell_size, cnn.name) == (0.3, 16, "pixel_mask")
    assert type(build_sub_branch("mask", 0.5, model=swin())) is PixelMaskSubBranch
    on_vit = build_sub_branch("mask", 0.5, model=vit(), cell_size=16)  # the option is accepted, and unused
    assert type(on_vit) is TokenMaskSubBranch and on_vit.name == "token_mask"
    with pytest.raises(ValueError, match=r"'mask' picks its kind from the model: pass model="):
        build_sub_branch("mask", 0.5)


@pytest.mark.parametrize(
    ("name", "cls", "make"),
    [
        ("token_mask", TokenMaskSubBranch, vit),
        ("beit_token_mask", BeitTokenMaskSubBranch, beit),
        ("pixel_mask", PixelMaskSubBranch, resnet),
        ("mask_token", MaskTokenSubBranch, swin),
        ("dropout", DropoutSubBranch, vit),
        ("droppath", DropPathSubBranch, resnet),
        ("none", NoSubBranch, resnet),
    ],
)
def test_yaml_names_build_their_classes(name, cls, make):
    assert SUB_BRANCHES[name] is cls and cls.__name__.endswith("SubBranch")
    model = make()
    branch = build_sub_branch(name, 0.25, model=model)
    assert type(branch) is cls and branch.name == name and branch.ratio == 0.25
    branch.setup(model)
    branch.teardown(model)


# ---------------------------------------------------------------------------------------------- mask token
def test_mask_token_replaces_regions_after_patch_embedding():
    model = swin()
    branch = MaskTokenSubBranch(0.5, cell_size=16)  # 4 x 4 tokens at stride 4
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
    branch = DropoutSubBranch(0.3)
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
        DropoutSubBranch(0.4).forward(model, torch.randn(2, 3, 32, 32))
    assert _rates(model) == before


@pytest.mark.parametrize("make", [vit, resnet], ids=["vit", "resnet"])
def test_droppath_makes_identity_slots_switchable_and_restores(make):
    model = make() if make is resnet else make(drop_path_rate=0.1)
    state_keys = set(model.state_dict())
    branch = DropPathSubBranch(0.25)
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
        DropPathSubBranch(0.5).setup(model)
        after = model(images)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ lifecycle
def structure(model):
    """Everything setup may change: state-dict keys, modules (type, slots, None attributes) and hooks."""
    return (
        list(model.state_dict()),
        [
            (
                name,
                type(module).__name__,
                list(module._modules),
                sorted(k for k, v in vars(module).items() if v is None and not k.startswith("_")),
                len(module._forward_hooks),
                len(module._forward_pre_hooks),
            )
            for name, module in model.named_modules()
        ],
    )


def eva():
    return timm.create_model("eva02_tiny_patch14_224", num_classes=4, img_size=28, depth=1).train()


@pytest.mark.parametrize(
    ("name", "make", "size"),
    [
        ("token_mask", vit, 32),
        ("token_mask", lambda: vit(patch_drop_rate=0.1), 32),
        ("token_mask", eva, 28),  # patch_drop None, indices returned
        ("beit_token_mask", beit, 32),  # hooks on pos_drop, attentions' class swapped and back
        ("mask_token", swin, 64),
        ("droppath", lambda: vit(drop_path_rate=0.1), 32),  # DropPath slots kept, Identity ones swapped back
        ("droppath", resnet, 32),  # drop_path None in timm's ResNet blocks
        ("droppath", swin, 64),
        ("dropout", lambda: vit(proj_drop_rate=0.1), 32),
        ("pixel_mask", resnet, 32),
    ],
)
def test_teardown_leaves_the_model_as_timm_built_it(name, make, size):
    torch.manual_seed(0)
    model = make()
    fresh = structure(model)
    images = torch.randn(2, 3, size, size)
    branch = build_sub_branch(name, 0.5, model=model)
    branch.setup(model)
    branch.setup(model)  # a second setup installs nothing twice
    with torch.no_grad():
        sub = branch.forward(model, images)
        assert sub.shape == (2, 4)
    branch.teardown(model)
    assert structure(model) == fresh
    model.eval()  # same outputs as a model that never had the sub-branch, given the same state (BN statistics)
    reference = make().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)
    branch.teardown(model)  # teardown twice: nothing left to remove
    assert structure(model) == fresh


def test_droppath_teardown_swaps_back_only_the_slots_it_replaced():
    model = vit(drop_path_rate=0.1)  # block 0: Identity (rate 0), block 1: DropPath(0.1)
    kept = model.blocks[1].drop_path1
    identity = model.blocks[0].drop_path1
    assert isinstance(identity, nn.Identity) and type(kept) is DropPath
    rate = kept.drop_prob
    branch = DropPathSubBranch(0.3)
    branch.setup(model)
    assert isinstance(model.blocks[0].drop_path1, SwitchableDropPath) and model.blocks[1].drop_path1 is kept
    branch.teardown(model)
    assert model.blocks[0].drop_path1 is identity and model.blocks[1].drop_path1 is kept
    assert kept.drop_prob == rate and rate > 0


def test_kinds_with_a_switch_refuse_to_run_before_setup():
    with pytest.raises(RuntimeError, match=r"TokenMaskSubBranch is not set up on this model: call setup"):
        TokenMaskSubBranch(0.5).forward(vit(), torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match=r"MaskTokenSubBranch is not set up"):
        MaskTokenSubBranch(0.5).forward(swin(), torch.randn(1, 3, 64, 64))


def _fit(module, steps, size):
    trainer = quiet_trainer(max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, make_loader(n=8 * steps, batch_size=8, size=size))
    assert trainer.global_step == steps and torch.isfinite(trainer.callback_metrics["train_loss_sub"])
    optimizer = trainer.optimizers[0]
    # The optimizer holds exactly the model's current parameters (no torn-down mask token).
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.model.parameters()}
    after = module.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


def test_a_module_switches_kinds_and_ends_as_clean_as_a_fresh_one():
    swin_kwargs = dict(img_size=64, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
    module = MaskSubModule(
        "swin_tiny_patch4_window7_224", num_classes=4, model_kwargs=swin_kwargs, sub_branch="mask_token"
    )
    fresh = structure(timm.create_model("swin_tiny_patch4_window7_224", num_classes=4, **swin_kwargs))
    embed = module.model.patch_embed
    assert len(embed._forward_hooks) == 1 and "masksub_mask_token" in dict(embed.named_parameters())
    _fit(module, 2, 64)
    assert module.sub_branch.last_mask.float().mean().item() == 0.5

    module.set_sub_branch("droppath", 0.2)
    assert not embed._forward_hooks and not hasattr(embed, "masksub_mask_token")
    assert module.hparams.sub_branch == "droppath" and module.hparams.sub_ratio == 0.2
    _fit(module, 2, 64)

    module.set_sub_branch("mask", cell_size=16)  # a Swin has no patch_drop: pixel cells
    assert type(module.sub_branch) is PixelMaskSubBranch and module.sub_branch.ratio == 0.2
    assert not any(isinstance(m, SwitchableDropPath) for m in module.model.modules())
    _fit(module, 2, 64)
    assert module.sub_branch.last_cell_size == 16
    module.sub_branch.teardown(module.model)
    assert structure(module.model) == fresh


def test_a_vit_module_switches_from_token_mask_to_droppath():
    module = MaskSubModule("vit_tiny_patch16_224", num_classes=4, model_kwargs=tiny_vit_kwargs())
    fresh = structure(timm.create_model("vit_tiny_patch16_224", num_classes=4, **tiny_vit_kwargs()))
    assert isinstance(module.model.patch_drop, SwitchablePatchDropout)
    _fit(module, 2, 32)
    assert module.sub_branch.last_keep_indices.shape == (8, 8)
    with pytest.raises(UnsupportedModelError, match=r"NHWC"):
        module.set_sub_branch("mask_token")
    assert type(module.sub_branch) is TokenMaskSubBranch  # a failed switch leaves the kind set up
    assert isinstance(module.model.patch_drop, SwitchablePatchDropout)
    module.set_sub_branch("droppath", 0.1)
    assert type(module.model.patch_drop) is nn.Identity
    _fit(module, 2, 32)
    module.set_sub_branch("none")
    assert structure(module.model) == fresh
