"""Every DataModule signature is readable by jsonargparse / LightningCLI; num_classes links to a model."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch
from fake_data import write_cub200
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI

import masksub_lightning.data as data

DATAMODULES = [getattr(data, n) for n in data.__all__ if n.endswith("DataModule")]
BASE_ARGS = {"batch_size", "num_workers", "img_size", "mixup_alpha", "cutmix_alpha", "repeated_aug", "seed"}


@pytest.mark.parametrize("cls", DATAMODULES, ids=lambda c: c.__name__)
def test_signature_is_parseable(cls):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    args = {a.dest.split(".", 1)[1] for a in parser._actions if a.dest.startswith("data.")}
    assert args >= BASE_ARGS  # subclasses forward **kwargs to the base: jsonargparse must see through it
    if cls not in (data.DigitsDataModule, data.PretrainDigitsDataModule):  # the digits ship with scikit-learn
        assert "root" in args and {"train_crop", "auto_augment", "norm_from_model"} <= args
    assert "num_classes" not in args  # a property, read from the data


def test_yaml_values_reach_the_datamodule(tmp_path):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(data.INaturalistDataModule, "data")
    cfg = parser.parse_string(
        "data:\n  root: /x\n  version: '2019'\n  train_crop: simple\n  auto_augment: 3a\n"
        "  scale: [0.2, 1.0]\n  mean: [0.5, 0.5, 0.5]\n  std: [0.5, 0.5, 0.5]\n"
        "  mixup_alpha: 0.8\n  repeated_aug: 3\n"
    )
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, data.INaturalistDataModule)
    assert (dm.version, dm.train_crop, dm.auto_augment, dm.scale, dm.repeated_aug) == (
        "2019",
        "simple",
        "3a",
        (0.2, 1.0),
        3,
    )
    with pytest.raises(Exception, match="train_crop"):
        parser.parse_string("data:\n  root: /x\n  train_crop: centre\n")


class _Head(L.LightningModule):
    def __init__(self, num_classes: int = 1) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, num_classes)


class _CLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


@pytest.mark.parametrize(
    ("cls_path", "extra", "expected"),
    [
        ("masksub_lightning.data.DigitsDataModule", [], 10),
        ("masksub_lightning.data.CUB200DataModule", ["--data.init_args.root={root}"], 200),
    ],
)
def test_cli_links_num_classes_before_setup(tmp_path, monkeypatch, cls_path, extra, expected):
    monkeypatch.setattr(sys, "argv", ["masksub"])  # LightningCLI warns when pytest's own argv is there too
    write_cub200(tmp_path)
    args = [
        "--data.class_path",
        cls_path,
        *(e.format(root=tmp_path) for e in extra),
        "--trainer.logger=false",
        "--trainer.accelerator=cpu",
    ]
    cli = _CLI(_Head, L.LightningDataModule, subclass_mode_data=True, run=False, args=args)
    assert cli.model.head.out_features == expected
    assert cli.datamodule.datasets == {}  # nothing was set up to get there
