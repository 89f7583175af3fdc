"""The one base DataModule: timm transforms, Mixup/CutMix on the device, repeated augmentation, loaders.

Subclasses only say where the data is::

    read_class_names()      -> list[str]                 lightweight metadata, works before setup()
    read_samples(split)     -> [(image_path, label), ...] for split in "train" / "val" / "test"
    (or override build_dataset(split, transform) for in-memory data: CIFAR, Digits)

Batches are ``(images, targets)``: images float32 ``(B, 3, H, W)``; targets int64 ``(B,)``, except in
training with Mixup/CutMix or label smoothing on, where they are float32 ``(B, num_classes)`` soft targets
(rows sum to 1). Mixing happens in ``on_after_batch_transfer``, i.e. on the accelerator, on the whole batch.

Reproducibility and resume. Every random draw of the data path is a function of ``seed`` and a position:

=========================  =====================================================================================
what                       random source
=========================  =====================================================================================
sample order               a private ``torch.Generator`` seeded with ``seed + epoch`` (:class:`RepeatedAugSampler`)
per-sample augmentation    Python ``random``, NumPy and torch CPU global RNGs, seeded per sample from
                           (seed, epoch, position in the global stream) and restored afterwards
                           (:func:`~masksub_lightning.data.datasets.seeded_rng`), in workers and main process
Mixup / CutMix             timm's ``Mixup`` draws from NumPy's global RNG; it runs under ``seeded_rng`` seeded
                           from (seed, rank, mix step), the step counter kept in this DataModule's ``state_dict``
worker base seed           the loader's own ``torch.Generator`` seeded from (seed, rank)
=========================  =====================================================================================

So the data path neither reads nor moves the global RNG state of the main process, and the train loader (a
torchdata ``StatefulDataLoader``, whose state Lightning stores in checkpoints) resumes mid-epoch exactly.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import lightning as L
import timm
import torch
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.data.mixup import mixup_target
from timm.data.transforms import str_to_interp_mode
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision import transforms as T

from masksub_lightning.data.datasets import (
    ImageListDataset,
    Sample,
    SampleDataset,
    bad_label_indices,
    label_error,
    require_path,
    seeded_rng,
)
from masksub_lightning.data.decode import fast_decode_pipeline
from masksub_lightning.data.gpu_decode import (
    DeviceAugment,
    EncodedBatch,
    EncodedTrainTransform,
    collate_encoded,
)
from masksub_lightning.data.samplers import RepeatedAugSampler, ShardedEvalSampler, mix_seed

Split = Literal["train", "val", "test"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Allowed values, written once: the Literal types are the signature jsonargparse checks, the tuples what the
# constructor's own checks list in their one-line errors (for Python callers).
TrainCrop = Literal["rrc", "simple"]
Interpolation = Literal["bilinear", "bicubic", "nearest", "lanczos"]
ReMode = Literal["const", "rand", "pixel"]
MixupMode = Literal["batch", "pair", "elem"]
BadSamples = Literal["error", "skip"]
Decode = Literal["cpu", "gpu"]
DecodeDevice = Literal["cuda", "cpu"]
_TRAIN_CROPS = get_args(TrainCrop)
_INTERPOLATIONS = get_args(Interpolation)
_RE_MODES = get_args(ReMode)
_MIXUP_MODES = get_args(MixupMode)
_BAD_SAMPLES = get_args(BadSamples)
_DECODES = get_args(Decode)
_DECODE_DEVICES = get_args(DecodeDevice)


def micro_batches_per_step(trainer: Any, module: Any = None) -> int:
    """Micro-batches per optimizer step: the module's ``grad_accumulation`` (the package's modules; default: the
    trainer's module) times Lightning's ``accumulate_grad_batches`` (automatic optimization); 1 without a trainer
    or for a bad value (the module reports that one)."""
    if module is None and trainer is not None:
        module = getattr(trainer, "lightning_module", None)
    n = (getattr(module, "hparams", None) or {}).get("grad_accumulation", 1)
    lightning = getattr(trainer, "accumulate_grad_batches", 1)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (n, lightning))
    return n * lightning if ok else 1


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    """ValueError naming ``name`` unless ``value`` is an integer (not a bool) in ``[minimum, maximum]``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        if maximum is None:
            _fail(name, value, f"must be an integer >= {minimum}")
        _fail(name, value, f"must be an integer in [{minimum}, {maximum}]")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "must be True or False")


