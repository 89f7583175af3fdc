"""Map-style datasets and file helpers shared by every DataModule.

Every file-based dataset is reduced to one list of ``(image_path, label)`` pairs read from its own on-disk
metadata, then served by :class:`ImageListDataset`. One loader for all datasets means one place that converts
odd image modes to RGB and one place that turns decode failures into errors naming the file.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from masksub_lightning.data.samplers import mix_seed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")

Sample = tuple[str, int]


class BadImageError(RuntimeError):
    """An image of a dataset cannot be used; the message names the file. Skipped with ``bad_samples="skip"``."""


class CorruptImageError(BadImageError):
    """An image file exists but cannot be decoded (corrupt, truncated or not an image)."""


class ImageTooSmallError(BadImageError):
    """An image's shorter side is below the DataModule's ``min_image_size``."""


class ImageTransformError(BadImageError):
    """The transform pipeline failed on an image (the original exception is chained)."""


#: What a DataLoader raises for one unusable sample, and what ``bad_samples="skip"`` skips.
BAD_SAMPLE_ERRORS = (BadImageError, FileNotFoundError)
#: Appended to the message of a bad sample under ``bad_samples="error"``: the way to train on regardless.
SKIP_HINT = "; to skip such files, set bad_samples: skip (--data.init_args.bad_samples skip)"


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


@contextlib.contextmanager
def decoding(name: str | os.PathLike) -> Iterator[None]:
    """Turn PIL's failures to open or decode the image ``name`` into one-line errors naming it.

    The one place that does (files, undecoded files, streaming shards, reduced-size JPEG decoding).

    Raises:
        FileNotFoundError: the file is listed in the dataset's metadata but missing on disk.
        CorruptImageError: the file cannot be decoded (corrupt, truncated, not an image).
    """
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file not found: {name}") from None
    except (OSError, SyntaxError, ValueError) as e:
        # PIL.UnidentifiedImageError and "image file is truncated" are both OSErrors. PIL's own traceback says
        # nothing the message does not, so it is not chained.
        raise CorruptImageError(f"Cannot decode image file {name}: {e}") from None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully and return it as RGB (errors: see :func:`decoding`)."""
    with decoding(path), Image.open(path) as img:
        img.load()  # decode now, inside the handler, so a truncated file fails here and not in a transform
        return to_rgb(img)


def bad_label_indices(labels: Sequence[int], num_classes: int) -> list[int]:
    """Positions of the labels outside ``[0, num_classes)``."""
    arr = np.asarray(labels, dtype=np.int64)
    return np.flatnonzero((arr < 0) | (arr >= num_classes)).tolist()


def check_labels(labels: Sequence[int], num_classes: int, name_of: Callable[[int], str], source: str) -> None:
    """Raise a ValueError naming the first item whose label is outside ``[0, num_classes)``.

    Args:
        labels: 0-based labels.
        num_classes: number of classes.
        name_of: item index -> its name (file path) for the message.
        source: where the labels were read from, for the message.
    """
    bad = bad_label_indices(labels, num_classes)
    if bad:
        raise ValueError(label_error(name_of(bad[0]), int(labels[bad[0]]), num_classes, source, len(bad)))


def label_error(name: str, label: int, num_classes: int, source: str, count: int = 1) -> str:
    """The message for an out-of-range label (shared by the error and the skip warning)."""
    return (
        f"{name}: label {label} is outside [0, {num_classes}) "
        f"({count} bad label(s) in total, read from {source})"
    )


