"""Writers of tiny copies of every supported dataset, in the dataset's real on-disk format.

(A helper module rather than a conftest.py in tests/data/: the suite's top-level tests import ``conftest`` by name,
and a second conftest.py here would shadow it.)

Every image is a solid colour that encodes its label (``color_of(label)``), so a test can decode the label
back from a transformed batch and check that images and targets really belong together.
Each writer returns the expected metadata: ``num_classes``, some ``class_names`` and per-split labels.
"""

from __future__ import annotations

import json
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.io import savemat

# Small, fast, colour-preserving DataModule settings: solid-colour images keep their colour through crops.
SMALL = dict(batch_size=2, num_workers=0, img_size=32, color_jitter=None)

# 6 levels per channel: 216 colours, 51 apart (JPEG error is a few units).
LEVELS = (0, 51, 102, 153, 204, 255)


def color_of(label: int) -> tuple[int, int, int]:
    assert 0 <= label < len(LEVELS) ** 3
    return LEVELS[label // 36], LEVELS[(label // 6) % 6], LEVELS[label % 6]


def decode_labels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Labels of a batch of solid-colour images (B, 3, H, W) normalised with mean / std."""
    rgb = images.float() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    rgb = rgb.mean(dim=(2, 3)) * 255  # (B, 3)
    levels = torch.tensor(LEVELS, dtype=torch.float32)
    idx = (rgb.unsqueeze(-1) - levels).abs().argmin(-1)  # (B, 3) level index per channel
    return idx[:, 0] * 36 + idx[:, 1] * 6 + idx[:, 2]


def write_image(
    path: Path, label: int, size: tuple[int, int] = (40, 36), mode: str = "RGB", noise: int = 0
) -> Path:
    """A solid ``color_of(label)`` image; ``noise > 0`` adds seeded uniform noise of that amplitude (a texture
    that crops, flips and colour ops visibly change, at the cost of exact colour decoding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color_of(label))
    if noise:
        rng = np.random.default_rng(zlib.crc32(path.name.encode()))
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-noise, noise + 1, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def _write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


# ----------------------------------------------------------------------------------------------- folders


def write_image_folder(
    root: Path, classes=("cat", "dog", "eel"), n_train=2, n_val=1, test=False, noise: int = 0
) -> dict:
    """``root/train/<class>/*.jpg``, ``root/val/...`` (and ``root/test/...``); classes sorted -> labels."""
    exts = (".jpg", ".png", ".JPEG")
    labels = {"train": [], "val": [], "test": []}
    splits = {"train": n_train, "val": n_val, **({"test": 1} if test else {})}
    for label, cls in enumerate(sorted(classes)):
        for split, n in splits.items():
            for i in range(n):
                write_image(root / split / cls / f"{cls}_{i}{exts[i % 3]}", label, noise=noise)
                labels[split].append(label)
    if not test:
        labels["test"] = labels["val"]
    return dict(num_classes=len(classes), class_names=sorted(classes), labels=labels)


def write_imagenet(root: Path) -> dict:
    """Four wnid folders; a class list picks two of them in non-sorted order."""
    wnids = ["n01440764", "n01443537", "n01484850", "n01491361"]
    for label, wnid in enumerate(wnids):
        for i in range(2):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", label)
        write_image(root / "val" / wnid / f"ILSVRC2012_val_{label:08d}.JPEG", label)
    _write_lines(root / "imagenet100.txt", ["# subset", "n01484850", "", "n01440764"])
    return dict(
        num_classes=4,
        class_names=wnids,
        labels={"train": [0, 0, 1, 1, 2, 2, 3, 3], "val": [0, 1, 2, 3], "test": [0, 1, 2, 3]},
        subset=dict(class_list="imagenet100.txt", class_names=["n01484850", "n01440764"]),
    )


# ------------------------------------------------------------------------------------------------- CIFAR


def _cifar_batch(labels, key: str) -> dict:
    data = np.stack(
        [np.repeat(np.array(color_of(y), dtype=np.uint8), 1024) for y in labels]
    )  # (N, 3072) R|G|B
    return {"batch_label": "fake", key: list(labels), "data": data, "filenames": [f"{i}.png" for i in labels]}


def _pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path) -> dict:
    base = root / "cifar-10-batches-py"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train = []
    for b in range(1, 6):
        labels = [(2 * b) % 10, (2 * b + 9) % 10]
        _pickle(base / f"data_batch_{b}", _cifar_batch(labels, "labels"))
        train += labels
    test = [0, 9, 4]
    _pickle(base / "test_batch", _cifar_batch(test, "labels"))
    _pickle(base / "batches.meta", {"label_names": names, "num_cases_per_batch": 2, "num_vis": 3072})
    return dict(num_classes=10, class_names=names, labels={"train": train, "val": test, "test": test})


