"""Training batches decoded and augmented on the GPU (``decode="gpu"``): workers read bytes, nvJPEG decodes.

With ``decode="gpu"`` on a file-based DataModule (image folders, ImageNet, the fine-grained sets, litdata shards)
the training split is served in three stages:

1. **worker** (:class:`EncodedTrainTransform`): reads the file's (or shard item's) bytes, parses the image
   header only (size, format) and draws every random parameter of the CPU pipeline for that sample: the same
   ops' own ``get_params`` and draws, from the same per-sample seeded RNGs, in the same order. A JPEG is handed
   on as its bytes; any other file (PNG, BMP, CMYK JPEG, ...) is decoded here with PIL, as the CPU pipeline does.
2. **collate** (:func:`collate_encoded`): an :class:`EncodedBatch` of byte tensors, parameters and labels.
3. **main process**, after the batch reaches the device (``on_after_batch_transfer``): one batched
   :func:`decode_jpegs` call (nvJPEG on CUDA), then :class:`DeviceAugment` applies the drawn parameters to the
   whole batch; Mixup / CutMix follow as for every DataModule.

Fidelity to the CPU pipeline (timm's transforms on PIL images), per op, for the same seed:

================================  ====================  ==========================================================
op                                law                   pixels
================================  ====================  ==========================================================
RandomResizedCrop (scale, ratio)  same draws            same crop box; torch's antialiased resize, not PIL's
                                                        (batches of the tests: mean 0.2, max 5 levels of 255)
simple crop (DeiT-III)            same draws            same resize size, 4 px reflect padding and crop offsets
interpolation (incl. "random")    same draws            bilinear / bicubic / nearest; lanczos refused
horizontal flip                   same draws            identical
3-Augment: choice of op           same draws            --
  solarize (threshold 128)        same                  identical (PIL's table)
  grayscale (desaturate)          same                  identical (PIL's fixed-point ITU-R 601 luma)
  Gaussian blur                   same sigma draw       a true Gaussian (13 taps); PIL approximates it with box
                                                        blurs: close, not identical
color_jitter                      same draws            same factors and per-image order; brightness / contrast /
                                                        saturation as PIL computes them (identical on equal input)
normalise                         same                  identical
random erasing (reprob, remode)   same box draws        same box; the noise of "pixel" / "rand" has the same law
                                                        (N(0, 1)) from a per-sample device generator, other values
JPEG decode                       --                    torchvision's CPU decoder: identical to PIL's here;
                                                        nvJPEG: not yet compared (needs a GPU)
RandAugment, AugMix, AutoAugment  --                    refused at construction (use decode="cpu")
================================  ====================  ==========================================================

Per-sample draws live in the worker, under the sample's seed, so the sample order, repeated augmentation, the
loader's state (exact mid-epoch resume) and Mixup are those of ``decode="cpu"``.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as nnf
from PIL import Image
from timm.data.auto_augment import AutoAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from masksub_lightning.data.datasets import CorruptImageError, ImageTooSmallError, decoding, to_rgb
from masksub_lightning.data.decode import _resized_size

#: Interpolation codes carried in the parameters (the tensor resize of each; nearest-exact matches PIL's nearest).
INTERPOLATIONS = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC, InterpolationMode.NEAREST_EXACT)
_INTERP_CODE = {InterpolationMode.BILINEAR: 0, InterpolationMode.BICUBIC: 1, InterpolationMode.NEAREST: 2}
#: 3-Augment op codes in the parameters ("aug"; -1: none).
AUG_OPS = ("Solarize", "Desaturate", "GaussianBlurRand")
#: The highest blur sigma the fixed kernel covers at 3 sigma (GaussianBlurRand draws sigma in [0.1, 2.0]).
_MAX_SIGMA = 2.0
#: JPEG colour modes nvJPEG turns into RGB as PIL does; others (CMYK) are decoded by PIL in the worker.
_DEVICE_JPEG_MODES = ("RGB", "L")
_PARAM_DTYPES = {"flip": torch.bool, "aug_arg": torch.float64, "jitter": torch.float64}
_DEPRECATION = r"The image decoding and encoding capabilities of TorchVision are deprecated"


def decode_jpegs(data: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Decode JPEG byte tensors (1-D uint8, on the CPU) into RGB ``(3, H, W)`` uint8 tensors on ``device``.

    The one place the package calls an image decoder of torchvision. On CUDA it is one batched nvJPEG call.
    torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns (DeprecationWarning) at every
    call; that warning is silenced here, once per call, rather than repeated at every training step.

    Raises:
        RuntimeError: a JPEG cannot be decoded (torchvision's message; :class:`DeviceAugment` names the file).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        # nvJPEG's hardware decoder does not follow stream order (torchvision PR #9606): let the work already
        # queued on this stream finish before it writes into memory the caching allocator may hand out again.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)
        return decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)


# ---------------------------------------------------------------------------------------- worker: the draws


def _flatten(transform: Any) -> list[Any]:
    if isinstance(transform, T.Compose):
        return [op for t in transform.transforms for op in _flatten(t)]
    return [transform]


_SUPPORTED_OPS = (
    RandomResizedCropAndInterpolation,
    T.RandomResizedCrop,
    T.Resize,
    T.RandomCrop,
    T.RandomHorizontalFlip,
    AutoAugment,
    T.ColorJitter,
    RandomErasing,
    MaybeToTensor,
    T.ToTensor,
    T.Normalize,
)


def check_supported(transform: Any) -> None:
    """ValueError naming the first op of the CPU train pipeline ``transform`` that the device path lacks."""
    for op in _flatten(transform):
        if isinstance(op, (RandomResizedCropAndInterpolation, T.RandomResizedCrop, T.Resize)):
            modes = op.interpolation if isinstance(op.interpolation, (tuple, list)) else [op.interpolation]
            bad = [m.value for m in modes if m not in _INTERP_CODE]
            if bad:
                raise ValueError(f"decode='gpu' resizes with bilinear / bicubic / nearest, not {bad[0]!r}")
        elif isinstance(op, AutoAugment):
            names = [o.name for sub in op.policy for o in sub]
            if any(len(sub) != 1 for sub in op.policy) or not set(names) <= set(AUG_OPS):
                raise ValueError(
                    f"decode='gpu' provides the 3-Augment ops {', '.join(AUG_OPS)}, not {names}: use "
                    "auto_augment='3a' or None, or decode='cpu'"
                )
        elif isinstance(op, T.ColorJitter) and op.hue is not None:
            raise ValueError("decode='gpu' has no hue jitter")
        elif isinstance(op, RandomErasing) and (op.max_count != 1 or op.num_splits > 1):
            raise ValueError("decode='gpu' erases one box per image, without splits")
        elif isinstance(op, T.RandomCrop) and (
            op.pad_if_needed
            or not isinstance(op.padding, (int, type(None)))
            or (op.padding and op.padding_mode != "reflect")
        ):
            raise ValueError(f"decode='gpu' crops with an int reflect padding only, not {op!r}")
        elif not isinstance(op, _SUPPORTED_OPS):
            raise ValueError(
                f"decode='gpu' does not provide the training op {type(op).__name__}: use decode='cpu' (it provides "
                "RandomResizedCrop / simple crop, flip, 3-Augment, color jitter, normalisation, random erasing)"
            )


def _shape(height: int, width: int) -> Tensor:
    # What the ops' get_params read the image size from (no storage).
    return torch.empty((3, height, width), device="meta")


def _draw_3a(op: AutoAugment) -> tuple[int, float]:
    """(op code, argument) of one 3-Augment draw: the draws AutoAugment and its AugmentOp make, in order."""
    (aug,) = random.choice(op.policy)
    if aug.prob < 1.0 and random.random() > aug.prob:
        return -1, 0.0
    magnitude = aug.magnitude
    if aug.magnitude_std == float("inf"):
        magnitude = random.uniform(0, magnitude)
    elif aug.magnitude_std > 0:
        magnitude = random.gauss(magnitude, aug.magnitude_std)
    magnitude = max(0.0, min(magnitude, aug.magnitude_max or 10))
    (level,) = aug.level_fn(magnitude, aug.hparams)
    if aug.name == "Desaturate":
        return 1, min(1.0, max(0.0, 1.0 - level))  # the enhance factor timm's desaturate uses
    if aug.name == "GaussianBlurRand":
        return 2, random.uniform(0.1, 2.0 * level)  # drawn inside timm's gaussian_blur_rand
    return 0, float(level)  # Solarize: the threshold


def _draw_erase(op: RandomErasing, size: int) -> list[int]:
    """(top, left, h, w) of timm's RandomErasing on a ``size`` square (h = 0: not erased), with its draws."""
    if random.random() > op.probability:
        return [0, 0, 0, 0]
    area = size * size
    for _ in range(10):
        target_area = random.uniform(op.min_area, op.max_area) * area
        aspect = math.exp(random.uniform(*op.log_aspect_ratio))
        h = round(math.sqrt(target_area * aspect))
        w = round(math.sqrt(target_area / aspect))
        if w < size and h < size:
            return [random.randint(0, size - h), random.randint(0, size - w), h, w]
    return [0, 0, 0, 0]