class ImageListDataset(Dataset):
    """Images on disk given as ``(path, label)`` pairs; labels are checked against ``num_classes`` up front.

    Every failure of one sample raises a :class:`BadImageError` (or FileNotFoundError) naming the file, in the
    main process and in DataLoader workers alike (torch re-raises a worker's exception with its message).

    Args:
        samples: ``(image_path, label)`` pairs, labels already 0-based.
        num_classes: number of classes; every label must lie in ``[0, num_classes)``.
        transform: applied to the RGB PIL image.
        source: where the list was read from, quoted in error messages.
        min_size: images whose shorter side is below this many pixels raise :class:`ImageTooSmallError`.
    """

    #: Can hand over undecoded bytes (``decode="gpu"``: a transform with ``takes_encoded_bytes``).
    serves_encoded_bytes = True

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        transform: Callable | None = None,
        source: str = "",
        min_size: int = 1,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.min_size = min_size
        check_labels([s[1] for s in self.samples], num_classes, lambda i: self.samples[i][0], source)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        if getattr(self.transform, "takes_encoded_bytes", False):  # decode="gpu": the file's bytes, undecoded
            with decoding(path):
                data = Path(path).read_bytes()
            return self.transform(data, str(path)), label  # type: ignore[misc]
        if getattr(self.transform, "takes_unloaded_image", False):
            return self._load_undecoded(path, label)
        img = load_rgb(path)
        if min(img.size) < self.min_size:
            raise ImageTooSmallError(
                f"Image file {path} is {img.width}x{img.height} px, smaller than min_image_size={self.min_size}"
            )
        if self.transform is not None:
            try:
                img = self.transform(img)
            except Exception as e:  # name the file: a bare trace from inside a transform names nothing
                raise ImageTransformError(
                    f"The transform failed on image file {path} ({img.width}x{img.height} px): {e!r}"
                ) from e
        return img, label

    def _load_undecoded(self, path: str, label: int) -> tuple[torch.Tensor, int]:
        """Open without decoding and let the transform decode (``fast_decode``: it picks a reduced JPEG size)."""
        with decoding(path):
            img = Image.open(path)
        with img:
            if min(img.size) < self.min_size:
                raise ImageTooSmallError(
                    f"Image file {path} is {img.width}x{img.height} px, smaller than "
                    f"min_image_size={self.min_size}"
                )
            try:
                return self.transform(img), label  # type: ignore[misc]
            except BadImageError:
                raise  # the decoder's own error already names the file
            except Exception as e:
                raise ImageTransformError(
                    f"The transform failed on image file {path} ({img.width}x{img.height} px): {e!r}"
                ) from e


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
    """Sorted image files directly inside ``class_dir`` (possibly none)."""
    return sorted(
        e.path for e in os.scandir(class_dir) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def empty_folder_error(class_dir: Path) -> str:
    return f"Class folder {class_dir} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)})"


def scan_image_folder(
    split_dir: Path,
    class_names: Sequence[str],
    require_all: bool,
    on_empty: Callable[[str], None] | None = None,
) -> list[Sample]:
    """``(path, label)`` pairs of an ImageFolder split ``split_dir/<class>/<image>``.

    Args:
        split_dir: the split directory.
        class_names: class folder names; a folder's label is its position in this list.
        require_all: a missing class folder is an error (train); otherwise it is skipped (a val split may
            lack a rare class).
        on_empty: called with the message for a class folder without images; None: raise a ValueError.
    """
    samples: list[Sample] = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            if require_all:
                raise FileNotFoundError(f"Class folder {class_dir} does not exist")
            continue
        files = list_images(class_dir)
        if not files:
            if on_empty is None:
                raise ValueError(empty_folder_error(class_dir))
            on_empty(empty_folder_error(class_dir))
        samples.extend((path, label) for path in files)
    return samples


# ---------------------------------------------------------------------------------- what loaders index


@contextlib.contextmanager
def seeded_rng(seed: int, restore: bool = True) -> Iterator[None]:
    """Run the block with Python's, NumPy's and torch's CPU global RNGs seeded from ``seed``, then restore them.

    timm / torchvision transforms draw from all three global RNGs. Restoring them afterwards keeps data
    loading in the main process (``num_workers=0``) from shifting the model's random stream. Only the CPU
    generator is touched: ``torch.manual_seed`` would also reseed (and not restore) every CUDA generator.

    Args:
        seed: the seed (any non-negative integer; NumPy gets its low 32 bits).
        restore: restore the previous states afterwards. DataLoader workers skip it: nothing else there uses
            the global RNGs, and saving NumPy's state is most of the cost (about 50 us of 65 us a sample).
    """
    states = (
        (torch.default_generator.get_state(), random.getstate(), np.random.get_state()) if restore else None
    )
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    try:
        yield
    finally:
        if states is not None:
            torch.default_generator.set_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])


