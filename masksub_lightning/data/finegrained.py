"""Fine-grained transfer datasets: Flowers-102, Stanford Cars, FGVC-Aircraft, Oxford-IIIT Pets, Food-101, DTD,
CUB-200-2011 and Stanford Dogs.

The first six are read from the exact layouts torchvision's dataset classes expect (pass torchvision's
``root``, or the dataset folder itself), with our own few lines of parsing: torchvision's Flowers-102 checks
md5 sums and Pets has no ``loader`` hook, and one reader style for all gives the same RGB conversion, the
same label checks and errors that name the file everywhere.

Split convention (as in transfer-learning papers): train on the official train (+ val where one exists), and
validate / test on the official test split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.io import loadmat

from masksub_lightning.data.base import HParam, ImageClassificationDataModule, Split, check_int
from masksub_lightning.data.datasets import Sample, list_class_dirs


def _read_mat(path: Path) -> dict:
    try:
        return loadmat(path, squeeze_me=True)
    except (ValueError, TypeError, OSError) as e:
        raise ValueError(f"Cannot read MATLAB file {path}: {e}") from e


def _mat_field(mat: dict, key: str, path: Path) -> np.ndarray:
    if key not in mat:
        raise ValueError(
            f"MATLAB file {path} has no variable {key!r} (has: {sorted(k for k in mat if k[0] != '_')})"
        )
    return np.atleast_1d(mat[key])  # squeeze_me turns a one-element array into a scalar


def _read_lines(path: Path) -> list[str]:
    """Non-empty, non-comment lines of a text file."""
    return [
        s for s in (line.strip() for line in path.read_text().splitlines()) if s and not s.startswith("#")
    ]


def _bad_line(path: Path, lineno: int, line: str, expected: str) -> ValueError:
    return ValueError(f"{path}:{lineno}: cannot parse {line!r} (expected {expected})")


def _int(value: Any, where: str, what: str) -> int:
    """``value`` (a text field, a MATLAB number) as an int, or a ValueError naming ``where`` (``file:line``),
    ``what`` it is and the value."""
    try:
        return int(value)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: {what} {value!r} is not a whole number") from None


def _mat_ints(mat: dict, key: str, path: Path) -> np.ndarray:
    """A MATLAB variable of integer labels / ids, or a ValueError naming the file, the variable and why."""
    try:
        return _mat_field(mat, key, path).astype(np.int64)
    except (ValueError, TypeError) as e:  # numpy's message quotes the bad value
        raise ValueError(f"{path}: {key!r} must hold whole numbers ({e})") from None


def _from_one_based(
    dm: ImageClassificationDataModule, split: Split, rows: list[tuple[str, int]], source: Path
) -> list[Sample]:
    """Samples from ``(image path, class id as the file writes it, 1..C)``: labels 0-based, and an id outside
    1..C reported as written (ValueError, or left out with ``bad_samples="skip"``)."""
    n = dm.num_classes
    bad = [(path, label) for path, label in rows if not 1 <= label <= n]
    for path, label in bad:
        dm.report_bad(
            split,
            "out-of-range label(s)",
            f"{path}: label {label} is outside [1, {n}] ({len(bad)} bad label(s) in total; 1-based class ids, as "
            f"in {source})",
        )
    return [(path, label - 1) for path, label in rows if 1 <= label <= n]


class Flowers102DataModule(ImageClassificationDataModule):
    """Oxford Flowers-102 (102 classes; train+val 2,040 images, test 6,149).

    Args:
        root: directory holding ``flowers-102/`` (torchvision's root), or that folder itself.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    layout = (
        "<root>/flowers-102/jpg/image_00001.jpg ...\n"
        "<root>/flowers-102/imagelabels.mat   ('labels': class 1..102 of image i)\n"
        "<root>/flowers-102/setid.mat         ('trnid', 'valid', 'tstid': 1-based image ids)"
    )

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)

    def _labels(self) -> tuple[np.ndarray, Path]:
        path = self.require(
            self.find_dir("flowers-102", "setid.mat") / "imagelabels.mat", "labels", kind="file"
        )
        return _mat_ints(_read_mat(path), "labels", path), path

    def read_class_names(self) -> list[str]:
        labels, _ = self._labels()
        return [str(k) for k in range(1, int(labels.max()) + 1)]  # the dataset's own 1-based class ids

    def read_samples(self, split: Split) -> list[Sample]:
        base = self.find_dir("flowers-102", "setid.mat")
        labels, labels_path = self._labels()
        setid_path = self.require(base / "setid.mat", "split file", kind="file")
        setid = _read_mat(setid_path)
        keys = ("trnid", "valid") if split == "train" else ("tstid",)
        ids = np.concatenate([_mat_ints(setid, k, setid_path) for k in keys])
        if ids.min() < 1 or ids.max() > len(labels):
            raise ValueError(
                f"{setid_path}: image ids must lie in [1, {len(labels)}] (the size of imagelabels.mat)"
            )
        rows = [(str(base / "jpg" / f"image_{i:05d}.jpg"), int(labels[i - 1])) for i in ids]
        return _from_one_based(self, split, rows, labels_path)


