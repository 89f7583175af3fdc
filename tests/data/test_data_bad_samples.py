"""Bad data: a clear error naming the file (bad_samples="error"), or a counted, warned, deterministic skip."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from fake_data import SMALL, decode_labels, write_cub200, write_image, write_image_folder, write_inat_json

from masksub_lightning.data import (
    CorruptImageError,
    CUB200DataModule,
    ImageFolderDataModule,
    INaturalistDataModule,
)
from masksub_lightning.data.datasets import ImageTooSmallError, ImageTransformError, SampleDataset


def _damage(tmp_path):
    """12 train images (4 per class), 2 of them bad: a truncated JPEG and a text file named .png."""
    write_image_folder(tmp_path, n_train=4, n_val=2)
    truncated = tmp_path / "train" / "cat" / "cat_0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = tmp_path / "train" / "eel" / "eel_1.png"
    garbage.write_bytes(b"not an image at all" * 20)
    return truncated, garbage


def _epoch(dm):
    loader = dm.train_dataloader()
    return [batch for batch in loader], loader


# ---------------------------------------------------------------------------------------------- "error"


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_raises_naming_the_file_in_workers_too(tmp_path, workers):
    truncated, _ = _damage(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), **{**SMALL, "num_workers": workers, "batch_size": 4})
    with pytest.raises(CorruptImageError, match=re.escape(str(truncated))):
        _epoch(dm)


HINT = "; to skip such files, set bad_samples: skip (--data.init_args.bad_samples skip)"


@pytest.mark.parametrize("workers", [0, 2])
def test_the_error_names_the_file_and_the_skip_option_in_its_last_line(tmp_path, workers):
    truncated, _ = _damage(tmp_path)
    (tmp_path / "train" / "eel" / "eel_1.png").unlink()  # the truncated JPEG is the one bad file
    dm = ImageFolderDataModule(root=str(tmp_path), **{**SMALL, "num_workers": workers, "batch_size": 4})
    with pytest.raises(CorruptImageError) as raised:
        _epoch(dm)
    # In a worker, torch's message is the worker's traceback: its last line is the one a training run ends with.
    last = str(raised.value).splitlines()[-1]
    assert re.fullmatch(
        rf"(.*CorruptImageError: )?Cannot decode image file {re.escape(str(truncated))}: .+", last
    )
    assert last.endswith(HINT) and last.count(HINT) == 1


def test_a_missing_file_names_the_skip_option_too(tmp_path):
    write_image_folder(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), **SMALL)
    dm.setup("fit")
    gone = dm.datasets["val"].samples[0][0]
    Path(gone).unlink()
    with pytest.raises(FileNotFoundError) as raised:
        list(dm.val_dataloader())
    assert str(raised.value) == f"Image file not found: {gone}{HINT}"


def test_unreadable_val_image_raises_naming_the_file(tmp_path):
    write_image_folder(tmp_path)
    bad = tmp_path / "val" / "dog" / "dog_0.jpg"
    bad.write_bytes(b"")
    dm = ImageFolderDataModule(root=str(tmp_path), **SMALL)
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        list(dm.val_dataloader())


def test_image_smaller_than_min_image_size_is_named(tmp_path):
    write_image_folder(tmp_path)
    small = write_image(tmp_path / "train" / "cat" / "tiny.png", 0, size=(5, 3))
    dm = ImageFolderDataModule(root=str(tmp_path), min_image_size=8, **{**SMALL, "batch_size": 7})
    with pytest.raises(
        ImageTooSmallError, match=re.escape(f"{small} is 5x3 px, smaller than min_image_size=8")
    ):
        _epoch(dm)
    # The default accepts it (timm's crops upsample it).
    assert len(_epoch(ImageFolderDataModule(root=str(tmp_path), **{**SMALL, "batch_size": 7}))[0]) == 1


def test_failing_transform_names_the_file(tmp_path):
    write_image_folder(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), **SMALL)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    dataset.transform = lambda img: img.crop((0, 0, 1, 1)).resize((0, 0))  # PIL rejects a 0x0 size
    with pytest.raises(ImageTransformError, match=re.escape(dataset.samples[0][0]) + r" \(40x36 px\)"):
        dataset[0]


def test_unknown_category_in_annotation_file_is_named(tmp_path):
    import json

    write_inat_json(tmp_path, "2018")
    doc = json.loads((tmp_path / "train2018.json").read_text())
    doc["annotations"][1]["category_id"] = 77
    (tmp_path / "train2018.json").write_text(json.dumps(doc))
    dm = INaturalistDataModule(root=str(tmp_path), version="2018", **SMALL)
    with pytest.raises(ValueError, match=r"train2018\.json: image .*_1\.jpg has category_id 77"):
        dm.setup("fit")


# ----------------------------------------------------------------------------------------------- "skip"


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_replaces_unreadable_images_deterministically_and_counts_them(tmp_path, workers):
    truncated, garbage = _damage(tmp_path)
    kwargs = {**SMALL, "num_workers": workers, "batch_size": 4, "bad_samples": "skip"}
    dm = ImageFolderDataModule(root=str(tmp_path), **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches, loader = _epoch(dm)
    images = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    assert len(targets) == 12  # a full epoch, every bad draw replaced
    assert torch.equal(decode_labels(images, dm.mean, dm.std), targets)  # replacements keep their own label

    samples = dm.datasets["train"].samples
    bad = {i for i, (path, _) in enumerate(samples) if path in (str(truncated), str(garbage))}
    expected = sum(index in bad for index in loader.sampler.indices())  # draws of a bad file this epoch
    assert expected == 2
    assert dm.skipped_samples["train"]["images"] == expected
    if workers == 0:  # (warnings raised inside worker processes are not seen by this process)
        named = " ".join(str(w.message) for w in caught)
        assert str(truncated) in named and str(garbage) in named

    # The per-epoch report: one warning with the count, then nothing new to report.
    with pytest.warns(UserWarning, match=rf"{expected} bad train image\(s\) skipped and replaced in epoch 0"):
        dm.report_skips("epoch 0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.report_skips("epoch 1")

    # Deterministic: a second DataModule serves the same replacements.
    again, _ = _epoch(ImageFolderDataModule(root=str(tmp_path), **kwargs))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))


def test_skip_in_the_val_split_keeps_its_length(tmp_path):
    write_image_folder(tmp_path, n_val=2)
    bad = tmp_path / "val" / "dog" / "dog_1.png"
    bad.write_bytes(b"garbage")
    dm = ImageFolderDataModule(root=str(tmp_path), bad_samples="skip", **SMALL)
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        targets = torch.cat([y for _, y in dm.val_dataloader()])
    assert len(targets) == 6 and dm.skipped_samples["val"]["images"] == 1


def test_skip_gives_up_when_nearly_everything_is_bad():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            raise CorruptImageError(f"Cannot decode image file {i}.jpg")

    dataset = SampleDataset(Broken(), bad_samples="skip", max_attempts=10)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=r"10 bad samples in a row.*\.jpg"):
        dataset[(0, 123)]


def test_skip_empty_class_folder_warns_and_counts(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "train" / "fox").mkdir()
    dm = ImageFolderDataModule(root=str(tmp_path), bad_samples="skip", **SMALL)
    with pytest.warns(UserWarning, match=r"skipped 1 empty class folder\(s\).*train/fox contains no images"):
        dm.setup("fit")
    assert dm.num_classes == 4  # the class keeps its label, it just has no training images
    assert len(dm.datasets["train"]) == 6
    assert dm.skipped_samples["train"] == {"empty class folder(s)": 1}


def test_skip_out_of_range_label_warns_counts_and_drops_the_entry(tmp_path):
    expected = write_cub200(tmp_path, bad_label=True)
    dm = CUB200DataModule(root=str(tmp_path), bad_samples="skip", **SMALL)
    with pytest.warns(UserWarning, match=re.escape(f"{expected['bad_file']}: label 201 is outside [1, 200]")):
        dm.setup("fit")
    assert sorted(dm.datasets["train"].targets) == sorted(expected["labels"]["train"])
    assert dm.skipped_samples["train"] == {"out-of-range label(s)": 1}
