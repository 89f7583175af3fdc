"""Recipe fidelity: each recipe family, resolved through `masksub fit` and built, has the authors' training.

`tests/test_recipes.py` checks the YAML; these tests check the objects the YAML builds (on a shrunken member of the
model family, with fake data in the real format): per-block drop-path rates, LayerScale init, the optimizer class
and every param group's lr / weight decay / eps, the LR schedule at chosen steps, the head and pooling-norm
initialisation after loading pre-trained weights, frozen parameters, the eval crop and the BCE threshold. Expected
values are the authors' settings as docs/recipes.md lists them, written out here, not read back from the YAML.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from timm.layers import DropPath
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from test_recipes import (
    CONFIGS,
    CPU_RUN,
    FAKE_DATA,
    make_fake,
    make_parser,
    resolve,
    shrink,
    weights_format,
)

from masksub_lightning.commands.cli import build_cli
from masksub_lightning.models.efficient_drop_path import EfficientDropPathBlock
from masksub_lightning.models.network import drop_path_rates

STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def parser():
    return make_parser()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake(tmp_path_factory.mktemp("fidelity"))


class _StopAfterFirstStep(L.Callback):
    """Stop after one optimizer step, so the schedule is built for the recipe's whole run but only one step runs."""

    def on_train_batch_end(self, trainer, *args: Any) -> None:
        if trainer.global_step >= 1:
            trainer.should_stop = True


def build(parser, fake, tmp_path, recipe: str, *extra: str):
    """Resolve `recipe` through the CLI on CPU and fake data, run one optimizer step, return the CLI object."""
    cfg = resolve(parser, recipe)
    model_cfg, data_cfg = cfg["model"]["init_args"], cfg["data"]["init_args"]
    module = cfg["data"]["class_path"].rsplit(".", 1)[-1]
    kwargs, size = shrink(model_cfg["model"])
    accumulation = model_cfg.get("grad_accumulation", 1)
    run = [a for a in CPU_RUN if not a.startswith(("--trainer.max_steps", "--trainer.limit_train_batches"))]
    args = [  # no subcommand: the CLI is built with run=False and fitted below
        "--config",
        str(CONFIGS / recipe),
        *run,
        f"--trainer.limit_train_batches={STEPS_PER_EPOCH * accumulation}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.root={fake.dataset(module, data_cfg.get('version'))}",
        f"--data.init_args.batch_size={max(2, FAKE_DATA[module][1] // accumulation)}",
        f"--data.init_args.img_size={size}",
        *(f"--model.init_args.model_kwargs.{k}={json.dumps(v)}" for k, v in kwargs.items()),
        *extra,
    ]
    if model_cfg["pretrained_weights"]:
        args.append(f"--model.init_args.pretrained_weights={fake.weights[weights_format_of(recipe)]}")
    with mock.patch.object(sys, "argv", ["masksub"]):
        cli = build_cli(args, run=False)
    cli.trainer.callbacks.append(_StopAfterFirstStep())
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1
    return cli


def weights_format_of(recipe: str) -> str:
    return weights_format(type("R", (), {"path": recipe})())


def groups(cli) -> list[dict[str, Any]]:
    return cli.model.optimizers().optimizer.param_groups


def group_of(cli, param: nn.Parameter) -> dict[str, Any]:
    return next(g for g in groups(cli) if any(p is param for p in g["params"]))


def schedule(cli, t: int) -> float:
    """The head's (lr_scale 1) learning rate the recipe's schedule gives at step / epoch ``t``."""
    return cli.model.lr_schedulers()._get_lr(t)[-1]


def steps_per_epoch(cli) -> int:
    """Optimizer steps per epoch of the fake run (the schedule counts these for per-step recipes)."""
    return -(-int(cli.trainer.num_training_batches) // cli.model.hparams.grad_accumulation)


def cosine(peak: float, floor: float, t: float, total: float) -> float:
    """timm's (and the authors' scripts') cosine after warmup: measured from t = 0, not from the warmup's end."""
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t / total))


def eval_resize(cli) -> int:
    """The eval transform's resize size (shorter side), img_size / eval_crop_pct."""
    transform = cli.datamodule.build_transform(train=False)
    for op in getattr(transform, "transforms", []):
        if type(op).__name__ in ("Resize", "ResizeKeepRatio"):
            size = op.size
            return size if isinstance(size, int) else min(size)
    raise AssertionError(f"no resize in {transform}")


