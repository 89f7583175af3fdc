"""The recipes' training / eval pipelines come out of timm with the right stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AutoAugment, RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from masksub_lightning.data import ImageNetDataModule


def _stages(transform) -> list:
    """The transform's leaf stages, Compose flattened."""
    if isinstance(transform, T.Compose):
        return [leaf for t in transform.transforms for leaf in _stages(t)]
    return [transform]


def _of(stages, cls):
    return [s for s in stages if isinstance(s, cls)]


def _image(w=60, h=40):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_deit3_pipeline_simple_crop_3augment_jitter():
    dm = ImageNetDataModule(root="x", img_size=48, train_crop="simple", auto_augment="3a", color_jitter=0.3)
    stages = _stages(dm.build_transform(train=True))
    assert [type(s) for s in stages[:3]] == [T.Resize, T.RandomCrop, T.RandomHorizontalFlip]
    assert stages[1].padding == 4 and stages[1].padding_mode == "reflect"
    (aa,) = _of(stages, AutoAugment)
    assert sorted(op.name for sub in aa.policy for op in sub) == [
        "Desaturate",
        "GaussianBlurRand",
        "Solarize",
    ]
    (jitter,) = _of(stages, T.ColorJitter)  # 3-Augment keeps colour jitter (timm drops it for other AA)
    assert jitter.brightness == (0.7, 1.3)
    assert not _of(stages, RandomErasing) and not _of(stages, RandomResizedCropAndInterpolation)
    out = dm.build_transform(train=True)(_image())
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32


def test_rsb_swin_pipeline_rrc_randaugment_erasing():
    dm = ImageNetDataModule(
        root="x", img_size=48, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, scale=(0.35, 1.0)
    )
    stages = _stages(dm.build_transform(train=True))
    (rrc,) = _of(stages, RandomResizedCropAndInterpolation)
    assert rrc.scale == (0.35, 1.0) and rrc.size == (48, 48)
    assert len(_of(stages, RandAugment)) == 1
    assert not _of(stages, T.ColorJitter)  # timm disables jitter under RandAugment, as the recipes do
    (erase,) = _of(stages, RandomErasing)
    assert erase.probability == 0.25 and erase.mode == "pixel"
    assert dm.build_transform(train=True)(_image()).shape == (3, 48, 48)


@pytest.mark.parametrize(("crop_pct", "resize"), [(1.0, 48), (0.875, 54)])
def test_eval_pipeline_resize_then_center_crop(crop_pct, resize):
    dm = ImageNetDataModule(root="x", img_size=48, eval_crop_pct=crop_pct, interpolation="bilinear")
    stages = _stages(dm.build_transform(train=False))
    assert [type(s) for s in stages[:2]] == [T.Resize, T.CenterCrop]
    assert stages[0].size == resize and stages[0].interpolation == T.InterpolationMode.BILINEAR
    assert dm.build_transform(train=False)(_image()).shape == (3, 48, 48)


def test_normalisation_from_a_timm_model_config():
    dm = ImageNetDataModule(root="x", norm_from_model="vit_base_patch16_clip_224.openai")
    torch.testing.assert_close(torch.tensor(dm.mean), torch.tensor((0.48145466, 0.4578275, 0.40821073)))
    torch.testing.assert_close(torch.tensor(dm.std), torch.tensor((0.26862954, 0.26130258, 0.27577711)))
    (norm,) = _of(_stages(dm.build_transform(train=False)), T.Normalize)
    torch.testing.assert_close(torch.as_tensor(norm.mean), torch.tensor(dm.mean))
    default = ImageNetDataModule(root="x")
    assert default.mean == (0.485, 0.456, 0.406) and default.std == (0.229, 0.224, 0.225)


def test_no_jitter_and_no_flip_when_disabled():
    dm = ImageNetDataModule(root="x", img_size=32, color_jitter=0.0, hflip=0.0, train_crop="simple")
    stages = _stages(dm.build_transform(train=True))
    assert not _of(stages, T.ColorJitter) and not _of(stages, T.RandomHorizontalFlip)


def test_train_interpolation_overrides_training_only(tmp_path):
    from masksub_lightning.data import ImageFolderDataModule

    dm = ImageFolderDataModule(
        root=str(tmp_path), img_size=32, train_interpolation="random", interpolation="bicubic"
    )
    train_crop = (
        dm.build_transform(train=True).transforms[0].transforms[0]
    )  # timm's RandomResizedCropAndInterpolation
    assert (
        isinstance(train_crop.interpolation, tuple) and len(train_crop.interpolation) == 2
    )  # random choice of two
    eval_resize = dm.build_transform(train=False).transforms[0]
    assert "bicubic" in str(eval_resize.interpolation).lower()
    import pytest

    with pytest.raises(ValueError, match="train_interpolation"):
        ImageFolderDataModule(root=str(tmp_path), train_interpolation="cubic")


def test_posterize_to_zero_bits_gives_black_instead_of_crashing():
    # RandAugment "mstd0.5" can draw magnitude 10, where timm's PosterizeIncreasing keeps 0 bits; Pillow >= 12
    # raises on 0 bits. Every posterize op of the pipeline must take it.
    dm = ImageNetDataModule(root="x", img_size=32, auto_augment="rand-m9-mstd0.5-inc1")
    (ra,) = _of(_stages(dm.build_transform(train=True)), RandAugment)
    (op,) = [op for op in ra.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    out = np.asarray(op(_image()))
    assert out.shape == (40, 60, 3) and out.max() == 0