class StanfordCarsDataModule(ImageClassificationDataModule):
    """Stanford Cars (196 classes; train 8,144 images, test 8,041), torchvision's layout with the devkit.

    Args:
        root: directory holding ``stanford_cars/`` (torchvision's root), or that folder itself.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    layout = (
        "<root>/stanford_cars/devkit/cars_meta.mat          ('class_names')\n"
        "<root>/stanford_cars/devkit/cars_train_annos.mat   ('annotations' struct: fname, class 1..196)\n"
        "<root>/stanford_cars/cars_test_annos_withlabels.mat\n"
        "<root>/stanford_cars/cars_train/00001.jpg ...\n"
        "<root>/stanford_cars/cars_test/00001.jpg ..."
    )

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)

    def read_class_names(self) -> list[str]:
        path = self.require(
            self.find_dir("stanford_cars", "devkit") / "devkit" / "cars_meta.mat", "class names", kind="file"
        )
        return [str(n) for n in _mat_field(_read_mat(path), "class_names", path)]

    def read_samples(self, split: Split) -> list[Sample]:
        base = self.find_dir("stanford_cars", "devkit")
        if split == "train":
            annos, images = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
        else:
            annos, images = base / "cars_test_annos_withlabels.mat", base / "cars_test"
        self.require(annos, "annotations", kind="file")
        self.require(images, "image folder", kind="dir")
        try:
            fields = [
                (str(a["fname"]), a["class"]) for a in _mat_field(_read_mat(annos), "annotations", annos)
            ]
        except (ValueError, IndexError, KeyError) as e:  # a struct without fname / class fields
            raise ValueError(f"{annos}: 'annotations' needs 'fname' and 'class' fields ({e})") from e
        rows = [(str(images / f), _int(c, f"{annos}: annotation of {f}", "class")) for f, c in fields]
        return _from_one_based(self, split, rows, annos)


class FGVCAircraftDataModule(ImageClassificationDataModule):
    """FGVC-Aircraft 2013b (100 variants / 70 families / 30 manufacturers; trainval 6,667, test 3,333).

    Args:
        root: directory holding ``fgvc-aircraft-2013b/`` (torchvision's root), or that folder itself.
        annotation_level: which label hierarchy level to classify.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    layout = (
        "<root>/fgvc-aircraft-2013b/data/images/1025794.jpg ...\n"
        "<root>/fgvc-aircraft-2013b/data/variants.txt   (families.txt, manufacturers.txt: a class a line)\n"
        "<root>/fgvc-aircraft-2013b/data/images_variant_trainval.txt   ('<image id> <class name>' per line)\n"
        "<root>/fgvc-aircraft-2013b/data/images_variant_test.txt"
    )
    _class_files = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
    annotation_level = HParam()

    def __init__(
        self,
        root: str,
        annotation_level: Literal["variant", "family", "manufacturer"] = "variant",
        **kwargs: Any,
    ) -> None:
        if annotation_level not in self._class_files:
            raise ValueError(
                f"annotation_level={annotation_level!r} is invalid: allowed: {', '.join(self._class_files)}"
            )
        super().__init__(root=root, **kwargs)

    def _data_dir(self) -> Path:
        return self.require(self.find_dir("fgvc-aircraft-2013b", "data") / "data", "data folder", kind="dir")

    def read_class_names(self) -> list[str]:
        path = self.require(
            self._data_dir() / self._class_files[self.annotation_level], "class list", kind="file"
        )
        return _read_lines(path)

    def read_samples(self, split: Split) -> list[Sample]:
        data = self._data_dir()
        name = "trainval" if split == "train" else "test"
        path = self.require(data / f"images_{self.annotation_level}_{name}.txt", "split file", kind="file")
        index = {c: i for i, c in enumerate(self.class_names)}
        samples = []
        for lineno, line in enumerate(_read_lines(path), 1):
            image_id, _, label = line.partition(" ")
            if label not in index:
                self.report_bad(
                    split,
                    "line(s) with an unknown class",
                    f"{path}:{lineno}: image {image_id}: class {label!r} is not in "
                    f"{self._class_files[self.annotation_level]}",
                )
                continue
            samples.append((str(data / "images" / f"{image_id}.jpg"), index[label]))
        return samples


class OxfordIIITPetDataModule(ImageClassificationDataModule):
    """Oxford-IIIT Pets (37 breeds; trainval 3,680 images, test 3,669).

    Args:
        root: directory holding ``oxford-iiit-pet/`` (torchvision's root), or that folder itself.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    layout = (
        "<root>/oxford-iiit-pet/images/Abyssinian_100.jpg ...\n"
        "<root>/oxford-iiit-pet/annotations/trainval.txt   ('<image id> <class 1..37> <species> <breed>')\n"
        "<root>/oxford-iiit-pet/annotations/test.txt"
    )

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)

    def _split_path(self, name: str) -> Path:
        base = self.find_dir("oxford-iiit-pet", "annotations")
        return self.require(base / "annotations" / f"{name}.txt", "split file", kind="file")

    def _read_split(self, name: str) -> list[tuple[str, int]]:
        """(image id, class id as written: 1..37) per line."""
        path = self._split_path(name)
        rows = []
        for lineno, line in enumerate(_read_lines(path), 1):
            parts = line.split()
            if len(parts) < 2:
                raise _bad_line(path, lineno, line, "'<image id> <class id> <species> <breed id>'")
            rows.append((parts[0], _int(parts[1], f"{path}:{lineno}", "class id")))
        return rows

    def read_class_names(self) -> list[str]:
        # Breed names come from the image ids ("great_pyrenees_12" -> "Great Pyrenees"), as torchvision does.
        names: dict[int, str] = {}
        for image_id, class_id in self._read_split("trainval") + self._read_split("test"):
            names.setdefault(class_id, " ".join(p.title() for p in image_id.rsplit("_", 1)[0].split("_")))
        return [names.get(k, str(k)) for k in range(1, max(names) + 1)]

    def read_samples(self, split: Split) -> list[Sample]:
        images = self.find_dir("oxford-iiit-pet", "annotations") / "images"
        name = "trainval" if split == "train" else "test"
        rows = [(str(images / f"{image_id}.jpg"), class_id) for image_id, class_id in self._read_split(name)]
        return _from_one_based(self, split, rows, self._split_path(name))


class Food101DataModule(ImageClassificationDataModule):
    """Food-101 (101 classes; train 75,750 images, test 25,250).

    Args:
        root: directory holding ``food-101/`` (torchvision's root), or that folder itself.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    layout = (
        "<root>/food-101/images/<class>/<id>.jpg\n"
        "<root>/food-101/meta/train.json   ({'<class>': ['<class>/<id>', ...], ...})\n"
        "<root>/food-101/meta/test.json"
    )

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)

    def _read_json(self, name: str) -> tuple[dict[str, list[str]], Path]:
        path = self.require(
            self.find_dir("food-101", "meta") / "meta" / f"{name}.json", "split file", kind="file"
        )
        try:
            return json.loads(path.read_text()), path
        except json.JSONDecodeError as e:
            raise ValueError(f"Cannot parse JSON file {path}: {e}") from e

    def read_class_names(self) -> list[str]:
        return sorted(self._read_json("test")[0])  # sorted class names, like torchvision

    def read_samples(self, split: Split) -> list[Sample]:
        meta, path = self._read_json("train" if split == "train" else "test")
        images = self.find_dir("food-101", "meta") / "images"
        index = {c: i for i, c in enumerate(self.class_names)}
        samples = []
        for cls, rel_paths in meta.items():
            if cls not in index:
                self.report_bad(
                    split, "unknown class(es)", f"{path}: class {cls!r} is not among the classes of test.json"
                )
                continue
            samples.extend((str(images.joinpath(*f"{rel}.jpg".split("/"))), index[cls]) for rel in rel_paths)
        return samples


