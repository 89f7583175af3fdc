"""Every precision a recipe or a user can set trains correctly, for every module, with and without clipping.

``16-mixed`` runs with a real CPU GradScaler (Lightning builds none for the CPU by itself). Clipping happens once,
in ``TrainingModule.on_before_optimizer_step``, on true (unscaled) gradients: the gradient a step applies has the
clip norm, and the logged ``train_grad_norm`` is the unscaled one. A GradScaler overflow skips the step without
moving the weights, breaking the schedule, the EMA or the non-finite-loss policy.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import make_loader, quiet_trainer, tiny_vit_kwargs
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.plugins import MixedPrecision
from test_pretraining import lut, mae, two_view_loader

from masksub_lightning import MaskSubModule

PRECISIONS = ["32-true", "16-mixed", "bf16-mixed", "bf16-true"]
MODULES = ["masksub", "baseline", "mae", "lut"]
CLIP = 1e-4  # far below every unclipped norm here, so each step is clipped


def make(kind: str, **kw) -> L.LightningModule:
    common = dict(lr=1e-3, warmup_epochs=0, **kw)
    if kind in ("masksub", "baseline"):
        sub_branch = "mask" if kind == "masksub" else "none"
        return MaskSubModule(
            "vit_tiny_patch16_224",
            num_classes=4,
            model_kwargs=tiny_vit_kwargs(),
            sub_branch=sub_branch,
            **common,
        )
    return (mae if kind == "mae" else lut)(lr_base_batch_size=None, export_on_fit_end=False, **common)


def loader(kind: str):
    return two_view_loader(n=16, batch_size=8) if kind == "lut" else make_loader(n=16, batch_size=8)


def precision_args(precision: str, scaler: torch.amp.GradScaler | None = None) -> dict:
    if precision == "16-mixed":
        scaler = scaler or torch.amp.GradScaler("cpu")
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    return {"precision": precision}


class StepRecord(L.Callback):
    """Per optimizer step: the norm of the gradient the step applied, the logged grad norm, unscale_ calls."""

    def __init__(self) -> None:
        self.applied_norms: list[float] = []
        self.logged_norms: list[float] = []
        self.unscale_calls: list[int] = []

    def on_train_start(self, trainer, module):
        params = list(module.optimizer_target().parameters())

        def after_step(optimizer, args, kwargs):  # .grad is what the step applied (optimizers leave it)
            grads = [p.grad.float() for p in params if p.grad is not None]
            self.applied_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        self._handle = trainer.optimizers[0].register_step_post_hook(after_step)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self._calls = 0
            unscale = scaler.unscale_

            def counting_unscale(optimizer):
                self._calls += 1
                return unscale(optimizer)

            scaler.unscale_ = counting_unscale

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        logged = trainer.callback_metrics.get("train_grad_norm_step")
        if logged is not None:
            self.logged_norms.append(float(logged))
        if hasattr(self, "_calls"):
            self.unscale_calls.append(self._calls)
            self._calls = 0

    def on_train_end(self, trainer, module):
        self._handle.remove()


def fit(module, kind: str, precision: str, steps: int = 2, callbacks=(), scaler=None) -> L.Trainer:
    trainer = quiet_trainer(
        max_steps=steps,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
        callbacks=list(callbacks),
        **precision_args(precision, scaler),
    )
    trainer.fit(module, loader(kind))
    return trainer


@pytest.mark.parametrize("optimizer_kwargs", [{"foreach": True}, {"fused": True}], ids=["foreach", "fused"])
@pytest.mark.parametrize("clip", [None, CLIP], ids=["noclip", "clip"])
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_trains_and_clips_true_gradients_once(precision, kind, clip, optimizer_kwargs):
    torch.manual_seed(0)
    kwargs = dict(grad_clip_norm=clip, optimizer_kwargs=optimizer_kwargs)
    if kind in ("mae", "lut"):  # MAE's betas stay, the kernel choice is added
        kwargs["optimizer_kwargs"] = {"betas": (0.9, 0.95), **optimizer_kwargs}
    module = make(kind, **kwargs)
    before = copy.deepcopy(module.optimizer_target().state_dict())
    record = StepRecord()
    trainer = fit(module, kind, precision, callbacks=[record])

    assert trainer.global_step == 2 and len(record.applied_norms) == 2  # both steps taken
    after = module.optimizer_target().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert all(torch.isfinite(p).all() for p in module.parameters())
    if precision == "16-mixed":
        # Once per step before anything reads .grad; a fused step with nothing to clip unscales inside itself.
        expected = 0 if "fused" in optimizer_kwargs and clip is None else 1
        assert record.unscale_calls == [expected, expected]
    if clip is None:
        assert record.logged_norms == []  # the norm is measured only when clipping
        return
    # The applied gradient has the clip norm in true units (clipping a still-scaled gradient would leave
    # clip / scale after the scaler's own unscale); bf16-true rounds the clipped gradient itself.
    tolerance = 2e-2 if precision == "bf16-true" else 1e-3
    assert record.applied_norms == pytest.approx([CLIP, CLIP], rel=tolerance)
    assert len(record.logged_norms) == 2 and all(n > 100 * CLIP for n in record.logged_norms)


@pytest.mark.parametrize("kind", MODULES)
def test_logged_grad_norm_under_a_grad_scaler_is_the_unscaled_one(kind):
    """Same start, same batches: the 16-mixed run logs the fp32 run's gradient norm, not 65536 times it."""
    norms = {}
    for precision in ("32-true", "16-mixed"):
        torch.manual_seed(0)
        module = make(kind, grad_clip_norm=CLIP)
        record = StepRecord()
        fit(module, kind, precision, steps=1, callbacks=[record])
        norms[precision] = record.logged_norms[0]
    assert norms["16-mixed"] == pytest.approx(norms["32-true"], rel=5e-2)


