"""Decoded + augmented images per second of the ImageNet training pipeline, per DataLoader worker.

Writes JPEGs in ImageNet's ImageFolder layout (or reads yours with ``--data-dir``), then times
``ImageNetDataModule.train_dataloader()`` with the DeiT-III pipeline (simple random crop, 3-Augment, color
jitter 0.3) and the RSB pipeline (RandomResizedCrop, RandAugment m7), both with repeated augmentation x3.
One warm-up epoch (worker start-up, file cache) is run first; the second epoch is timed.

    python benchmarks/data_throughput.py --num-images 512 --workers 0 2 4 8
    python benchmarks/data_throughput.py --smoke        # a few seconds, used by the tests
"""

from __future__ import annotations

import argparse
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
    "rsb-randaug": dict(train_crop="rrc", auto_augment="rand-m7-mstd0.5-inc1", repeated_aug=3),
}


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


def measure(root: Path, variant: str, workers: int, img_size: int, batch_size: int) -> tuple[float, int]:
    """(images per second, images timed) of one pipeline and worker count, timed over a warm second epoch."""
    import torch

    from masksub_lightning.data import ImageNetDataModule

    dm = ImageNetDataModule(
        root=str(root),
        img_size=img_size,
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=True,
        pin_memory=False,
        **VARIANTS[variant],
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


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-images", type=int, default=512, help="JPEGs to generate (default 512)")
    parser.add_argument("--src-size", default="500x375", help="generated JPEG size WxH (ImageNet's typical)")
    parser.add_argument("--img-size", type=int, default=224, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="worker counts to time")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--data-dir", help="existing ImageFolder root (train/<class>/) instead of generated JPEGs"
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

    with tempfile.TemporaryDirectory() as tmp:
        if args.data_dir:
            root = Path(args.data_dir)
        else:
            root = Path(tmp)
            width, height = (int(v) for v in args.src_size.lower().split("x"))
            write_jpegs(root, args.num_images, width, height)
        rows = []
        for variant in args.variants:
            for workers in args.workers:
                rate, count = measure(root, variant, workers, args.img_size, args.batch_size)
                rows.append(
                    dict(
                        variant=variant,
                        workers=workers,
                        images=count,
                        rate=rate,
                        per_worker=rate / max(workers, 1),
                    )
                )

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"ImageNet training pipeline: {args.num_images} JPEGs of {args.src_size} -> {args.img_size}px, "
        f"batch {args.batch_size}, {cpus} CPUs"
    )
    print(f"{'variant':<14}{'workers':>8}{'images':>8}{'img/s':>10}{'img/s/worker':>14}")
    for r in rows:
        print(
            f"{r['variant']:<14}{r['workers']:>8}{r['images']:>8}{r['rate']:>10.1f}{r['per_worker']:>14.1f}"
        )
    print("(workers=0 decodes in the main process and counts as one worker)")
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    main()
