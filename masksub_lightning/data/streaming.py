"""Training from litdata shards, on local disk or behind a URL (``s3://``, ``gs://``, ``azure://``, ...).

Write the shards once from any of this package's image datasets (the encoded image bytes are copied, not
re-encoded; in-memory datasets such as CIFAR are stored as PNG)::

    masksub data optimize --dataset imagenet --root data/imagenet --out s3://bucket/imagenet-shards
    masksub data optimize --dataset imagefolder --root my_data --out shards/my_data --splits train val test

then train with ``--data.class_path masksub_lightning.data.streaming.StreamingDataModule``
``--data.init_args.root <out>``
and the usual transform / Mixup / repeated-augmentation arguments. Layout of ``<out>``::

    <out>/meta/    one litdata item: JSON {format, version, dataset, class_names, splits: {split: count}}
    <out>/train/   litdata chunks of {"image": encoded bytes, "label": int, "index": int, "name": source file}
    <out>/val/     (and any other split written), items in the source dataset's order

The shards are read by position (litdata's random access), so :class:`StreamingDataModule` is the base
DataModule with another dataset underneath: the same sampler (seeded order, repeated augmentation, DDP and
multi-node sharding by global rank), the same per-sample augmentation seeds, the same loader state for an exact
mid-epoch resume, and therefore the same batches as the folder version of the data. Remote chunks are downloaded
into ``cache_dir`` on first use; give it room for the whole split (``max_cache_size``), or a shuffled epoch
fetches chunks again as they are evicted.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from masksub_lightning.data.base import HParam, ImageClassificationDataModule, Split, check_optional_str
from masksub_lightning.data.datasets import (
    ArrayImageDataset,
    BadImageError,
    ImageListDataset,
    ImageTooSmallError,
    ImageTransformError,
    decoding,
    to_rgb,
)
from masksub_lightning.data.decode import fast_decode_pipeline

#: Written into ``<out>/meta``; a reader refuses shards of another format or version.
SHARD_FORMAT = "masksub-lightning image shards"
SHARD_VERSION = 1

#: ``masksub data optimize --dataset`` names (a full class path works too).
DATASETS = {
    "imagenet": "ImageNetDataModule",
    "imagefolder": "ImageFolderDataModule",
    "cifar10": "CIFAR10DataModule",
    "cifar100": "CIFAR100DataModule",
    "flowers102": "Flowers102DataModule",
    "food101": "Food101DataModule",
    "dtd": "DTDDataModule",
    "pets": "OxfordIIITPetDataModule",
    "cars": "StanfordCarsDataModule",
    "aircraft": "FGVCAircraftDataModule",
    "cub200": "CUB200DataModule",
    "dogs": "StanfordDogsDataModule",
    "inaturalist": "INaturalistDataModule",
}

INSTALL_HINT = "pip install 'masksub-lightning[streaming]' (or pip install litdata)"


def require_litdata() -> Any:
    """The ``litdata`` module, or an ImportError saying how to install it."""
    try:
        import litdata
    except ImportError:
        litdata = None
    if litdata is None:  # raised outside the except block: the CLI reports this line, not a chained one
        raise ImportError(f"Streaming shards need litdata, which is not installed: {INSTALL_HINT}")
    return litdata


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a directory or a URL."""
    return "/".join([str(root).rstrip("/"), *parts])


# ------------------------------------------------------------------------------------------------- writing


def _shard_item(entry: tuple[int, str, int, Any]) -> dict[str, Any]:
    """One litdata item from ``(index, name, label, path or encoded bytes)`` (runs in litdata's workers)."""
    index, name, label, source = entry
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        with open(source, "rb") as f:
            data = f.read()
    return {"image": data, "label": int(label), "index": int(index), "name": name}


def _meta_item(text: str) -> dict[str, str]:
    return {"meta": text}


def _entries(datamodule: ImageClassificationDataModule, split: Split) -> list[tuple[int, str, int, Any]]:
    source = datamodule.build_dataset(split, None)
    if isinstance(source, ImageListDataset):
        root = str(datamodule.root or "")
        return [
            (i, os.path.relpath(path, root) if root else str(path), label, str(path))
            for i, (path, label) in enumerate(source.samples)
        ]
    if isinstance(source, ArrayImageDataset):
        entries = []
        for i in range(len(source)):
            img, label = source[i]
            buf = io.BytesIO()
            img.save(buf, format="PNG")  # lossless: the shards serve exactly the in-memory pixels
            entries.append((i, f"{split}[{i}]", label, buf.getvalue()))
        return entries
    raise ValueError(
        f"{type(datamodule).__name__} serves {type(source).__name__} items (preprocessed tensors), not images; "
        "shards hold encoded images, so this dataset cannot be written as shards"
    )


