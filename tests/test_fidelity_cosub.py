"""Recipe fidelity of the CoSub recipe: resolved through `masksub fit` and built, it is DeiT-III ViT-B 800 ep
(docs/recipes.md "CoSub") trained by CoSubModule. Expected values are written out here, not read from the YAML.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from timm.layers import DropPath

sys.path.insert(0, str(Path(__file__).parent))
from test_fidelity import blocks_drop_path, build, cosine, eval_resize, group_of, groups, schedule
from test_recipes import make_fake, make_parser

from masksub_lightning import CoSubModule
from masksub_lightning.method.subbranch import NoSubBranch


@pytest.fixture(scope="module")
def parser():
    return make_parser()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake(tmp_path_factory.mktemp("fidelity_cosub"))


def test_deit3_vit_base_800ep_cosub(parser, fake, tmp_path):
    cli = build(parser, fake, tmp_path, "deit3/vit_base_800ep_cosub.yaml")
    model, module, data = cli.model.model, cli.model, cli.datamodule
    assert type(module) is CoSubModule
    assert isinstance(module.sub_branch, NoSubBranch) and not module.sub_branch.active
    # Drop path 0.2 at every block (the two halves' only difference), constant as deit builds DeiT-III ViTs.
    rates = blocks_drop_path(model)
    assert len(rates) == 2 * len(model.blocks) and rates == pytest.approx([0.2] * len(rates))
    assert all(
        isinstance(b.drop_path1, DropPath) and isinstance(b.drop_path2, DropPath) for b in model.blocks
    )
    for gamma in (model.blocks[0].ls1.gamma, model.blocks[-1].ls2.gamma):  # LayerScale init 1e-4
        assert torch.allclose(gamma, torch.full_like(gamma, 1e-4), rtol=0, atol=2e-6)
    # LAMB, eps 1e-8, lr 3e-3 (not scaled), wd 0.05 on weights only; per-epoch warmup 5 -> cosine to 1e-5 at 800.
    assert type(module.optimizers().optimizer).__name__ == "Lamb"
    assert all(g["eps"] == 1e-8 for g in groups(cli))
    assert group_of(cli, model.blocks[0].attn.qkv.weight)["weight_decay"] == pytest.approx(0.05)
    assert group_of(cli, model.blocks[0].attn.qkv.bias)["weight_decay"] == 0.0
    assert module.hparams.lr_interval == "epoch"
    assert schedule(cli, 0) == pytest.approx(1e-6)
    assert schedule(cli, 5) == pytest.approx(cosine(3e-3, 1e-5, 5, 800), rel=1e-9)
    assert schedule(cli, 400) == pytest.approx(cosine(3e-3, 1e-5, 400, 800), rel=1e-9)
    assert schedule(cli, 800) == pytest.approx(1e-5, rel=1e-9)
    # BCE against the mixed label made binary (> 0), as deit's --bce-loss; co-training targets stay sigmoids.
    assert module.criterion.kind == "bce" and module.hparams.bce_target_threshold == 0.0
    assert (data.mixup_alpha, data.cutmix_alpha, data.repeated_aug) == (0.8, 1.0, 3)
    assert eval_resize(cli) == data.img_size
    # The step's logged parts are CoSub's, not MaskSub's.
    metrics = cli.trainer.callback_metrics
    assert "train_loss_label_step" in metrics and "train_loss_cotrain_step" in metrics
    assert "train_loss_sub_step" not in metrics