class SampleDataset(Dataset):
    """What a DataModule's loaders index: per-sample augmentation seeds and the bad-sample policy.

    Keys are indices, or ``(index, seed)`` pairs from :class:`RepeatedAugSampler` ``(with_seeds=True)``:
    the sample is then loaded and augmented under :func:`seeded_rng` ``(seed)``, so its augmentation is a
    function of (seed, epoch, position) only, identical in any worker, after any resume.

    A sample that raises one of :data:`BAD_SAMPLE_ERRORS` is, with ``bad_samples="error"``, re-raised (the
    message names the file); with ``"skip"`` it is replaced by another sample chosen deterministically from the
    key, a warning names the file (once per process and file), and the sample is counted (once, however many
    draws its replacement took) in :attr:`skip_counts`, a shared-memory tensor with one slot per process
    (main = 0, worker w = w + 1).

    Args:
        dataset: the split's dataset.
        bad_samples: "error" or "skip".
        num_workers: the loader's worker count (sizes :attr:`skip_counts`).
        max_attempts: replacements tried for one key before giving up (the dataset is then mostly unusable).
    """

    def __init__(
        self,
        dataset: Dataset,
        bad_samples: Literal["error", "skip"] = "error",
        num_workers: int = 0,
        max_attempts: int = 100,
    ) -> None:
        self.dataset = dataset
        self.bad_samples = bad_samples
        self.max_attempts = max_attempts
        # Shared memory: workers' increments are visible in the main process (fork and spawn alike).
        self.skip_counts = torch.zeros(num_workers + 1, dtype=torch.int64).share_memory_()
        self._known_bad: set[int] = set()  # per process: indices already found bad are not decoded again

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def skipped(self) -> int:
        """Samples skipped so far, all processes together."""
        return int(self.skip_counts.sum())

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        index, seed = key if isinstance(key, tuple) else (key, None)
        in_worker = get_worker_info() is not None
        rng = seeded_rng(seed, restore=not in_worker) if seed is not None else contextlib.nullcontext()
        with rng:
            return self._load(int(index), seed)

    def _load(self, index: int, seed: int | None) -> Any:
        last_error: BaseException | None = None
        for attempt in range(self.max_attempts):
            if index not in self._known_bad:
                try:
                    return self.dataset[index]
                except BAD_SAMPLE_ERRORS as e:
                    if self.bad_samples == "error":
                        _add_skip_hint(e)
                        raise
                    self._known_bad.add(index)
                    warnings.warn(f"Skipping a bad sample (bad_samples='skip'): {e}", stacklevel=2)
                    last_error = e
            if attempt == 0:  # one count per sample served by a replacement
                info = get_worker_info()
                self.skip_counts[0 if info is None else info.id + 1] += 1
            # The replacement depends only on the key, so a resumed run picks the same one.
            index = mix_seed(index, seed if seed is not None else 0, attempt) % len(self)
        raise RuntimeError(
            f"{self.max_attempts} bad samples in a row while replacing one (bad_samples='skip'); most of the "
            f"dataset is unreadable. Last error: {last_error}"
        )


def _add_skip_hint(err: BaseException) -> None:
    """End the message of ``err`` with :data:`SKIP_HINT` (in place: its type, traceback and cause stay).

    In a DataLoader worker torch re-raises the worker's exception with its formatted traceback as the message, so
    this message is also the last line a training run prints.
    """
    err.args = (f"{err}{SKIP_HINT}",)