def check_optional_str(name: str, value: Any, path: bool = False) -> None:
    if value is not None and not isinstance(value, (str, os.PathLike) if path else str):
        _fail(name, value, f"must be a {'path' if path else 'string'} or None")


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, also for 0 bits: Pillow >= 12 raises there ("bits must be between 1 and 8"), which
    timm's "PosterizeIncreasing" reaches at magnitude 10 (RandAugment "m9-mstd0.5" about once in 40 draws of
    the op). Keeping 0 bits gives a black image, as older Pillow and the TensorFlow reference did."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _patch_posterize(transform: Any) -> None:
    """Swap :func:`_posterize` into every timm AutoAugment / RandAugment / AugMix posterize op of ``transform``."""
    if isinstance(transform, T.Compose):
        for t in transform.transforms:
            _patch_posterize(t)
        return
    ops = list(getattr(transform, "ops", []))
    ops += [op for sub in getattr(transform, "policy", []) for op in sub]
    for op in ops:
        if getattr(op, "aug_fn", None) is auto_augment.posterize:
            op.aug_fn = _posterize


class _LazyIterator:
    """An iterator that calls ``start()`` for the real one at the first ``next()``."""

    def __init__(self, start: Callable[[], Any]) -> None:
        self._start = start
        self._it: Any = None

    def __iter__(self) -> _LazyIterator:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = self._start()
        return next(self._it)


class TrainLoader(StatefulDataLoader):
    """torchdata's StatefulDataLoader, except that ``iter()`` starts the epoch only at the first ``next()``.

    On resume Lightning calls ``iter()`` (which restores a loaded state and, with workers, immediately
    dispatches indices) before ``sampler.set_epoch()``. Deferring the start lets the sampler see the epoch
    Lightning will actually run, so a checkpoint from an epoch that Lightning ended early
    (``limit_train_batches``) starts the next epoch from its beginning instead of continuing the saved one.
    """

    def __iter__(self) -> Any:  # type: ignore[override]
        return _LazyIterator(super().__iter__)


class HParam:
    """Attribute view of one saved hyperparameter: reads and writes ``obj.hparams[name]``.

    A subclass whose signature lacks a base argument (Digits has no ``train_crop``) does not save it; reading it
    gives the base signature's default, which is the value the base was built with.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        hparams = obj.hparams
        if self.name in hparams:
            return hparams[self.name]
        return _base_defaults()[self.name]

    def __set__(self, obj: Any, value: Any) -> None:
        obj.hparams[self.name] = value


def _base_defaults() -> dict[str, Any]:
    params = inspect.signature(ImageClassificationDataModule.__init__).parameters
    return {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}


def _accepted_init_args(cls: type) -> set[str]:
    """Argument names ``cls(...)`` accepts, following ``**kwargs`` that subclasses forward to their parent."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
        if klass is ImageClassificationDataModule or not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


