"""Every image mode decodes to 8-bit RGB with the right colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_data import SMALL, color_of, decode_labels
from PIL import Image

from masksub_lightning.data import ImageFolderDataModule, load_rgb

GRAY = 86  # color_of(86) == (102, 102, 102): grey survives every mode


def _save(path, mode):
    rgb = Image.new("RGB", (20, 10), color_of(GRAY))
    if mode == "P_transparent":
        img = rgb.convert("P")
        img.info["transparency"] = 0
        img.save(path, transparency=0)
        return
    if mode == "I;16":
        Image.fromarray(np.full((10, 20), 102 * 257, dtype=np.uint16)).save(path)
        return
    rgb.convert(mode).save(path)


@pytest.mark.parametrize(
    ("mode", "ext"),
    [
        ("RGB", "jpg"),
        ("L", "jpg"),
        ("L", "png"),
        ("CMYK", "jpg"),
        ("P", "png"),
        ("P", "gif"),
        ("P_transparent", "png"),
        ("LA", "png"),
        ("RGBA", "png"),
        ("I;16", "png"),
        ("RGB", "bmp"),
        ("RGB", "webp"),
        ("L", "tiff"),
    ],
)
def test_modes_convert_to_rgb(tmp_path, mode, ext):
    path = tmp_path / f"img.{ext}"
    _save(path, mode)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (20, 10)
    np.testing.assert_allclose(np.asarray(img, dtype=np.float64).mean(axis=(0, 1)), [102, 102, 102], atol=3)


def test_mixed_modes_through_a_datamodule(tmp_path):
    labels = {"a": 0, "b": 43, "c": 215}  # grey labels: (0,0,0), (51,51,51), (255,255,255)
    modes = ["L", "CMYK", "P", "RGBA"]
    for cls, label in labels.items():
        for split in ("train", "val"):
            for mode in modes:
                ext = "jpg" if mode in ("L", "CMYK") else "png"
                img = Image.new("RGB", (24, 24), color_of(label)).convert(mode)
                path = tmp_path / split / cls / f"{mode}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                img.save(path)
    dm = ImageFolderDataModule(root=str(tmp_path), **{**SMALL, "batch_size": 12})
    dm.setup("validate")
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.float32
    assert targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    decoded = decode_labels(images, dm.mean, dm.std)
    assert decoded.tolist() == [0] * 4 + [43] * 4 + [215] * 4
