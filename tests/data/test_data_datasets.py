"""Every DataModule reads a tiny copy of its dataset written in the real on-disk format."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from fake_data import (
    SMALL,
    decode_labels,
    write_cifar10,
    write_cifar100,
    write_cub200,
    write_dtd,
    write_fgvc_aircraft,
    write_flowers102,
    write_food101,
    write_image_folder,
    write_imagenet,
    write_inat2021,
    write_inat_json,
    write_oxford_pets,
    write_stanford_cars,
    write_stanford_dogs,
)

from masksub_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CUB200DataModule,
    DTDDataModule,
    FGVCAircraftDataModule,
    Flowers102DataModule,
    Food101DataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    INaturalistDataModule,
    OxfordIIITPetDataModule,
    StanfordCarsDataModule,
    StanfordDogsDataModule,
)

CASES = {
    "image_folder": (write_image_folder, ImageFolderDataModule, {}),
    "image_folder_test": (partial(write_image_folder, test=True), ImageFolderDataModule, {}),
    "imagenet": (write_imagenet, ImageNetDataModule, {}),
    "cifar10": (write_cifar10, CIFAR10DataModule, {}),
    "cifar100": (write_cifar100, CIFAR100DataModule, {}),
    "flowers102": (write_flowers102, Flowers102DataModule, {}),
    "stanford_cars": (write_stanford_cars, StanfordCarsDataModule, {}),
    "fgvc_aircraft": (write_fgvc_aircraft, FGVCAircraftDataModule, {}),
    "oxford_pets": (write_oxford_pets, OxfordIIITPetDataModule, {}),
    "food101": (write_food101, Food101DataModule, {}),
    "dtd": (write_dtd, DTDDataModule, {}),
    "cub200": (write_cub200, CUB200DataModule, {}),
    "stanford_dogs": (write_stanford_dogs, StanfordDogsDataModule, {}),
    "inat2018": (partial(write_inat_json, year="2018"), INaturalistDataModule, {"version": "2018"}),
    "inat2019": (partial(write_inat_json, year="2019"), INaturalistDataModule, {"version": "2019"}),
    "inat2021_mini": (write_inat2021, INaturalistDataModule, {"version": "2021_mini"}),
    "inat2021": (
        partial(write_inat2021, train_folder="2021_train"),
        INaturalistDataModule,
        {"version": "2021"},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_datamodule_reads_its_real_layout(name, tmp_path):
    writer, cls, kwargs = CASES[name]
    expected = writer(tmp_path)
    dm = cls(root=str(tmp_path), **kwargs, **SMALL)

    # Metadata works before setup (the CLI links num_classes to the model at instantiation).
    assert dm.num_classes == expected["num_classes"]
    assert dm.class_names == expected["class_names"]
    assert dm.datasets == {}

    dm.setup()
    for split in ("train", "val", "test"):
        dataset = dm.datasets[split]
        pairs = [dataset[i] for i in range(len(dataset))]
        targets = torch.tensor([int(y) for _, y in pairs])
        assert sorted(targets.tolist()) == sorted(expected["labels"][split]), split
        images = torch.stack([x for x, _ in pairs])
        assert images.shape == (len(dataset), 3, 32, 32) and images.dtype == torch.float32
        # Each image is a solid colour encoding its label: the image really is the file of that label.
        assert torch.equal(decode_labels(images, dm.mean, dm.std), targets), split

    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and images.is_contiguous()
    assert targets.dtype == torch.int64 and targets.shape == (2,)
    assert torch.equal(decode_labels(images, dm.mean, dm.std), targets)

    images, targets = next(iter(dm.val_dataloader()))
    assert targets.dtype == torch.int64
    assert targets.tolist() == [int(dm.datasets["val"][i][1]) for i in range(2)]  # val order is fixed
    assert torch.equal(decode_labels(images, dm.mean, dm.std), targets)


def test_imagenet_class_list_selects_and_orders_a_subset(tmp_path):
    expected = write_imagenet(tmp_path)["subset"]
    dm = ImageNetDataModule(root=str(tmp_path), class_list=expected["class_list"], **SMALL)
    assert dm.class_names == expected["class_names"] and dm.num_classes == 2
    dm.setup("fit")
    # Labels follow the class list's order: n01484850 -> 0 (written with colour label 2), n01440764 -> 1.
    samples = dm.datasets["train"].samples
    assert sorted({(p.split("/")[-2], y) for p, y in samples}) == [("n01440764", 1), ("n01484850", 0)]
    assert len(dm.datasets["val"]) == 2


def test_image_folder_uses_test_folder_when_present(tmp_path):
    write_image_folder(tmp_path, test=True)
    dm = ImageFolderDataModule(root=str(tmp_path), **SMALL)
    dm.setup("test")
    assert set(dm.datasets) == {"test"}
    assert all("/test/" in p for p, _ in dm.datasets["test"].samples)


def test_fgvc_aircraft_annotation_levels(tmp_path):
    write_fgvc_aircraft(tmp_path)
    dm = FGVCAircraftDataModule(root=str(tmp_path), annotation_level="manufacturer", **SMALL)
    assert dm.class_names == ["Boeing", "Airbus", "ATR", "Cessna"]


def test_dtd_partition_and_dataset_folder_as_root(tmp_path):
    write_dtd(tmp_path)
    dm = DTDDataModule(root=str(tmp_path / "dtd" / "dtd"), partition=2, **SMALL)  # the folder itself
    dm.setup("fit")
    assert [(p.split("/")[-1], y) for p, y in dm.datasets["train"].samples] == [("blotchy_0002.jpg", 1)]


def test_cifar_root_may_be_the_batches_folder(tmp_path):
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path / "cifar-10-batches-py"), **SMALL)
    assert dm.num_classes == 10
    dm.setup("fit")
    assert dm.datasets["train"].targets == [2, 1, 4, 3, 6, 5, 8, 7, 0, 9]  # batch 1..5 order