def optimize_shards(
    datamodule: ImageClassificationDataModule,
    out: str,
    splits: Sequence[str] = ("train", "val"),
    num_workers: int | None = None,
    chunk_bytes: str = "64MB",
) -> dict[str, Any]:
    """Write ``datamodule``'s splits as litdata shards under ``out`` (a directory or a URL); returns the metadata.

    Args:
        datamodule: any image DataModule of this package (its ``bad_samples`` policy applies to the metadata:
            empty class folders and out-of-range labels are errors or left out).
        out: output directory or URL; ``out/<split>/`` and ``out/meta/`` are overwritten.
        splits: the splits to write ("train", "val", "test").
        num_workers: litdata writer processes (default: up to 8, one per CPU).
        chunk_bytes: target chunk size (litdata's ``chunk_bytes``).

    Raises:
        ImportError: litdata is not installed.
        ValueError: an unknown split, or a dataset that does not serve images.
    """
    litdata = require_litdata()
    for split in splits:
        if split not in ("train", "val", "test"):
            raise ValueError(f"splits={list(splits)!r} is invalid: each must be one of train, val, test")
    workers = num_workers or min(8, os.cpu_count() or 1)
    # litdata sets the global start method (spawn by default, which re-imports torch in every writer): fork
    # where there is one, and put the previous method back afterwards so later DataLoaders are unaffected.
    previous = multiprocessing.get_start_method(allow_none=True)
    start = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    try:
        meta = _optimize(litdata, datamodule, out, splits, workers, chunk_bytes, start)
    finally:
        multiprocessing.set_start_method(previous, force=True)
    return meta