def blocks_drop_path(model: nn.Module) -> list[float]:
    return drop_path_rates(model)


# ------------------------------------------------------------------------------------------------- DeiT-III
def test_deit3_pretraining(parser, fake, tmp_path):
    cli = build(parser, fake, tmp_path, "deit3/vit_base_400ep.yaml")
    model, module = cli.model.model, cli.model
    # Stochastic depth constant per block (deit/models_v2.py), not timm's linear ramp.
    rates = blocks_drop_path(model)
    assert len(rates) == 2 * len(model.blocks) and rates == pytest.approx([0.1] * len(rates))
    assert all(isinstance(b.drop_path1, DropPath) for b in model.blocks)
    # Compute-skipping drop-path (speed only; tests/test_efficient_drop_path.py shows it is timm's DropPath law).
    assert module.hparams.efficient_drop_path and all(type(b) is EfficientDropPathBlock for b in model.blocks)
    # LayerScale init 1e-4 (the DeiT-III code's init_values; timm's deit3 default is 1e-6). One step at lr 1e-6
    # moves a LAMB parameter without weight decay by about 1e-6 (no trust ratio), hence the tolerance.
    for gamma in (model.blocks[0].ls1.gamma, model.blocks[-1].ls2.gamma):
        assert torch.allclose(gamma, torch.full_like(gamma, 1e-4), rtol=0, atol=2e-6)
    # LAMB, eps 1e-8 (deit/main.py --opt-eps), lr 3e-3 not scaled by the batch, wd 0.03 on weights only.
    optimizer = module.optimizers().optimizer
    assert type(optimizer).__name__ == "Lamb"
    assert all(g["eps"] == 1e-8 for g in groups(cli))
    assert group_of(cli, model.blocks[0].attn.qkv.weight)["weight_decay"] == pytest.approx(0.03)
    assert group_of(cli, model.blocks[0].attn.qkv.bias)["weight_decay"] == 0.0
    assert group_of(cli, model.pos_embed)["weight_decay"] == 0.0
    # LR once per epoch: warmup from 1e-6 over 5 epochs to 3e-3, cosine to 1e-5 at epoch 400.
    assert module.hparams.lr_interval == "epoch"
    assert schedule(cli, 0) == pytest.approx(1e-6)
    assert schedule(cli, 5) == pytest.approx(cosine(3e-3, 1e-5, 5, 400), rel=1e-9)
    assert schedule(cli, 200) == pytest.approx(cosine(3e-3, 1e-5, 200, 400), rel=1e-9)
    assert schedule(cli, 400) == pytest.approx(1e-5, rel=1e-9)
    # BCE against the mixed label made binary (> 0); eval at crop ratio 1.0.
    assert module.criterion.kind == "bce" and module.hparams.bce_target_threshold == 0.0
    assert eval_resize(cli) == cli.datamodule.img_size


def test_deit3_small_has_no_drop_path_and_huge_has_half(parser, fake, tmp_path):
    small = build(parser, fake, tmp_path / "s", "deit3/vit_small_400ep.yaml").model.model
    assert blocks_drop_path(small) == [0.0] * (2 * len(small.blocks))
    huge = build(parser, fake, tmp_path / "h", "deit3/vit_huge_400ep.yaml").model.model
    assert blocks_drop_path(huge) == pytest.approx([0.5] * (2 * len(huge.blocks)))


def test_deit3_finetune_224(parser, fake, tmp_path):
    cli = build(parser, fake, tmp_path, "deit3/vit_large_400ep_ft224.yaml")
    model, module = cli.model.model, cli.model
    assert blocks_drop_path(model) == pytest.approx([0.45] * (2 * len(model.blocks)))
    assert all(type(b) is EfficientDropPathBlock for b in model.blocks)
    assert type(module.optimizers().optimizer).__name__ == "AdamW"
    assert all(g["eps"] == 1e-8 for g in groups(cli))
    assert group_of(cli, model.blocks[0].mlp.fc1.weight)["weight_decay"] == pytest.approx(0.1)
    assert schedule(cli, 0) == pytest.approx(1e-6) and schedule(cli, 5) == pytest.approx(1e-5, rel=1e-9)
    assert module.criterion.kind == "ce" and cli.datamodule.label_smoothing == 0.1
    assert eval_resize(cli) == cli.datamodule.img_size


