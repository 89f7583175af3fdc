"""CIFAR-10 / CIFAR-100 from the official python pickle batches (the folders torchvision's CIFAR10/100 read).

Read with our own few lines rather than ``torchvision.datasets.CIFAR10``, which checks each batch file's md5
and so rejects anything but the untouched official files. Images stay in memory as uint8 and go through the
same timm PIL transforms as every other dataset (upsampled to ``img_size`` for transfer learning).
Validation and test are both the official test set, as transfer-learning papers report.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from masksub_lightning.data.base import ImageClassificationDataModule, Split
from masksub_lightning.data.datasets import ArrayImageDataset, bad_label_indices, label_error


class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10 (10 classes, 50k train / 10k test images of 32x32).

    Args:
        root: directory holding ``cifar-10-batches-py/`` (torchvision's root), or that folder itself.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    names_key = "label_names"
    labels_key = "labels"
    layout = (
        "<root>/cifar-10-batches-py/data_batch_1 ... data_batch_5   (python pickles: 'data' (N, 3072) uint8, "
        "'labels')\n<root>/cifar-10-batches-py/test_batch\n<root>/cifar-10-batches-py/batches.meta   "
        "('label_names')"
    )

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)

    @property
    def base_dir(self) -> Path:
        return self.find_dir(self.folder, self.meta_file)

    def _unpickle(self, name: str) -> tuple[dict, Path]:
        path = self.require(self.base_dir / name, "pickle file", kind="file")
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1"), path
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"Cannot read CIFAR pickle file {path}: {e}") from e

    def read_class_names(self) -> list[str]:
        meta, path = self._unpickle(self.meta_file)
        if self.names_key not in meta:
            raise ValueError(f"{path} has no {self.names_key!r} entry")
        return list(meta[self.names_key])

    def build_dataset(self, split: Split, transform: Callable | None) -> ArrayImageDataset:
        images, labels = [], []
        for name in self.train_files if split == "train" else self.test_files:
            batch, path = self._unpickle(name)
            try:
                data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # planes R, G, B
                batch_labels = [int(y) for y in batch[self.labels_key]]
            except (KeyError, ValueError) as e:
                raise ValueError(f"Malformed CIFAR batch {path}: {e!r}") from e
            bad = bad_label_indices(batch_labels, self.num_classes)
            for i in bad:
                message = label_error(
                    f"image {i} of {path}", batch_labels[i], self.num_classes, str(path), len(bad)
                )
                self.report_bad(split, "out-of-range label(s)", message)
            keep = np.setdiff1d(np.arange(len(batch_labels)), bad)
            images.append(data[keep].transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
            labels += [batch_labels[i] for i in keep]
        source = f"{self.base_dir} ({split})"
        return ArrayImageDataset(
            np.ascontiguousarray(np.concatenate(images)), labels, self.num_classes, transform, source
        )


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 with its 100 fine labels (50k train / 10k test images of 32x32).

    Args:
        root: directory holding ``cifar-100-python/`` (torchvision's root), or that folder itself.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    names_key = "fine_label_names"
    labels_key = "fine_labels"
    layout = (
        "<root>/cifar-100-python/train   (python pickle: 'data' (N, 3072) uint8, 'fine_labels')\n"
        "<root>/cifar-100-python/test\n<root>/cifar-100-python/meta   ('fine_label_names')"
    )
