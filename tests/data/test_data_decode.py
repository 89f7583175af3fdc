"""fast_decode: reduced-size JPEG decoding keeps the crop's geometry and random draws; only resampling differs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_data import SMALL, decode_labels, write_image_folder
from PIL import Image

from masksub_lightning.data import CorruptImageError, ImageFolderDataModule
from masksub_lightning.data.datasets import seeded_rng
from masksub_lightning.data.decode import DraftDecode, decode, fast_decode_pipeline

RECIPES = {
    "deit3": dict(train_crop="rrc", auto_augment="3a", color_jitter=0.3),
    "deit3-simple": dict(train_crop="simple", auto_augment="3a", color_jitter=0.3),
    "rsb": dict(
        train_crop="rrc", auto_augment="rand-m7-mstd0.5", color_jitter=0.0, train_interpolation="random"
    ),
    "mae": dict(train_crop="rrc", auto_augment="rand-m9-mstd0.5-inc1", color_jitter=None, reprob=0.25),
}


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields plus mild noise: JPEG-like content with detail at every scale."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def to_pixels(x: torch.Tensor, dm) -> torch.Tensor:
    """Normalised (3, H, W) tensor back to 0..255."""
    return x * torch.tensor(dm.std).view(3, 1, 1) * 255 + torch.tensor(dm.mean).view(3, 1, 1) * 255


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_png_sources_give_bit_identical_samples(tmp_path, recipe):
    # PNG has no reduced decoding: the fast path must then reproduce the plain pipeline exactly, which checks
    # that it draws the same random numbers in the same order (crop box, interpolation, flip, colour ops).
    root = tmp_path / "data"
    for label in range(2):
        for i in range(3):
            path = root / "train" / f"c{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(90 + 20 * i, 70, seed=10 * label + i).save(path)
    kwargs = dict(SMALL, root=str(root), img_size=32, **RECIPES[recipe])
    plain = ImageFolderDataModule(**kwargs).get_dataset("train")
    fast = ImageFolderDataModule(**kwargs, fast_decode=True).get_dataset("train")
    assert isinstance(fast.transform.transforms[0], DraftDecode)
    for i in range(len(plain)):
        for seed in (0, 1, 2):
            with seeded_rng(seed):
                a, ya = plain[i]
            with seeded_rng(seed):
                b, yb = fast[i]
            assert ya == yb
            assert torch.equal(a, b), (recipe, i, seed)


@pytest.mark.parametrize("train", [True, False])
def test_large_jpeg_is_decoded_reduced_with_the_same_geometry(tmp_path, train):
    path = tmp_path / "data" / "train" / "c0" / "big.jpg"
    path.parent.mkdir(parents=True)
    photo(960, 720, seed=3).save(path, quality=92)
    (tmp_path / "data" / "val").mkdir()
    dm = ImageFolderDataModule(root=str(tmp_path / "data"), img_size=64, auto_augment=None, color_jitter=None)
    plain = dm.build_transform(train=train)
    fast = fast_decode_pipeline(plain)
    with Image.open(path) as img:  # 720 / 64 > 8: the eval resize (73 px short side) decodes at 1/8
        _, scale = decode(img, (82, 73))
    assert scale == 8
    scores, shifted = [], []
    for seed in range(6):
        with seeded_rng(seed):
            full = to_pixels(plain(Image.open(path).convert("RGB")), dm)
        with seeded_rng(seed):
            reduced = to_pixels(fast(Image.open(path)), dm)
        scores.append(psnr(full, reduced))
        # The same crop one output pixel off: what a geometry error of that size would score.
        shifted.append(psnr(full[:, :, 1:], full[:, :, :-1]))
    assert min(scores) > 38, scores
    assert min(scores) > max(shifted) + 5, (scores, shifted)


def test_fast_decode_loader_keeps_labels_and_colours(tmp_path):
    meta = write_image_folder(tmp_path / "data", classes=("a", "b", "c", "d"), n_train=3)
    dm = ImageFolderDataModule(root=str(tmp_path / "data"), **dict(SMALL, batch_size=4), fast_decode=True)
    seen = []
    for images, targets in dm.train_dataloader():
        assert torch.equal(decode_labels(images, dm.mean, dm.std), targets)
        seen += targets.tolist()
    assert sorted(seen) == sorted(meta["labels"]["train"])


def test_corrupt_and_small_files_are_named(tmp_path):
    root = tmp_path / "data"
    write_image_folder(root, classes=("a", "b"), n_train=1)
    bad = root / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    dm = ImageFolderDataModule(root=str(root), **SMALL, fast_decode=True)
    ds = dm.get_dataset("train")
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(CorruptImageError, match=r"broken\.jpg"):
        ds[index]
    dm = ImageFolderDataModule(root=str(root), **SMALL, fast_decode=True, min_image_size=1000)
    with pytest.raises(Exception, match="smaller than min_image_size=1000"):
        dm.get_dataset("train")[0]


def test_fast_decode_must_be_a_bool(tmp_path):
    with pytest.raises(ValueError, match="fast_decode='yes'"):
        ImageFolderDataModule(root=str(tmp_path), fast_decode="yes")
