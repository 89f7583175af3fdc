"""Exact mid-epoch resume of the train loader: same samples, same augmentations, same order, same mixing."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from fake_data import write_image_folder
from lightning.pytorch.callbacks import ModelCheckpoint

from masksub_lightning.data import DigitsDataModule, ImageFolderDataModule, RepeatedAugSampler

MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, repeated_aug=3, seed=7)


def _digits(workers):
    return DigitsDataModule(batch_size=16, img_size=16, num_workers=workers, **MIX)


def _folder(root, workers):
    # Every timm stage that draws random numbers: RandomResizedCrop + RandAugment (Python random and NumPy),
    # flip and random erasing (torch).
    return ImageFolderDataModule(
        root=str(root),
        batch_size=4,
        num_workers=workers,
        img_size=16,
        auto_augment="rand-m9-mstd0.5-inc1",
        reprob=0.5,
        color_jitter=None,
        **MIX,
    )


def _epochs(loader, epochs, start_epoch=0, first=None, resumed=False):
    """Batches of ``epochs`` epochs in Lightning's order: set_epoch, then iter() and the batches, except right
    after load_state_dict, where iter() (which restores the state) comes first. ``first`` limits the first
    epoch's batch count (a run stopped there)."""
    out = []
    for e, epoch in enumerate(range(start_epoch, start_epoch + epochs)):
        if resumed and e == 0:
            it = iter(loader)
            loader.sampler.set_epoch(epoch)
        else:
            loader.sampler.set_epoch(epoch)
            it = iter(loader)
        for i, batch in enumerate(it):
            out.append((epoch, batch))
            if e == 0 and first is not None and i + 1 == first:
                break
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ea, (xa, ya)), (eb, (xb, yb)) in zip(a, b):
        assert ea == eb
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["digits", "folder"])
def test_loader_resumes_mid_epoch_bitwise(kind, workers, tmp_path):
    if kind == "folder":
        write_image_folder(tmp_path, n_train=8, noise=60)  # 24 textured images: 6 batches of 4
    make = (lambda: _digits(workers)) if kind == "digits" else (lambda: _folder(tmp_path, workers))
    dm = make()
    loader = dm.train_dataloader()
    n = len(loader)
    k = n // 2

    # Uninterrupted: two epochs.
    reference = _epochs(loader, 2)
    assert len(reference) == 2 * n

    # Interrupted after one epoch and k batches: its state, taken there.
    dm_run = make()
    run = dm_run.train_dataloader()
    done = _epochs(run, 1) + _epochs(run, 1, start_epoch=1, first=k)
    _assert_same(done, reference[: n + k])
    state = copy.deepcopy(run.state_dict())
    del run

    # A fresh DataModule and loader, state loaded: the rest of epoch 1, then epoch 2 as in a longer run.
    resumed_loader = make().train_dataloader()
    resumed_loader.load_state_dict(state)
    rest = _epochs(resumed_loader, 1, start_epoch=1, resumed=True)
    _assert_same(rest, reference[n + k :])

    # The test can fail: without the state the loader starts epoch 1 over, and the augmentations are random
    # (the three copies of an image that repeated augmentation puts next to each other differ).
    restarted = _epochs(make().train_dataloader(), 1, start_epoch=1)
    assert not torch.equal(restarted[0][1][0], rest[0][1][0])
    images, _ = reference[0][1]
    sampler = make().train_dataloader().sampler
    indices = sampler.indices()
    assert indices[0] == indices[1] and not torch.equal(images[0], images[1])


def test_resume_state_from_epoch_zero_crosses_the_epoch_boundary(tmp_path):
    dm = _digits(0)
    loader = dm.train_dataloader()
    n = len(loader)
    reference = _epochs(loader, 2)
    run = _digits(0).train_dataloader()
    _epochs(run, 1, first=3)
    state = run.state_dict()
    resumed = _digits(0).train_dataloader()
    resumed.load_state_dict(state)
    rest = _epochs(resumed, 1, resumed=True) + _epochs(resumed, 1, start_epoch=1)
    _assert_same(rest, reference[3:])
    assert len(rest) == 2 * n - 3


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_every_training_batch_advances_the_step_without_mixup(smoothing):
    """The step seeds device-side draws (DALI's random erasing) too: without Mixup it must still move."""
    dm = DigitsDataModule(batch_size=16, img_size=16, num_workers=0, label_smoothing=smoothing)
    dm.trainer = SimpleNamespace(training=True, world_size=1, global_rank=0)
    assert not dm.mixup_enabled
    for _ in range(3):
        dm.mix(torch.randn(16, 3, 16, 16), torch.arange(16) % 10)
    assert dm.state_dict() == {"mix_step": 3}


def test_mixup_draws_resume_with_the_datamodule_state():
    dm = _digits(0)
    dm.trainer = SimpleNamespace(training=True, world_size=1, global_rank=0)
    batches = [(torch.randn(16, 3, 16, 16), torch.arange(16) % 10) for _ in range(4)]
    reference = [dm.mix(x.clone(), y) for x, y in batches]
    dm2 = _digits(0)
    dm2.trainer = dm.trainer
    dm2.mix(batches[0][0].clone(), batches[0][1])
    dm2.mix(batches[1][0].clone(), batches[1][1])
    state = dm2.state_dict()
    assert state == {"mix_step": 2}

    resumed = _digits(0)
    resumed.trainer = dm.trainer
    resumed.load_state_dict(state)
    torch.manual_seed(123)  # the global RNGs play no part
    for (x, y), (rx, ry) in zip(batches[2:], reference[2:]):
        mx, my = resumed.mix(x.clone(), y)
        assert torch.equal(mx, rx) and torch.equal(my, ry)
    # ... and a module that does not load the state mixes differently.
    fresh = _digits(0)
    fresh.trainer = dm.trainer
    assert not torch.equal(fresh.mix(batches[2][0].clone(), batches[2][1])[1], reference[2][1])