def draw_params(ops: Sequence[Any], width: int, height: int, img_size: int) -> dict[str, Any]:
    """Every random parameter the CPU train pipeline ``ops`` draws for a ``width x height`` image, in its order.

    Reads Python's ``random`` and torch's CPU generator exactly as the ops do (call it under the sample's
    :func:`~masksub_lightning.data.datasets.seeded_rng`). Plain Python numbers (tensors cost more to make than
    the draws): :func:`collate_encoded` stacks them into the tensors :class:`DeviceAugment` applies.
    """
    p: dict[str, Any] = dict(
        box=[0, 0, height, width], resize=[0, 0], pad=0, interp=1, flip=False, aug=-1, aug_arg=0.0,
        jitter_order=[-1, -1, -1, -1], jitter=[math.nan] * 3, erase=[0, 0, 0, 0],
    )  # fmt: skip
    h, w = height, width
    for op in ops:
        if isinstance(op, (RandomResizedCropAndInterpolation, T.RandomResizedCrop)):
            p["box"] = list(op.get_params(_shape(h, w), op.scale, op.ratio))
            mode = op.interpolation
            p["interp"] = _INTERP_CODE[random.choice(mode) if isinstance(mode, (tuple, list)) else mode]
            h = w = img_size
        elif isinstance(op, T.Resize):
            w, h = _resized_size(op, w, h)
            p["resize"], p["interp"] = [h, w], _INTERP_CODE[op.interpolation]
        elif isinstance(op, T.RandomCrop):
            pad = op.padding or 0
            top, left, h, w = op.get_params(_shape(h + 2 * pad, w + 2 * pad), op.size)
            p["box"], p["pad"] = [top, left, h, w], pad
        elif isinstance(op, T.RandomHorizontalFlip):
            p["flip"] = bool(torch.rand(1) < op.p)
        elif isinstance(op, AutoAugment):
            p["aug"], p["aug_arg"] = _draw_3a(op)
        elif isinstance(op, T.ColorJitter):
            order, *factors, _ = op.get_params(op.brightness, op.contrast, op.saturation, op.hue)
            p["jitter_order"] = order.tolist()
            p["jitter"] = [math.nan if f is None else f for f in factors]
        elif isinstance(op, RandomErasing):
            p["erase"] = _draw_erase(op, img_size)
    p["noise_seed"] = random.getrandbits(62)  # after every draw of the CPU pipeline: changes none of them
    return p