def _optimize(
    litdata: Any,
    datamodule: ImageClassificationDataModule,
    out: str,
    splits: Sequence[str],
    workers: int,
    chunk_bytes: str,
    start_method: str | None,
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for split in splits:
        entries = _entries(datamodule, split)  # type: ignore[arg-type]
        if not entries:
            raise ValueError(
                f"{type(datamodule).__name__} {split} split has no images under {datamodule.root}"
            )
        litdata.optimize(
            fn=_shard_item,
            inputs=entries,
            output_dir=join(out, split),
            chunk_bytes=chunk_bytes,
            num_workers=min(workers, len(entries)),
            reorder_files=False,
            keep_data_ordered=True,  # item i of the shards is sample i of the dataset
            mode="overwrite",
            start_method=start_method,
            verbose=False,
        )
        counts[split] = len(entries)
    meta = {
        "format": SHARD_FORMAT,
        "version": SHARD_VERSION,
        "dataset": type(datamodule).__name__,
        "source": str(datamodule.root),
        "class_names": list(datamodule.class_names),
        "splits": counts,
    }
    litdata.optimize(
        fn=_meta_item,
        inputs=[json.dumps(meta)],
        output_dir=join(out, "meta"),
        chunk_bytes="1MB",
        num_workers=1,
        mode="overwrite",
        start_method=start_method,
        verbose=False,
    )
    return meta


# ------------------------------------------------------------------------------------------------- reading


def _open_streaming(url: str, cache_dir: str | None, max_cache_size: str) -> Any:
    """A litdata reader over all of ``url``'s items, whatever the process's rank.

    litdata shards a StreamingDataset by rank when ``torch.distributed`` is initialised (``len()`` and the
    iteration then cover this rank's chunks). Here the sampler does the sharding and reads by global position, so
    the reader is told it is alone.
    """
    litdata = require_litdata()
    reader = litdata.StreamingDataset(url, cache_dir=cache_dir, max_cache_size=max_cache_size)
    from litdata.utilities.env import _DistributedEnv

    reader.distributed_env = _DistributedEnv(world_size=1, global_rank=0, num_nodes=1)
    return reader


def read_meta(root: str, cache_dir: str | None = None, max_cache_size: str = "100GB") -> dict[str, Any]:
    """The metadata of the shards under ``root``.

    Raises:
        ValueError: ``root`` cannot be read, holds no masksub shards, or shards of another format version.
    """
    url = join(root, "meta")
    reason = ""
    try:
        meta = json.loads(_open_streaming(url, cache_dir, max_cache_size)[0]["meta"])
    except ImportError:
        raise
    except Exception as e:  # litdata / botocore / obstore raise many kinds: say which root, and why
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if reason:  # raised outside the except block: no chained context for the CLI to report instead
        raise ValueError(
            f"StreamingDataModule root={root!r}: cannot read the shard metadata at {url} ({reason}); expected "
            "the output of `masksub data optimize --out <root>`"
        )
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise ValueError(f"StreamingDataModule root={root!r} does not hold masksub-lightning shards ({url})")
    if meta.get("version") != SHARD_VERSION:
        raise ValueError(
            f"StreamingDataModule root={root!r}: shards of format version {meta.get('version')!r}, this package "
            f"reads version {SHARD_VERSION}; re-run `masksub data optimize`"
        )
    return meta


class ShardImageDataset(Dataset):
    """Map-style view of one split's shards: item ``i`` is sample ``i`` of the source dataset.

    Decoding and errors follow :class:`~masksub_lightning.data.datasets.ImageListDataset` (a bad item raises a
    :class:`~masksub_lightning.data.datasets.BadImageError` naming the shard URL, position and source file).
    The litdata reader is opened lazily in each process (DataLoader workers open their own).

    Args:
        url: the split's shard directory or URL.
        length: number of items (from the metadata; checked against the shards when first opened).
        num_classes: labels must lie in ``[0, num_classes)``.
        transform: applied to the RGB PIL image (or to the undecoded one, with ``takes_unloaded_image``).
        cache_dir: litdata download cache for remote shards.
        max_cache_size: litdata cache limit.
        min_size: images whose shorter side is below this many pixels are bad.
    """

    #: Can hand over undecoded bytes (``decode="gpu"``: a transform with ``takes_encoded_bytes``).
    serves_encoded_bytes = True

    def __init__(
        self,
        url: str,
        length: int,
        num_classes: int,
        transform: Callable | None = None,
        cache_dir: str | None = None,
        max_cache_size: str = "100GB",
        min_size: int = 1,
    ) -> None:
        self.url = url
        self.length = length
        self.num_classes = num_classes
        self.transform = transform
        self.cache_dir = cache_dir
        self.max_cache_size = max_cache_size
        self.min_size = min_size
        self._reader: Any = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None, "_pid": None}

    def reader(self) -> Any:
        """This process's litdata reader (reopened after a fork)."""
        if self._reader is None or self._pid != os.getpid():
            reader = _open_streaming(self.url, self.cache_dir, self.max_cache_size)
            if len(reader) != self.length:
                raise ValueError(
                    f"Shards at {self.url} hold {len(reader)} items but their metadata says {self.length}: "
                    "they were overwritten by another dataset or run; re-run `masksub data optimize`"
                )
            self._reader, self._pid = reader, os.getpid()
        return self._reader

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} is out of range for {self.length} items of {self.url}")
        item = self.reader()[index % self.length]
        name = f"{self.url} item {index} ({item.get('name', '?')})"
        label = int(item["label"])
        if not 0 <= label < self.num_classes:
            raise BadImageError(f"{name}: label {label} is outside [0, {self.num_classes})")
        if getattr(self.transform, "takes_encoded_bytes", False):  # decode="gpu": the item's bytes, undecoded
            return self.transform(bytes(item["image"]), name), label
        with decoding(name):
            img = Image.open(io.BytesIO(bytes(item["image"])))
        img.filename = name  # named in decode errors  # type: ignore[attr-defined]
        with img:
            if min(img.size) < self.min_size:
                raise ImageTooSmallError(
                    f"Image {name} is {img.width}x{img.height} px, smaller than min_image_size={self.min_size}"
                )
            if not getattr(self.transform, "takes_unloaded_image", False):
                with decoding(name):
                    img.load()
                img = to_rgb(img)
            if self.transform is None:
                return img, label
            try:
                return self.transform(img), label
            except BadImageError:
                raise
            except Exception as e:
                raise ImageTransformError(
                    f"The transform failed on image {name} ({img.width}x{img.height} px): {e!r}"
                ) from e