def test_data_path_leaves_the_global_rng_alone():
    dm = _digits(0)
    dm.trainer = SimpleNamespace(training=True, world_size=1, global_rank=0)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for x, y in dm.train_dataloader():
        dm.mix(x, y)
        break
    assert torch.equal(torch.rand(3), expected)


def test_sampler_state_checks_it_describes_the_same_stream():
    sampler = RepeatedAugSampler(range(20), num_repeats=3, seed=1)
    other = RepeatedAugSampler(range(20), num_repeats=3, seed=2)
    with pytest.raises(ValueError, match=r"seed=1 but this sampler has seed=2"):
        other.load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match=r"num_replicas=1 but this sampler has num_replicas=2"):
        RepeatedAugSampler(range(20), num_replicas=2, rank=1, seed=1).load_state_dict(sampler.state_dict())


def test_rank0_state_resumes_every_rank_at_its_own_stream():
    # Lightning keeps rank 0's loader state only; rank 1 loading it continues rank 1's stream.
    ranks = [RepeatedAugSampler(range(50), num_replicas=2, rank=r, seed=3, with_seeds=True) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    full = [list(s) for s in ranks]
    it = iter(ranks[0])
    for _ in range(7):
        next(it)
    state = ranks[0].state_dict()
    fresh = RepeatedAugSampler(range(50), num_replicas=2, rank=1, seed=3, with_seeds=True)
    fresh.load_state_dict(state)
    assert list(fresh) == full[1][7:] and full[1][7:] != full[0][7:]


class _Seen(L.LightningModule):
    """Records every training batch it gets (after Mixup / CutMix)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3 * 16 * 16, 10)
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        images, targets = batch
        self.seen.append((self.current_epoch, images.clone(), targets.clone()))
        return torch.sum(-targets * torch.log_softmax(self.layer(images.flatten(1)), -1), -1).mean()

    def configure_optimizers(self):
        # The common idiom (OneCycleLR, MaskSubModule's schedules) that builds the train loader before Lightning
        # restores the checkpoint's loop state, so Lightning's own loader-state restore never reaches it.
        assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=6,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("stop", "workers"), [(4, 0), (6, 0), (4, 2)], ids=["mid_epoch", "epoch_end", "mid_epoch_workers"]
)
def test_lightning_resume_from_checkpoint_sees_the_uninterrupted_batches(tmp_path, stop, workers):
    # The epoch ends after 6 of the loader's 89 batches (limit_train_batches): at stop=6 Lightning resumes
    # into the next epoch, which must start from its beginning, not continue the saved one.
    reference = _Seen()
    _trainer(tmp_path / "ref", enable_checkpointing=False).fit(reference, datamodule=_digits(workers))
    assert len(reference.seen) == 12

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, save_top_k=-1)
    stopped = _Seen()
    _trainer(tmp_path / "run", callbacks=[ckpt], max_steps=stop).fit(stopped, datamodule=_digits(workers))
    path = next((tmp_path / "ckpt").glob(f"*step={stop}.ckpt"))
    checkpoint = torch.load(path, weights_only=True)
    (loader_state,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the loader's state
    assert loader_state  # (the sampler's position is inside, in a layout that differs with the worker count)
    assert checkpoint["DigitsDataModule"]["mix_step"] == stop
    assert checkpoint["DigitsDataModule"]["train_loader"] == loader_state

    resumed = _Seen()
    _trainer(tmp_path / "resume").fit(resumed, datamodule=_digits(workers), ckpt_path=path)
    assert len(resumed.seen) == 12 - stop
    for (e, x, y), (re, rx, ry) in zip(resumed.seen, reference.seen[stop:]):
        assert e == re and torch.equal(x, rx) and torch.equal(y, ry)


class _RecordBatches(L.Callback):
    """Records each training batch as the module gets it (after Mixup / CutMix)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        images, targets = batch
        self.seen.append((trainer.current_epoch, images.clone(), targets.clone()))


def test_masksub_module_resume_sees_the_uninterrupted_batches(tmp_path):
    from conftest import tiny_vit_kwargs

    from masksub_lightning import MaskSubModule

    def module():
        return MaskSubModule(
            "vit_tiny_patch16_224", num_classes=10, model_kwargs=tiny_vit_kwargs(), optimizer="sgd", lr=0.01
        )

    def data():
        return DigitsDataModule(batch_size=8, img_size=32, **MIX)

    reference = _RecordBatches()
    _trainer(tmp_path / "ref", enable_checkpointing=False, callbacks=[reference]).fit(
        module(), datamodule=data()
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)

    class StopAtStep3(
        L.Callback
    ):  # not max_steps: that would give the run (and its checkpoint) a 3-step schedule
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 3

    _trainer(tmp_path / "run", callbacks=[ckpt, StopAtStep3()]).fit(module(), datamodule=data())
    resumed = _RecordBatches()
    path = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    _trainer(tmp_path / "resume", callbacks=[resumed]).fit(module(), datamodule=data(), ckpt_path=path)
    assert len(reference.seen) == 12 and len(resumed.seen) == 9
    for (e, x, y), (re, rx, ry) in zip(resumed.seen, reference.seen[3:]):
        assert e == re and torch.equal(x, rx) and torch.equal(y, ry)
