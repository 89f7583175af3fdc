"""Pre-training views (masksub_lightning.data.pretrain): LUT's two SRC views and MAE's single view."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from masksub_lightning.data import (
    PretrainDigitsDataModule,
    PretrainImageFolderDataModule,
    PretrainImageNetDataModule,
)
from masksub_lightning.data.pretrain import lut_view_transforms

sys.path.insert(0, str(Path(__file__).parent / "data"))
from fake_data import write_imagenet


def _textured(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_mim_view_is_a_simple_random_crop_of_the_reflect_padded_image():
    """View 0 = Resize -> RandomCrop(padding 4, reflect) -> flip only: it equals one of the 81 shifted crops."""
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    mim, context = lut_view_transforms(32, mean, std, hflip=0.0)
    img = _textured()
    padded = torch.nn.functional.pad(TF.to_tensor(img)[None], (4, 4, 4, 4), mode="reflect")[0]
    crops = [TF.normalize(padded[:, y : y + 32, x : x + 32], mean, std) for y in range(9) for x in range(9)]
    offsets = set()
    for _ in range(10):
        view = mim(img)
        match = [i for i, c in enumerate(crops) if torch.allclose(c, view, atol=1e-6)]
        assert match, "view 0 must be a pure shifted crop (no colour op)"
        offsets.add(match[0])
    assert len(offsets) > 1  # random crops
    # View 1 adds colour jitter / 3-Augment: it is (almost always) none of the pure crops.
    assert sum(any(torch.allclose(c, context(img), atol=1e-6) for c in crops) for _ in range(5)) <= 1


def test_lut_digits_batches_are_two_independent_views():
    dm = PretrainDigitsDataModule(batch_size=8, img_size=32)
    dm.setup("fit")
    views, labels = next(iter(dm.train_dataloader()))
    assert views.shape == (8, 2, 3, 32, 32) and labels.shape == (8,)
    assert not torch.allclose(views[:, 0], views[:, 1])
    val, _ = next(iter(dm.val_dataloader()))
    assert val.shape == (8, 3, 32, 32)  # evaluation: single images
    mae = PretrainDigitsDataModule(batch_size=8, img_size=32, views="mae")
    mae.setup("fit")
    assert next(iter(mae.train_dataloader()))[0].shape == (8, 3, 32, 32)
    assert mae.hparams.views == "mae"


def test_image_folder_views(tmp_path):
    write_imagenet(tmp_path)
    for cls in (PretrainImageFolderDataModule, PretrainImageNetDataModule):
        dm = cls(root=str(tmp_path), batch_size=2, num_workers=0, img_size=32)
        dm.setup("fit")
        views, _ = next(iter(dm.train_dataloader()))
        assert views.shape == (2, 2, 3, 32, 32)
        assert type(dm)(**dm.hparams).views == "lut"  # rebuildable from its hyperparameters


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"views": "three"}, r"views='three' is invalid: allowed: mae, lut"),
        ({"view_sizes": (32, 24)}, r"view_sizes=\(32, 24\) is invalid: both LUT views must be img_size=32"),
        ({"view_sizes": (24, 24)}, "both LUT views must be img_size=32"),
    ],
)
def test_bad_views_are_one_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PretrainDigitsDataModule(img_size=32, **kwargs)
