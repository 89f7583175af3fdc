"""NVIDIA DALI training loader: decode, crop, augment and normalise on the GPU (or on DALI's CPU operators).

:class:`DALIDataModule` is an :class:`~masksub_lightning.data.imagenet.ImageFolderDataModule` (ImageNet or your
own folders) whose *training* batches come from a DALI pipeline; validation / test keep the PIL loaders (their
cost is small and their numbers stay comparable). It feeds the same LightningModule: batches are ``(images,
targets)``, Mixup / CutMix / label smoothing run on the device in ``on_after_batch_transfer`` as for every
DataModule, and random erasing (``reprob``) runs there too, on the whole batch.

The sample order is the base DataModule's (:class:`~masksub_lightning.data.samplers.RepeatedAugSampler`: seeded
shuffle, repeated augmentation, DDP / multi-node sharding by global rank) and the loader's ``state_dict`` resumes
it mid-epoch at the next unseen batch. DALI draws its augmentations from its own generator (seeded from
``seed`` and the rank), so a resumed run sees the same images in the same order but not the same crops.

What the pipeline reproduces (``auto_augment`` / ``train_crop`` of the recipes):

================================  ==========  =====================================================================
recipe op                         fidelity    DALI
================================  ==========  =====================================================================
RandomResizedCrop (scale, ratio)  close       ``decoders.image_random_crop`` (ROI decode) + ``resize`` (antialias):
                                              the same area / aspect-ratio ranges, but DALI's own sampler (its
                                              aspect-ratio law and 10-attempt fallback are not torchvision's)
simple crop (DeiT-III)            approx.     resize short side + random square crop, without timm's 4 px reflect
                                              padding
horizontal flip                   same law    ``crop_mirror_normalize(mirror=coin_flip)`` after the colour ops
                                              (pointwise ops commute with a flip; RandAugment's geometric ops
                                              are symmetric in law)
bilinear / bicubic / "random"     approx.     DALI's linear / cubic kernels with antialiasing (not PIL's exactly)
3-Augment ("3a")                  same law    one of grayscale (ITU-R 601 luma, as PIL), solarize at 128,
                                              Gaussian blur sigma ~ U(0.1, 2) per image
color_jitter                      approx.     ``color_twist`` brightness / contrast / saturation ~ U(1-c, 1+c),
                                              in a fixed order (torchvision shuffles the order per image)
RandAugment "rand-mM-nN-..."      approx.     ``nvidia.dali.auto_aug.rand_augment`` (n ops at magnitude M of 10);
                                              DALI's op list and magnitude mapping, no "mstd" noise, no "inc"
normalise                         same        ``crop_mirror_normalize`` (mean / std x 255)
random erasing (reprob)           same        timm's ``RandomErasing`` on the device batch
Mixup / CutMix / label smoothing  same        the base DataModule's, on the device
AugMix, AutoAugment "v0" / ...    none        refused at construction
================================  ==========  =====================================================================
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from timm.data.random_erasing import RandomErasing

from masksub_lightning.data.base import check_int
from masksub_lightning.data.datasets import seeded_rng
from masksub_lightning.data.imagenet import ImageFolderDataModule
from masksub_lightning.data.samplers import RepeatedAugSampler, mix_seed

INSTALL_HINT = (
    "pip install 'masksub-lightning[dali]' (nvidia-dali-cuda120; use nvidia-dali-cuda130 for CUDA 13), "
    "or use an ordinary DataModule"
)

_RAND_AUGMENT = re.compile(r"^rand(-[a-z]+[0-9.]*)*$")


def require_dali() -> Any:
    """The ``nvidia.dali`` module, or an ImportError saying how to install it."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.auto_aug.rand_augment  # noqa: F401  (RandAugment lives in a submodule)
    except ImportError:
        dali = None
    if dali is None:  # raised outside the except block: the CLI reports this line, not a chained one
        raise ImportError(f"DALIDataModule needs NVIDIA DALI, which is not installed: {INSTALL_HINT}")
    return dali


def parse_rand_augment(spec: str) -> tuple[int, int]:
    """``(num_ops, magnitude)`` of a timm RandAugment string such as "rand-m9-mstd0.5-inc1" (n defaults to 2)."""
    num_ops, magnitude = 2, 10
    for token in spec.split("-")[1:]:
        key, value = re.match(r"([a-z]+)([0-9.]*)", token).groups()  # type: ignore[union-attr]
        if key == "m":
            magnitude = int(float(value))
        elif key == "n":
            num_ops = int(value)
    return num_ops, max(0, min(10, magnitude))