class EncodedTrainTransform:
    """The worker's part of ``decode="gpu"``: an image's bytes in, ``(payload, params, name)`` out; no JPEG decoding.

    ``payload`` is the JPEG's bytes as a 1-D uint8 tensor, or, for any other format (and CMYK JPEGs), the image
    decoded here by PIL as a ``(3, H, W)`` uint8 tensor. ``params`` is :func:`draw_params` of the CPU pipeline.
    Returns ``(payload, params, name)``.

    Args:
        pipeline: the DataModule's CPU train transform (its ops are read, not run).
        img_size: the output side.
        min_size: images whose shorter side is below this raise :class:`ImageTooSmallError`.
    """

    #: Tells the datasets to hand over the encoded bytes and the file's name instead of a PIL image.
    takes_encoded_bytes = True

    def __init__(self, pipeline: Callable, img_size: int, min_size: int = 1) -> None:
        check_supported(pipeline)
        self.ops = _flatten(pipeline)
        self.img_size = img_size
        self.min_size = min_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ops!r})"

    def __call__(self, data: bytes, name: str) -> tuple[Tensor, dict[str, Any], str]:
        with decoding(name):
            img = Image.open(io.BytesIO(data))  # parses the header only
        with img:
            width, height = img.size
            if min(width, height) < self.min_size:
                raise ImageTooSmallError(
                    f"Image {name} is {width}x{height} px, smaller than min_image_size={self.min_size}"
                )
            if img.format == "JPEG" and img.mode in _DEVICE_JPEG_MODES:
                payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                with decoding(name):
                    img.load()
                payload = F.pil_to_tensor(to_rgb(img))
        return payload, draw_params(self.ops, width, height, self.img_size), name


