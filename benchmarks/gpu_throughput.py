"""GPU training throughput and model-FLOPs utilisation (MFU) of MaskSub vs the baseline and a plain PyTorch loop.

Per model (default ViT-B/16 and ResNet-50 at 224): bf16-mixed, channels-last for CNNs, fused AdamW,
``torch.compile``. Three variants on one pre-built batch, alternating for ``--rounds`` rounds:

* ``lightning masksub``: ``MaskSubModule(sub_branch="mask")`` in a Trainer;
* ``lightning baseline``: the same class with ``sub_branch="none"``;
* ``plain baseline``: the baseline step as a hand-written PyTorch loop (``overhead.plain_step_time``).

images/s counts input images (a MaskSub step sees each image twice but counts it once). MFU = model FLOPs per
step (``FlopCounterMode``: forward + backward of every branch the variant runs) / step time / the card's peak dense
bf16 FLOP/s (table below, or ``--peak-flops``). Timing windows are synchronized only at their ends, so the CPU runs
ahead of the GPU as in real training. ``--sync-debug`` also counts host-device synchronisations inside
``training_step`` (``torch.cuda.set_sync_debug_mode``), which would stall that overlap.

    python benchmarks/gpu_throughput.py                                  # on a CUDA machine
    python benchmarks/gpu_throughput.py --model vit_base_patch16_224 --batch-size 256 --sync-debug
    python benchmarks/gpu_throughput.py --smoke --peak-flops 1e12        # CPU, tiny models, no compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import _common as C
import torch
from lightning.pytorch.callbacks import Callback
from overhead import plain_step_time

# Dense bf16 tensor-core peak per GPU, FLOP/s (vendor data sheets). First matching substring wins.
PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
]
DEFAULT_MODELS = ["vit_base_patch16_224", "resnet50"]
DEFAULT_BATCH = 256  # per GPU, DeiT-III / RSB-like


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


class SyncCounter(Callback):
    """Counts synchronizing CUDA calls inside ``training_step`` (between batch start and end) after warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.index, self.syncs, self.steps = warmup, 0, 0, 0
        self._caught = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.index >= self.warmup:
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.index += 1
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self.syncs += sum("synchroniz" in str(w.message) for w in self._records)
            self.steps += 1
            self._caught = None


def host_syncs_per_step(module, batch, device, precision: str, warmup: int, steps: int = 3) -> float:
    counter = SyncCounter(warmup)
    trainer = C.make_trainer(device, precision, warmup + steps, [counter])
    trainer.fit(module, train_dataloaders=C.fixed_loader(batch, warmup + steps))
    return counter.syncs / max(1, counter.steps)


