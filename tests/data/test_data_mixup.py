"""Mixup / CutMix / label smoothing: soft targets in training only, int64 targets in validation."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from masksub_lightning.data import DigitsDataModule


def _batch(dm, b=8):
    images = torch.randn(b, 3, dm.img_size, dm.img_size)
    return images, torch.arange(b) % dm.num_classes


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixup_gives_soft_targets_in_training_only(mode):
    dm = DigitsDataModule(
        batch_size=8, mixup_alpha=0.8, cutmix_alpha=1.0, mixup_mode=mode, label_smoothing=0.1
    )
    assert dm.soft_targets
    images, targets = _batch(dm)
    dm.trainer = SimpleNamespace(training=True)
    mixed, soft = dm.on_after_batch_transfer((images.clone(), targets), 0)
    assert mixed.shape == images.shape and mixed.dtype == torch.float32
    assert soft.shape == (8, 10) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    assert soft.min() >= 0.01 - 1e-6  # smoothing 0.1 over 10 classes puts >= 0.01 everywhere

    dm.trainer = SimpleNamespace(training=False)  # validating / testing / sanity check
    same, hard = dm.on_after_batch_transfer((images.clone(), targets), 0)
    assert torch.equal(same, images) and torch.equal(hard, targets) and hard.dtype == torch.int64


def test_mixup_mixes_with_the_flipped_batch():
    dm = DigitsDataModule(batch_size=4, mixup_alpha=1.0)
    dm.trainer = SimpleNamespace(training=True)
    images = torch.stack([torch.full((3, 32, 32), float(v)) for v in range(4)])
    targets = torch.tensor([0, 1, 2, 3])
    mixed, soft = dm.mix(images.clone(), targets)
    lam = soft[0, 0].item()  # batch mode: image i = lam * x_i + (1 - lam) * x_{B-1-i}
    torch.testing.assert_close(mixed[0], torch.full((3, 32, 32), 3 * (1 - lam)))
    torch.testing.assert_close(soft[0, 3].item(), 1 - lam)


def test_label_smoothing_alone_gives_smoothed_one_hot():
    dm = DigitsDataModule(batch_size=3, label_smoothing=0.1)  # odd batch fine without mixup
    dm.trainer = SimpleNamespace(training=True)
    images, targets = torch.zeros(3, 3, 32, 32), torch.tensor([0, 5, 9])
    out, soft = dm.on_after_batch_transfer((images, targets), 0)
    assert torch.equal(out, images)
    expected = torch.full((3, 10), 0.01)
    expected[torch.arange(3), targets] = 0.91
    torch.testing.assert_close(soft, expected)


def test_no_mixing_keeps_int_targets_in_training():
    dm = DigitsDataModule(batch_size=4)
    dm.trainer = SimpleNamespace(training=True)
    images, targets = _batch(dm, 4)
    _, out = dm.on_after_batch_transfer((images, targets), 0)
    assert not dm.soft_targets and out.dtype == torch.int64 and torch.equal(out, targets)


def test_odd_batch_with_mixup_is_rejected_at_init():
    with pytest.raises(ValueError, match=r"batch_size=7 .*even"):
        DigitsDataModule(batch_size=7, cutmix_alpha=1.0)


def test_channels_last_output():
    dm = DigitsDataModule(batch_size=4, channels_last=True)
    images, _ = dm.on_after_batch_transfer(_batch(dm, 4), 0)
    assert images.is_contiguous(memory_format=torch.channels_last)


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3 * 16 * 16, 10)
        self.seen = {"train": [], "val": []}
        self.epochs = []

    def on_train_epoch_start(self) -> None:
        self.epochs.append(self.trainer.train_dataloader.sampler.epoch)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        self.seen["train"].append((tuple(images.shape), images.dtype, targets.clone()))
        return torch.sum(-targets * torch.log_softmax(self.layer(images.flatten(1)), -1), -1).mean()

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        self.seen["val"].append((tuple(images.shape), images.dtype, targets.clone()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_mixup_inside_a_real_fit():
    dm = DigitsDataModule(batch_size=16, img_size=16, mixup_alpha=0.8, cutmix_alpha=1.0, repeated_aug=3)
    model = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.seen["train"]) == 6 and model.epochs == [0, 1]  # Lightning calls set_epoch each epoch
    for shape, dtype, targets in model.seen["train"]:
        assert shape == (16, 3, 16, 16) and dtype == torch.float32
        assert targets.shape == (16, 10) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(16))
    assert len(model.seen["val"]) == 5  # 1 sanity-check batch + 2 per epoch
    for shape, _, targets in model.seen["val"]:
        assert shape == (16, 3, 16, 16) and targets.dtype == torch.int64 and targets.shape == (16,)
        assert targets.min() >= 0 and targets.max() < 10
