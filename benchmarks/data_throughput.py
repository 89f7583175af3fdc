"""Decoded + augmented images per second of the ImageNet training pipeline, per worker, for every data path.

Writes JPEGs in ImageNet's ImageFolder layout (or reads yours with ``--data-dir``), then times the training
loader of each data path side by side, for the DeiT-III pipeline (simple random crop, 3-Augment, color jitter
0.3, repeated augmentation x3), the RSB pipeline (RandomResizedCrop, RandAugment m7, random interpolation,
repeated augmentation x3) and the MAE fine-tuning pipeline (RandomResizedCrop, RandAugment m9, random erasing
0.25):

    folder   ImageNetDataModule: PIL decode + timm transforms in DataLoader workers
    fast     the same with fast_decode=True (reduced-size JPEG decoding, masksub_lightning.data.decode)
    shards   StreamingDataModule over litdata shards written from the same files (needs litdata)
    dali     DALIDataModule on DALI's CPU operators, one DALI thread per "worker" (needs nvidia-dali)

One warm-up epoch (worker start-up, file cache) is run first; the second epoch is timed. ``--equivalence``
also decodes the same crops with and without fast_decode and reports PSNR / max abs difference.

    python benchmarks/data_throughput.py --num-images 256 --workers 0 --paths folder fast shards dali
    python benchmarks/data_throughput.py --src-size 1000x750 --equivalence
    python benchmarks/data_throughput.py --smoke        # a few seconds, used by the tests
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Recipe settings of the two pipelines (see docs/method.md, "Recipes").
VARIANTS = {
    "deit3-3aug": dict(train_crop="simple", auto_augment="3a", color_jitter=0.3, repeated_aug=3),
    "rsb-randaug": dict(
        train_crop="rrc", auto_augment="rand-m7-mstd0.5-inc1", train_interpolation="random", repeated_aug=3
    ),
    "mae-randaug": dict(
        train_crop="rrc", auto_augment="rand-m9-mstd0.5-inc1", color_jitter=None, reprob=0.25
    ),
}
PATHS = ("folder", "fast", "shards", "dali")
#: Training images/s of one H200 (RESULTS.md section 7): MaskSub ViT-B/16 and ResNet-50 steps.
GPU_RATES = {"ViT-B/16 MaskSub": 2238, "ResNet-50 MaskSub": 2346}


def write_jpegs(
    root: Path, num_images: int, width: int, height: int, num_classes: int = 4, seed: int = 0
) -> None:
    """Photo-like JPEGs (smooth colour fields plus noise, quality 90) in ``root/{train,val}/<class>/``."""
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
            (width, height), Image.BICUBIC
        )
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(
            -20, 21, (height, width, 3), dtype=np.int16
        )
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        for split in ("train", "val") if i < num_classes else ("train",):
            path = root / split / f"n{i % num_classes:08d}" / f"img_{i:06d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, quality=90)


def available(path: str) -> str | None:
    """Why ``path`` cannot run here (a missing optional package), or None."""
    import importlib.util

    needs = {"shards": "litdata", "dali": "nvidia.dali"}.get(path)
    if needs is None:
        return None
    try:
        found = importlib.util.find_spec(needs) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"{needs} is not installed"


def make_datamodule(path: str, root: Path, shards: Path | None, variant: str, workers: int, **kwargs):
    """The DataModule of one data path with a variant's recipe settings."""
    settings = dict(VARIANTS[variant], **kwargs)
    if path in ("folder", "fast"):
        from masksub_lightning.data import ImageNetDataModule

        return ImageNetDataModule(root=str(root), fast_decode=path == "fast", num_workers=workers, **settings)
    if path == "shards":
        from masksub_lightning.data.streaming import StreamingDataModule

        return StreamingDataModule(root=str(shards), num_workers=workers, **settings)
    if path == "dali":
        from masksub_lightning.data.dali import DALIDataModule

        return DALIDataModule(root=str(root), dali_device="cpu", dali_threads=max(workers, 1), **settings)
    raise ValueError(f"unknown path {path!r}; paths: {', '.join(PATHS)}")


def measure(
    root: Path,
    variant: str,
    workers: int,
    img_size: int,
    batch_size: int,
    path: str = "folder",
    shards: Path | None = None,
) -> tuple[float, int]:
    """(images per second, images timed) of one path, pipeline and worker count, over a warm second epoch."""
    import torch

    dm = make_datamodule(
        path,
        root,
        shards,
        variant,
        workers,
        img_size=img_size,
        batch_size=batch_size,
        persistent_workers=True,
        pin_memory=False,
    )
    loader = dm.train_dataloader()
    # Workers run single-threaded torch; do the same in-process, where small multi-threaded tensor ops
    # (to_tensor / normalize) can cost more in thread hand-offs than in work.
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)
    try:
        for _ in loader:  # warm-up epoch: worker start-up, imports, file cache
            pass
        start, count = time.perf_counter(), 0
        for images, _ in loader:  # persistent workers start prefetching here, so the epoch is timed whole
            count += len(images)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
        del loader  # shut the persistent workers down
    return count / elapsed, count


