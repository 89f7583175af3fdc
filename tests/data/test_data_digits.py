"""The quickstart DataModule: scikit-learn's real 8x8 digits, in memory."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from masksub_lightning.data import DigitsDataModule


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return torch.from_numpy(d.images).float(), torch.from_numpy(d.target)


def _all(dataset):
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.stack(labels)


def test_metadata_before_setup():
    dm = DigitsDataModule()
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    assert dm.datasets == {}


def test_split_is_stratified_fixed_and_seeded(digits):
    dm = DigitsDataModule(train_augment=False)
    dm.setup()
    train, val, test = (dm.datasets[s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (1437, 360, 360)
    counts = Counter(val.targets)
    assert sorted(counts) == list(range(10)) and all(35 <= c <= 37 for c in counts.values())
    assert torch.equal(test.images, val.images)  # test = val

    again = DigitsDataModule(train_augment=False)
    again.setup("fit")
    assert torch.equal(again.datasets["val"].images, val.images)
    other = DigitsDataModule(split_seed=1)
    other.setup("fit")
    assert not torch.equal(other.datasets["val"].labels, val.labels)


def test_images_are_the_real_digits_upsampled_and_normalised(digits):
    raw, labels = digits
    dm = DigitsDataModule(img_size=16, train_augment=False)
    dm.setup("fit")
    x_train, y_train = _all(dm.datasets["train"])
    x_val, y_val = _all(dm.datasets["val"])
    assert x_val.shape == (360, 3, 16, 16) and x_val.dtype == torch.float32 and y_val.dtype == torch.int64
    assert torch.equal(x_val[:, 0], x_val[:, 1]) and torch.equal(x_val[:, 0], x_val[:, 2])
    assert x_val.min() >= -1.0 and x_val.max() <= 1.0  # [0, 1] normalised with mean = std = 0.5
    # Together the splits hold exactly the 1,797 sklearn images: compare per-label sorted upsampled sums.
    expected = F.interpolate(raw.unsqueeze(1) / 16, size=(16, 16), mode="bilinear").clamp(0, 1)
    expected = (expected - 0.5) / 0.5
    ours = torch.cat([x_train, x_val])[:, 0]
    ours_labels = torch.cat([y_train, y_val])
    for digit in range(10):
        a = ours[ours_labels == digit].sum(dim=(1, 2)).sort().values
        b = expected[labels == digit, 0].sum(dim=(1, 2)).sort().values
        torch.testing.assert_close(a, b)


def test_train_augment_is_a_small_shift():
    dm = DigitsDataModule(img_size=16, train_augment=True)
    dm.setup("fit")
    plain = dm.build_transform(train=False)
    dataset = dm.datasets["train"]
    background = -1.0  # a zero pixel after normalisation
    shifts = set()
    for i in range(20):
        augmented, _ = dataset[i]
        reference = torch.nn.functional.pad(plain(dataset.images[i]), (2, 2, 2, 2), value=background)
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.allclose(reference[:, dy : dy + 16, dx : dx + 16], augmented)
        ]
        assert found, f"sample {i} is not a shift of at most 2 pixels"
        shifts.add(found[0])
    assert len(shifts) > 3  # and the shift is random


def test_one_epoch_serves_each_training_image_once_in_full_batches():
    dm = DigitsDataModule(batch_size=64, train_augment=False)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert [len(x) for x, _ in batches] == [64] * 22  # 1,437 images: the incomplete last batch is dropped
    # The epoch is a permutation of the split: 1,408 distinct images, each with its own label.
    order = loader.sampler.indices()[:1408]
    assert len(set(order)) == 1408
    train = dm.datasets["train"]
    images = torch.cat([x for x, _ in batches])
    assert torch.equal(torch.cat([y for _, y in batches]), train.labels[order])
    assert torch.equal(images, dm.build_transform(train=False)(train.images[order]))
