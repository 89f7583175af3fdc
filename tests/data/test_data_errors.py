"""Bad input fails early with a message that names the value, file or path and what was expected."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import lightning as L
import pytest
from fake_data import (
    SMALL,
    write_cifar10,
    write_cub200,
    write_flowers102,
    write_image,
    write_image_folder,
    write_inat_json,
    write_oxford_pets,
)
from torch.utils.data import DataLoader

from masksub_lightning.data import (
    CIFAR10DataModule,
    CorruptImageError,
    CUB200DataModule,
    DigitsDataModule,
    DTDDataModule,
    FGVCAircraftDataModule,
    Flowers102DataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    INaturalistDataModule,
    OxfordIIITPetDataModule,
    StanfordCarsDataModule,
)

# ------------------------------------------------------------------------------------------ missing paths


def test_missing_root_names_path_and_layout(tmp_path):
    dm = ImageNetDataModule(root=str(tmp_path / "nowhere"))  # constructing is fine (no I/O in __init__)
    with pytest.raises(FileNotFoundError) as err:
        _ = dm.num_classes
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "<root>/train/n01440764/" in msg and "<root>/val/" in msg


def test_missing_val_split_names_it(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "val").rename(tmp_path / "validation")
    dm = ImageFolderDataModule(root=str(tmp_path), **SMALL)
    assert dm.num_classes == 3  # train is there
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "val"))):
        dm.setup("fit")


@pytest.mark.parametrize("cls", [Flowers102DataModule, StanfordCarsDataModule, CIFAR10DataModule])
def test_missing_dataset_folder(cls, tmp_path):
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        cls(root=str(tmp_path)).setup("fit")


def test_missing_annotation_file_is_named(tmp_path):
    write_inat_json(tmp_path, "2018")
    (tmp_path / "train2018.json").unlink()
    dm = INaturalistDataModule(root=str(tmp_path), version="2018", **SMALL)
    assert dm.num_classes == 5  # class metadata comes from val2018.json
    with pytest.raises(FileNotFoundError, match=r"train2018\.json"):
        dm.setup("fit")


def test_missing_image_listed_in_annotations_is_named(tmp_path):
    write_cub200(tmp_path)
    victim = next((tmp_path / "CUB_200_2011" / "images").rglob("Bird_1.jpg"))
    victim.unlink()
    dm = CUB200DataModule(root=str(tmp_path), **SMALL)
    dm.setup("fit")
    with pytest.raises(FileNotFoundError, match=re.escape(str(victim))):
        [dm.datasets["train"][i] for i in range(len(dm.datasets["train"]))]


# ------------------------------------------------------------------------------------------- bad content


def test_empty_class_folder_is_named(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "train" / "fox").mkdir()
    dm = ImageFolderDataModule(root=str(tmp_path), **SMALL)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'train' / 'fox'} contains no images")):
        dm.setup("fit")


def test_val_class_unknown_to_train_is_named(tmp_path):
    write_image_folder(tmp_path)
    write_image(tmp_path / "val" / "cta" / "x.jpg", 0)
    with pytest.raises(ValueError, match="cta"):
        ImageFolderDataModule(root=str(tmp_path), **SMALL).setup("validate")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_image_is_named(tmp_path, damage):
    write_image_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "dog_0.jpg"
    data = bad.read_bytes()
    bad.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"not an image" * 50, "empty": b""}[damage]
    )
    dm = ImageFolderDataModule(root=str(tmp_path), **SMALL)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    index = [p for p, _ in dataset.samples].index(str(bad))
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        dataset[index]
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):  # and through a loader
        for _ in DataLoader(dataset, batch_size=6):
            pass


def test_label_out_of_range_is_named(tmp_path):
    expected = write_cub200(tmp_path, bad_label=True)  # class id 201 of 200
    dm = CUB200DataModule(root=str(tmp_path), **SMALL)
    assert dm.num_classes == 200
    with pytest.raises(ValueError) as raised:
        dm.setup("fit")
    labels = tmp_path / "CUB_200_2011" / "image_class_labels.txt"
    assert str(raised.value) == (  # as the file writes it: 1-based
        f"{expected['bad_file']}: label 201 is outside [1, 200] (1 bad label(s) in total; 1-based class ids, as in "
        f"{labels})"
    )


def test_a_pets_class_id_of_0_is_reported_as_written(tmp_path):
    write_oxford_pets(tmp_path)
    split = tmp_path / "oxford-iiit-pet" / "annotations" / "trainval.txt"
    split.write_text(split.read_text().replace("Abyssinian_101 1 1 1", "Abyssinian_101 0 1 1"))
    with pytest.raises(
        ValueError, match=re.escape("Abyssinian_101.jpg: label 0 is outside [1, 3] (1 bad label(s)")
    ):
        OxfordIIITPetDataModule(root=str(tmp_path), **SMALL).setup("fit")


@pytest.mark.parametrize(
    ("write", "cls", "file", "old", "new", "expected"),
    [
        (
            write_cub200,
            CUB200DataModule,
            "CUB_200_2011/image_class_labels.txt",
            "2 200\n",
            "2 two hundred\n",
            "image_class_labels.txt:2: class id 'two hundred' is not a whole number",
        ),
        (
            write_cub200,
            CUB200DataModule,
            "CUB_200_2011/classes.txt",
            "3 003.Bird_3\n",
            "3x 003.Bird_3\n",
            "classes.txt:3: class id '3x' is not a whole number",
        ),
        (
            write_oxford_pets,
            OxfordIIITPetDataModule,
            "oxford-iiit-pet/annotations/test.txt",
            "great_pyrenees_13 2 2 1",
            "great_pyrenees_13 II 2 1",
            "test.txt:2: class id 'II' is not a whole number",
        ),
    ],
    ids=["cub-labels", "cub-classes", "pets"],
)
def test_a_non_numeric_label_names_the_file_line_and_text(tmp_path, write, cls, file, old, new, expected):
    write(tmp_path)
    path = tmp_path / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(ValueError) as raised:
        cls(root=str(tmp_path), **SMALL).setup("fit")
    assert str(raised.value) == f"{tmp_path / file.rsplit('/', 1)[0]}/{expected}"


def test_a_non_numeric_mat_label_names_the_file_and_the_value(tmp_path):
    import numpy as np
    from scipy.io import savemat

    write_flowers102(tmp_path)
    path = tmp_path / "flowers-102" / "imagelabels.mat"
    savemat(path, {"labels": np.array(["one", "two"], dtype=object)})
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: 'labels' must hold whole numbers (") + ".*'one'"
    ):
        Flowers102DataModule(root=str(tmp_path), **SMALL).setup("fit")


def test_cifar_label_out_of_range_and_corrupt_pickle(tmp_path):
    import pickle

    write_cifar10(tmp_path)
    base = tmp_path / "cifar-10-batches-py"
    batch = pickle.loads((base / "test_batch").read_bytes(), encoding="latin1")
    batch["labels"][1] = 10
    (base / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=r"image 1 of .*test_batch.*label 10 is outside \[0, 10\)"):
        CIFAR10DataModule(root=str(tmp_path), **SMALL).setup("validate")
    (base / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="data_batch_3"):
        CIFAR10DataModule(root=str(tmp_path), **SMALL).setup("fit")


def test_class_list_naming_absent_class(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("cat\nwolf\n")
    dm = ImageNetDataModule(root=str(tmp_path), class_list="classes.txt", **SMALL)
    assert dm.class_names == ["cat", "wolf"]
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train" / "wolf"))):
        dm.setup("fit")


def test_too_small_train_split_for_batch_size(tmp_path):
    write_image_folder(tmp_path, n_train=1)
    dm = ImageFolderDataModule(root=str(tmp_path), **{**SMALL, "batch_size": 4})
    with pytest.raises(ValueError, match=r"3 images.*batch_size=4"):
        dm.train_dataloader()


# ---------------------------------------------------------------------------------------- invalid arguments


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(batch_size=-1), r"batch_size=-1 .*integer >= 1"),
        (dict(batch_size=0), r"batch_size=0"),
        (dict(num_workers=-2), r"num_workers=-2 .*>= 0"),
        (dict(train_crop="center"), r"train_crop='center' .*rrc, simple"),
        (dict(interpolation="cubic"), r"interpolation='cubic' .*bicubic"),
        (dict(mixup_mode="row"), r"mixup_mode='row' .*batch, pair, elem"),
        (dict(scale=(0.5, 0.1)), r"scale=\(0.5, 0.1\)"),
        (dict(hflip=1.5), r"hflip=1.5 .*\[0, 1\]"),
        (dict(reprob=-0.1), r"reprob"),
        (dict(eval_crop_pct=1.2), r"eval_crop_pct=1.2 .*\(0, 1\]"),
        (dict(label_smoothing=1.0), r"label_smoothing=1.0"),
        (dict(mixup_alpha=-1.0), r"mixup_alpha"),
        (dict(batch_size=5, mixup_alpha=0.8), r"batch_size=5 .*even"),
        (dict(repeated_aug=0), r"repeated_aug=0"),
        (dict(auto_augment="bogus"), r"auto_augment='bogus' .*'3a'"),
        (dict(norm_from_model="no_such_model"), r"norm_from_model='no_such_model'"),
        (dict(norm_from_model="resnet50", mean=(0.5, 0.5, 0.5)), r"norm_from_model='resnet50' and mean"),
        (dict(mean=(0.5, 0.5)), r"mean=\(0.5, 0.5\) .*3 numbers"),
        (dict(std=(0.5, 0.0, 0.5)), r"mean / std"),
        (dict(mean="imagenet"), r"mean='imagenet' .*3 numbers"),
        (dict(img_size=22.5), r"img_size=22.5 .*integer >= 1"),
        (dict(num_workers=True), r"num_workers=True .*integer"),
        (dict(pin_memory="yes"), r"pin_memory='yes' .*True or False"),
        (dict(persistent_workers=1), r"persistent_workers=1 .*True or False"),
        (dict(channels_last=None), r"channels_last=None .*True or False"),
        (dict(seed=-1), r"seed=-1 .*integer >= 0"),
        (dict(seed=1.5), r"seed=1.5"),
        (dict(auto_augment=3), r"auto_augment=3 .*string or None"),
        (dict(norm_from_model=["resnet50"]), r"norm_from_model=\['resnet50'\] .*string or None"),
        (dict(scale=(0.5,)), r"scale=\(0.5,\) .*two numbers"),
        (dict(ratio="wide"), r"ratio='wide' .*two numbers"),
        (dict(ratio=(2.0, 1.0)), r"ratio=\(2.0, 1.0\) .*min <= max"),
        (dict(hflip="0.5"), r"hflip='0.5' .*number"),
        (dict(color_jitter=-0.1), r"color_jitter=-0.1 .*>= 0"),
        (dict(color_jitter="strong"), r"color_jitter='strong' .*number"),
        (dict(remode="zeros"), r"remode='zeros' .*const, rand, pixel"),
        (dict(train_interpolation="cubic"), r"train_interpolation='cubic' .*random or None"),
        (dict(mixup_prob=2.0), r"mixup_prob=2.0 .*\[0, 1\]"),
        (dict(mixup_switch_prob=-0.5), r"mixup_switch_prob=-0.5 .*\[0, 1\]"),
        (dict(cutmix_alpha=-1.0), r"cutmix_alpha=-1.0 .*>= 0"),
        (dict(bad_samples="ignore"), r"bad_samples='ignore' .*error, skip"),
        (dict(min_image_size=0), r"min_image_size=0 .*integer >= 1"),
    ],
)
def test_invalid_arguments_raise_value_error_in_init(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ImageNetDataModule(root="/does/not/matter", **kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "pattern"),
    [
        (DigitsDataModule, dict(val_fraction=1.0), r"val_fraction=1.0"),
        (DigitsDataModule, dict(val_fraction="0.2"), r"val_fraction='0.2'"),
        (DigitsDataModule, dict(split_seed=-3), r"split_seed=-3 .*integer >= 0"),
        (DigitsDataModule, dict(train_augment="no"), r"train_augment='no' .*True or False"),
        (DigitsDataModule, dict(batch_size=0), r"batch_size=0"),
        (INaturalistDataModule, dict(root="x", version="2020"), r"version='2020' .*2018, 2019"),
        (ImageFolderDataModule, dict(root="x", class_list=5), r"class_list=5 .*path or None"),
        (ImageFolderDataModule, dict(root=3), r"root=3 .*path or None"),
        (FGVCAircraftDataModule, dict(root="x", annotation_level="model"), r"annotation_level='model'"),
        (DTDDataModule, dict(root="x", partition=11), r"partition=11 .*\[1, 10\]"),
        (DTDDataModule, dict(root="x", partition=1.5), r"partition=1.5 .*integer"),
    ],
)
def test_invalid_subclass_arguments(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


# ----------------------------------------------------------------------------------- model vs data classes


class _Classes(L.LightningModule):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes


@pytest.mark.parametrize(
    ("model_classes", "data_kwargs", "pattern"),
    [
        (12, dict(mixup_alpha=0.8), r"model has num_classes=12 but DigitsDataModule has 10 classes: Mixup"),
        (12, dict(label_smoothing=0.1), r"num_classes=12 .* label smoothing"),
        (8, dict(), r"num_classes=8 but DigitsDataModule has 10 classes: labels up to"),
    ],
)
def test_model_num_classes_must_fit_the_data_at_setup(model_classes, data_kwargs, pattern):
    dm = DigitsDataModule(batch_size=8, **data_kwargs)
    dm.trainer = SimpleNamespace(lightning_module=_Classes(model_classes))
    with pytest.raises(ValueError, match=pattern):
        dm.setup("fit")


def test_matching_or_larger_model_head_is_fine():
    dm = DigitsDataModule(batch_size=8, mixup_alpha=0.8)
    dm.trainer = SimpleNamespace(lightning_module=_Classes(10))
    dm.setup("fit")
    hard = DigitsDataModule(batch_size=8)  # hard labels only need to fit inside the head
    hard.trainer = SimpleNamespace(lightning_module=_Classes(1000))
    hard.setup("fit")
    evaluating = DigitsDataModule(batch_size=8, mixup_alpha=0.8)  # evaluation targets are hard labels
    evaluating.trainer = SimpleNamespace(lightning_module=_Classes(1000))
    evaluating.setup("validate")


@pytest.mark.parametrize(
    "split, key, field",
    [("train", "annotations", "image_id"), ("train", "images", "file_name"), ("val", "categories", "id")],
)
def test_inaturalist_entry_without_a_field_is_named(tmp_path, split, key, field):
    write_inat_json(tmp_path, "2018")
    path = tmp_path / f"{split}2018.json"
    doc = json.loads(path.read_text())
    del doc[key][1][field]
    path.write_text(json.dumps(doc))
    dm = INaturalistDataModule(root=str(tmp_path), version="2018", **SMALL)
    with pytest.raises(ValueError, match=rf"{split}2018\.json: {key}\[1\] has no '{field}' field") as e:
        dm.setup("fit")
    assert "\n" not in str(e.value)