class DTDDataModule(ImageClassificationDataModule):
    """Describable Textures Dataset (47 classes; per partition train+val 3,760 images, test 1,880).

    Args:
        root: torchvision's root (holding ``dtd/dtd/``), or the inner ``dtd`` folder itself.
        partition: which of the 10 official splits to use.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    layout = (
        "<root>/dtd/dtd/images/<class>/<class>_0001.jpg\n"
        "<root>/dtd/dtd/labels/train1.txt, val1.txt, test1.txt   ('<class>/<file>.jpg' per line; 1..10)"
    )

    partition = HParam()

    def __init__(self, root: str, partition: int = 1, **kwargs: Any) -> None:
        check_int("partition", partition, minimum=1, maximum=10)
        super().__init__(root=root, **kwargs)

    def read_class_names(self) -> list[str]:
        return list_class_dirs(
            self.require(self.find_dir("dtd/dtd", "labels") / "images", "images", kind="dir")
        )

    def read_samples(self, split: Split) -> list[Sample]:
        base = self.find_dir("dtd/dtd", "labels")
        index = {c: i for i, c in enumerate(self.class_names)}
        samples = []
        for name in ("train", "val") if split == "train" else ("test",):
            path = self.require(base / "labels" / f"{name}{self.partition}.txt", "split file", kind="file")
            for lineno, line in enumerate(_read_lines(path), 1):
                cls, _, file = line.partition("/")
                if not file:
                    raise _bad_line(path, lineno, line, "'<class folder under images/>/<file>'")
                if cls not in index:
                    self.report_bad(
                        split,
                        "line(s) with an unknown class",
                        f"{path}:{lineno}: class folder {cls!r} is not among the classes under images/",
                    )
                    continue
                samples.append((str(base / "images" / cls / file), index[cls]))
        return samples


class CUB200DataModule(ImageClassificationDataModule):
    """Caltech-UCSD Birds-200-2011 (200 classes; train 5,994 images, test 5,794).

    Args:
        root: directory holding ``CUB_200_2011/``, or that folder itself.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    layout = (
        "<root>/CUB_200_2011/images/001.Black_footed_Albatross/<file>.jpg\n"
        "<root>/CUB_200_2011/images.txt              ('<image id> <path under images/>')\n"
        "<root>/CUB_200_2011/image_class_labels.txt  ('<image id> <class id 1..200>')\n"
        "<root>/CUB_200_2011/train_test_split.txt    ('<image id> <1 = train, 0 = test>')\n"
        "<root>/CUB_200_2011/classes.txt             ('<class id> <class name>')"
    )

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)

    def _path(self, name: str) -> Path:
        return self.require(self.find_dir("CUB_200_2011", "images.txt") / name, "metadata file", kind="file")

    def _rows(self, name: str) -> list[tuple[str, str, str]]:
        """A two-column text file as ``(file:line, first column, second column)`` rows."""
        path = self._path(name)
        rows = []
        for lineno, line in enumerate(_read_lines(path), 1):
            key, _, value = line.partition(" ")
            if not value:
                raise _bad_line(path, lineno, line, "'<id> <value>'")
            rows.append((f"{path}:{lineno}", key, value.strip()))
        return rows

    def _table(self, name: str) -> dict[str, str]:
        """A two-column text file as {first column: second column}."""
        return {key: value for _, key, value in self._rows(name)}

    def read_class_names(self) -> list[str]:
        classes = {_int(key, where, "class id"): value for where, key, value in self._rows("classes.txt")}
        # Class ids are 1..200; label = id - 1. Names keep the "001." prefix of the folder names.
        return [classes.get(k, str(k)) for k in range(1, max(classes) + 1)]

    def read_samples(self, split: Split) -> list[Sample]:
        base = self.find_dir("CUB_200_2011", "images.txt")
        images, is_train = self._table("images.txt"), self._table("train_test_split.txt")
        labels = {
            key: _int(value, where, "class id") for where, key, value in self._rows("image_class_labels.txt")
        }
        want = "1" if split == "train" else "0"
        rows = []
        for image_id, rel in images.items():
            if image_id not in labels or image_id not in is_train:
                raise ValueError(
                    f"{base}: image id {image_id} ({rel}) is missing from image_class_labels.txt or "
                    "train_test_split.txt"
                )
            if is_train[image_id] == want:
                rows.append((str(base / "images" / rel), labels[image_id]))
        return _from_one_based(self, split, rows, self._path("image_class_labels.txt"))