def build_train_pipeline(dm: DALIDataModule, batch_size: int, device_id: int | None, seed: int) -> Any:
    """The built DALI training pipeline of ``dm``'s settings (external sources "jpegs" and "labels")."""
    dali = require_dali()
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import rand_augment

    gpu = dm.dali_device == "gpu"
    aug = dm.auto_augment or None
    jitter = dm.color_jitter or 0.0
    if aug and aug != "3a":
        jitter = 0.0  # timm ignores color_jitter under RandAugment / AutoAugment

    @dali.pipeline_def(enable_conditionals=True)
    def pipeline() -> Any:
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        labels = fn.external_source(name="labels", dtype=types.INT64, ndim=0)
        images = _decode_and_crop(dm, jpegs, "mixed" if gpu else "cpu")
        if aug == "3a":  # a DALI conditional: stays in the pipeline function, which DALI converts
            choice = fn.random.choice(3)
            if choice == 0:
                images = fn.hsv(images, saturation=0.0)  # luma only: grayscale as PIL's "L"
            elif choice == 1:
                light = fn.cast(images >= 128, dtype=types.UINT8)
                images = fn.cast(
                    images + light * (255 - 2 * images), dtype=types.UINT8
                )  # 255 - x where x >= 128
            else:
                images = fn.gaussian_blur(images, sigma=fn.random.uniform(range=[0.1, 2.0]))
        elif aug:
            num_ops, magnitude = parse_rand_augment(aug)
            images = rand_augment.rand_augment(images, n=num_ops, m=magnitude, num_magnitude_bins=11)
        images = _jitter_flip_normalize(dm, images, jitter)
        return images, labels.gpu() if gpu else labels

    with warnings.catch_warnings():  # DALI's own RandAugment calls operators it has since renamed
        warnings.filterwarnings("ignore", message=r".*is now deprecated", category=DeprecationWarning)
        pipe = pipeline(
            batch_size=batch_size,
            num_threads=dm.dali_threads,
            device_id=device_id,
            seed=seed & 0x7FFFFFFF,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        pipe.build()
    return pipe


def _interpolation(name: str) -> Any:
    """A DALI interpolation for timm's name; ``random`` (bilinear or bicubic per image) is drawn per sample."""
    from nvidia.dali import fn, types

    if name == "random":
        choice = fn.random.choice([int(types.INTERP_LINEAR), int(types.INTERP_CUBIC)])
        return fn.cast(choice, dtype=types.DALIDataType.INTERP_TYPE)
    return {
        "bilinear": types.INTERP_LINEAR,
        "bicubic": types.INTERP_CUBIC,
        "nearest": types.INTERP_NN,
        "lanczos": types.INTERP_LANCZOS3,
    }[name]


def _decode_and_crop(dm: DALIDataModule, jpegs: Any, device: str) -> Any:
    """Decode and crop to ``img_size``: RandomResizedCrop (decoding the crop only), or resize + random crop."""
    from nvidia.dali import fn, types

    size = dm.img_size
    interp = _interpolation(dm.train_interpolation or dm.interpolation)
    if dm.train_crop == "rrc":
        images = fn.decoders.image_random_crop(
            jpegs,
            device=device,
            output_type=types.RGB,
            random_area=list(dm.scale),
            random_aspect_ratio=list(dm.ratio),
            num_attempts=10,
        )
        return fn.resize(images, size=[size, size], interp_type=interp, antialias=True)
    images = fn.decoders.image(jpegs, device=device, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=size, interp_type=interp, antialias=True)
    return fn.crop(
        images,
        crop=[size, size],
        crop_pos_x=fn.random.uniform(range=[0.0, 1.0]),
        crop_pos_y=fn.random.uniform(range=[0.0, 1.0]),
    )


def _jitter_flip_normalize(dm: DALIDataModule, images: Any, jitter: float) -> Any:
    """Colour jitter (brightness, contrast, saturation), horizontal flip, normalisation to float CHW."""
    from nvidia.dali import fn, types

    if jitter > 0:
        low = max(0.0, 1.0 - jitter)
        images = fn.color_twist(
            images,
            brightness=fn.random.uniform(range=[low, 1.0 + jitter]),
            contrast=fn.random.uniform(range=[low, 1.0 + jitter]),
            saturation=fn.random.uniform(range=[low, 1.0 + jitter]),
        )
    return fn.crop_mirror_normalize(
        images,
        mirror=fn.random.coin_flip(probability=dm.hflip),
        mean=[255.0 * m for m in dm.mean],
        std=[255.0 * s for s in dm.std],
        dtype=types.FLOAT,
        output_layout="CHW",
    )


def _to_torch(tensor_list: Any, device: torch.device) -> torch.Tensor:
    """Copy a dense DALI TensorList into a new torch tensor on ``device`` (DALI reuses its buffers next run)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    tensor = tensor_list.as_tensor()
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return feed_ndarray(tensor, out, cuda_stream=stream)


class DALITrainLoader:
    """An iterable of ``(images, targets)`` batches from a DALI pipeline, in the order of a RepeatedAugSampler.

    Has ``sampler`` (Lightning calls its ``set_epoch``), ``__len__`` and ``state_dict`` / ``load_state_dict``
    (Lightning checkpoints it): the state is the sampler's at the last batch handed out.

    Args:
        files: ``(path, label)`` of the training split.
        sampler: this rank's sampler (``with_seeds=False``).
        batch_size: images per batch (incomplete last batches are dropped).
        pipeline: a built DALI pipeline with external sources "jpegs" and "labels".
        device: where the pipeline's outputs live.
    """

    def __init__(
        self,
        files: list[tuple[str, int]],
        sampler: RepeatedAugSampler,
        batch_size: int,
        pipeline: Any,
        device: torch.device,
    ) -> None:
        self.files = files
        self.sampler = sampler
        self.batch_size = batch_size
        self.pipeline = pipeline
        self.device = device
        self._start = 0
        self._served = 0

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = list(self.sampler)  # from a loaded resume position on, if any
        self._start, self._served = self.sampler.position - len(indices), 0
        full = len(indices) // self.batch_size * self.batch_size
        for begin in range(0, full, self.batch_size):
            chunk = [self.files[i] for i in indices[begin : begin + self.batch_size]]
            self.pipeline.feed_input("jpegs", [np.fromfile(path, dtype=np.uint8) for path, _ in chunk])
            self.pipeline.feed_input("labels", [np.array(label, dtype=np.int64) for _, label in chunk])
            images, labels = self.pipeline.run()
            self._served += len(chunk)
            yield _to_torch(images, self.device), _to_torch(labels, self.device)

    def state_dict(self) -> dict[str, int]:
        # The sampler ran ahead to the end of the epoch (its indices are taken at once): the state is that of
        # the last batch handed out, on this rank and (consumed) for all ranks together.
        state = self.sampler.state_dict()
        state["position"] = self._start + self._served
        state["consumed"] = state["position"] * self.sampler.num_replicas
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


class DALIDataModule(ImageFolderDataModule):
    """ImageFolder-layout data (ImageNet too) with DALI training batches; see the module docstring for fidelity.

    Args:
        root: directory holding ``train/`` and ``val/`` (as :class:`ImageFolderDataModule`).
        class_list: optional class subset file (as :class:`ImageFolderDataModule`).
        dali_device: "gpu": decode (nvJPEG) and augment on this process's GPU; "cpu": DALI's CPU operators
            (tests, machines without a GPU).
        dali_threads: DALI CPU threads per process (decode / CPU ops); the DataLoader's ``num_workers`` is not
            used for training.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.

    Raises:
        ImportError: DALI is not installed (one line saying how to install it).
        ValueError: ``dali_device="gpu"`` without a visible CUDA GPU, or an augmentation DALI does not provide.
    """

    def __init__(
        self,
        root: str,
        class_list: str | None = None,
        dali_device: Literal["gpu", "cpu"] = "gpu",
        dali_threads: int = 4,
        **kwargs: Any,
    ) -> None:
        require_dali()
        if dali_device not in ("gpu", "cpu"):
            raise ValueError(f"dali_device={dali_device!r} is invalid: allowed: gpu, cpu")
        check_int("dali_threads", dali_threads, minimum=1)
        if dali_device == "gpu" and not torch.cuda.is_available():
            raise ValueError("dali_device='gpu' needs a CUDA GPU and none is visible; use dali_device='cpu'")
        super().__init__(root=root, class_list=class_list, **kwargs)
        aug = self.auto_augment
        if aug and aug != "3a" and not _RAND_AUGMENT.match(aug):
            raise ValueError(
                f"auto_augment={aug!r} is not available in the DALI pipeline: allowed: None, '3a', 'rand-m<M>-...' "
                "(RandAugment); use ImageNetDataModule / ImageFolderDataModule for AugMix / AutoAugment"
            )
        self._eraser: RandomErasing | None = None

    @property
    def dali_device(self) -> str:
        return self.hparams["dali_device"]

    @property
    def dali_threads(self) -> int:
        return self.hparams["dali_threads"]

    def train_dataloader(self) -> DALITrainLoader:  # type: ignore[override]
        files = self.drop_bad_labels(
            "train", self.read_samples("train"), f"{type(self).__name__} train split"
        )
        world, rank = self._world()
        # The same epoch as the CPU loaders: whole global batches of one global order (resumable on another
        # number of processes with the global batch kept).
        sampler = RepeatedAugSampler(
            files,
            self.repeated_aug,
            num_replicas=world,
            rank=rank,
            seed=self.seed,
            global_batch=self.train_global_batch(len(files)),
        )
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"{type(self).__name__}: {len(sampler)} training images per device, fewer than "
                f"batch_size={self.batch_size}"
            )
        if self.dali_device == "gpu":
            device = torch.device("cuda", torch.cuda.current_device())
            device_id: int | None = device.index
        else:
            device, device_id = torch.device("cpu"), None
        pipeline = build_train_pipeline(self, self.batch_size, device_id, mix_seed(self.seed, rank))
        loader = DALITrainLoader(files, sampler, self.batch_size, pipeline, device)
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader  # type: ignore[assignment]
        return loader

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, targets = batch
        if self.reprob > 0 and self.trainer is not None and self.trainer.training:
            if self._eraser is None:
                self._eraser = RandomErasing(self.reprob, mode=self.remode, device=str(images.device))
            _, rank = self._world()
            # Drawn under a seed of (seed, rank, step), like Mixup: the main process's CPU RNGs do not move.
            with seeded_rng(mix_seed(self.seed, rank, self._mix_step, 1)):
                images = self._eraser(images)
        return super().on_after_batch_transfer((images, targets), dataloader_idx)
