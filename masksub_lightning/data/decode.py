"""Reduced-size JPEG decoding: decode only as many pixels as the first resize of the pipeline keeps.

A training crop of ImageNet rarely needs every pixel of a large source: RandomResizedCrop shrinks the crop box
to ``img_size`` and the eval / simple-crop ``Resize`` shrinks the whole image. libjpeg can decode at 1/2, 1/4 or
1/8 of the size for a fraction of the cost (it skips the high DCT frequencies), which PIL exposes as
``Image.draft``.

:class:`DraftDecode` is the first op of such a pipeline. It receives the opened but not yet decoded image,
draws the geometric op's random parameters from the *original* size (the same draws, in the same order, from the
same RNGs as the op itself), asks libjpeg for the largest reduction that still leaves at least the output size
across the crop, and resamples the crop box mapped into the reduced image (``Image.resize(box=...)`` takes
fractional boxes). The crop therefore covers exactly the same part of the picture and the pixels differ only by
the resampling (figures in ``benchmarks/RESULTS.md``, section 5). A source that is not a JPEG, or less than
twice the needed size, is decoded fully and gives a bit-identical crop.

Turned on by ``fast_decode=True`` on any file-based DataModule (:func:`fast_decode_pipeline` wraps its
transform; :class:`~masksub_lightning.data.datasets.ImageListDataset` then hands over undecoded images).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import functional as F

from masksub_lightning.data.datasets import decoding, to_rgb

_RRC_TYPES = (RandomResizedCropAndInterpolation, T.RandomResizedCrop)


def decode(img: Image.Image, request: tuple[int, int] | None = None) -> tuple[Image.Image, float]:
    """Decode an opened image, at a reduced JPEG scale if ``request`` allows one; RGB and the scale used.

    Args:
        img: a PIL image from ``Image.open``, not loaded yet (a loaded image is only converted to RGB).
        request: the smallest ``(width, height)`` the caller needs; libjpeg picks the largest power-of-two
            reduction (1/2, 1/4, 1/8) that keeps the image at least this large. None: full size.

    Returns:
        The decoded RGB image and the reduction ``s``: original pixel coordinate ``x`` is ``x / s`` in it.

    Raises:
        CorruptImageError: the file cannot be decoded; the message names it.
    """
    scale = 1.0
    with decoding(getattr(img, "filename", "") or "<in-memory image>"):
        if request is not None and hasattr(img, "draft") and getattr(img, "_im", None) is None:
            width = img.size[0]
            drafted = img.draft(None, (max(1, request[0]), max(1, request[1])))
            if drafted is not None:  # (mode, (0, 0, W / s, H / s)); None for formats without reduced decoding
                scale = width / drafted[1][2]
        img.load()
        return to_rgb(img), scale


def _resized_size(op: T.Resize, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) ``op`` resizes a ``width x height`` image to, or None when it is not a plain Resize."""
    size = op.size
    if isinstance(size, (list, tuple)):
        if len(size) == 2:
            return int(size[1]), int(size[0])
        size = size[0]
    if op.max_size is not None:
        return None
    # torchvision's rule for an int size: the short side becomes `size`, the long side int(size * long / short).
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


class DraftDecode:
    """Decode an undecoded image at reduced size and apply the pipeline's first geometric op in one resample.

    Handles timm's ``RandomResizedCropAndInterpolation``, torchvision's ``RandomResizedCrop`` and ``Resize``
    (an int size or ``(h, w)``, the eval and DeiT-III simple-crop first op). Any other ``op`` (or None) is
    applied to the fully decoded image, so the wrapper is always correct and at worst not faster.

    Args:
        op: the pipeline's first op, replaced by this one.
    """

    #: Tells :class:`~masksub_lightning.data.datasets.ImageListDataset` to pass the image undecoded.
    takes_unloaded_image = True

    def __init__(self, op: Callable | None) -> None:
        self.op = op

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.op!r})"

    def __call__(self, img: Image.Image) -> Image.Image:
        op = self.op
        if isinstance(op, _RRC_TYPES):
            return self._resized_crop(img, op)
        if isinstance(op, T.Resize):
            out = _resized_size(op, *img.size)
            if out is not None:
                width, height = img.size
                rgb, s = decode(img, out)
                if s == 1:
                    return op(rgb)  # full size: exactly the op's own resize
                return rgb.resize(
                    out, F.pil_modes_mapping[op.interpolation], box=(0, 0, width / s, height / s)
                )
        rgb, _ = decode(img)
        return rgb if op is None else op(rgb)

    @staticmethod
    def _resized_crop(img: Image.Image, op: Any) -> Image.Image:
        # The same draws as the op's __call__: crop box from get_params (Python `random` in timm, torch in
        # torchvision) on the original size, then timm's random interpolation choice.
        top, left, h, w = op.get_params(img, op.scale, op.ratio)
        interpolation = op.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        out_h, out_w = op.size if isinstance(op.size, (tuple, list)) and len(op.size) == 2 else (op.size,) * 2
        if isinstance(out_h, (tuple, list)):  # torchvision keeps a 1-element list for an int size
            out_h = out_w = out_h[0]
        width, height = img.size
        # Whole-image size at which the crop box would be exactly out_w x out_h: no reduction goes below it.
        request = (math.ceil(width * out_w / w), math.ceil(height * out_h / h))
        rgb, s = decode(img, request)
        if s == 1:  # full size: exactly the op's own crop-then-resize (bit-identical)
            return F.resized_crop(rgb, top, left, h, w, [out_h, out_w], interpolation)
        box = (left / s, top / s, (left + w) / s, (top + h) / s)
        return rgb.resize((out_w, out_h), F.pil_modes_mapping[interpolation], box=box)


def fast_decode_pipeline(transform: T.Compose) -> T.Compose:
    """``transform`` with its first op replaced by :class:`DraftDecode` (nested Composes are flattened first).

    The result expects an undecoded PIL image (``Image.open``); it is marked ``takes_unloaded_image``.
    """
    ops: list[Callable] = []

    def flatten(t: Any) -> None:
        if isinstance(t, T.Compose):
            for sub in t.transforms:
                flatten(sub)
        else:
            ops.append(t)

    flatten(transform)
    first = ops[0] if ops and isinstance(ops[0], (*_RRC_TYPES, T.Resize)) else None
    rest = ops[1:] if first is not None else ops
    pipeline = T.Compose([DraftDecode(first), *rest])
    pipeline.takes_unloaded_image = True  # type: ignore[attr-defined]
    return pipeline
