"""DataModule arguments live in ``dm.hparams`` (save_hyperparameters), readable and writable as attributes."""

from __future__ import annotations

import inspect

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from masksub_lightning.data import DigitsDataModule, ImageNetDataModule, INaturalistDataModule


def test_every_argument_is_saved_and_rebuilds_the_same_datamodule():
    dm = ImageNetDataModule(root="/data/in1k", class_list="in100.txt", batch_size=64, scale=[0.2, 1.0])
    params = set(inspect.signature(ImageNetDataModule.__init__).parameters) - {"self", "kwargs"}
    base = set(inspect.signature(ImageNetDataModule.__mro__[2].__init__).parameters) - {"self"}
    assert set(dm.hparams) == params | base
    assert dm.hparams["class_list"] == "in100.txt" and dm.hparams["batch_size"] == 64
    assert dm.scale == (0.2, 1.0) and dm.hparams["scale"] == (0.2, 1.0)  # YAML lists become tuples
    again = ImageNetDataModule(**dm.hparams)
    assert dict(again.hparams) == dict(dm.hparams)
    assert (again.root, again.class_list, again.batch_size, again.mean) == (
        "/data/in1k",
        "in100.txt",
        64,
        dm.mean,
    )


def test_subclass_saves_only_its_own_signature():
    dm = DigitsDataModule(batch_size=16, split_seed=3)
    assert set(dm.hparams) == set(inspect.signature(DigitsDataModule.__init__).parameters) - {"self"}
    assert "train_crop" not in dm.hparams and dm.train_crop == "rrc"  # the base default it was built with
    assert dm.split_seed == 3 and dm.val_fraction == 0.2
    assert dict(DigitsDataModule(**dm.hparams).hparams) == dict(dm.hparams)


def test_attributes_write_through_to_hparams():
    dm = DigitsDataModule(batch_size=16)
    dm.batch_size = 32  # e.g. Lightning's batch-size finder
    assert dm.hparams["batch_size"] == 32 and dm.train_dataloader().batch_size == 32


def test_inaturalist_version_is_saved_as_the_string():
    assert INaturalistDataModule(root="x", version=2019).hparams["version"] == "2019"


class _Tiny(L.LightningModule):
    def __init__(self, label_smoothing: float = 0.0, channels_last: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(3 * 8 * 8, 10)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_checkpoint_holds_the_hparams_and_loggers_do_not_clash(tmp_path):
    # The module and the data both have label_smoothing / channels_last, with different values: Lightning
    # refuses to log both under one key, so the DataModule's arguments are kept out of the loggers.
    dm = DigitsDataModule(batch_size=8, img_size=8, label_smoothing=0.1, channels_last=True, seed=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_Tiny(), datamodule=dm)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["datamodule_hyper_parameters"]
    assert saved["label_smoothing"] == 0.1 and saved["seed"] == 4
    restored = DigitsDataModule.load_from_checkpoint(path)
    assert dict(restored.hparams) == dict(dm.hparams)
