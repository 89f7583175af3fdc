"""Linear probing (``MaskSubModule(linear_probe=True)``, ``configs/linprobe/``) and the LARS it trains with.

* the network built: BatchNorm1d(affine=False, eps=1e-6) + the linear classifier as the head, every other
  parameter frozen, the frozen part in eval mode whatever Lightning does;
* a probe run from an exported MAE encoder (``encoder.pth``): the encoder's weights are the file's and stay
  bit for bit, no encoder parameter ever holds a gradient, the head and the BatchNorm statistics move;
* the optimizer: exactly two groups (the weight matrix with the trust ratio, the bias without), LR scaled by the
  global batch, and one step equal to MAE's LARS update written out here;
* bad options as one line.
"""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
from timm.optim import Lars
from torch import nn

from masksub_lightning.data import DigitsDataModule
from masksub_lightning.modules.masksub import MaskSubModule
from masksub_lightning.modules.pretraining import MAEModule
from masksub_lightning.training.optim import build_optimizer, split_lars_groups

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def probe(**kwargs) -> MaskSubModule:
    options = dict(
        model="vit_small_patch16_224",
        num_classes=10,
        model_kwargs={**TINY_VIT, "drop_path_rate": 0.5, "drop_rate": 0.5},  # must stay off: eval mode
        linear_probe=True,
        sub_branch="none",
        head_init_std=0.01,
        optimizer="lars",
        lr=0.1,
        lr_base_batch_size=256,
        weight_decay=0.0,
        warmup_epochs=0.0,
    )
    return MaskSubModule(**{**options, **kwargs})


def test_the_probe_network():
    module = probe()
    head = module.model.head
    assert isinstance(head, nn.Sequential) and [type(m) for m in head] == [nn.BatchNorm1d, nn.Linear]
    norm = head[0]
    assert (norm.affine, norm.eps, norm.num_features) == (False, 1e-6, 32)
    assert [n for n, p in module.model.named_parameters() if p.requires_grad] == [
        "head.1.weight",
        "head.1.bias",
    ]
    assert (
        0.005 < float(head[1].weight.detach().std()) < 0.015
    )  # head_init_std 0.01 (MAE: trunc_normal std 0.01)
    for mode in (True, False, True):  # Lightning switches modes every epoch and around validation
        module.train(mode)
        assert head.training == mode and head[0].training == mode
        assert not any(m.training for name, m in module.model.named_modules() if not name.startswith("head"))
    assert module.optimizer_target() is head


def export_tiny_encoder(path) -> dict[str, torch.Tensor]:
    """An MAE pre-training module's encoder written as encoder.pth (released-MAE layout), randomised."""
    torch.manual_seed(3)
    mae = MAEModule(
        model="vit_small_patch16_224",
        model_kwargs=TINY_VIT,
        decoder_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        export_on_fit_end=False,
    )
    with torch.no_grad():
        for p in mae.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mae.export_encoder(path)
    return mae.encoder_state_dict()


class GradientRecorder(L.Callback):
    """Which parameters hold a gradient when each optimizer step applies, and the optimizer."""

    def __init__(self) -> None:
        self.with_grad: list[set[str]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.with_grad.append({n for n, p in pl_module.model.named_parameters() if p.grad is not None})


def fit_probe(tmp_path, module: MaskSubModule, steps: int = 3) -> tuple[L.Trainer, GradientRecorder]:
    recorder = GradientRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        max_steps=steps,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=DigitsDataModule(img_size=16, batch_size=32))
    return trainer, recorder


def test_a_probe_run_trains_the_head_only_on_the_exported_encoder(tmp_path):
    encoder = export_tiny_encoder(tmp_path / "encoder.pth")
    module = probe(pretrained_weights=str(tmp_path / "encoder.pth"))
    head_before = {k: v.clone() for k, v in module.model.head.state_dict().items()}
    trainer, recorder = fit_probe(tmp_path, module)
    assert trainer.global_step == 3
    after = module.model.state_dict()
    # The encoder is the exported one, untouched by three steps (no update, no BatchNorm / dropout effect).
    for key, value in encoder.items():
        assert torch.equal(after[key], value), key
    assert (
        recorder.with_grad == [{"head.1.weight", "head.1.bias"}] * 3
    )  # no gradient ever reached the encoder
    moved = {k for k, v in module.model.head.state_dict().items() if not torch.equal(v, head_before[k])}
    assert moved == {"1.weight", "1.bias", "0.running_mean", "0.running_var", "0.num_batches_tracked"}
    assert int(module.model.head[0].num_batches_tracked) == 3
    assert "val_acc1" in trainer.callback_metrics


def test_the_optimizer_groups_and_lr(tmp_path):
    module = probe()
    trainer, _ = fit_probe(tmp_path, module, steps=1)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is Lars
    head = module.model.head[1]
    groups = [
        ([id(p) for p in g["params"]], g["always_adapt"], g["weight_decay"]) for g in optimizer.param_groups
    ]
    assert groups == [([id(head.weight)], True, 0.0), ([id(head.bias)], False, 0.0)]
    for group in optimizer.param_groups:  # the schedule's peak: base lr 0.1 x global batch 32 / 256
        assert group["initial_lr"] == pytest.approx(0.1 * 32 / 256, rel=1e-12)
        assert group["momentum"] == 0.9
        assert (group["trust_coeff"], group["nesterov"], group["dampening"]) == (0.001, False, 0)


def test_one_lars_step_is_maes_update():
    """MAE's LARS (util/lars.py), written out: > 1-D parameters: g <- g * 0.001 ||p|| / ||g|| (1 if a norm is 0),
    biases as they are; mu <- 0.9 mu + g; p <- p - lr mu. Two steps, so the momentum counts too."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    reference = {n: p.detach().clone() for n, p in layer.named_parameters()}
    momentum = {n: torch.zeros_like(p) for n, p in reference.items()}
    optimizer = build_optimizer(layer, "lars", lr=0.5, weight_decay=0.0)
    for _ in range(2):
        grads = {"weight": torch.randn(4, 6), "bias": torch.randn(4)}
        for n, p in layer.named_parameters():
            p.grad = grads[n].clone()
        optimizer.step()
        for n, p in reference.items():
            g = grads[n]
            if p.ndim > 1:
                g = g * (0.001 * p.norm() / g.norm())
            momentum[n] = 0.9 * momentum[n] + g
            reference[n] = p - 0.5 * momentum[n]
    for n, p in layer.named_parameters():
        assert torch.allclose(p, reference[n], atol=1e-7), n
    with pytest.raises(ValueError, match="has not stepped yet"):
        split_lars_groups(optimizer)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"sub_branch": "mask"},
            "linear_probe=True trains a classifier on frozen features; sub_branch must be 'none', got 'mask'",
        ),
        ({"linear_probe": "yes"}, "linear_probe must be true or false, got 'yes'"),
    ],
)
def test_bad_options_are_one_line(options, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        probe(**options)


def test_a_model_without_a_linear_head_is_one_line():
    class Bare(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(
        ValueError, match=r"^linear_probe needs one linear classifier head; Bare has none found"
    ):
        MaskSubModule(model=Bare(), num_classes=10, linear_probe=True, sub_branch="none")
    # A timm model built without a classifier (num_classes=0 gives an Identity head) has none either.
    net = timm.create_model("vit_small_patch16_224", num_classes=0, **TINY_VIT)
    with pytest.raises(
        ValueError, match=r"^linear_probe needs one linear classifier head; VisionTransformer has \['head'\]$"
    ):
        from masksub_lightning.models.network import linear_probe_head

        linear_probe_head(net)