class StreamingDataModule(ImageClassificationDataModule):
    """Train from the shards ``masksub data optimize`` wrote, locally or from a URL.

    Every transform, Mixup / CutMix, repeated-augmentation, loader and resume argument of
    :class:`~masksub_lightning.data.base.ImageClassificationDataModule` applies unchanged; with the same
    arguments and seed the batches equal those of the DataModule the shards were written from.

    Args:
        root: the ``--out`` of ``masksub data optimize``: a directory or a URL (``s3://...``, ``gs://...``).
        dataset: optional guard: the DataModule class (or ``--dataset`` name) the shards must come from; shards
            of another dataset are then refused at construction.
        cache_dir: where remote chunks are downloaded (litdata's default cache when None).
        max_cache_size: litdata cache limit, e.g. "200GB"; at least the split's size avoids re-downloads.
        **kwargs: transform / loader / mixup options of :class:`ImageClassificationDataModule`.

    Raises:
        ImportError: litdata is not installed.
        ValueError: ``root`` cannot be read, holds no masksub shards, shards of another format version, or of
            another dataset than ``dataset``.
    """

    layout = (
        "<root>/meta/    (written by `masksub data optimize`)\n"
        "<root>/train/   index.json + chunk-*.bin\n"
        "<root>/val/     index.json + chunk-*.bin"
    )

    dataset = HParam()
    cache_dir = HParam()
    max_cache_size = HParam()

    def __init__(
        self,
        root: str,
        dataset: str | None = None,
        cache_dir: str | None = None,
        max_cache_size: str = "100GB",
        **kwargs: Any,
    ) -> None:
        check_optional_str("dataset", dataset)
        check_optional_str("cache_dir", cache_dir, path=True)
        check_optional_str("max_cache_size", max_cache_size)
        if root is None:
            raise ValueError(
                f"StreamingDataModule needs root=<shard directory or URL>. Expected layout:\n{self.layout}"
            )
        require_litdata()
        super().__init__(root=str(root), **kwargs)
        self._meta: dict[str, Any] | None = None
        meta = self.meta  # read now: a bad root or foreign shards fail at construction, before training
        if (
            dataset is not None
            and DATASETS.get(dataset.lower(), dataset).rsplit(".", 1)[-1] != meta["dataset"]
        ):
            raise ValueError(
                f"StreamingDataModule dataset={dataset!r}, but the shards at {root} were written from "
                f"{meta['dataset']} (masksub data optimize --dataset ...)"
            )

    @property
    def meta(self) -> dict[str, Any]:
        """The shards' metadata (read once)."""
        if self._meta is None:
            self._meta = read_meta(self.root, self.cache_dir, self.max_cache_size)
        return self._meta

    def read_class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def shard_split(self, split: Split) -> str:
        """The written split serving ``split``: "test" falls back to "val" when no test shards were written."""
        splits = self.meta["splits"]
        if split in splits:
            return split
        if split == "test" and "val" in splits:
            return "val"
        raise ValueError(
            f"StreamingDataModule: no {split!r} shards under {self.root} (written: {', '.join(splits)}); "
            f"re-run masksub data optimize with --splits ... {split}"
        )

    def build_dataset(self, split: Split, transform: Callable | None) -> Dataset:
        name = self.shard_split(split)
        if self.fast_decode and transform is not None:
            transform = fast_decode_pipeline(transform)
        dataset = ShardImageDataset(
            join(self.root, name),
            int(self.meta["splits"][name]),
            self.num_classes,
            transform,
            self.cache_dir,
            self.max_cache_size,
            self.min_image_size,
        )
        dataset.reader()  # fail now (unreadable split, shards overwritten) rather than in a worker
        return dataset


# --------------------------------------------------------------------------------------------- command line


def _datamodule_class(name: str) -> type:
    import importlib

    import masksub_lightning.data as data

    if name.lower() in DATASETS:
        return getattr(data, DATASETS[name.lower()])
    if "." in name:
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    if hasattr(data, name):
        return getattr(data, name)
    raise ValueError(
        f"--dataset {name!r} is unknown; names: {', '.join(DATASETS)} (or a DataModule class path)"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``masksub data`` (``masksub_lightning.commands.cli`` routes the sub-command here)."""
    parser = argparse.ArgumentParser(prog="masksub data", description="Prepare datasets for training.")
    sub = parser.add_subparsers(dest="command", required=True)
    opt = sub.add_parser(
        "optimize",
        help="write a dataset as litdata shards (for StreamingDataModule)",
        description="Write a dataset's splits as litdata shards (encoded image bytes + label) to a directory "
        "or URL; train from them with masksub_lightning.data.streaming.StreamingDataModule.",
    )
    opt.add_argument(
        "--dataset", required=True, help=f"one of {', '.join(DATASETS)}, or a DataModule class path"
    )
    opt.add_argument("--root", required=True, help="the dataset's root directory (as for its DataModule)")
    opt.add_argument("--out", required=True, help="output directory or URL (s3://..., gs://...)")
    opt.add_argument(
        "--splits", nargs="+", default=["train", "val"], help="splits to write (default: train val)"
    )
    opt.add_argument(
        "--num-workers", type=int, default=None, help="writer processes (default: CPUs, at most 8)"
    )
    opt.add_argument("--chunk-bytes", default="64MB", help="target chunk size (default 64MB)")
    opt.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another argument of the DataModule, e.g. --set class_list=in100.txt (YAML values)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import yaml

        kwargs: dict[str, Any] = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set {item!r} is invalid: expected KEY=VALUE")
            kwargs[key] = yaml.safe_load(value)
        datamodule = _datamodule_class(args.dataset)(root=args.root, **kwargs)
        meta = optimize_shards(datamodule, args.out, args.splits, args.num_workers, args.chunk_bytes)
    except (ValueError, FileNotFoundError, ImportError, TypeError) as err:
        parser.error(str(err))
    counts = ", ".join(f"{k}: {v}" for k, v in meta["splits"].items())
    print(f"wrote {meta['dataset']} shards ({len(meta['class_names'])} classes; {counts}) to {args.out}")