def write_cifar100(root: Path) -> dict:
    base = root / "cifar-100-python"
    names = [f"class{i:02d}" for i in range(100)]
    train, test = [0, 99, 42, 7], [99, 3]
    for name, labels in (("train", train), ("test", test)):
        batch = _cifar_batch(labels, "fine_labels")
        batch["coarse_labels"] = [y // 5 for y in labels]
        _pickle(base / name, batch)
    _pickle(base / "meta", {"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]})
    return dict(num_classes=100, class_names=names, labels={"train": train, "val": test, "test": test})


# ------------------------------------------------------------------------------------ torchvision layouts


def write_flowers102(root: Path) -> dict:
    base = root / "flowers-102"
    class_ids = [1, 102, 50, 1, 102, 50, 7]  # 1-based class of image_00001 ... image_00007
    for i, c in enumerate(class_ids, 1):
        write_image(base / "jpg" / f"image_{i:05d}.jpg", c - 1)
    savemat(base / "imagelabels.mat", {"labels": np.array([class_ids], dtype=np.uint8)})
    savemat(
        base / "setid.mat",
        {
            "trnid": np.array([[1, 2]], dtype=np.uint16),
            "valid": np.array([[3, 7]], dtype=np.uint16),
            "tstid": np.array([[4, 5, 6]], dtype=np.uint16),
        },
    )
    return dict(
        num_classes=102,
        class_names=[str(k) for k in range(1, 103)],
        labels={"train": [0, 101, 49, 6], "val": [0, 101, 49], "test": [0, 101, 49]},
    )


def _cars_annos(rows) -> np.ndarray:
    dt = [
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("fname", "O"),
    ]
    return np.array([(1, 2, 30, 20, np.uint8(c), f) for f, c in rows], dtype=dt).reshape(1, -1)


def write_stanford_cars(root: Path) -> dict:
    base = root / "stanford_cars"
    names = [f"Make{i} Model{i} 2012" for i in range(1, 197)]
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    train, test = (
        [("00001.jpg", 1), ("00002.jpg", 196), ("00003.jpg", 10)],
        [("00001.jpg", 196), ("00002.jpg", 2)],
    )
    for folder, rows in (("cars_train", train), ("cars_test", test)):
        for f, c in rows:
            write_image(base / folder / f, c - 1)
    savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": _cars_annos(train)})
    savemat(base / "cars_test_annos_withlabels.mat", {"annotations": _cars_annos(test)})
    return dict(
        num_classes=196, class_names=names, labels={"train": [0, 195, 9], "val": [195, 1], "test": [195, 1]}
    )


def write_fgvc_aircraft(root: Path) -> dict:
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A320", "ATR-72", "Cessna 172"]  # names with '-' and spaces, as the real ones
    _write_lines(data / "variants.txt", variants)
    _write_lines(data / "families.txt", ["Boeing 707", "A320", "ATR-72", "Cessna 172"])
    _write_lines(data / "manufacturers.txt", ["Boeing", "Airbus", "ATR", "Cessna"])
    trainval = [("1025794", 0), ("0034309", 3), ("2233311", 1)]
    test = [("1514522", 3), ("0056978", 2)]
    for name, rows in (("trainval", trainval), ("test", test)):
        _write_lines(data / f"images_variant_{name}.txt", [f"{i} {variants[y]}" for i, y in rows])
        for i, y in rows:
            write_image(data / "images" / f"{i}.jpg", y)
    return dict(
        num_classes=4, class_names=variants, labels={"train": [0, 3, 1], "val": [3, 2], "test": [3, 2]}
    )


def write_oxford_pets(root: Path) -> dict:
    base = root / "oxford-iiit-pet"
    trainval = [("Abyssinian_100", 1, 1, 1), ("great_pyrenees_12", 2, 2, 1), ("Abyssinian_101", 1, 1, 1)]
    test = [("yorkshire_terrier_3", 3, 2, 2), ("great_pyrenees_13", 2, 2, 1)]
    for name, rows in (("trainval", trainval), ("test", test)):
        _write_lines(base / "annotations" / f"{name}.txt", [" ".join(map(str, r)) for r in rows])
        for image_id, c, _, _ in rows:
            write_image(base / "images" / f"{image_id}.jpg", c - 1)
    return dict(
        num_classes=3,
        class_names=["Abyssinian", "Great Pyrenees", "Yorkshire Terrier"],
        labels={"train": [0, 1, 0], "val": [2, 1], "test": [2, 1]},
    )


def write_food101(root: Path) -> dict:
    base = root / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "waffles"]
    train = {
        "apple_pie": ["apple_pie/1005649"],
        "waffles": ["waffles/2001", "waffles/2002"],
        "baby_back_ribs": [],
    }
    test = {"apple_pie": ["apple_pie/1011328"], "baby_back_ribs": ["baby_back_ribs/3001"], "waffles": []}
    (base / "meta").mkdir(parents=True)
    for name, meta in (("train", train), ("test", test)):
        (base / "meta" / f"{name}.json").write_text(json.dumps(meta))
        for cls, rels in meta.items():
            for rel in rels:
                write_image(base / "images" / f"{rel}.jpg", classes.index(cls))
    _write_lines(base / "meta" / "classes.txt", classes)
    return dict(
        num_classes=3, class_names=classes, labels={"train": [0, 2, 2], "val": [0, 1], "test": [0, 1]}
    )


def write_dtd(root: Path) -> dict:
    base = root / "dtd" / "dtd"
    classes = ["banded", "blotchy", "zigzagged"]
    files = {c: [f"{c}_{i:04d}.jpg" for i in range(3)] for c in classes}
    for label, c in enumerate(classes):
        for f in files[c]:
            write_image(base / "images" / c / f, label)
    _write_lines(base / "labels" / "train1.txt", ["banded/banded_0000.jpg", "zigzagged/zigzagged_0000.jpg"])
    _write_lines(base / "labels" / "val1.txt", ["blotchy/blotchy_0000.jpg"])
    _write_lines(base / "labels" / "test1.txt", ["zigzagged/zigzagged_0001.jpg", "banded/banded_0001.jpg"])
    _write_lines(base / "labels" / "train2.txt", ["blotchy/blotchy_0002.jpg"])
    _write_lines(base / "labels" / "val2.txt", [])
    _write_lines(base / "labels" / "test2.txt", ["banded/banded_0002.jpg"])
    return dict(
        num_classes=3, class_names=classes, labels={"train": [0, 2, 1], "val": [2, 0], "test": [2, 0]}
    )


# ---------------------------------------------------------------------------------------- own readers


def write_cub200(root: Path, bad_label: bool = False) -> dict:
    base = root / "CUB_200_2011"
    names = [f"{k:03d}.Bird_{k}" for k in range(1, 201)]
    # (image id, class id 1..200, is_train)
    rows = [(1, 1, 1), (2, 200, 1), (3, 17, 0), (4, 1, 0), (5, 17, 1)]
    if bad_label:
        rows.append((6, 201, 1))
    paths = {i: f"{names[c - 1] if c <= 200 else '201.Nope'}/Bird_{i}.jpg" for i, c, _ in rows}
    _write_lines(base / "classes.txt", [f"{k} {n}" for k, n in enumerate(names, 1)])
    _write_lines(base / "images.txt", [f"{i} {paths[i]}" for i, _, _ in rows])
    _write_lines(base / "image_class_labels.txt", [f"{i} {c}" for i, c, _ in rows])
    _write_lines(base / "train_test_split.txt", [f"{i} {t}" for i, _, t in rows])
    for i, c, _ in rows:
        write_image(base / "images" / paths[i], min(c, 200) - 1)
    return dict(
        num_classes=200,
        class_names=names,
        labels={"train": [0, 199, 16], "val": [16, 0], "test": [16, 0]},
        bad_file=str(base / "images" / paths.get(6, "")),
    )


def _dogs_list(path: Path, files, labels) -> None:
    cell = np.empty((len(files), 1), dtype=object)
    for i, f in enumerate(files):
        cell[i, 0] = f
    savemat(
        path,
        {
            "file_list": cell,
            "annotation_list": cell.copy(),
            "labels": np.array(labels, dtype=np.uint8).reshape(-1, 1),
        },
    )


def write_stanford_dogs(root: Path) -> dict:
    breeds = {1: "n02085620-Chihuahua", 2: "n02085782-Japanese_spaniel", 120: "n02116738-African_hunting_dog"}
    train = [(f"{breeds[c]}/{breeds[c].split('-')[0]}_{i}.jpg", c) for i, c in enumerate([1, 120, 2, 1])]
    test = [(f"{breeds[c]}/{breeds[c].split('-')[0]}_{i + 10}.jpg", c) for i, c in enumerate([120, 2])]
    for name, rows in (("train", train), ("test", test)):
        _dogs_list(root / f"{name}_list.mat", [f for f, _ in rows], [c for _, c in rows])
        for f, c in rows:
            write_image(root / "Images" / f, c - 1)
    class_names = [breeds.get(k, str(k)) for k in range(1, 121)]
    return dict(
        num_classes=120,
        class_names=class_names,
        labels={"train": [0, 119, 1, 0], "val": [119, 1], "test": [119, 1]},
    )


def write_inat_json(root: Path, year: str) -> dict:
    """COCO-style ``train<year>.json`` / ``val<year>.json`` with images under ``train_val<year>/``."""
    categories = [
        {"id": k, "name": f"Species {k}", "supercategory": "Plantae" if k % 2 else "Aves"} for k in range(5)
    ]
    splits = {"train": [0, 4, 2, 4], "val": [3, 0]}
    for split, labels in splits.items():
        images, annotations = [], []
        for i, c in enumerate(labels):
            image_id = 1000 * (split == "val") + i
            file = f"train_val{year}/{categories[c]['supercategory']}/{c}/{split}_{i}.jpg"
            write_image(root / file, c)
            images.append({"id": image_id, "file_name": file, "width": 40, "height": 36, "license": 0})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": c})
        doc = {
            "info": {"year": int(year)},
            "images": images,
            "annotations": annotations,
            "categories": categories,
            "licenses": [],
        }
        (root / f"{split}{year}.json").write_text(json.dumps(doc))
    return dict(
        num_classes=5,
        class_names=[f"Species {k}" for k in range(5)],
        labels={"train": splits["train"], "val": splits["val"], "test": splits["val"]},
    )


def write_inat2021(root: Path, train_folder: str = "2021_train_mini") -> dict:
    classes = [
        "00000_Animalia_Annelida_Clitellata_Crassiclitellata_Lumbricidae_Lumbricus_terrestris",
        "00001_Animalia_Annelida_Polychaeta_Phyllodocida_Nereididae_Alitta_succinea",
        "00002_Plantae_Tracheophyta_Magnoliopsida_Asterales_Asteraceae_Bellis_perennis",
    ]
    labels = {"train": [], "val": []}
    for label, c in enumerate(classes):
        for split, folder, n in (("train", train_folder, 2), ("val", "2021_valid", 1)):
            for i in range(n):
                write_image(root / folder / c / f"{label}{i}-abc.jpg", label)
                labels[split].append(label)
    labels["test"] = labels["val"]
    return dict(num_classes=3, class_names=classes, labels=labels)
