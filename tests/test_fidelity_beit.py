"""Recipe fidelity of configs/beitv2/: the objects the BEiT v2 fine-tuning recipe builds are microsoft/unilm's.

As in tests/test_fidelity.py (whose helpers this reuses): the recipe is resolved through `masksub fit` on a shrunken
BEiT v2 with fake ImageNet data and the fake unilm pre-training checkpoint of tests/test_recipes.py, one optimizer
step runs, and the built optimizer, schedule, model, Mixup and transforms are checked against the values of
docs/recipes.md "BEiT v2 fine-tuning", written out here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
from lightning.pytorch.callbacks import WeightAveraging
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torch import nn
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).parent))
from test_fidelity import (
    blocks_drop_path,
    build,
    cosine,
    eval_resize,
    group_of,
    groups,
    schedule,
    steps_per_epoch,
)
from test_recipes import make_fake, make_parser, resolve

from masksub_lightning import MaskSubModule
from masksub_lightning.method.subbranch import BeitTokenMaskSubBranch

RECIPE = "beitv2/vit_base.yaml"


@pytest.fixture(scope="module")
def parser():
    return make_parser()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake(tmp_path_factory.mktemp("fidelity_beit"))


@pytest.fixture(scope="module")
def cli(parser, fake, tmp_path_factory):
    return build(parser, fake, tmp_path_factory.mktemp("beit_run"), RECIPE)


def test_model_head_and_pretrained_weights(cli, fake):
    model, module = cli.model.model, cli.model
    assert isinstance(model, timm.models.beit.Beit) and model.pos_embed is None
    assert type(module.sub_branch) is BeitTokenMaskSubBranch and module.sub_branch.ratio == 0.5
    # The unilm checkpoint's shared table is in every block (one step at lr ~1e-6 later), pre-training parts out.
    shared = fake.beit_encoder["rel_pos_bias.relative_position_bias_table"]
    for block in model.blocks:
        assert torch.allclose(block.attn.relative_position_bias_table, shared, atol=1e-5)
    assert torch.allclose(
        model.blocks[1].attn.qkv.weight, fake.beit_encoder["blocks.1.attn.qkv.weight"], atol=1e-5
    )
    # Mean pooling + a fresh fc_norm (the checkpoint's final norm is not loaded), no norm before pooling.
    assert model.global_pool == "avg" and isinstance(model.norm, nn.Identity)
    assert torch.allclose(model.fc_norm.weight, torch.ones_like(model.fc_norm.weight), atol=1e-5)
    assert torch.allclose(model.fc_norm.bias, torch.zeros_like(model.fc_norm.bias), atol=1e-5)
    # Head: trunc-normal std 0.02 scaled by 0.001 (weight and zero bias), timm's BEiT init (head_init_scale).
    assert module.hparams.head_init_std is None and model.head_init_scale == 0.001
    std = model.head.weight.std().item()
    assert 1.5e-5 < std < 2.5e-5, std
    assert model.head.bias.abs().max() < 1e-5
    # Layer scale 0.1 (not timm's beitv2 default 1e-5) in a model built from the recipe's kwargs before loading.
    built = timm.create_model(module.hparams.model, num_classes=4, **module.hparams.model_kwargs)
    assert torch.equal(built.blocks[0].gamma_1, torch.full_like(built.blocks[0].gamma_1, 0.1))
    # Drop-path 0.2 ramped linearly from 0 (unilm: torch.linspace(0, drop_path, depth)).
    rates = blocks_drop_path(model)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)


def test_optimizer_groups_decay_the_relative_position_tables(cli):
    model, module = cli.model.model, cli.model
    assert type(module.optimizers().optimizer).__name__ == "AdamW"
    assert all(g["eps"] == 1e-8 and tuple(g["betas"]) == (0.9, 0.999) for g in groups(cli))
    # unilm's skip list is the model's {pos_embed, cls_token} plus every 1-D parameter and bias: the tables decay.
    for block in model.blocks:
        assert group_of(cli, block.attn.relative_position_bias_table)["weight_decay"] == pytest.approx(0.05)
    assert group_of(cli, model.blocks[0].attn.qkv.weight)["weight_decay"] == pytest.approx(0.05)
    assert group_of(cli, model.patch_embed.proj.weight)["weight_decay"] == pytest.approx(0.05)
    for param in (
        model.cls_token,
        model.blocks[0].attn.q_bias,
        model.blocks[0].gamma_1,
        model.fc_norm.weight,
    ):
        assert group_of(cli, param)["weight_decay"] == 0.0
    # Layer decay 0.6 ** (depth + 1 - layer): stem 0, block i at i + 1, fc_norm and head at depth + 1.
    depth = len(model.blocks)
    for param, layer in [
        (model.patch_embed.proj.weight, 0),
        (model.cls_token, 0),
        (model.blocks[0].attn.relative_position_bias_table, 1),
        (model.blocks[depth - 1].mlp.fc1.weight, depth),
        (model.fc_norm.weight, depth + 1),
        (model.head.weight, depth + 1),
    ]:
        assert group_of(cli, param).get("lr_scale", 1.0) == pytest.approx(0.6 ** (depth + 1 - layer)), layer


def test_schedule_precision_and_no_clipping_or_ema(parser, cli):
    module = cli.model
    # lr 5e-4 as given (not scaled by the batch), 20 warmup epochs from 1e-6, cosine per step to 1e-6 at 100 epochs.
    assert module.hparams.lr_base_batch_size is None and module.hparams.lr_interval == "step"
    per_epoch = steps_per_epoch(cli)
    warmup_end, total = 20 * per_epoch, 100 * per_epoch
    assert schedule(cli, 0) == pytest.approx(1e-6)
    assert schedule(cli, warmup_end) == pytest.approx(cosine(5e-4, 1e-6, warmup_end, total), rel=1e-9)
    assert schedule(cli, total) == pytest.approx(1e-6, rel=1e-9)
    assert module.hparams.grad_clip_norm is None
    assert not [cb for cb in cli.trainer.callbacks if isinstance(cb, WeightAveraging)]
    trainer = resolve(parser, RECIPE)["trainer"]  # the run above is on the CPU in fp32; the recipe's own:
    assert trainer["precision"] == "16-mixed" and trainer["devices"] * trainer["num_nodes"] == 8


def test_mixup_and_transforms(cli):
    data = cli.datamodule
    mixup = data._mixup  # built at the first training batch
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob) == (0.8, 1.0, 1.0, 0.5)
    assert mixup.mode == "batch" and mixup.label_smoothing == 0.1
    assert (
        cli.model.criterion.kind == "ce" and cli.model.hparams.label_smoothing == 0.0
    )  # smoothing in the targets
    ops = list(data.build_transform(train=True).transforms)
    flat = [t for stage in ops for t in getattr(stage, "transforms", [stage])]
    crop = next(t for t in flat if type(t).__name__ == "RandomResizedCropAndInterpolation")
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert next(t for t in flat if isinstance(t, T.RandomHorizontalFlip)).p == 0.5
    rand = next(t for t in flat if isinstance(t, RandAugment))
    assert rand.num_layers == 2 and {op.magnitude for op in rand.ops} == {9}
    assert {op.magnitude_std for op in rand.ops} == {0.5}
    assert "PosterizeIncreasing" in {op.name for op in rand.ops}  # the "inc1" (increasing) op set
    assert not any(
        isinstance(t, T.ColorJitter) for t in flat
    )  # colour jitter 0.4 is unused under RandAugment
    erasing = next(t for t in flat if isinstance(t, RandomErasing))
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)  # ImageNet default
    # Eval: resize img_size / 0.875 (256 at 224), center crop, bicubic.
    assert eval_resize(cli) == int(data.img_size / 0.875)


def test_a_no_weight_decay_name_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match=r"no_weight_decay entries \['pos_embed'\] match no parameter"):
        MaskSubModule(
            "beitv2_base_patch16_224",
            num_classes=4,
            model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2),
            no_weight_decay=["cls_token", "pos_embed"],  # BEiT v2 has no absolute position embedding
        )
    with pytest.raises(ValueError, match=r"no_weight_decay must be a list of parameter names"):
        MaskSubModule("resnet18", num_classes=4, no_weight_decay="cls_token")