def test_droppath_sub_branch_restores_each_blocks_own_constant_rate(parser, fake, tmp_path):
    cli = build(
        parser,
        fake,
        tmp_path,
        "deit3/vit_base_400ep.yaml",
        "--model.init_args.sub_branch=droppath",
        "--model.init_args.sub_ratio=0.3",
    )
    model = cli.model.model
    seen = []
    # On the block, not its DropPath: with efficient_drop_path (the recipe's) the block applies the rate itself.
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(m.drop_path1.drop_prob))
    cli.model.train()
    images = torch.randn(2, 3, 32, 32)
    cli.model.sub_branch_forward(images)
    hook.remove()
    assert seen == [0.3]  # the sub-branch's rate during its forward ...
    assert blocks_drop_path(model) == pytest.approx([0.1] * (2 * len(model.blocks)))  # ... each block's after


# ------------------------------------------------------------------------------------------------------ MAE
def test_mae_finetune(parser, fake, tmp_path):
    cli = build(parser, fake, tmp_path, "mae/vit_base.yaml")
    model, module = cli.model.model, cli.model
    # fc_norm fresh (not the encoder's final norm), head ~ N(0, 2e-5^2), bias 0 (after one step of lr ~1e-8).
    assert torch.allclose(model.fc_norm.weight, torch.ones_like(model.fc_norm.weight), atol=1e-5)
    assert torch.allclose(model.fc_norm.bias, torch.zeros_like(model.fc_norm.bias), atol=1e-5)
    assert isinstance(model.norm, nn.Identity)
    std = model.head.weight.std().item()
    assert 1.5e-5 < std < 2.5e-5, std
    # Drop-path as timm builds it (the MAE code ramps it linearly too), 0.1 at the last block.
    rates = blocks_drop_path(model)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    # lr = blr x global batch / 256, layer decay 0.65, per-step warmup from 0 over 5 epochs, cosine to 1e-6.
    hp = module.hparams
    lr = 5e-4 * cli.datamodule.batch_size / 256
    per_epoch = steps_per_epoch(cli)
    total = 100 * per_epoch
    assert schedule(cli, 0) == 0.0
    assert schedule(cli, 5 * per_epoch) == pytest.approx(cosine(lr, 1e-6, 5 * per_epoch, total), rel=1e-9)
    assert schedule(cli, total) == pytest.approx(1e-6, rel=1e-9)
    head_scale = group_of(cli, model.head.weight).get("lr_scale", 1.0)
    embed_scale = group_of(cli, model.patch_embed.proj.weight)["lr_scale"]
    assert head_scale == 1.0 and embed_scale == pytest.approx(0.65 ** (len(model.blocks) + 1))
    assert type(module.optimizers().optimizer).__name__ == "AdamW" and hp.weight_decay == 0.05
    assert eval_resize(cli) == int(cli.datamodule.img_size / 0.875)


def test_mae_large_accumulates_four_micro_batches(parser, fake, tmp_path):
    cli = build(parser, fake, tmp_path, "mae/vit_large.yaml")
    module = cli.model
    assert module.hparams.grad_accumulation == 4
    # One optimizer step consumed four batches; the lr is scaled by the global batch including accumulation.
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4
    lr = 1e-3 * cli.datamodule.batch_size * 4 / 256
    per_epoch = steps_per_epoch(cli)
    assert per_epoch == int(cli.trainer.num_training_batches) // 4
    assert schedule(cli, 5 * per_epoch) == pytest.approx(cosine(lr, 1e-6, 5 * per_epoch, 50 * per_epoch))


