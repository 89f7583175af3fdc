"""Resuming with settings that change the LR schedule's length is refused with a clear message (both directions).

Lightning restores the scheduler's saved state over the freshly built one, so without this check a resume with a
longer (or shorter) max_epochs would keep the old schedule length silently.
"""

from __future__ import annotations

import lightning as L
import pytest
from conftest import make_loader, quiet_trainer, tiny_vit_kwargs

from masksub_lightning import MaskSubModule


class StopAfterEpochs(L.Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def module(**overrides) -> MaskSubModule:
    kwargs = dict(num_classes=4, model_kwargs=tiny_vit_kwargs(), lr=1e-3, warmup_epochs=1)
    return MaskSubModule("vit_tiny_patch16_224", **{**kwargs, **overrides})


def checkpoint(tmp_path, planned_epochs: int, run_epochs: int, **overrides) -> str:
    trainer = quiet_trainer(
        max_epochs=planned_epochs, num_sanity_val_steps=0, callbacks=[StopAfterEpochs(run_epochs)]
    )
    trainer.fit(module(**overrides), train_dataloaders=make_loader(n=32, batch_size=8))
    path = str(tmp_path / "stopped.ckpt")
    trainer.save_checkpoint(path)
    return path


def resume(path: str, max_epochs: int, **overrides) -> L.Trainer:
    trainer = quiet_trainer(max_epochs=max_epochs, num_sanity_val_steps=0)
    trainer.fit(module(**overrides), train_dataloaders=make_loader(n=32, batch_size=8), ckpt_path=path)
    return trainer


@pytest.mark.parametrize(("planned", "resumed"), [(2, 3), (4, 3)], ids=["longer", "shorter"])
def test_a_different_max_epochs_is_refused(tmp_path, planned, resumed):
    path = checkpoint(tmp_path, planned_epochs=planned, run_epochs=1)
    with pytest.raises(ValueError, match=r"cannot resume: the checkpoint's LR schedule spans") as info:
        resume(path, max_epochs=resumed)
    message = str(info.value)
    assert f"spans {4 * planned} optimizer steps (warmup 4)" in message
    assert f"this run's would span {4 * resumed} (warmup 4)" in message
    assert "pretrained_weights" in message  # says how to train on from the weights instead


def test_a_different_batch_count_is_refused_for_a_per_epoch_schedule_too(tmp_path):
    path = checkpoint(tmp_path, planned_epochs=3, run_epochs=1, lr_interval="epoch")
    with pytest.raises(ValueError, match=r"spans 3 epochs \(warmup 1\), this run's would span 5"):
        resume(path, max_epochs=5, lr_interval="epoch")


def test_the_same_settings_resume_and_finish(tmp_path):
    path = checkpoint(tmp_path, planned_epochs=3, run_epochs=1)
    trainer = resume(path, max_epochs=3)
    assert trainer.global_step == 12 and trainer.current_epoch == 3