class ImageClassificationDataModule(L.LightningDataModule):
    """Base DataModule for image classification with the DeiT-III / RSB / MAE training pipelines.

    Every argument is a plain type so LightningCLI / jsonargparse can read it from YAML. The arguments are
    stored with ``save_hyperparameters()`` (``dm.hparams``, and ``datamodule_hyper_parameters`` in checkpoints)
    and readable as attributes (``dm.batch_size``). They are not sent to loggers: the module has arguments of
    the same name (``label_smoothing``, ``channels_last``) whose values may legitimately differ, and Lightning
    refuses to log two different values under one key.

    Args:
        root: dataset root directory (layout: see the subclass).
        batch_size: batch size per device. A training epoch is a whole number of optimizer steps: the images
            short of a full global batch (batch_size x devices x grad_accumulation) are left out, a different few
            each epoch (static shapes for ``torch.compile``; the same epoch on any number of devices).
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
            ranks (3 for DeiT-III / RSB; 1 = off). Epoch length is unchanged (about N / repeated_aug distinct
            images per epoch).
        channels_last: return images in ``torch.channels_last`` memory format (faster convnets on GPU).
        seed: seed of the training order and of every augmentation draw (see the module docstring).
        bad_samples: what to do with bad data. "error" (default): an empty class folder or a label outside
            ``[0, num_classes)`` in an annotation file raises a ValueError at setup, and an image that cannot
            be decoded, is missing, is smaller than ``min_image_size`` or breaks the transform raises at load
            time, naming the file (in a worker too). "skip": such folders / annotation entries are left out at
            setup with one warning per split and kind (counted in :attr:`skipped_samples`), and such images are
            replaced by another sample chosen deterministically from the sample's position (a warning names
            each file once per process; a warning with the count about once per epoch).
        min_image_size: images whose shorter side is below this many pixels are bad samples (see
            ``bad_samples``). 1 (default) accepts every image; timm's crops upsample small images.
        fast_decode: decode JPEGs at 1/2, 1/4 or 1/8 size when the first resize (RandomResizedCrop, Resize)
            keeps fewer pixels anyway; the crop geometry is unchanged, the pixels differ by resampling only
            (:mod:`masksub_lightning.data.decode`). Image-file datasets only.
        decode: where training images are decoded and augmented. "cpu" (default): PIL + timm in the loader
            workers. "gpu": the workers only read the bytes and draw the random parameters; the main process
            decodes the batch with nvJPEG and crops / flips / 3-Augment / jitters / normalises / erases it on
            the GPU, with the same random draws (:mod:`masksub_lightning.data.gpu_decode` says, per op, where
            the pixels differ). Image files and litdata shards only; RandAugment / AugMix / AutoAugment,
            lanczos and ``fast_decode`` are refused. Validation / test keep the CPU pipeline.
        decode_device: the device ``decode="gpu"`` runs on: "cuda" (the trainer's GPU), or "cpu" (the same
            batched path with torchvision's CPU decoder in the main process: tests, machines without a GPU).

    Raises:
        ValueError: an argument is out of range; the message names the value and what is allowed.
    """

    #: Directory tree a subclass expects under ``root``; quoted in missing-path errors.
    layout: ClassVar[str] = "<root>/..."

    root = HParam()
    batch_size = HParam()
    num_workers = HParam()
    pin_memory = HParam()
    persistent_workers = HParam()
    img_size = HParam()
    train_crop = HParam()
    scale = HParam()
    ratio = HParam()
    hflip = HParam()
    auto_augment = HParam()
    color_jitter = HParam()
    reprob = HParam()
    remode = HParam()
    eval_crop_pct = HParam()
    interpolation = HParam()
    train_interpolation = HParam()
    norm_from_model = HParam()
    mixup_alpha = HParam()
    cutmix_alpha = HParam()
    mixup_prob = HParam()
    mixup_switch_prob = HParam()
    mixup_mode = HParam()
    label_smoothing = HParam()
    repeated_aug = HParam()
    channels_last = HParam()
    seed = HParam()
    bad_samples = HParam()
    min_image_size = HParam()
    fast_decode = HParam()
    decode = HParam()
    decode_device = HParam()

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        img_size: int = 224,
        train_crop: TrainCrop = "rrc",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = None,
        color_jitter: float | None = 0.4,
        reprob: float = 0.0,
        remode: ReMode = "pixel",
        eval_crop_pct: float = 0.875,
        interpolation: Interpolation = "bicubic",
        train_interpolation: Interpolation | Literal["random"] | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        norm_from_model: str | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: MixupMode = "batch",
        label_smoothing: float = 0.0,
        repeated_aug: int = 1,
        channels_last: bool = False,
        seed: int = 0,
        bad_samples: BadSamples = "error",
        min_image_size: int = 1,
        fast_decode: bool = False,
        decode: Decode = "cpu",
        decode_device: DecodeDevice = "cuda",
    ) -> None:
        super().__init__()
        # Also collects the calling subclass's own arguments; base arguments the subclass does not accept are
        # left out so that `type(dm)(**dm.hparams)` (and load_from_checkpoint) rebuild the same DataModule.
        accepted = _accepted_init_args(type(self))
        self.save_hyperparameters(ignore=[n for n in _base_defaults() if n not in accepted], logger=False)
        for name in ("scale", "ratio"):  # YAML gives lists
            if name in self.hparams and isinstance(self.hparams[name], (list, tuple)):
                self.hparams[name] = tuple(self.hparams[name])
        self._validate_arguments(mean, std)
        self.mean, self.std = self._resolve_norm(mean, std, norm_from_model)
        self._validate()

        self.datasets: dict[str, Dataset] = {}
        self._class_names: list[str] | None = None
        self._mixup: Mixup | None = None
        self._device_augment: DeviceAugment | None = None
        self._mix_step = (
            0  # training batches so far: the Mixup / CutMix (and DALI erasing) seed of the next one
        )
        self._loader_datasets: dict[str, SampleDataset] = {}
        self._train_loader: TrainLoader | None = None
        self._train_loader_state: dict[str, Any] | None = None  # from a checkpoint, for the next train loader
        self._setup_skips: dict[str, dict[str, list[str]]] = {}
        self._reported_skips: dict[str, int] = {}
        self._report_epoch: int | None = None

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

    def _validate_arguments(self, mean: Any, std: Any) -> None:
        """Types of the arguments that later checks and timm would otherwise trip over with a bare error."""
        check_optional_str("root", self.root, path=True)
        check_optional_str("auto_augment", self.auto_augment)
        check_optional_str("norm_from_model", self.norm_from_model)
        for name in ("pin_memory", "persistent_workers", "channels_last", "fast_decode"):
            check_bool(name, getattr(self, name))
        check_int("seed", self.seed, minimum=0)
        check_int("min_image_size", self.min_image_size, minimum=1)
        if self.bad_samples not in _BAD_SAMPLES:
            _fail("bad_samples", self.bad_samples, f"allowed: {', '.join(_BAD_SAMPLES)}")
        self._validate_decode()
        for name in ("scale", "ratio"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != 2 or not all(map(_is_number, value)):
                _fail(name, value, "must be two numbers (min, max)")
        for name, value in (("mean", mean), ("std", std)):
            if value is not None and (
                not isinstance(value, (list, tuple)) or len(value) != 3 or not all(map(_is_number, value))
            ):
                _fail(name, value, "must be 3 numbers (one per RGB channel) or None")
        for name in (
            "hflip",
            "reprob",
            "eval_crop_pct",
            "mixup_alpha",
            "cutmix_alpha",
            "mixup_prob",
            "mixup_switch_prob",
            "label_smoothing",
        ):
            if not _is_number(getattr(self, name)):
                _fail(name, getattr(self, name), "must be a number")
        if self.color_jitter is not None and not _is_number(self.color_jitter):
            _fail("color_jitter", self.color_jitter, "must be a number >= 0 or None")

    def _validate_decode(self) -> None:
        if self.decode not in _DECODES:
            _fail("decode", self.decode, f"allowed: {', '.join(_DECODES)}")
        if self.decode_device not in _DECODE_DEVICES:
            _fail("decode_device", self.decode_device, f"allowed: {', '.join(_DECODE_DEVICES)}")
        if self.decode != "gpu":
            return
        if self.fast_decode:
            _fail(
                "fast_decode",
                True,
                "reduced-size decoding is a CPU decoder's; with decode='gpu' leave it False",
            )
        if self.decode_device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "decode='gpu' needs a CUDA GPU and none is visible: use decode='cpu' "
                "(or decode_device='cpu' to run the batched decode path on the CPU, for tests)"
            )

    def _validate(self) -> None:
        def prob(name: str, value: float) -> None:
            if not 0.0 <= value <= 1.0:
                _fail(name, value, "must be in [0, 1]")

        check_int("batch_size", self.batch_size, minimum=1)
        check_int("num_workers", self.num_workers, minimum=0)
        check_int("img_size", self.img_size, minimum=1)
        check_int("repeated_aug", self.repeated_aug, minimum=1)
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
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            _fail("scale", self.scale, "must be (min, max) with 0 < min <= max <= 1")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
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
        if self.mixup_alpha < 0:
            _fail("mixup_alpha", self.mixup_alpha, "must be >= 0 (0 disables Mixup)")
        if self.cutmix_alpha < 0:
            _fail("cutmix_alpha", self.cutmix_alpha, "must be >= 0 (0 disables CutMix)")
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
        samples = self.drop_bad_labels(split, self.read_samples(split), source)
        if self.fast_decode and transform is not None:
            transform = fast_decode_pipeline(transform)
        return ImageListDataset(samples, self.num_classes, transform, source, min_size=self.min_image_size)

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
        pipeline = T.Compose([primary, secondary, final])
        _patch_posterize(pipeline)
        return pipeline

    # ------------------------------------------------------------------------------------------------ setup

    def get_dataset(self, split: Split) -> Dataset:
        """The dataset of a split, built on first use (with the train or eval transform)."""
        if split not in self.datasets:
            self._setup_skips[split] = {}
            transform = self.build_transform(train=split == "train")
            if split == "train" and self.decode == "gpu":
                # Raises at setup for an op the device path lacks (RandAugment, lanczos, ...).
                transform = EncodedTrainTransform(transform, self.img_size, self.min_image_size)
            self.datasets[split] = self.build_dataset(split, transform)
            if split == "train" and self.decode == "gpu":
                self._check_serves_bytes(self.datasets[split])
            for kind, messages in self._setup_skips[split].items():
                warnings.warn(
                    f"{type(self).__name__} {split} split: skipped {len(messages)} {kind} "
                    f"(bad_samples='skip'); first: {messages[0]}",
                    stacklevel=2,
                )
        return self.datasets[split]

    def _check_serves_bytes(self, dataset: Dataset) -> None:
        if not getattr(dataset, "serves_encoded_bytes", False):
            raise ValueError(
                f"decode='gpu' needs image files or litdata shards, but {type(self).__name__} serves "
                f"{type(dataset).__name__} items (images in memory): use decode='cpu'"
            )

    def report_bad(self, split: Split, kind: str, message: str) -> None:
        """A bad metadata entry found while reading a split: ValueError, or counted and left out.

        Readers call this and then leave the entry out. With ``bad_samples="error"`` it raises
        ``ValueError(message)``; with ``"skip"`` it records the entry for one summary warning per split and kind.

        Args:
            split: the split being read.
            kind: what was bad, plural, e.g. "empty class folder(s)", "out-of-range label(s)".
            message: names the file / folder / line and what is allowed.
        """
        if self.bad_samples == "error":
            raise ValueError(message)
        self._setup_skips.setdefault(split, {}).setdefault(kind, []).append(message)

    def drop_bad_labels(self, split: Split, samples: list[Sample], source: str) -> list[Sample]:
        """``samples`` without those whose label is outside ``[0, num_classes)`` (or a ValueError naming one)."""
        bad = bad_label_indices([y for _, y in samples], self.num_classes)
        for i in bad:
            path, label = samples[i]
            self.report_bad(
                split, "out-of-range label(s)", label_error(path, label, self.num_classes, source, len(bad))
            )
        drop = set(bad)
        return [s for i, s in enumerate(samples) if i not in drop]

    @property
    def skipped_samples(self) -> dict[str, dict[str, int]]:
        """Per split: entries left out at setup (per kind) and images skipped at load time ("images")."""
        counts: dict[str, dict[str, int]] = {}
        for split, kinds in self._setup_skips.items():
            counts.setdefault(split, {}).update({k: len(v) for k, v in kinds.items()})
        for split, dataset in self._loader_datasets.items():
            counts.setdefault(split, {})["images"] = dataset.skipped
        return counts

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("val",)}
        for split in splits.get(stage, ("train", "val", "test")):
            self.get_dataset(split)
        self._check_model_classes(training=stage in ("fit", None))
        root_device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        on_cuda = root_device is None or root_device.type == "cuda"
        if self.decode == "gpu" and self.decode_device == "cuda" and not on_cuda:
            raise ValueError(
                f"decode='gpu' decodes on the trainer's CUDA device, but the trainer runs on {root_device}: "
                "use decode='cpu' (or decode_device='cpu')"
            )

    def _check_model_classes(self, training: bool) -> None:
        """The model's ``num_classes`` must fit the data's: soft targets are ``(B, num_classes)`` of the data."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        model_classes = getattr(module, "num_classes", None)
        if not isinstance(model_classes, int) or isinstance(model_classes, bool):
            return
        if training and self.soft_targets and model_classes != self.num_classes:
            raise ValueError(
                f"The model has num_classes={model_classes} but {type(self).__name__} has {self.num_classes} "
                "classes: Mixup / CutMix / label smoothing build (batch, num_classes) targets from the data's "
                "classes, so the two must be equal"
            )
        if model_classes < self.num_classes:
            raise ValueError(
                f"The model has num_classes={model_classes} but {type(self).__name__} has {self.num_classes} "
                "classes: labels up to num_classes - 1 would be outside the model's output"
            )

    # ---------------------------------------------------------------------------------------------- loaders

    def _world(self) -> tuple[int, int]:
        """(world size, global rank) from the attached Trainer; (1, 0) without one."""
        if self.trainer is None:
            return 1, 0
        return getattr(self.trainer, "world_size", 1), getattr(self.trainer, "global_rank", 0)

    def _loader_dataset(self, split: Split) -> SampleDataset:
        """The split's dataset wrapped for a loader: per-sample seeds and the bad-sample policy."""
        wrapped = SampleDataset(self.get_dataset(split), self.bad_samples, self.num_workers)
        self._loader_datasets[split] = wrapped
        self._reported_skips[split] = 0
        return wrapped

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.num_workers
        return dict(
            batch_size=self.batch_size,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.accelerator.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
        )

    def train_sampler(self, dataset: Dataset) -> RepeatedAugSampler:
        """Seeded, resumable sampler of this rank's training indices, yielding ``(index, sample_seed)`` keys.

        Always a DistributedSampler (even with ``repeated_aug=1``), so Lightning's ``use_distributed_sampler``
        leaves it alone under DDP instead of wrapping and sharding it a second time. An epoch is a whole number
        of optimizer steps of the global batch (see :meth:`train_global_batch`), the same epoch on any number of
        processes: a run resumes on another world size with the global batch kept.
        """
        world, rank = self._world()
        return RepeatedAugSampler(
            dataset,
            self.repeated_aug,
            num_replicas=world,
            rank=rank,
            seed=self.seed,
            with_seeds=True,
            global_batch=self.train_global_batch(len(dataset)),
        )

    def train_global_batch(self, dataset_size: int) -> int:
        """Training images per optimizer step over all processes: batch_size x world size x accumulation.

        The accumulation is the attached module's ``grad_accumulation`` (or Lightning's
        ``accumulate_grad_batches``). With less than one such step of data the epoch is counted in per-process
        batches instead, so that the module's own check names ``grad_accumulation``.
        """
        world, _ = self._world()
        micro = self.batch_size * world
        step = micro * micro_batches_per_step(self.trainer)
        return step if dataset_size >= step else micro

    def train_dataloader(self) -> TrainLoader:
        """A torchdata ``StatefulDataLoader``: its ``state_dict()`` (which Lightning checkpoints) resumes exactly.

        Raises:
            ValueError: fewer training images than one batch on every device.
        """
        dataset = self._loader_dataset("train")
        sampler = self.train_sampler(dataset)
        if len(sampler) < self.batch_size:
            world, _ = self._world()
            raise ValueError(
                f"{type(self).__name__}: the train split has {len(dataset)} images, fewer than one batch on each "
                f"of {world} device(s) (batch_size={self.batch_size}, {self.batch_size * world} images); training "
                "drops incomplete batches, so no batch would be left. Lower batch_size."
            )
        # The worker base seed comes from `generator` (without one, from the global torch RNG, which this would
        # then move). Augmentations do not depend on it: each sample is seeded from its key.
        _, rank = self._world()
        generator = torch.Generator().manual_seed(mix_seed(self.seed, rank))
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch function: not our concern
            warnings.filterwarnings("ignore", message=".*set_vital.* is deprecated")
            loader = TrainLoader(
                dataset,
                sampler=sampler,
                drop_last=True,
                generator=generator,
                collate_fn=collate_encoded if self.decode == "gpu" else None,
                **self._loader_kwargs(),
            )
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    def _eval_loader(self, split: Split) -> DataLoader:
        # Each rank evaluates its own shard without padding: every sample counted exactly once under DDP.
        dataset = self._loader_dataset(split)
        world, rank = self._world()
        sampler = ShardedEvalSampler(dataset, num_replicas=world, rank=rank)
        return DataLoader(dataset, sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    # -------------------------------------------------------------------------------------- batch on device

    def mix(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup / CutMix / label smoothing of a training batch; targets become float ``(B, num_classes)``.

        Each call draws its mixing parameters from NumPy seeded with (seed, rank, mix step), then advances the
        step, so the draws do not depend on (or move) the global RNG and resume with :meth:`state_dict`.
        """
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
            _, rank = self._world()
            with seeded_rng(mix_seed(self.seed, rank, self._mix_step)):
                result = self._mixup(images, targets)  # mixes images in place
        elif self.label_smoothing > 0:
            result = images, mixup_target(targets, self.num_classes, lam=1.0, smoothing=self.label_smoothing)
        else:
            result = images, targets
        # Every training batch advances the step, mixed or not: device-side draws seeded from it (DALI's random
        # erasing) would otherwise repeat the same draw on every batch of a run without Mixup.
        self._mix_step += 1
        return result

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, EncodedBatch):  # decode="gpu": the JPEG bytes stay on the host for the decoder
            return batch.targets_to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def decode_batch(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode="gpu"``: the decoded, augmented images of an :class:`EncodedBatch` and its targets."""
        targets = batch.targets
        device = targets.device if self.decode_device == "cuda" else torch.device("cpu")
        if self._device_augment is None:
            self._device_augment = DeviceAugment(self.img_size, self.mean, self.std, self.remode)
        return self._device_augment(batch, device).to(targets.device), targets

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, EncodedBatch):
            batch = self.decode_batch(batch)
        images, targets = batch
        # Only the training batches are mixed: validation / test targets stay int64 class indices.
        if self.trainer is not None and self.trainer.training:
            self._maybe_report_skips()
            images, targets = self.mix(images, targets)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    # ----------------------------------------------------------------------------------- state and reports

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints by Lightning: the Mixup / CutMix step counter and the train loader's state.

        Lightning keeps the loader's state in its fit loop too, but restores it only into a loader built after
        the loop state is restored. A module whose ``configure_optimizers`` reads
        ``trainer.estimated_stepping_batches`` (or calls ``fit_loop.setup_data()``) builds the loader before
        that, and Lightning's copy never reaches it; this copy is loaded into that loader when it is built.
        """
        state: dict[str, Any] = {"mix_step": self._mix_step}
        if self._train_loader is not None:
            state["train_loader"] = self._train_loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._mix_step = int(state_dict.get("mix_step", 0))
        self._train_loader_state = state_dict.get("train_loader")

    def _maybe_report_skips(self) -> None:
        epoch = getattr(self.trainer, "current_epoch", None)
        if epoch != self._report_epoch:
            if self._report_epoch is not None:
                self.report_skips(f"epoch {self._report_epoch}")
            self._report_epoch = epoch

    def report_skips(self, when: str) -> None:
        """Warn, per split, how many images were skipped at load time since the last report."""
        for split, dataset in self._loader_datasets.items():
            total = dataset.skipped
            new = total - self._reported_skips.get(split, 0)
            if new > 0:
                warnings.warn(
                    f"{type(self).__name__}: {new} bad {split} image(s) skipped and replaced in {when} "
                    f"({total} since the loader was built; bad_samples='skip'; earlier warnings name the files)",
                    stacklevel=2,
                )
            self._reported_skips[split] = total

    def teardown(self, stage: str) -> None:
        self.report_skips(f"{stage} (last part)")
        self._report_epoch = None