class OverflowAtFirstStep(L.Callback):
    """Writes an inf into one gradient of the first step, as an fp16 overflow does (the loss stays finite)."""

    def on_after_backward(self, trainer, module):
        if trainer.global_step == 0:
            param = next(p for p in module.optimizer_target().parameters() if p.grad is not None)
            param.grad.view(-1)[0] = float("inf")


@pytest.mark.parametrize("optimizer_kwargs", [{"foreach": True}, {"fused": True}], ids=["foreach", "fused"])
@pytest.mark.parametrize("nonfinite_loss", ["stop", "skip"])
@pytest.mark.parametrize("kind", ["masksub", "mae"])
def test_a_grad_scaler_overflow_skips_only_that_step(kind, nonfinite_loss, optimizer_kwargs):
    class Watch(L.Callback):
        def __init__(self):
            self.weights, self.lrs = [], []

        def on_train_batch_end(self, trainer, module, *args):
            self.weights.append(copy.deepcopy(module.optimizer_target().state_dict()))
            self.lrs.append(trainer.optimizers[0].param_groups[-1]["lr"])

    def run(overflow: bool):
        torch.manual_seed(0)
        module = make(
            kind, grad_clip_norm=1.0, nonfinite_loss=nonfinite_loss, optimizer_kwargs=optimizer_kwargs
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        ema, watch = EMAWeightAveraging(decay=0.5), Watch()
        initial = copy.deepcopy(module.optimizer_target().state_dict())
        callbacks = [OverflowAtFirstStep()] * overflow + [ema, watch]
        trainer = fit(module, kind, "16-mixed", steps=2, callbacks=callbacks, scaler=scaler)
        return trainer, scaler, ema, watch, initial

    trainer, scaler, ema, watch, initial = run(overflow=True)
    weights = watch.weights

    # Step 1 was skipped by the scaler: weights unchanged, the scale halved; step 2 trained.
    assert all(torch.equal(initial[k], weights[0][k]) for k in initial)
    assert any(
        not torch.equal(weights[0][k], weights[1][k]) for k in initial if initial[k].is_floating_point()
    )
    assert scaler.get_scale() == 2.0**9
    # The schedule counts both steps (as timm / DeiT do), and the run went on: no "non-finite loss" stop, no skip.
    assert trainer.global_step == 2 and watch.lrs == run(overflow=False)[3].lrs
    assert "train_skipped_steps" not in trainer.callback_metrics
    averaged = ema._average_model.module.state_dict()
    assert all(torch.isfinite(v).all() for v in averaged.values() if v.is_floating_point())
