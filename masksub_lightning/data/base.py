"""The one base DataModule: timm transforms, Mixup/CutMix on the device, repeated augmentation, loaders.

Subclasses only say where the data is::

    read_class_names()      -> list[str]                 lightweight metadata, works before setup()
    read_samples(split)     -> [(image_path, label), ...] for split in "train" / "val" / "test"
    (or override build_dataset(split, transform) for in-memory data: CIFAR, Digits)

Batches are ``(images, targets)``: images float32 ``(B, 3, H, W)``; targets int64 ``(B,)``, except in
training with Mixup/CutMix or label smoothing on, where they are float32 ``(B, num_classes)`` soft targets
(rows sum to 1). Mixing happens in ``on_after_batch_transfer``, i.e. on the accelerator, on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import timm
import torch
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from timm.data.transforms import str_to_interp_mode
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from masksub_lightning.data.datasets import ImageListDataset, Sample, require_path
from masksub_lightning.data.samplers import RepeatedAugSampler

Split = Literal["train", "val", "test"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TRAIN_CROPS = ("rrc", "simple")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
_RE_MODES = ("const", "rand", "pixel")
_MIXUP_MODES = ("batch", "pair", "elem")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: {allowed}")


class ImageClassificationDataModule(L.LightningDataModule):
    """Base DataModule for image classification with the DeiT-III / RSB / MAE training pipelines.

    Every argument is a plain type so LightningCLI / jsonargparse can read it from YAML.

    Args:
        root: dataset root directory (layout: see the subclass).
        batch_size: batch size per device. Training drops the last incomplete batch (static shapes for
            ``torch.compile``).
        num_workers: DataLoader worker processes per device.
        pin_memory: pin host memory (only when an accelerator is present).
        persistent_workers: keep workers alive between epochs (only when ``num_workers > 0``).
        img_size: square input resolution of train and eval images.
        train_crop: "rrc" = RandomResizedCrop (with ``scale`` and ``ratio``); "simple" = DeiT-III's simple
            random crop (resize the short side to ``img_size``, random crop with 4 px reflect padding).
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: horizontal flip probability.
        auto_augment: timm augmentation string: "3a" (DeiT-III 3-Augment), "rand-m9-mstd0.5-inc1"
            (RandAugment), "augmix-...", "v0", or None.
        color_jitter: color jitter strength (brightness / contrast / saturation); None or 0 disables it.
            timm ignores it under RandAugment / AutoAugment, but keeps it with "3a" (as DeiT-III does).
        reprob: random erasing probability.
        remode: random erasing fill mode.
        eval_crop_pct: eval center-crop ratio (resize to ``img_size / eval_crop_pct``, then crop).
        interpolation: resize interpolation for train and eval.
        train_interpolation: training-only interpolation overriding ``interpolation`` ("random": timm's random
            bilinear / bicubic, as the RSB recipe uses); None: same as ``interpolation``.
        mean: normalisation mean; None = ImageNet's (or the model's, with ``norm_from_model``).
        std: normalisation std; None = ImageNet's (or the model's, with ``norm_from_model``).
        norm_from_model: a timm model name (e.g. "vit_base_patch16_clip_224.openai") whose pretrained
            config's mean / std to use (metadata only, nothing is downloaded). Excludes ``mean`` / ``std``.
        mixup_alpha: Mixup beta-distribution alpha; 0 disables Mixup.
        cutmix_alpha: CutMix beta-distribution alpha; 0 disables CutMix.
        mixup_prob: probability of mixing a batch (or element, see ``mixup_mode``).
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        mixup_mode: draw mixing parameters per "batch", per "pair" of samples or per "elem" (sample).
        label_smoothing: label smoothing folded into the soft training targets. Any value > 0 (like Mixup /
            CutMix) makes training targets float ``(B, num_classes)``.
        repeated_aug: repeated augmentation: each sampled image appears this many times per epoch, spread over
            ranks (3 for DeiT-III / RSB; 1 = off). Epoch length is unchanged.
        channels_last: return images in ``torch.channels_last`` memory format (faster convnets on GPU).
        seed: seed of the training order; the order is a function of (seed, epoch, world size, rank).

    Raises:
        ValueError: an argument is out of range; the message names the value and what is allowed.
    """

    #: Directory tree a subclass expects under ``root``; quoted in missing-path errors.
    layout: ClassVar[str] = "<root>/..."

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        img_size: int = 224,
        train_crop: Literal["rrc", "simple"] = "rrc",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = None,
        color_jitter: float | None = 0.4,
        reprob: float = 0.0,
        remode: Literal["const", "rand", "pixel"] = "pixel",
        eval_crop_pct: float = 0.875,
        interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos"] = "bicubic",
        train_interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos", "random"] | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        norm_from_model: str | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: Literal["batch", "pair", "elem"] = "batch",
        label_smoothing: float = 0.0,
        repeated_aug: int = 1,
        channels_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.img_size = img_size
        self.train_crop = train_crop
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.auto_augment = auto_augment
        self.color_jitter = color_jitter
        self.reprob = reprob
        self.remode = remode
        self.eval_crop_pct = eval_crop_pct
        self.interpolation = interpolation
        self.train_interpolation = train_interpolation
        self.norm_from_model = norm_from_model
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.mixup_prob = mixup_prob
        self.mixup_switch_prob = mixup_switch_prob
        self.mixup_mode = mixup_mode
        self.label_smoothing = label_smoothing
        self.repeated_aug = repeated_aug
        self.channels_last = channels_last
        self.seed = seed
        self.mean, self.std = self._resolve_norm(mean, std, norm_from_model)
        self._validate()

        self.datasets: dict[str, Dataset] = {}
        self._class_names: list[str] | None = None
        self._mixup: Mixup | None = None

    # ------------------------------------------------------------------------------------------- validation

    @staticmethod
    def _resolve_norm(
        mean: tuple[float, ...] | None, std: tuple[float, ...] | None, norm_from_model: str | None
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if norm_from_model is not None:
            if mean is not None or std is not None:
                raise ValueError(
                    f"norm_from_model={norm_from_model!r} and mean / std are both set: give one of them"
                )
            cfg = timm.get_pretrained_cfg(norm_from_model)
            if cfg is None:
                raise ValueError(
                    f"norm_from_model={norm_from_model!r} is not a timm model with a pretrained config "
                    "(see timm.list_pretrained())"
                )
            return tuple(cfg.mean), tuple(cfg.std)
        return tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD)

    def _validate(self) -> None:
        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                _fail(name, value, f"must be an integer >= {minimum}")

        def prob(name: str, value: float) -> None:
            if not 0.0 <= value <= 1.0:
                _fail(name, value, "must be in [0, 1]")

        positive_int("batch_size", self.batch_size)
        positive_int("num_workers", self.num_workers, minimum=0)
        positive_int("img_size", self.img_size)
        positive_int("repeated_aug", self.repeated_aug)
        if self.train_crop not in _TRAIN_CROPS:
            _fail("train_crop", self.train_crop, f"allowed: {', '.join(_TRAIN_CROPS)}")
        if self.interpolation not in _INTERPOLATIONS:
            _fail("interpolation", self.interpolation, f"allowed: {', '.join(_INTERPOLATIONS)}")
        if self.train_interpolation not in (None, "random", *_INTERPOLATIONS):
            allowed = ", ".join((*_INTERPOLATIONS, "random"))
            _fail("train_interpolation", self.train_interpolation, f"allowed: {allowed} or None")
        if self.remode not in _RE_MODES:
            _fail("remode", self.remode, f"allowed: {', '.join(_RE_MODES)}")
        if self.mixup_mode not in _MIXUP_MODES:
            _fail("mixup_mode", self.mixup_mode, f"allowed: {', '.join(_MIXUP_MODES)}")
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            _fail("scale", self.scale, "must be (min, max) with 0 < min <= max <= 1")
        if len(self.ratio) != 2 or not 0.0 < self.ratio[0] <= self.ratio[1]:
            _fail("ratio", self.ratio, "must be (min, max) with 0 < min <= max")
        prob("hflip", self.hflip)
        prob("reprob", self.reprob)
        prob("mixup_prob", self.mixup_prob)
        prob("mixup_switch_prob", self.mixup_switch_prob)
        if self.color_jitter is not None and self.color_jitter < 0:
            _fail("color_jitter", self.color_jitter, "must be >= 0 or None")
        if not 0.0 < self.eval_crop_pct <= 1.0:
            _fail("eval_crop_pct", self.eval_crop_pct, "must be in (0, 1]")
        if not 0.0 <= self.label_smoothing < 1.0:
            _fail("label_smoothing", self.label_smoothing, "must be in [0, 1)")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            _fail("mixup_alpha / cutmix_alpha", (self.mixup_alpha, self.cutmix_alpha), "must be >= 0")
        if self.mixup_enabled and self.batch_size % 2:
            _fail(
                "batch_size",
                self.batch_size,
                "Mixup / CutMix pair sample i with sample B-1-i, so the "
                "per-device batch size must be even (or set mixup_alpha = cutmix_alpha = 0)",
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            _fail("mean / std", (self.mean, self.std), "need 3 values each, std > 0")
        if self.auto_augment:
            try:  # let timm parse it now rather than fail in a worker at the first batch
                create_transform(self.img_size, is_training=True, auto_augment=self.auto_augment)
            except (AssertionError, KeyError, ValueError, IndexError) as e:
                _fail(
                    "auto_augment",
                    self.auto_augment,
                    "expected a timm augmentation string such as '3a', "
                    f"'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2' or 'v0' ({e})",
                )

    # -------------------------------------------------------------------------------- metadata (pre-setup)

    @property
    def class_names(self) -> list[str]:
        """Class names in label order; read from lightweight metadata on first access, before ``setup()``."""
        if self._class_names is None:
            names = [str(n) for n in self.read_class_names()]
            if not names:
                raise ValueError(f"{type(self).__name__}: no classes found under root={self.root}")
            self._class_names = names
        return self._class_names

    @property
    def num_classes(self) -> int:
        """Number of classes (the CLI links it to the model's head at instantiation)."""
        return len(self.class_names)

    @property
    def mixup_enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def soft_targets(self) -> bool:
        """Whether training targets are float ``(B, num_classes)`` rather than int64 ``(B,)``."""
        return self.mixup_enabled or self.label_smoothing > 0

    @property
    def root_path(self) -> Path:
        """``root`` as a Path; raises FileNotFoundError (quoting the expected layout) if it is missing."""
        if self.root is None:
            raise ValueError(
                f"{type(self).__name__} needs root=<dataset directory>. Expected layout:\n{self.layout}"
            )
        return require_path(self.root, f"{type(self).__name__} root", self.layout, kind="dir")

    def find_dir(self, folder: str, marker: str) -> Path:
        """The dataset folder: ``root/folder`` (torchvision's layout), or ``root`` if it holds ``marker``."""
        root = self.root_path
        if not (root / folder).is_dir() and (root / marker).exists():
            return root
        return self.require(root / folder, "dataset folder", kind="dir")

    def require(self, path: Path, what: str, kind: str = "any") -> Path:
        """Check that ``path`` exists, else raise FileNotFoundError naming it and this dataset's layout."""
        return require_path(path, f"{type(self).__name__} {what}", self.layout, kind=kind)

    # ---------------------------------------------------------------------------------------- subclass hooks

    def read_class_names(self) -> list[str]:
        """Class names in label order, from cheap metadata (directory listing, class list file)."""
        raise NotImplementedError

    def read_samples(self, split: Split) -> list[Sample]:
        """``(image_path, label)`` pairs of a split, labels 0-based."""
        raise NotImplementedError

    def build_dataset(self, split: Split, transform: Callable | None) -> Dataset:
        """The dataset of a split. The default serves ``read_samples(split)`` image files."""
        source = f"{type(self).__name__} {split} split under {self.root}"
        return ImageListDataset(self.read_samples(split), self.num_classes, transform, source=source)

    def build_transform(self, train: bool) -> Callable:
        """timm's train / eval pipeline from this module's settings (PIL image -> normalised tensor)."""
        cj = self.color_jitter or None  # 0 -> None: skip a no-op ColorJitter
        if not train:
            return create_transform(
                self.img_size,
                is_training=False,
                crop_pct=self.eval_crop_pct,
                interpolation=self.interpolation,
                mean=self.mean,
                std=self.std,
            )
        primary, secondary, final = create_transform(
            self.img_size,
            is_training=True,
            scale=self.scale,
            ratio=self.ratio,
            hflip=self.hflip,
            auto_augment=self.auto_augment,
            color_jitter=cj,
            interpolation=self.train_interpolation or self.interpolation,
            mean=self.mean,
            std=self.std,
            re_prob=self.reprob,
            re_mode=self.remode,
            separate=True,
        )
        if self.train_crop == "simple":
            # DeiT-III's "simple random crop": timm has no such crop mode, so swap only the geometric stage
            # and keep timm's colour (3-Augment / jitter) and tensor (normalise / erasing) stages.
            geometric = [
                T.Resize(self.img_size, interpolation=str_to_interp_mode(self.interpolation)),
                T.RandomCrop(self.img_size, padding=4, padding_mode="reflect"),
            ]
            if self.hflip > 0:
                geometric.append(T.RandomHorizontalFlip(self.hflip))
            primary = T.Compose(geometric)
        return T.Compose([primary, secondary, final])

    # ------------------------------------------------------------------------------------------------ setup

    def get_dataset(self, split: Split) -> Dataset:
        """The dataset of a split, built on first use (with the train or eval transform)."""
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split, self.build_transform(train=split == "train"))
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("val",)}
        for split in splits.get(stage, ("train", "val", "test")):
            self.get_dataset(split)

    # ---------------------------------------------------------------------------------------------- loaders

    def _world(self) -> tuple[int, int]:
        """(world size, global rank) from the attached Trainer; (1, 0) without one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.accelerator.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            **kwargs,
        )

    def train_sampler(self, dataset: Dataset) -> RepeatedAugSampler:
        """Seeded sampler of this rank's training indices.

        Always a DistributedSampler (even with ``repeated_aug=1``), so Lightning's ``use_distributed_sampler``
        leaves it alone under DDP instead of wrapping and sharding it a second time.
        """
        world, rank = self._world()
        return RepeatedAugSampler(dataset, self.repeated_aug, num_replicas=world, rank=rank, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        dataset = self.get_dataset("train")
        sampler = self.train_sampler(dataset)
        if len(sampler) < self.batch_size:
            world, _ = self._world()
            raise ValueError(
                f"{type(self).__name__}: the train split has {len(dataset)} images, i.e. {len(sampler)} per "
                f"device with {world} device(s), fewer than batch_size={self.batch_size}; training drops "
                "incomplete batches, so no batch would be left. Lower batch_size."
            )
        # Workers seed their augmentation RNGs from a base seed drawn from `generator`. Without one it comes
        # from the global torch RNG, which Lightning seeds identically on every rank: the copies of an image
        # that repeated augmentation sends to different ranks would then get identical augmentations.
        _, rank = self._world()
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, rank]).generate_state(1)[0])
        )
        return self._loader(dataset, sampler=sampler, drop_last=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.get_dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.get_dataset("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.get_dataset("val"), shuffle=False)

    # -------------------------------------------------------------------------------------- batch on device

    def mix(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup / CutMix / label smoothing of a training batch; targets become float ``(B, num_classes)``."""
        if self.mixup_enabled:
            if len(images) % 2:
                raise ValueError(f"Mixup / CutMix need an even batch, got {len(images)} images")
            if self._mixup is None:
                self._mixup = Mixup(
                    mixup_alpha=self.mixup_alpha,
                    cutmix_alpha=self.cutmix_alpha,
                    prob=self.mixup_prob,
                    switch_prob=self.mixup_switch_prob,
                    mode=self.mixup_mode,
                    label_smoothing=self.label_smoothing,
                    num_classes=self.num_classes,
                )
            return self._mixup(images, targets)  # mixes images in place
        if self.label_smoothing > 0:
            return images, mixup_target(targets, self.num_classes, lam=1.0, smoothing=self.label_smoothing)
        return images, targets

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, targets = batch
        # Only the training batches are mixed: validation / test targets stay int64 class indices.
        if self.trainer is not None and self.trainer.training:
            images, targets = self.mix(images, targets)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets
