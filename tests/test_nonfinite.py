"""The non-finite loss policy (`nonfinite_loss`): stop by default, or skip and count; a NaN is never saved."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_loader, quiet_trainer, tiny_vit_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from masksub_lightning import MaskSubModule
from masksub_lightning.training.guards import NonFiniteLossError, NonFiniteMonitor


class Poisoned(MaskSubModule):
    """Makes one branch's loss NaN at a chosen optimizer step (1-based, as the logs count)."""

    def __init__(self, *args, poison_step: int = 3, poison_branch: str = "main", **kwargs):
        super().__init__(*args, **kwargs)
        self.poison_step, self.poison_branch = poison_step, poison_branch

    def on_train_batch_start(self, batch, batch_idx):
        self.batches_seen = getattr(self, "batches_seen", 0) + 1

    def _poison(self, loss):  # the poison_step-th training batch (= optimizer step until one is skipped)
        return loss * float("nan") if self.batches_seen == self.poison_step else loss

    def main_loss(self, main_logits, target):
        loss = super().main_loss(main_logits, target)
        return self._poison(loss) if self.poison_branch == "main" and self.training else loss

    def sub_loss(self, sub_logits, main_logits):
        loss = super().sub_loss(sub_logits, main_logits)
        return self._poison(loss) if self.poison_branch == "sub" else loss


def make(branch: str, policy: str = "stop", **kwargs) -> Poisoned:
    return Poisoned(
        "vit_tiny_patch16_224",
        num_classes=4,
        model_kwargs=tiny_vit_kwargs(),
        lr=1e-3,
        poison_branch=branch,
        nonfinite_loss=policy,
        **kwargs,
    )


def all_finite(module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize(("branch", "name"), [("main", "main branch"), ("sub", "sub-branch")])
def test_stop_names_the_step_and_branch_and_saves_nothing_after_it(tmp_path, branch, name, precision):
    module = make(branch)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path,
        every_n_train_steps=1,
        save_top_k=-1,
        filename="s{step}",
        auto_insert_metric_name=False,
    )
    trainer = quiet_trainer(
        max_epochs=2, precision=precision, enable_checkpointing=True, callbacks=[ckpt], num_sanity_val_steps=0
    )
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(module, train_dataloaders=make_loader(n=64, batch_size=16))
    message = str(info.value)
    assert f"at step 3 in the {name}" in message and "nonfinite_loss='stop'" in message
    assert f"Last good checkpoint: {tmp_path / 's2.ckpt'}" in message
    # Nothing from the poisoned step on was applied or saved (on CPU the check runs before the optimizer step).
    assert trainer.global_step == 2 and all_finite(module)
    saved = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert saved == ["s1.ckpt", "s2.ckpt"], saved
    for path in tmp_path.glob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("branch", ["main", "sub"])
def test_skip_drops_the_step_counts_it_and_trains_on(branch):
    module = make(branch, policy="skip")
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=make_loader(n=64, batch_size=16))
    assert trainer.global_step == 2 * 4 - 1  # 8 batches, one step skipped
    assert all_finite(module)
    assert trainer.callback_metrics["train_skipped_steps"] == 1.0
    assert math.isfinite(float(trainer.callback_metrics["train_loss_epoch"]))


def test_a_diverging_run_stops_instead_of_saving_nan_weights():
    # A huge learning rate: the weights blow up, the loss turns inf / NaN a few steps in.
    module = MaskSubModule(
        "vit_tiny_patch16_224",
        num_classes=4,
        model_kwargs=tiny_vit_kwargs(),
        optimizer="sgd",
        lr=1e12,
        weight_decay=0.0,
        scheduler="constant",
    )
    trainer = quiet_trainer(max_epochs=5, num_sanity_val_steps=0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(NaN or inf\) at step \d+"):
        trainer.fit(module, train_dataloaders=make_loader(n=64, batch_size=16))


def test_monitor_reports_the_first_bad_step():
    monitor = NonFiniteMonitor()
    monitor.record(1, {"main branch": torch.tensor(1.0), "sub-branch": torch.tensor(2.0)})
    monitor.record(2, {"main branch": torch.tensor(1.0), "sub-branch": torch.tensor(float("inf"))})
    monitor.record(3, {"main branch": torch.tensor(float("nan"))})
    found = monitor.poll()
    assert (found.step, found.part) == (2, "sub-branch")
    assert monitor.poll() is None  # reported once; the rest is dropped


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match=r"nonfinite_loss must be 'stop' or 'skip', got 'ignore'"):
        make("main", policy="ignore")
