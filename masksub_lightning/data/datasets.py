"""Map-style datasets and file helpers shared by every DataModule.

Every file-based dataset is reduced to one list of ``(image_path, label)`` pairs read from its own on-disk
metadata, then served by :class:`ImageListDataset`. One loader for all datasets means one place that converts
odd image modes to RGB and one place that turns decode failures into errors naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")

Sample = tuple[str, int]


class CorruptImageError(RuntimeError):
    """An image file exists but cannot be decoded (corrupt, truncated or not an image)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image (grayscale, 16-bit, CMYK, palette, with alpha) to 8-bit RGB.

    Alpha is dropped, as timm / torchvision loaders do.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # 16/32-bit grayscale: PIL's convert("RGB") clips at 255, which turns most of the image white.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F" and arr.max() > 255:
            arr = arr / 257.0  # 65535 -> 255
        elif img.mode == "F" and arr.max() <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids PIL's "palette images with transparency" warning.
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully and return it as RGB.

    Raises:
        FileNotFoundError: the file is listed in the dataset's metadata but missing on disk.
        CorruptImageError: the file cannot be decoded; the message names the file.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now, inside the try, so a truncated file fails here and not in a transform
            return to_rgb(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        # PIL.UnidentifiedImageError and "image file is truncated" are both OSErrors.
        raise CorruptImageError(f"Cannot decode image file {path}: {e}") from e


def check_labels(labels: Sequence[int], num_classes: int, name_of: Callable[[int], str], source: str) -> None:
    """Raise a ValueError naming the first item whose label is outside ``[0, num_classes)``.

    Args:
        labels: 0-based labels.
        num_classes: number of classes.
        name_of: item index -> its name (file path) for the message.
        source: where the labels were read from, for the message.
    """
    arr = np.asarray(labels, dtype=np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name_of(i)}: label {int(arr[i])} is outside [0, {num_classes}) "
            f"({bad.size} bad label(s) in total, read from {source})"
        )


class ImageListDataset(Dataset):
    """Images on disk given as ``(path, label)`` pairs; labels are checked against ``num_classes`` up front.

    Args:
        samples: ``(image_path, label)`` pairs, labels already 0-based.
        num_classes: number of classes; every label must lie in ``[0, num_classes)``.
        transform: applied to the RGB PIL image.
        source: where the list was read from, quoted in error messages.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        transform: Callable | None = None,
        source: str = "",
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        check_labels([s[1] for s in self.samples], num_classes, lambda i: self.samples[i][0], source)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = load_rgb(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, label


class ArrayImageDataset(Dataset):
    """Images held in memory as a ``(N, H, W, 3)`` uint8 array (CIFAR): served as PIL images like files are.

    Args:
        images: ``(N, H, W, 3)`` uint8 array.
        labels: ``N`` labels in ``[0, num_classes)``.
        num_classes: number of classes.
        transform: applied to the RGB PIL image.
        source: where the arrays were read from, quoted in error messages.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int],
        num_classes: int,
        transform: Callable | None = None,
        source: str = "",
    ) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{source}: expected a (N, H, W, 3) uint8 array, got {images.shape} {images.dtype}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{source}: {len(images)} images but {len(labels)} labels")
        check_labels(labels, num_classes, lambda i: f"image {i} of {source}", source)
        self.images = images
        self.targets = [int(y) for y in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.images[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class TensorImageDataset(Dataset):
    """Preprocessed ``(N, C, H, W)`` float images kept in memory, with a cheap per-sample tensor transform.

    Args:
        images: ``(N, C, H, W)`` float tensor.
        labels: ``(N,)`` int64 tensor.
        transform: applied to each ``(C, H, W)`` tensor.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[index]


# ------------------------------------------------------------------------------------- file-system helpers


def require_path(path: str | os.PathLike, what: str, layout: str, kind: str = "any") -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError naming it and the expected layout.

    Args:
        path: the path that must exist.
        what: what this path is, e.g. "CUB-200-2011 image list".
        layout: the expected directory tree, quoted in the error.
        kind: "dir", "file" or "any".
    """
    p = Path(path)
    ok = p.is_dir() if kind == "dir" else p.is_file() if kind == "file" else p.exists()
    if not ok:
        noun = {"dir": "directory", "file": "file"}.get(kind, "path")
        raise FileNotFoundError(f"{what}: expected {noun} {p} does not exist. Expected layout:\n{layout}")
    return p


def list_class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the sub-directories of ``split_dir`` (hidden ones skipped)."""
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise FileNotFoundError(
            f"{split_dir} has no class sub-directories (expected {split_dir}/<class>/<image>)"
        )
    return names


def list_images(class_dir: Path) -> list[str]:
    """Sorted image files directly inside ``class_dir``; an empty class folder is an error naming it."""
    files = sorted(
        e.path for e in os.scandir(class_dir) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise FileNotFoundError(
            f"Class folder {class_dir} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def scan_image_folder(split_dir: Path, class_names: Sequence[str], require_all: bool) -> list[Sample]:
    """``(path, label)`` pairs of an ImageFolder split ``split_dir/<class>/<image>``.

    Args:
        split_dir: the split directory.
        class_names: class folder names; a folder's label is its position in this list.
        require_all: a missing class folder is an error (train); otherwise it is skipped (a val split may
            lack a rare class).
    """
    samples: list[Sample] = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            if require_all:
                raise FileNotFoundError(f"Class folder {class_dir} does not exist")
            continue
        samples.extend((path, label) for path in list_images(class_dir))
    return samples