class StanfordDogsDataModule(ImageClassificationDataModule):
    """Stanford Dogs (120 breeds; train 12,000 images, test 8,580), read from its ``*_list.mat`` files.

    Args:
        root: directory holding ``Images/``, ``train_list.mat`` and ``test_list.mat``.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    layout = (
        "<root>/Images/n02085620-Chihuahua/n02085620_10074.jpg ...\n"
        "<root>/train_list.mat   ('file_list': paths under Images/, 'labels': class 1..120)\n"
        "<root>/test_list.mat"
    )

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)

    def _read_list(self, name: str) -> list[tuple[str, int]]:
        path = self.require(
            self.find_dir("stanford_dogs", "train_list.mat") / f"{name}_list.mat", "list", kind="file"
        )
        mat = _read_mat(path)
        files, labels = _mat_field(mat, "file_list", path), _mat_ints(mat, "labels", path)
        if len(files) != len(labels):
            raise ValueError(f"{path}: {len(files)} files but {len(labels)} labels")
        return [(str(f), int(y)) for f, y in zip(files, labels)]  # class ids as written: 1..120

    def read_class_names(self) -> list[str]:
        # Breed folder names ("n02085620-Chihuahua") by class id, from the train list's paths.
        names: dict[int, str] = {}
        for file, class_id in self._read_list("train"):
            names.setdefault(class_id, file.split("/", 1)[0])
        return [names.get(k, str(k)) for k in range(1, max(names) + 1)]

    def read_samples(self, split: Split) -> list[Sample]:
        root = self.find_dir("stanford_dogs", "train_list.mat")
        name = "train" if split == "train" else "test"
        rows = [(str(root / "Images" / f), y) for f, y in self._read_list(name)]
        return _from_one_based(self, split, rows, root / f"{name}_list.mat")
