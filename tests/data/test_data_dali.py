"""DALI training loader on DALI's CPU operators: order, labels, 3-Augment ops, resume, device-side mixing, errors."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from fake_data import SMALL, color_of, decode_labels, write_image_folder

CLASSES = tuple(f"c{i:02d}" for i in range(12))


def _needs_dali() -> None:
    # DALI is an optional extra (a CUDA-specific wheel), not part of `.[dev]`: a fresh install skips these.
    pytest.importorskip("nvidia.dali", reason="needs the 'dali' extra: pip install -e '.[dali]'")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali") / "data"
    write_image_folder(root, classes=CLASSES, n_train=2, n_val=1)
    return str(root)


def _dm(folder, **kwargs):
    from masksub_lightning.data.dali import DALIDataModule

    dm = DALIDataModule(
        root=folder, dali_device="cpu", dali_threads=1, **{**SMALL, "batch_size": 4, **kwargs}
    )
    dm.trainer = SimpleNamespace(training=True, world_size=1, global_rank=0)
    return dm


def _run(dm, limit=None, state=None):
    loader = dm.train_dataloader()
    if state is not None:
        loader.load_state_dict(state)
    out = []
    for images, targets in loader:
        out.append((images, targets))
        if len(out) == limit:
            return out, loader.state_dict()
    return out, None


def test_missing_dali_is_one_clear_line(monkeypatch, folder):
    from masksub_lightning.data import dali

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali -> ImportError
    with pytest.raises(ImportError, match=r"needs NVIDIA DALI, which is not installed: pip install") as e:
        dali.DALIDataModule(root=folder, dali_device="cpu")
    assert "\n" not in str(e.value)


def test_order_and_labels_follow_the_sampler(folder):
    _needs_dali()
    from masksub_lightning.data import ImageFolderDataModule

    dm = _dm(folder, repeated_aug=2, seed=5)
    batches, _ = _run(dm)
    ref = ImageFolderDataModule(root=folder, **{**SMALL, "batch_size": 4, "repeated_aug": 2, "seed": 5})
    ref.trainer = dm.trainer
    expected = [t for _, t in ref.train_dataloader()]
    assert len(batches) == len(expected) == 6
    for (images, targets), want in zip(batches, expected):
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
        assert torch.equal(targets, want)  # the same sample order as the PIL loader
        assert torch.equal(decode_labels(images, dm.mean, dm.std), targets)  # and the images match the labels


def test_three_augment_gives_grayscale_solarize_or_blur(folder):
    _needs_dali()
    dm = _dm(folder, auto_augment="3a", color_jitter=None)
    kinds = set()
    for images, targets in _run(dm)[0]:
        rgb = (images * torch.tensor(dm.std).view(1, 3, 1, 1) + torch.tensor(dm.mean).view(1, 3, 1, 1)) * 255
        rgb = rgb.mean(dim=(2, 3))
        for got, label in zip(rgb, targets.tolist()):
            c = torch.tensor(color_of(label), dtype=torch.float32)
            gray = (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]).expand(3)
            solar = torch.where(c >= 128, 255 - c, c)
            # A solid image: blur leaves it as is. Tolerance: JPEG / PNG rounding and DALI's luma weights.
            options = {"gray": gray, "solarize": solar, "blur": c}
            close = [k for k, v in options.items() if (got - v).abs().max() < 4]
            assert close, (label, got, options)
            kinds.update(close)
    assert {"gray", "solarize"} <= kinds  # 24 draws: both appear (the blur is indistinguishable on solids)


def test_randaugment_and_simple_crop_run_and_change_images(folder):
    _needs_dali()
    plain = _run(_dm(folder, seed=1))[0]
    for kwargs in (
        dict(auto_augment="rand-m9-mstd0.5-inc1", train_interpolation="random"),
        dict(train_crop="simple"),
    ):
        batches = _run(_dm(folder, seed=1, **kwargs))[0]
        assert len(batches) == len(plain)
        assert all(torch.isfinite(x).all() and x.shape == (4, 3, 32, 32) for x, _ in batches)
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(plain, batches))  # same order
    randaug = _run(_dm(folder, seed=1, auto_augment="rand-m9-mstd0.5-inc1"))[0]
    assert any((a - b).abs().max() > 0.5 for (a, _), (b, _) in zip(plain, randaug))  # the ops did something


def test_resume_continues_with_the_next_unseen_batch(folder):
    _needs_dali()
    full = [t for _, t in _run(_dm(folder, repeated_aug=3, seed=2))[0]]
    first, state = _run(_dm(folder, repeated_aug=3, seed=2), limit=2)
    rest, _ = _run(_dm(folder, repeated_aug=3, seed=2), state=state)
    resumed = [t for _, t in first] + [t for _, t in rest]
    assert len(rest) == len(full) - 2 > 0
    assert all(torch.equal(a, b) for a, b in zip(resumed, full))
    assert len(first) + len(rest) == len(full)


def test_mixing_and_erasing_on_the_device_batch(folder):
    _needs_dali()
    dm = _dm(folder, mixup_alpha=0.8, cutmix_alpha=1.0, reprob=1.0, remode="const")
    images, targets = next(iter(dm.train_dataloader()))
    mixed, soft = dm.on_after_batch_transfer((images.clone(), targets), 0)
    assert soft.shape == (4, len(CLASSES)) and torch.allclose(soft.sum(1), torch.ones(4))
    assert (mixed == 0).any()  # "const" erasing writes zeros; the solid normalised images have none


def test_bad_requests_fail_at_construction(folder):
    _needs_dali()
    from masksub_lightning.data.dali import DALIDataModule

    with pytest.raises(ValueError, match=r"auto_augment='augmix-m5-w4-d2' is not available in the DALI"):
        DALIDataModule(root=folder, dali_device="cpu", auto_augment="augmix-m5-w4-d2")
    with pytest.raises(ValueError, match=r"dali_device='tpu' is invalid"):
        DALIDataModule(root=folder, dali_device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"dali_device='gpu' needs a CUDA GPU"):
            DALIDataModule(root=folder, dali_device="gpu")


def test_lightning_fit_consumes_the_dali_loader(folder, tmp_path):
    _needs_dali()
    import lightning as L

    seen = []

    class Record(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, len(CLASSES))

        def training_step(self, batch, batch_idx):
            images, targets = batch
            seen.append((self.current_epoch, targets.tolist()))
            return torch.nn.functional.cross_entropy(self.layer(images.mean(dim=(2, 3))), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = _dm(folder, repeated_aug=2, seed=7)
    dm.trainer = None
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Record(), datamodule=dm)
    per_epoch = [[t for e, ts in seen if e == epoch for t in ts] for epoch in (0, 1)]
    assert [len(p) for p in per_epoch] == [24, 24]
    assert per_epoch[0] != per_epoch[1]  # set_epoch reached the sampler: a new order each epoch


@pytest.mark.parametrize("stop", [4, 6], ids=["mid_epoch", "epoch_end"])
def test_lightning_resume_continues_the_sample_order(folder, tmp_path, stop):
    _needs_dali()
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Record(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, len(CLASSES))
            self.seen = []

        def training_step(self, batch, batch_idx):
            images, targets = batch
            self.seen.append((self.current_epoch, targets.tolist()))
            return torch.nn.functional.cross_entropy(self.layer(images.mean(dim=(2, 3))), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def data():
        dm = _dm(folder, repeated_aug=3, seed=11)
        dm.trainer = None
        return dm

    def trainer(root, **kwargs):
        return L.Trainer(
            accelerator="cpu",
            max_epochs=2,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            **kwargs,
        )

    reference = Record()
    trainer(tmp_path / "ref", enable_checkpointing=False).fit(reference, datamodule=data())
    assert len(reference.seen) == 12
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, save_top_k=-1)
    trainer(tmp_path / "run", callbacks=[ckpt], max_steps=stop).fit(Record(), datamodule=data())
    resumed = Record()
    path = next((tmp_path / "ckpt").glob(f"*step={stop}.ckpt"))
    trainer(tmp_path / "resume").fit(resumed, datamodule=data(), ckpt_path=path)
    assert resumed.seen == reference.seen[stop:]
