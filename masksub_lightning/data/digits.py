"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images of 10 classes, no download needed.

The quickstart dataset: upsampled to ``img_size`` once, kept in memory as float tensors, so a small ViT trains
on it in a minute or two on a laptop CPU. Shares the base's sampler, Mixup / CutMix and loaders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision import transforms as T

from masksub_lightning.data.base import (
    HParam,
    ImageClassificationDataModule,
    Split,
    check_bool,
    check_int,
)
from masksub_lightning.data.datasets import TensorImageDataset


class RandomShift(torch.nn.Module):
    """Translate a ``(C, H, W)`` tensor by up to ``max_shift`` pixels along each axis, filling with zeros.

    Args:
        max_shift: largest shift in pixels.
    """

    def __init__(self, max_shift: int) -> None:
        super().__init__()
        self.max_shift = max_shift

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        s = self.max_shift
        if s == 0:
            return img
        h, w = img.shape[-2:]
        dy, dx = (torch.randint(0, 2 * s + 1, (2,))).tolist()
        return F.pad(img, (s, s, s, s))[..., dy : dy + h, dx : dx + w]


class DigitsDataModule(ImageClassificationDataModule):
    """Handwritten digits (``sklearn.datasets.load_digits``) as ``(3, img_size, img_size)`` images.

    A fixed, seeded, stratified train / val split (test = val). The timm PIL augmentations of the base do not
    apply here; the optional training augmentation is a random shift of up to one original pixel.

    Args:
        batch_size: batch size per device.
        num_workers: DataLoader workers; 0 is fastest for in-memory tensors.
        img_size: output resolution (the 8x8 digits are upsampled bilinearly).
        val_fraction: fraction of the 1,797 images held out for validation (stratified by class).
        split_seed: seed of the train / val split (fixed, independent of ``seed``).
        train_augment: randomly shift training images by up to ``img_size // 8`` pixels (one original pixel).
        mean: normalisation mean of the [0, 1] images.
        std: normalisation std.
        mixup_alpha: see :class:`ImageClassificationDataModule` (as are the remaining args).
        cutmix_alpha: CutMix alpha; 0 disables CutMix.
        mixup_prob: probability of mixing a batch (or element).
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        mixup_mode: "batch", "pair" or "elem".
        label_smoothing: label smoothing folded into soft training targets.
        repeated_aug: repeated augmentation count (1 = off).
        channels_last: return images in channels_last memory format.
        pin_memory: pin host memory (only when an accelerator is present).
        persistent_workers: keep workers alive between epochs (only when ``num_workers > 0``).
        seed: seed of the training order.
    """

    layout = "(no files: sklearn.datasets.load_digits ships with scikit-learn)"
    val_fraction = HParam()
    split_seed = HParam()
    train_augment = HParam()

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        img_size: int = 32,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        train_augment: bool = True,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: Literal["batch", "pair", "elem"] = "batch",
        label_smoothing: float = 0.0,
        repeated_aug: int = 1,
        channels_last: bool = False,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        seed: int = 0,
    ) -> None:
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, (int, float))
            or not 0 < val_fraction < 1
        ):
            raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be a number in (0, 1)")
        check_int("split_seed", split_seed, minimum=0)
        check_bool("train_augment", train_augment)
        super().__init__(
            root=None,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            img_size=img_size,
            mean=mean,
            std=std,
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            mixup_prob=mixup_prob,
            mixup_switch_prob=mixup_switch_prob,
            mixup_mode=mixup_mode,
            label_smoothing=label_smoothing,
            repeated_aug=repeated_aug,
            channels_last=channels_last,
            seed=seed,
        )
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def read_class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    def _split_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"train": (images, labels), "val": ...}: (N, 3, S, S) float in [0, 1] and (N,) int64."""
        if self._tensors is None:
            digits = load_digits()
            x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8), pixels 0..16
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
            x = x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)
            y = torch.from_numpy(digits.target).long()
            train_idx, val_idx = train_test_split(
                np.arange(len(y)),
                test_size=self.val_fraction,
                stratify=digits.target,
                random_state=self.split_seed,
            )
            train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
            self._tensors = {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx])}
        return self._tensors

    def build_transform(self, train: bool) -> Callable:
        normalize = T.Normalize(self.mean, self.std)
        if train and self.train_augment:
            return T.Compose([RandomShift(max(1, self.img_size // 8)), normalize])
        return normalize

    def build_dataset(self, split: Split, transform: Callable | None) -> TensorImageDataset:
        images, labels = self._split_tensors()["train" if split == "train" else "val"]
        return TensorImageDataset(images, labels, transform)
