"""Data for MAE / LUT pre-training (:mod:`masksub_lightning.modules.pretraining`): the same datasets, other train views.

``views="mae"``: one view per image, MAE's augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + flip.
``views="lut"``: two views per image, stacked as (2, C, H, W) (batches (B, 2, C, H, W)), LUT's augmentations::

    both views   "simple resized crop" (SRC): Resize(img_size) -> RandomCrop(img_size, padding 4, reflect) -> flip,
                 drawn independently per view
    view 0       (the MIM view) nothing more
    view 1       (the context view) ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, then one of grayscale /
                 solarize / gaussian blur (3-Augment)

Labels are loaded but unused by the pre-training modules. Evaluation batches are single images with the base's
eval transform (the modules report the reconstruction loss on them). The transforms take PIL images (image
folders) and [0, 1] float tensors (the in-memory digits) alike.

=====================================  ===============================================================
class                                  data
=====================================  ===============================================================
:class:`PretrainImageFolderDataModule` any ImageFolder-style ``train/<class>/`` tree (labels unused)
:class:`PretrainImageNetDataModule`    ImageNet-1k (or a class subset)
:class:`PretrainDigitsDataModule`      scikit-learn's 8x8 digits, upsampled (CPU end-to-end runs)
=====================================  ===============================================================
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, Literal

import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from masksub_lightning.data.base import HParam, check_int
from masksub_lightning.data.digits import DigitsDataModule
from masksub_lightning.data.imagenet import ImageFolderDataModule, ImageNetDataModule

__all__ = [
    "PretrainDigitsDataModule",
    "PretrainImageFolderDataModule",
    "PretrainImageNetDataModule",
    "PretrainViews",
    "lut_view_transforms",
    "mae_view_transform",
]

_VIEWS = ("mae", "lut")


class _ToTensor:
    """PIL image -> float tensor in [0, 1]; a tensor passes through (in-memory datasets are tensors already)."""

    def __call__(self, img: Any) -> torch.Tensor:
        return img if isinstance(img, torch.Tensor) else TF.to_tensor(img)


class Solarize:
    """Invert the pixels at or above half of the range (PIL: 128; [0, 1] tensors: 0.5)."""

    def __call__(self, img: Any) -> Any:
        if isinstance(img, Image.Image):
            return ImageOps.solarize(img, threshold=128)
        return torch.where(img >= 0.5, 1.0 - img, img)


class GaussianBlur:
    """Gaussian blur with a radius (sigma) drawn uniformly from ``radius`` (DeiT-III's 3-Augment: 0.1 - 2)."""

    def __init__(self, radius: tuple[float, float] = (0.1, 2.0)) -> None:
        self.radius = radius

    def __call__(self, img: Any) -> Any:
        sigma = random.uniform(*self.radius)
        if isinstance(img, Image.Image):
            return img.filter(ImageFilter.GaussianBlur(radius=sigma))
        kernel = 2 * math.ceil(3 * sigma) + 1
        return TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma])


def _src(img_size: int, interpolation: str, hflip: float) -> list[Callable]:
    """The "simple resized crop" geometry of DeiT-III / LUT."""
    ops: list[Callable] = [
        T.Resize(img_size, interpolation=str_to_interp_mode(interpolation)),
        T.RandomCrop(img_size, padding=4, padding_mode="reflect"),
    ]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    return ops


def lut_view_transforms(
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: str = "bicubic",
    hflip: float = 0.5,
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
    jitter_prob: float = 0.8,
) -> tuple[Callable, Callable]:
    """LUT's (MIM view, context view) pipelines: image -> normalised (C, img_size, img_size) tensor."""
    finish = [_ToTensor(), T.Normalize(mean, std)]
    mim = T.Compose([*_src(img_size, interpolation, hflip), *finish])
    context = T.Compose(
        [
            *_src(img_size, interpolation, hflip),
            T.RandomApply([T.ColorJitter(*color_jitter)], p=jitter_prob),
            T.RandomChoice([T.Grayscale(num_output_channels=3), Solarize(), GaussianBlur()]),
            *finish,
        ]
    )
    return mim, context


def mae_view_transform(
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: str = "bicubic",
    hflip: float = 0.5,
) -> Callable:
    """MAE's pre-training augmentation: RandomResizedCrop(scale 0.2-1) + flip + normalise."""
    ops: list[Callable] = [
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=str_to_interp_mode(interpolation)),
    ]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    return T.Compose([*ops, _ToTensor(), T.Normalize(mean, std)])


class PretrainViews:
    """Apply each view pipeline to the same image and stack the results: (num_views, C, H, W).

    Raises:
        ValueError: the views come out with different shapes (they must stack, and the student and teacher
            share one position embedding).
    """

    def __init__(self, *views: Callable) -> None:
        self.views = views

    def __call__(self, img: Any) -> torch.Tensor:
        out = [view(img) for view in self.views]
        shapes = {tuple(v.shape) for v in out}
        if len(shapes) != 1:
            raise ValueError(
                f"the pre-training views have different shapes {sorted(shapes)}; they must be equal"
            )
        return torch.stack(out)


class PretrainViewsMixin:
    """Gives a classification DataModule MAE / LUT training views (put it first in the bases).

    Args:
        views: ``"lut"`` (two stacked views per image) or ``"mae"`` (one view).
        view_sizes: output size of (view 0, view 1) for ``"lut"``; None: both ``img_size``. Both must equal
            ``img_size``: the student and the teacher encode both views with one position embedding.
        **kwargs: the DataModule's own arguments.
    """

    views = HParam()
    view_sizes = HParam()

    def __init__(
        self, views: Literal["mae", "lut"] = "lut", view_sizes: tuple[int, int] | None = None, **kwargs: Any
    ) -> None:
        if views not in _VIEWS:
            raise ValueError(f"views={views!r} is invalid: allowed: {', '.join(_VIEWS)}")
        if view_sizes is not None:
            if not isinstance(view_sizes, (list, tuple)) or len(view_sizes) != 2:
                raise ValueError(
                    f"view_sizes={view_sizes!r} is invalid: must be two sizes (view 0, view 1) or None"
                )
            for size in view_sizes:
                check_int("view_sizes", size, minimum=1)
            img_size = kwargs.get("img_size", 32 if isinstance(self, DigitsDataModule) else 224)
            if len(set(view_sizes)) != 1 or view_sizes[0] != img_size:
                raise ValueError(
                    f"view_sizes={tuple(view_sizes)!r} is invalid: both LUT views must be img_size={img_size} "
                    "(the student and the teacher encode them with one position embedding)"
                )
        super().__init__(**kwargs)

    def build_transform(self, train: bool) -> Callable:
        if not train:
            return super().build_transform(train)  # type: ignore[misc]
        args = (self.img_size, self.mean, self.std, self.interpolation)  # type: ignore[attr-defined]
        hflip = self.hflip  # type: ignore[attr-defined]
        if self.views == "mae":
            return mae_view_transform(*args, hflip=hflip)
        return PretrainViews(*lut_view_transforms(*args, hflip=hflip))


class PretrainImageFolderDataModule(PretrainViewsMixin, ImageFolderDataModule):
    """Pre-training views from ``train/<class>/`` folders (any ImageFolder-style dataset; labels unused)."""


class PretrainImageNetDataModule(PretrainViewsMixin, ImageNetDataModule):
    """Pre-training views from ImageNet-1k in ImageFolder layout (labels unused)."""


class PretrainDigitsDataModule(PretrainViewsMixin, DigitsDataModule):
    """Pre-training views from scikit-learn's digits (real 8x8 images, upsampled; labels unused)."""
