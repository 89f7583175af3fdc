"""CPU cores per GPU for the DeiT-III training pipeline: decode on the CPU (before) vs decode="gpu" (after).

A MaskSub ViT-B/16 step on one H200 consumes about 2,200 images/s (RESULTS.md, section 7). The loader workers
must produce that many. This script times, on one core (the main process, one torch thread), what one worker
does per image, collation included:

    before   decode="cpu": read the file, PIL decode, timm's DeiT-III transforms (simple crop, 3-Augment, colour
             jitter 0.3), default collation of float tensors
    after    decode="gpu": read the file, parse the JPEG header, draw the same random parameters, collate the
             bytes (masksub_lightning.data.gpu_decode); no decoding

and prints img/s per core and the cores per GPU each needs for ``--target-rate``. Both run side by side, in
alternating rounds, on the same JPEGs (photo-like, ImageNet's typical 500x375, quality 90; or ``--data-dir``).
``--device cpu|cuda`` also times the main process's part of decode="gpu" (batched decode + augmentation of the
collated batches): on cuda that is nvJPEG plus the GPU ops, the figure the GPU must sustain next to its step.

    python benchmarks/gpu_decode.py                           # before / after on this CPU
    python benchmarks/gpu_decode.py --device cuda             # + the GPU's decode + augment throughput
    python benchmarks/gpu_decode.py --smoke                   # a few seconds, used by the tests
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (the tests)

from _common import emit_json, environment, print_table
from data_throughput import write_jpegs

from masksub_lightning.data import ImageFolderDataModule
from masksub_lightning.data.datasets import seeded_rng
from masksub_lightning.data.gpu_decode import DeviceAugment, collate_encoded
from masksub_lightning.data.samplers import RepeatedAugSampler

DEIT3 = dict(train_crop="simple", auto_augment="3a", color_jitter=0.3)
RRC = dict(train_crop="rrc", auto_augment="3a", color_jitter=0.3)


def worker_pass(dataset, keys, batch_size: int, collate) -> tuple[float, list]:
    """Seconds to load and collate ``keys`` as one DataLoader worker does (per-sample seeds, no RNG restore)."""
    batches, items = [], []
    start = time.perf_counter()
    for index, seed in keys:
        with seeded_rng(seed, restore=False):
            items.append(dataset[index])
        if len(items) == batch_size:
            batches.append(collate(items))
            items = []
    if items:
        batches.append(collate(items))
    return time.perf_counter() - start, batches


def device_pass(dm: ImageFolderDataModule, batches: list, device: torch.device) -> float:
    """Seconds for the main process to decode and augment ``batches`` on ``device`` (decode="gpu")."""
    augment = DeviceAugment(dm.img_size, dm.mean, dm.std, dm.remode)
    augment(batches[0], device)  # warm-up: nvJPEG handles, kernels
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        augment(batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def build(root: Path, settings: dict, decode: str, img_size: int) -> ImageFolderDataModule:
    extra = dict(decode="gpu", decode_device="cpu") if decode == "gpu" else {}
    dm = ImageFolderDataModule(root=str(root), img_size=img_size, num_workers=0, **settings, **extra)
    dm.setup("fit")
    return dm


def measure(args, root: Path) -> dict:
    settings = DEIT3 if args.recipe == "deit3" else RRC
    paths = {name: build(root, settings, name, args.img_size) for name in ("cpu", "gpu")}
    datasets = {name: dm.get_dataset("train") for name, dm in paths.items()}
    collates = {"cpu": default_collate, "gpu": collate_encoded}
    keys = list(RepeatedAugSampler(datasets["cpu"], 1, num_replicas=1, rank=0, seed=0, with_seeds=True))
    times: dict[str, list[float]] = {"cpu": [], "gpu": []}
    encoded: list = []
    for r in range(args.rounds):
        for name in ("cpu", "gpu") if r % 2 == 0 else ("gpu", "cpu"):
            seconds, batches = worker_pass(datasets[name], keys, args.batch_size, collates[name])
            times[name].append(seconds)
            encoded = batches if name == "gpu" else encoded
            print(f"  round {r + 1}/{args.rounds} {name}: {len(keys) / seconds:.1f} img/s", flush=True)
    result: dict = {}
    for label, name in (("before", "cpu"), ("after", "gpu")):
        rate = len(keys) / statistics.median(times[name])
        result[label] = dict(
            images=len(keys), per_core=rate, cores_per_gpu=args.target_rate / rate, rounds=times[name]
        )
    result["speedup"] = result["after"]["per_core"] / result["before"]["per_core"]
    if args.device != "none":
        device = torch.device(args.device)
        seconds = device_pass(paths["gpu"], encoded, device)
        result["device"] = dict(device=args.device, images=len(keys), rate=len(keys) / seconds)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-images", type=int, default=256, help="JPEGs to generate (default 256)")
    parser.add_argument("--src-size", default="500x375", help="generated JPEG size WxH (ImageNet's typical)")
    parser.add_argument("--data-dir", default=None, help="an ImageFolder root to read instead (train/)")
    parser.add_argument("--img-size", type=int, default=224, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--recipe", default="deit3", choices=["deit3", "rrc"], help="simple crop or RRC")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both paths")
    parser.add_argument("--target-rate", type=float, default=2200.0, help="images/s one GPU consumes")
    parser.add_argument(
        "--device", default="none", choices=["none", "cpu", "cuda"], help="also time the main-process part"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run (a few seconds) to check it works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_images, args.rounds, args.batch_size, args.img_size = 16, 1, 8, 64
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    torch.set_num_threads(1)  # one worker = one core
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir) if args.data_dir else Path(tmp)
        if not args.data_dir:
            width, height = (int(v) for v in args.src_size.split("x"))
            write_jpegs(root, args.num_images, width, height)
        result = measure(args, root)
    rows = [
        dict(path=f"{label} (decode={name})", **result[label])
        for label, name in (("before", "cpu"), ("after", "gpu"))
    ]
    print_table(
        f"Loader worker cost, {args.recipe} pipeline, {args.src_size} JPEGs, {args.img_size} px, one core",
        rows,
        [
            ("path", "path", "s"),
            ("per_core", "img/s per core", ".1f"),
            ("cores_per_gpu", "cores per GPU", ".2f"),
        ],
    )
    print(
        f"worker speed-up (after / before): {result['speedup']:.2f}x; target {args.target_rate:.0f} img/s per GPU"
    )
    if "device" in result:
        print(f"main process, decode + augment on {args.device}: {result['device']['rate']:.1f} img/s")
    payload = dict(
        result, environment=environment(torch.device(args.device.replace("none", "cpu"))), args=vars(args)
    )
    emit_json(payload)
    return payload


if __name__ == "__main__":
    main()