# ----------------------------------------------------------------------------------------------------- CLIP
def test_clip_finetune(parser, fake, tmp_path):
    cli = build(parser, fake, tmp_path, "clip/vit_base16.yaml")
    model, module = cli.model.model, cli.model
    # Patch embedding frozen: no gradient, in no optimizer group.
    assert not model.patch_embed.proj.weight.requires_grad
    in_optimizer = {id(p) for g in groups(cli) for p in g["params"]}
    assert id(model.patch_embed.proj.weight) not in in_optimizer
    assert id(model.blocks[0].attn.qkv.weight) in in_optimizer
    # Pooling: a fresh per-token norm, then the mean over patch tokens (fc_norm off, global_pool avg).
    assert model.global_pool == "avg" and isinstance(model.fc_norm, nn.Identity)
    assert torch.allclose(model.norm.weight, torch.ones_like(model.norm.weight), atol=1e-4)
    tokens = torch.randn(2, 1 + 16, model.embed_dim)
    pooled = model.forward_head(model.norm(tokens), pre_logits=True)
    expected = nn.functional.layer_norm(
        tokens[:, 1:], (model.embed_dim,), model.norm.weight, model.norm.bias
    ).mean(1)
    assert torch.allclose(pooled, expected, atol=1e-6)
    std = model.head.weight.std().item()
    assert 1.5e-5 < std < 2.5e-5, std
    # Eval at crop 1.0; EMA 0.9998; lr not scaled by the batch.
    assert eval_resize(cli) == cli.datamodule.img_size
    ema = [cb for cb in cli.trainer.callbacks if isinstance(cb, EMAWeightAveraging)]
    assert len(ema) == 1
    assert ema[0]._kwargs["avg_fn"](torch.zeros(1), torch.ones(1), torch.tensor(1)).item() == pytest.approx(
        2e-4
    )
    assert module.hparams.lr_base_batch_size is None


def test_clip_large_accumulates_four(parser, fake, tmp_path):
    cli = build(parser, fake, tmp_path, "clip/vit_large14.yaml")
    assert cli.model.hparams.grad_accumulation == 4
    assert cli.trainer.num_nodes == 1 and cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4


# ------------------------------------------------------------------------------------------------------ RSB
def test_rsb_resnet(parser, fake, tmp_path):
    cli = build(parser, fake, tmp_path, "resnet_rsb/resnet50.yaml")
    model, module = cli.model.model, cli.model
    assert module.criterion.kind == "bce" and module.hparams.bce_target_threshold is None  # soft BCE targets
    assert type(module.optimizers().optimizer).__name__ == "Lamb"
    assert group_of(cli, model.conv1.weight)["weight_decay"] == pytest.approx(0.02)
    assert module.hparams.lr_interval == "epoch"
    assert schedule(cli, 0) == pytest.approx(1e-4)
    assert schedule(cli, 5) == pytest.approx(cosine(5e-3, 1e-6, 5, 300), rel=1e-9)
    assert schedule(cli, 300) == pytest.approx(1e-6, rel=1e-9)
    assert cli.datamodule.train_interpolation == "random"
    assert eval_resize(cli) == int(cli.datamodule.img_size / 0.95)
    rates = blocks_drop_path(model)
    assert rates[-1] == pytest.approx(0.05) and rates[0] < 0.05  # timm's linear ramp, as the RSB recipe


# ----------------------------------------------------------------------------------------------------- Swin
def test_swin(parser, fake, tmp_path):
    cli = build(parser, fake, tmp_path, "swin/swin_tiny.yaml")
    model, module = cli.model.model, cli.model
    assert module.sub_branch.name == "mask_token"
    token = model.patch_embed.masksub_mask_token
    assert group_of(cli, token)["weight_decay"] == 0.0  # the mask token is excluded from weight decay
    # lr = 5e-4 x global batch / 512; warmup 5e-7 and min 5e-6 scaled alike; 20 warmup epochs; clip 5.0.
    lr, per_epoch = 5e-4 * cli.datamodule.batch_size / 512, steps_per_epoch(cli)
    warmup_end, total = 20 * per_epoch, 300 * per_epoch
    assert schedule(cli, warmup_end) == pytest.approx(cosine(lr, 1e-5, warmup_end, total), rel=1e-9)
    assert module.hparams.grad_clip_norm == 5.0
    assert module.criterion.kind == "ce"


# ------------------------------------------------------------------------------------------------- transfer
def test_transfer(parser, fake, tmp_path):
    cli = build(parser, fake, tmp_path, "transfer/cifar10.yaml")
    optimizer = cli.model.optimizers().optimizer
    assert type(optimizer).__name__ == "SGD"
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in groups(cli))
    per_epoch = steps_per_epoch(cli)
    assert schedule(cli, 5 * per_epoch) == pytest.approx(cosine(0.01, 1e-5, 5 * per_epoch, 1000 * per_epoch))
    assert group_of(cli, cli.model.model.blocks[0].attn.qkv.weight)["weight_decay"] == pytest.approx(1e-4)