# ------------------------------------------------------------------------------------------- the batch


class EncodedBatch:
    """A training batch before decoding: payloads stay on the host (nvJPEG reads host memory), targets move.

    Attributes:
        payloads: per image, JPEG bytes (1-D uint8) or decoded pixels (``(3, H, W)`` uint8).
        params: :func:`draw_params` of every image, stacked: ``{name: (B, ...) tensor}`` (host).
        targets: int64 ``(B,)`` labels.
        names: the files (for decode errors).
    """

    def __init__(self, payloads: list[Tensor], params: dict[str, Tensor], targets: Tensor, names: list[str]):
        self.payloads, self.params, self.targets, self.names = payloads, params, targets, names

    def __len__(self) -> int:
        return len(self.payloads)

    def pin_memory(self) -> EncodedBatch:
        """Called by the DataLoader's pin-memory thread: page-locked payloads copy to the GPU faster."""
        return EncodedBatch([p.pin_memory() for p in self.payloads], self.params, self.targets, self.names)

    def targets_to(self, device: torch.device) -> EncodedBatch:
        return EncodedBatch(
            self.payloads, self.params, self.targets.to(device, non_blocking=True), self.names
        )


def collate_encoded(items: list[tuple[tuple[Tensor, dict[str, Any], str], int]]) -> EncodedBatch:
    """The train loader's ``collate_fn`` under ``decode="gpu"``: items ``((payload, params, name), label)``."""
    payloads = [payload for (payload, _, _), _ in items]
    params = {
        key: torch.tensor([p[key] for (_, p, _), _ in items], dtype=_PARAM_DTYPES.get(key, torch.int64))
        for key in items[0][0][1]
    }
    names = [name for (_, _, name), _ in items]
    return EncodedBatch(payloads, params, torch.tensor([label for _, label in items]), names)


# ------------------------------------------------------------------------------ main process: the device


def pil_luma(x: Tensor) -> Tensor:
    """PIL's RGB -> "L" on uint8 ``(..., 3, H, W)``: ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``, ``(..., 1, H, W)``."""
    r, g, b = x.to(torch.int32).unbind(-3)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(-3)