def measure(name: str, args, device) -> tuple[list[dict], dict]:
    spec = C.resolve_spec(name, args.img_size, args.batch_size or (None if args.smoke else DEFAULT_BATCH))
    channels_last = C.channels_last_for(spec, args.channels_last)
    opts = dict(compile=args.compile, channels_last=channels_last, fused_adamw=True)
    modules = {
        "masksub": C.build_module(spec, "mask", **opts),
        "baseline": C.build_module(spec, "none", **opts),
    }
    batch = C.make_batch(spec, device, channels_last=channels_last)
    flops = {v: C.count_step_flops(m, batch)["total"] for v, m in modules.items()}  # eager, before compiling
    print(
        f"  {spec.label} batch {spec.batch_size}: GFLOP/step masksub {flops['masksub'] / 1e9:.2f}, "
        f"baseline {flops['baseline'] / 1e9:.2f}",
        flush=True,
    )

    timed = dict(
        device=device, precision=args.precision, warmup=args.warmup, steps=args.steps, sync_every_step=False
    )
    times = C.interleave(
        {
            "lightning masksub": lambda: C.time_lightning(modules["masksub"], batch, **timed),
            "lightning baseline": lambda: C.time_lightning(modules["baseline"], batch, **timed),
            "plain baseline": lambda: plain_step_time(modules["baseline"], batch, **timed),
        },
        args.rounds,
    )
    syncs = {}
    if args.sync_debug and device.type == "cuda":
        for variant in ("masksub", "baseline"):
            syncs[variant] = host_syncs_per_step(modules[variant], batch, device, args.precision, args.warmup)
            print(
                f"  host syncs per step inside the training step, {variant}: {syncs[variant]:.2f}", flush=True
            )

    peak = peak_flops(device, args.peak_flops)
    rows = []
    for variant, step_times in times.items():
        kind = variant.split()[-1]
        step_s = statistics.median(step_times)
        achieved = flops[kind] / step_s
        rows.append(
            {
                "model": spec.label,
                "batch_size": spec.batch_size,
                "variant": variant,
                "channels_last": channels_last,
                "step_s": step_s,
                "images_per_s": spec.batch_size / step_s,
                "tflops_per_step": flops[kind] / 1e12,
                "achieved_tflops_per_s": achieved / 1e12,
                "mfu": achieved / peak if peak else None,
                "host_syncs_per_step": syncs.get(kind) if variant.startswith("lightning") else None,
                "step_s_rounds": step_times,
            }
        )
    ratios = {
        "model": spec.label,
        "flop_ratio": flops["masksub"] / flops["baseline"],
        "masksub_over_baseline_time": C.ratio_stats(times["lightning masksub"], times["lightning baseline"])[
            "median"
        ],
        "lightning_over_plain_time": C.ratio_stats(times["lightning baseline"], times["plain baseline"])[
            "median"
        ],
    }
    ratios["gap"] = ratios["masksub_over_baseline_time"] / ratios["flop_ratio"] - 1
    return rows, ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", action="append", help=f"timm name or preset; repeatable (default: {DEFAULT_MODELS})"
    )
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help=f"per GPU (default {DEFAULT_BATCH})")
    parser.add_argument("--no-compile", action="store_true", help="eager mode")
    parser.add_argument("--compile", action="store_true", help="compile in --smoke too (slow on CPU)")
    parser.add_argument(
        "--channels-last", choices=["auto", "on", "off"], default="auto", help="auto: CNNs only"
    )
    parser.add_argument("--peak-flops", type=float, default=None, help="peak dense bf16 FLOP/s of the device")
    parser.add_argument(
        "--sync-debug", action="store_true", help="count host syncs inside training_step (GPU)"
    )
    C.add_common_args(parser, rounds=3, warmup=15, steps=30)
    parser.set_defaults(device="cuda", precision="bf16-mixed")
    args = parser.parse_args(argv)
    if args.smoke:
        # The code path on CPU: tiny models, eager (inductor on CPU would take minutes), a couple of steps.
        args.device = "cpu" if not torch.cuda.is_available() else args.device
        args.model = args.model or ["tiny-vit", "tiny-resnet"]
        args.rounds, args.warmup, args.steps = 1, 1, 2
    elif args.device != "cuda" or not torch.cuda.is_available():
        print(
            "gpu_throughput.py measures GPU throughput and MFU and needs a CUDA device "
            f"(device={args.device!r}, cuda available={torch.cuda.is_available()}). "
            "Run it on a GPU machine, or use --smoke to check the code path on CPU.",
            file=sys.stderr,
        )
        return 2
    args.model = args.model or DEFAULT_MODELS
    args.compile = not args.no_compile and (args.compile or not args.smoke)
    device = C.setup_run(args)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    env = C.environment(device)
    peak = peak_flops(device, args.peak_flops)
    print(
        f"GPU throughput | {env['device']} | peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s | "
        f"{args.precision} compile={args.compile} fused AdamW | rounds={args.rounds} warmup={args.warmup} "
        f"steps={args.steps} | {' '.join(sys.argv)}",
        flush=True,
    )
    if peak is None:
        print("peak FLOP/s of this device unknown: pass --peak-flops for MFU", flush=True)

    rows, ratios = [], []
    for name in args.model:
        print(f"measuring {name} ...", flush=True)
        start = time.perf_counter()
        model_rows, model_ratios = measure(name, args, device)
        rows += model_rows
        ratios.append(model_ratios)
        # Per model as soon as it is done (kept if a later model runs past a time limit).
        print(f"done {name} in {time.perf_counter() - start:.1f} s: {json.dumps(model_ratios)}", flush=True)

    C.print_table(
        "Throughput (median over rounds)",
        rows,
        [
            ("model", "model", "s"),
            ("batch_size", "batch", "d"),
            ("variant", "variant", "s"),
            ("step_s", "s/step", ".4f"),
            ("images_per_s", "images/s", ".1f"),
            ("tflops_per_step", "TFLOP/step", ".3f"),
            ("achieved_tflops_per_s", "TFLOP/s", ".1f"),
            ("mfu", "MFU", ".1%"),
            ("host_syncs_per_step", "syncs/step", ".1f"),
        ],
    )
    C.print_table(
        "Ratios (median of per-round ratios)",
        ratios,
        [
            ("model", "model", "s"),
            ("flop_ratio", "MaskSub FLOP ratio", ".3f"),
            ("masksub_over_baseline_time", "MaskSub time ratio", ".3f"),
            ("gap", "gap", "+.1%"),
            ("lightning_over_plain_time", "Lightning / plain", ".4f"),
        ],
    )
    C.emit_json(
        {
            "benchmark": "gpu_throughput",
            **env,
            "peak_flops": peak,
            "args": vars(args),
            "results": rows,
            "ratios": ratios,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
