"""ImageFolder-layout datasets: your own data, and ImageNet-1k (or a class subset such as ImageNet-100)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from masksub_lightning.data.base import HParam, ImageClassificationDataModule, Split, check_optional_str
from masksub_lightning.data.datasets import Sample, list_class_dirs, scan_image_folder


class ImageFolderDataModule(ImageClassificationDataModule):
    """Images sorted into one folder per class, one folder per split.

    Classes are the sorted sub-folders of ``train/``; val / test folders use the same label mapping (a class
    folder they lack is skipped, an extra one is an error). Without ``test/`` the test split is ``val/``.

    Args:
        root: dataset directory holding ``train/`` and ``val/`` (and optionally ``test/``).
        class_list: optional text file with one class folder name per line (blank lines and ``#`` comments
            skipped): only these classes are used, labelled in the file's order. A relative path is looked
            up under ``root`` first, then in the working directory.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    layout = (
        "<root>/train/<class>/<image>.jpg   (one sub-folder per class; .jpeg/.png/... also read)\n"
        "<root>/val/<class>/<image>.jpg\n"
        "<root>/test/<class>/<image>.jpg    (optional; val is used when absent)"
    )

    class_list = HParam()

    def __init__(self, root: str, class_list: str | None = None, **kwargs: Any) -> None:
        check_optional_str("class_list", class_list, path=True)
        super().__init__(root=root, **kwargs)

    def read_class_names(self) -> list[str]:
        if self.class_list is None:
            return list_class_dirs(self.require(self.root_path / "train", "train split", kind="dir"))
        path = Path(self.class_list)
        if not path.is_absolute() and (self.root_path / path).is_file():
            path = self.root_path / path  # relative to root first, then to the working directory
        path = self.require(path, "class_list file", kind="file")
        names = [line.strip() for line in path.read_text().splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        if len(set(names)) != len(names):
            raise ValueError(f"class_list file {path} lists a class more than once")
        return names

    def split_dir(self, split: Split) -> Path:
        if split == "test" and not (self.root_path / "test").is_dir():
            split = "val"
        return self.require(self.root_path / split, f"{split} split", kind="dir")

    def read_samples(self, split: Split) -> list[Sample]:
        split_dir = self.split_dir(split)
        if split != "train" and self.class_list is None:
            # Without a class list every folder must be a train class: a typo would silently drop images.
            extra = sorted(set(list_class_dirs(split_dir)) - set(self.class_names))
            if extra:
                raise ValueError(f"{split_dir} has class folders that train/ lacks: {extra[:5]}")
        return scan_image_folder(
            split_dir,
            self.class_names,
            require_all=split == "train",
            on_empty=partial(self.report_bad, split, "empty class folder(s)"),
        )


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1k (ILSVRC-2012) in ImageFolder layout, the DeiT-III / RSB / MAE / Swin training set.

    The validation images must be sorted into ``val/<wnid>/`` folders (the usual preprocessing of the
    official flat val folder). The test split is the val split (ImageNet's test labels are not public).
    With ``class_list`` (one wnid per line) only those classes are used, e.g. ImageNet-100.

    Args:
        root: directory holding ``train/`` and ``val/``.
        class_list: optional file of wnids (one per line) selecting and ordering a class subset.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    layout = (
        "<root>/train/n01440764/n01440764_10026.JPEG   (1000 wnid folders)\n"
        "<root>/val/n01440764/ILSVRC2012_val_00000293.JPEG   (val sorted into the same wnid folders)"
    )

    def read_samples(self, split: Split) -> list[Sample]:
        split_dir = self.split_dir("val" if split == "test" else split)
        # A class list may name a subset, so extra val folders are fine; a missing class folder is not.
        return scan_image_folder(
            split_dir,
            self.class_names,
            require_all=True,
            on_empty=partial(self.report_bad, split, "empty class folder(s)"),
        )
