"""iNaturalist 2018 / 2019 (COCO-style json annotations) and 2021 (torchvision's folder layout)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Literal

from masksub_lightning.data.base import HParam, ImageClassificationDataModule, Split
from masksub_lightning.data.datasets import Sample, list_class_dirs, scan_image_folder

# version -> (train, val) annotation json (2018 / 2019) or image folder (2021) names.
_SPLITS = {
    "2018": ("train2018.json", "val2018.json"),
    "2019": ("train2019.json", "val2019.json"),
    "2021_mini": ("2021_train_mini", "2021_valid"),
    "2021": ("2021_train", "2021_valid"),
}


#: The fields this reader uses in each entry of the COCO-style lists.
_ENTRY_FIELDS = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "category_id"),
    "categories": ("id",),
}


class INaturalistDataModule(ImageClassificationDataModule):
    """iNaturalist species classification: 2018 (8,142 classes), 2019 (1,010) or 2021 (10,000).

    2018 / 2019 read the official json files: ``images`` (id, file_name relative to ``root``), ``annotations``
    (image_id, category_id) and ``categories`` (id, name). Labels are category ids ranked in sorted order
    (contiguous ids 0..C-1 in the official files, so label = category id). Class metadata is read from the
    smaller val json. 2021 reads torchvision's ``INaturalist`` folders (``2021_train_mini`` or ``2021_train``
    for training, ``2021_valid``); the class is the sorted position of the category folder name.
    Validation and test are the official val split (the test labels are not public).

    Args:
        root: directory holding the json files and the image folders they refer to (2018 / 2019), or the
            ``2021_*`` folders (2021).
        version: "2018", "2019", "2021_mini" (the 500k-image mini training set) or "2021" (the full one).
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.
    """

    layout = (
        "2018 / 2019:\n"
        "  <root>/train2018.json, <root>/val2018.json   (train2019.json / val2019.json)\n"
        "      {'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'category_id'}],\n"
        "       'categories': [{'id', 'name'}]}\n"
        "  <root>/train_val2018/Plantae/2491/<file>.jpg  (whatever file_name says, relative to root)\n"
        "2021_mini / 2021:\n"
        "  <root>/2021_train_mini/00000_Animalia_Annelida_Clitellata_..._terrestris/<file>.jpg\n"
        "  <root>/2021_valid/00000_Animalia_.../<file>.jpg"
    )

    version = HParam()

    def __init__(
        self, root: str, version: Literal["2018", "2019", "2021_mini", "2021"] = "2018", **kwargs: Any
    ) -> None:
        version = str(version)  # a YAML `version: 2018` arrives as an int (saved as the string)
        if version not in _SPLITS:
            raise ValueError(f"version={version!r} is invalid: allowed: {', '.join(_SPLITS)}")
        super().__init__(root=root, **kwargs)
        self._category_index: dict[int, int] | None = None

    @property
    def uses_json(self) -> bool:
        return not self.version.startswith("2021")

    def _split_name(self, split: Split) -> str:
        train, val = _SPLITS[self.version]
        return train if split == "train" else val

    def _read_json(self, name: str) -> tuple[dict, Path]:
        path = self.require(self.root_path / name, "annotation file", kind="file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"Cannot parse JSON file {path}: {e}") from e
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{path} has no {key!r} list (COCO-style iNaturalist annotations expected)")
        # A hand-edited or truncated file must not end in a bare KeyError deep in setup: name the entry and field.
        for key, fields in _ENTRY_FIELDS.items():
            for index, entry in enumerate(data[key]):
                missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
                if missing:
                    raise ValueError(
                        f"{path}: {key}[{index}] has no {', '.join(map(repr, missing))} field; each entry of "
                        f"{key!r} needs {', '.join(map(repr, fields))} (COCO-style iNaturalist annotations), "
                        f"got {entry!r:.200}"
                    )
        return data, path

    def read_class_names(self) -> list[str]:
        if not self.uses_json:
            split_dir = self.require(self.root_path / self._split_name("val"), "val folder", kind="dir")
            return list_class_dirs(split_dir)
        data, _ = self._read_json(self._split_name("val"))
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self._category_index = {c["id"]: i for i, c in enumerate(categories)}
        return [str(c.get("name", c["id"])) for c in categories]

    def read_samples(self, split: Split) -> list[Sample]:
        if not self.uses_json:
            split_dir = self.require(self.root_path / self._split_name(split), f"{split} folder", kind="dir")
            return scan_image_folder(
                split_dir,
                self.class_names,
                require_all=split == "train",
                on_empty=partial(self.report_bad, split, "empty class folder(s)"),
            )
        _ = self.class_names  # fills the category index
        assert self._category_index is not None
        data, path = self._read_json(self._split_name(split))
        files = {img["id"]: img["file_name"] for img in data["images"]}
        samples = []
        for ann in data["annotations"]:
            file = files.get(ann["image_id"])
            if file is None:
                raise ValueError(
                    f"{path}: annotation refers to image_id {ann['image_id']}, which is not in 'images'"
                )
            label = self._category_index.get(ann["category_id"])
            if label is None:
                self.report_bad(
                    split,
                    "annotation(s) with an unknown category_id",
                    f"{path}: image {file} has category_id {ann['category_id']}, which is not among "
                    f"the {len(self._category_index)} categories of {self._split_name('val')}",
                )
                continue
            samples.append((str(self.root_path / file), label))
        return samples