def equivalence(root: Path, variant: str, img_size: int, limit: int = 64) -> dict:
    """The same crops (same seeds) decoded fully and with fast_decode: PSNR and max abs difference in 0..255.

    Compares the geometric stage only (the crop and its resize, as uint8 images): the colour ops after it
    (posterize, solarize, equalize) turn a one-level difference into a large one, which says nothing about
    the decode.
    """
    from masksub_lightning.data.datasets import seeded_rng
    from masksub_lightning.data.decode import fast_decode_pipeline

    dm = make_datamodule("folder", root, None, variant, 0, img_size=img_size)
    draft = fast_decode_pipeline(dm.build_transform(train=True)).transforms[0]
    files = [path for path, _ in dm.read_samples("train")][:limit]
    psnrs, max_abs = [], 0
    for i, path in enumerate(files):
        with seeded_rng(i), Image.open(path) as img:
            a = np.asarray(draft.op(img.convert("RGB")), dtype=np.int16)
        with seeded_rng(i), Image.open(path) as img:
            b = np.asarray(draft(img), dtype=np.int16)
        mse = float(((a - b) ** 2).mean())
        psnrs.append(float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse))
        max_abs = max(max_abs, int(np.abs(a - b).max()))
    finite = [p for p in psnrs if p != float("inf")]
    return dict(
        variant=variant,
        images=len(psnrs),
        identical=len(psnrs) - len(finite),
        psnr_median=float(np.median(finite)) if finite else float("inf"),
        psnr_min=min(finite) if finite else float("inf"),
        max_abs=max_abs,
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-images", type=int, default=512, help="JPEGs to generate (default 512)")
    parser.add_argument("--src-size", default="500x375", help="generated JPEG size WxH (ImageNet's typical)")
    parser.add_argument("--img-size", type=int, default=224, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="worker counts to time")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    parser.add_argument(
        "--paths", nargs="+", default=None, choices=PATHS, help="data paths to time (default: all installed)"
    )
    parser.add_argument(
        "--data-dir", help="existing ImageFolder root (train/<class>/) instead of generated JPEGs"
    )
    parser.add_argument(
        "--equivalence", action="store_true", help="also compare fast_decode crops with full decoding"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run (a few seconds) to check it works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_images, args.src_size, args.img_size, args.batch_size, args.workers = (
            48,
            "160x120",
            64,
            8,
            [0],
        )
        args.variants = args.variants or ["deit3-3aug", "rsb-randaug"]
        args.paths = args.paths or ["folder"]
    variants = args.variants or list(VARIANTS)
    paths = args.paths or list(PATHS)
    skipped = {p: available(p) for p in paths if available(p)}
    paths = [p for p in paths if p not in skipped]

    equivalent = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_dir:
            root = Path(args.data_dir)
        else:
            root = Path(tmp) / "folder"
            width, height = (int(v) for v in args.src_size.lower().split("x"))
            write_jpegs(root, args.num_images, width, height)
        shards = None
        if "shards" in paths:
            from masksub_lightning.data import ImageNetDataModule
            from masksub_lightning.data.streaming import optimize_shards

            shards = Path(tmp) / "shards"
            optimize_shards(ImageNetDataModule(root=str(root)), str(shards), splits=["train"], num_workers=2)
        rows = []
        for variant in variants:
            for path in paths:
                for workers in args.workers:
                    rate, count = measure(
                        root, variant, workers, args.img_size, args.batch_size, path=path, shards=shards
                    )
                    rows.append(
                        dict(
                            variant=variant,
                            path=path,
                            workers=workers,
                            images=count,
                            rate=rate,
                            per_worker=rate / max(workers, 1),
                        )
                    )
        if args.equivalence:
            equivalent = [equivalence(root, v, args.img_size) for v in variants]

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"ImageNet training pipeline: {args.num_images} JPEGs of {args.src_size} -> {args.img_size}px, "
        f"batch {args.batch_size}, {cpus} CPUs"
    )
    gpu_cols = "".join(f"{name:>20}" for name in GPU_RATES)
    print(f"{'variant':<13}{'path':>8}{'workers':>8}{'images':>8}{'img/s':>9}{'img/s/worker':>14}{gpu_cols}")
    for r in rows:
        need = "".join(f"{math.ceil(rate / r['per_worker']):>20}" for rate in GPU_RATES.values())
        print(
            f"{r['variant']:<13}{r['path']:>8}{r['workers']:>8}{r['images']:>8}{r['rate']:>9.1f}"
            f"{r['per_worker']:>14.1f}{need}"
        )
    print(
        "(workers=0 decodes in the main process and counts as one worker; for dali a worker is a DALI CPU thread;"
    )
    print(" the last columns: workers of this kind one H200 needs to keep up with that training step)")
    for path, why in skipped.items():
        print(f"skipped path {path}: {why}")
    for e in equivalent:
        print(
            f"fast_decode vs full decode, {e['variant']} crop + resize: {e['images']} crops, {e['identical']} "
            "bit-identical "
            f"(decoded at full size), the others: PSNR median {e['psnr_median']:.1f} dB, min {e['psnr_min']:.1f} dB, "
            f"max |diff| {e['max_abs']:.0f}/255"
        )
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    main()