def pil_blend(degenerate: Tensor, img: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``Image.blend(degenerate, img, factor)`` on uint8: float32 ``d + f (i - d)``, clipped, truncated.

    ``factor``: one value per image, ``(B,)``; ``degenerate`` broadcasts against ``img``.
    """
    d = degenerate.to(torch.float32)
    f = factor.to(img.device, torch.float32).view(-1, 1, 1, 1)  # the factors come from the host
    out = d + f * (img.to(torch.float32) - d)
    return out.clamp_(0, 255).to(torch.uint8)  # the float -> uint8 cast truncates, as PIL's (UINT8) cast


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return pil_blend(torch.zeros_like(x[:, :1]), x, factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    # PIL: the degenerate image is the mean of the "L" image, rounded to an integer.
    mean = pil_luma(x).to(torch.float64).mean(dim=(-3, -2, -1), keepdim=True)
    return pil_blend(torch.floor(mean + 0.5), x, factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return pil_blend(pil_luma(x), x, factor)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """PIL's ``ImageOps.solarize``: values at or above the per-image threshold are inverted."""
    return torch.where(x >= threshold.to(x.device).view(-1, 1, 1, 1), 255 - x, x)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """A separable Gaussian of per-image ``sigma`` (13 taps, edges replicated), rounded back to uint8."""
    radius = math.ceil(3 * _MAX_SIGMA)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma.to(x.device, torch.float32).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(x.shape[1], 0)  # (B * C, taps)
    b, c, h, w = x.shape
    y = nnf.pad(x.to(torch.float32).reshape(1, b * c, h, w), [radius] * 4, mode="replicate")
    y = nnf.conv2d(y, kernel.view(b * c, 1, 1, -1), groups=b * c)
    y = nnf.conv2d(y, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return y.reshape(b, c, h, w).round_().clamp_(0, 255).to(torch.uint8)


_JITTER = (adjust_brightness, adjust_contrast, adjust_saturation)


class DeviceAugment:
    """The main process's part of ``decode="gpu"``: decode an :class:`EncodedBatch` and apply its parameters.

    Args:
        img_size: the output side.
        mean: normalisation mean (RGB, in [0, 1] units).
        std: normalisation std.
        erase_mode: random erasing fill ("pixel", "rand" or "const"), for boxes drawn in the workers.
    """

    def __init__(
        self, img_size: int, mean: Sequence[float], std: Sequence[float], erase_mode: str = "pixel"
    ) -> None:
        self.img_size, self.mean, self.std, self.erase_mode = img_size, tuple(mean), tuple(std), erase_mode

    def decode(self, batch: EncodedBatch, device: torch.device) -> list[Tensor]:
        """Every image of ``batch`` as ``(3, H, W)`` uint8 on ``device``: the JPEGs in one batched decode."""
        jpegs = [i for i, p in enumerate(batch.payloads) if p.dim() == 1]
        images = [p.to(device, non_blocking=True) if p.dim() == 3 else p for p in batch.payloads]
        if jpegs:
            try:
                decoded = decode_jpegs([batch.payloads[i] for i in jpegs], device)
            except RuntimeError:
                decoded = [self._decode_one(batch, i, device) for i in jpegs]  # find and name the bad file
            for i, img in zip(jpegs, decoded):
                images[i] = img
        return images

    @staticmethod
    def _decode_one(batch: EncodedBatch, index: int, device: torch.device) -> Tensor:
        try:
            return decode_jpegs([batch.payloads[index]], device)[0]
        except RuntimeError as e:
            raise CorruptImageError(
                f"Cannot decode image file {batch.names[index]} on {device.type} (decode='gpu'): {e}"
            ) from None

    def __call__(self, batch: EncodedBatch, device: torch.device) -> Tensor:
        """Normalised float32 ``(B, 3, img_size, img_size)`` images on ``device``."""
        p = batch.params
        x = torch.stack([self._geometry(img, p, i) for i, img in enumerate(self.decode(batch, device))])
        flip = p["flip"].to(device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = self._three_augment(x, p["aug"], p["aug_arg"])
        x = self._jitter(x, p["jitter_order"], p["jitter"])
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        x = (x.to(torch.float32) / 255 - mean) / std
        return self._erase(x, p["erase"], p["noise_seed"])

    def _geometry(self, img: Tensor, p: dict[str, Tensor], i: int) -> Tensor:
        """Crop and resize image ``i`` as its parameters say: RandomResizedCrop, or resize + padded crop."""
        top, left, h, w = p["box"][i].tolist()
        mode = INTERPOLATIONS[int(p["interp"][i])]
        size = [self.img_size, self.img_size]
        rh, rw = p["resize"][i].tolist()
        if rh == 0:  # RandomResizedCrop
            return F.resized_crop(img, top, left, h, w, size, mode, antialias=True)
        img = F.resize(img, [rh, rw], mode, antialias=True)
        pad = int(p["pad"][i])
        if pad:  # DeiT-III's simple crop: 4 px of reflect padding before the random crop
            img = F.pad(img, [pad], padding_mode="reflect")
        return F.crop(img, top, left, h, w)

    @staticmethod
    def _three_augment(x: Tensor, aug: Tensor, arg: Tensor) -> Tensor:
        out = x.clone()
        for code, op in ((0, solarize), (1, adjust_saturation), (2, gaussian_blur)):
            rows = torch.nonzero(aug == code).flatten()
            if len(rows):
                dev_rows = rows.to(x.device)
                out[dev_rows] = op(x[dev_rows], arg[rows])
        return out

    @staticmethod
    def _jitter(x: Tensor, order: Tensor, factors: Tensor) -> Tensor:
        # Each image applies its ops in its own drawn order: position by position, the images whose op there is
        # brightness / contrast / saturation get it with their own factor.
        for position in range(order.shape[1]):
            for code, op in enumerate(_JITTER):
                rows = torch.nonzero((order[:, position] == code) & ~factors[:, code].isnan()).flatten()
                if len(rows):
                    dev_rows = rows.to(x.device)
                    x[dev_rows] = op(x[dev_rows], factors[rows, code])
        return x

    def _erase(self, x: Tensor, boxes: Tensor, seeds: Tensor) -> Tensor:
        for i in torch.nonzero(boxes[:, 2] > 0).flatten().tolist():
            top, left, h, w = boxes[i].tolist()
            if self.erase_mode == "const":
                fill = torch.zeros((3, 1, 1), device=x.device)
            else:
                gen = torch.Generator(x.device).manual_seed(int(seeds[i]))
                shape = (3, h, w) if self.erase_mode == "pixel" else (3, 1, 1)
                fill = torch.empty(shape, device=x.device).normal_(generator=gen)
            x[i, :, top : top + h, left : left + w] = fill
        return x
