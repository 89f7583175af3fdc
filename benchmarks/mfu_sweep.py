"""MFU sweep: what a user can set without changing the method, for the baseline and MaskSub, one knob at a time.

Per family, a reference setting (ViT-B/16: batch 256, bf16-mixed, ``torch.compile`` default mode, fused AdamW,
SDPA's own backend choice, TF32 for the fp32 parts; ResNet-50 the same but eager and channels-last, since its
compilation did not finish within a 120 s limit in the last GPU session) and settings that each change one knob:

* batch 512;
* ``torch.compile`` mode: eager, ``default``, ``max-autotune-no-cudagraphs`` (the module compiles with the default
  mode; this script calls ``model.compile(mode=...)`` itself, the same in-place compile);
* AdamW ``foreach`` instead of ``fused`` (``optimizer_kwargs``);
* SDPA backend forced to flash / cuDNN / efficient (``torch.nn.attention.sdpa_kernel`` around the fits; attention
  models only);
* TF32 off for fp32 matmuls and convolutions (``torch.set_float32_matmul_precision("highest")``,
  ``torch.backends.cudnn.allow_tf32``);
* channels-last off (CNNs only).

Each setting is time-boxed: one round of a baseline fit and a MaskSub fit (``_common.time_lightning``, windows
synchronized only at their ends), a few warm-up and measured steps each, a fresh ``torch._dynamo`` state per setting.
MFU = model FLOPs per step (``FlopCounterMode`` over the step, both branches for MaskSub: ``_common.count_step_flops``)
/ step time / the card's peak dense bf16 FLOP/s (``gpu_throughput.PEAK_BF16_FLOPS``, or ``--peak-flops``).
The settings of a family run most valuable first; one whose estimated cost (the reference setting's wall time,
x3 for max-autotune) does not fit in the family's share of ``--budget`` is skipped and says so.

    python benchmarks/mfu_sweep.py                            # CUDA GPU: ViT-B/16 and ResNet-50, ~4.5 minutes
    python benchmarks/mfu_sweep.py --model vit_base_patch16_224 --budget 200
    python benchmarks/mfu_sweep.py --smoke --peak-flops 1e12  # CPU, tiny models; CUDA-only settings skipped
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import _common as C
import torch
from gpu_throughput import peak_flops

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = ("flash", "cudnn", "efficient")
DEFAULT_MODELS = ["vit_base_patch16_224", "resnet50"]
DEFAULT_BATCH = 256


@dataclass(frozen=True)
class Setting:
    """The knobs a user sets around an unchanged MaskSub step."""

    batch_size: int
    compile_mode: str | None = "default"  # None: eager
    fused_adamw: bool = True
    sdpa: str = "default"  # SDPA's own choice, or one of SDPA_BACKENDS forced
    tf32: bool = True
    channels_last: bool = False


@dataclass(frozen=True)
class Family:
    spec: C.ModelSpec
    base: Setting
    attention: bool  # a transformer: SDPA settings apply, channels-last does not


def family_for(name: str, args: argparse.Namespace) -> Family:
    spec = C.resolve_spec(name, args.img_size, args.batch_size or (None if args.smoke else DEFAULT_BATCH))
    attention = not C.channels_last_for(spec, "auto")  # fixed input size (position embeddings): a transformer
    compile_mode = None if (args.smoke or not attention) else "default"
    base = Setting(spec.batch_size, compile_mode, channels_last=not attention)
    return Family(spec, base, attention)


def settings_for(family: Family) -> list[tuple[str, Setting]]:
    """The reference first, then one knob changed per setting, most valuable first."""
    base = family.base
    out = [
        ("reference", base),
        (f"batch {2 * base.batch_size}", replace(base, batch_size=2 * base.batch_size)),
    ]
    if family.attention:
        out.append(("SDPA cudnn", replace(base, sdpa="cudnn")))
    for mode in (None, *COMPILE_MODES):
        if mode != base.compile_mode:
            out.append((f"compile {mode}" if mode else "eager", replace(base, compile_mode=mode)))
    out += [("foreach AdamW", replace(base, fused_adamw=False)), ("TF32 off", replace(base, tf32=False))]
    if family.attention:
        out += [(f"SDPA {b}", replace(base, sdpa=b)) for b in SDPA_BACKENDS if b != "cudnn"]
    else:
        out.append(("channels-last off", replace(base, channels_last=False)))
    return out


def skip_reason(setting: Setting, device: torch.device) -> str | None:
    """Why a setting cannot run here (None when it can)."""
    if device.type != "cuda":
        if setting.sdpa != "default":
            return f"CUDA-only: the {setting.sdpa} SDPA kernel needs a GPU"
        if not setting.tf32:
            return "CUDA-only: TF32 is a GPU tensor-core format"
        if setting.compile_mode is not None:
            return "not on CPU: inductor on CPU takes minutes per graph"
    return None


@contextlib.contextmanager
def backend_flags(setting: Setting) -> Iterator[None]:
    """TF32 and the SDPA backend for the fits of one setting; the previous flags restored after."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    try:
        torch.set_float32_matmul_precision("high" if setting.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = setting.tf32
        forced = (
            sdpa_kernel([backends[setting.sdpa]]) if setting.sdpa != "default" else contextlib.nullcontext()
        )
        with forced:
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def time_variant(module, batch, device, precision: str, warmup: int, steps: int) -> float:
    """Seconds per step of one fit (a window synchronized at its ends). Tests replace it with a fake clock."""
    return C.time_lightning(module, batch, device, precision, warmup, steps, sync_every_step=False)


def build(spec: C.ModelSpec, setting: Setting, kind: str):
    return C.build_module(spec, kind, channels_last=setting.channels_last, fused_adamw=setting.fused_adamw)


def mfu(flops_per_step: float, step_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak (None when the peak is unknown)."""
    return flops_per_step / step_s / peak if peak else None


def measure_setting(family: Family, label: str, setting: Setting, args, device, peak) -> list[dict[str, Any]]:
    """One baseline and one MaskSub fit per round under ``setting``; one row per variant."""
    spec = replace(family.spec, batch_size=setting.batch_size)
    batch = C.make_batch(spec, device, channels_last=setting.channels_last)
    torch._dynamo.reset()  # a fresh compile per setting: the graphs depend on the SDPA backend and TF32
    rows = []
    with backend_flags(setting):
        modules = {"baseline": build(spec, setting, "none"), "masksub": build(spec, setting, "mask")}
        flops = {
            v: C.count_step_flops(m, batch)["total"] for v, m in modules.items()
        }  # eager, before compiling
        for module in modules.values():
            if setting.compile_mode is not None:
                module.model.compile(
                    mode=setting.compile_mode
                )  # in place, as MaskSubModule(compile=True) does
        times = C.interleave(
            {
                v: (lambda m=m: time_variant(m, batch, device, args.precision, args.warmup, args.steps))
                for v, m in modules.items()
            },
            args.rounds,
        )
    for variant, step_times in times.items():
        step_s = statistics.median(step_times)
        rows.append(
            {
                "family": spec.label,
                "setting": label,
                "variant": variant,
                "batch_size": setting.batch_size,
                "compile": setting.compile_mode or "eager",
                "adamw": "fused" if setting.fused_adamw else "foreach",
                "sdpa": setting.sdpa,
                "tf32": setting.tf32,
                "channels_last": setting.channels_last,
                "step_s": step_s,
                "images_per_s": setting.batch_size / step_s,
                "tflops_per_step": flops[variant] / 1e12,
                "gflops_per_step": flops[variant] / 1e9,
                "achieved_tflops_per_s": flops[variant] / step_s / 1e12,
                "mfu": mfu(flops[variant], step_s, peak),
            }
        )
    return rows


def sweep_family(family: Family, args, device, peak, budget_s: float) -> tuple[list[dict], list[dict]]:
    """Every setting of one family within ``budget_s`` seconds: (measured rows, skipped settings with reasons)."""
    rows, skipped = [], []
    start, reference_wall = time.perf_counter(), None
    for label, setting in settings_for(family):
        reason = skip_reason(setting, device)
        if reason is None and reference_wall is not None:
            estimate = reference_wall * (3 if setting.compile_mode == "max-autotune-no-cudagraphs" else 1)
            left = budget_s - (time.perf_counter() - start)
            if estimate > left:
                reason = f"budget: about {estimate:.0f} s needed, {left:.0f} s left of {budget_s:.0f} s"
        if reason is not None:
            print(f"  skip {family.spec.label} / {label}: {reason}", flush=True)
            skipped.append({"family": family.spec.label, "setting": label, "reason": reason})
            continue
        began = time.perf_counter()
        try:
            new = measure_setting(family, label, setting, args, device, peak)
        except (RuntimeError, torch.OutOfMemoryError) as error:  # e.g. a forced SDPA backend with no kernel
            reason = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
            print(f"  skip {family.spec.label} / {label}: {reason}", flush=True)
            skipped.append({"family": family.spec.label, "setting": label, "reason": reason})
            continue
        wall = time.perf_counter() - began
        reference_wall = reference_wall if reference_wall is not None else wall
        rows += new
        figures = ", ".join(f"{r['variant']} {r['images_per_s']:.1f} img/s" for r in new)
        print(f"done {family.spec.label} / {label} in {wall:.1f} s: {figures}", flush=True)
    return rows, skipped


def best_per_family(rows: list[dict]) -> list[dict]:
    """Per family and variant, the setting with the highest achieved FLOP/s (the highest MFU on one device)."""
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["family"], row["variant"])
        if key not in best or row["achieved_tflops_per_s"] > best[key]["achieved_tflops_per_s"]:
            best[key] = row
    return list(best.values())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", action="append", help=f"timm name or preset; repeatable (default: {DEFAULT_MODELS})"
    )
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument(
        "--batch-size", type=int, default=None, help=f"reference batch (default {DEFAULT_BATCH})"
    )
    parser.add_argument("--peak-flops", type=float, default=None, help="peak dense bf16 FLOP/s of the device")
    parser.add_argument(
        "--budget", type=float, default=270.0, help="seconds for the whole sweep, shared by the families"
    )
    C.add_common_args(parser, rounds=1, warmup=3, steps=8)
    parser.set_defaults(device="cuda", precision="bf16-mixed")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
        args.model = args.model or ["tiny-vit", "tiny-resnet"]
        args.rounds, args.warmup, args.steps = 1, 1, 2
    args.model = args.model or DEFAULT_MODELS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and (args.device != "cuda" or not torch.cuda.is_available()):
        print(
            "mfu_sweep.py measures GPU MFU and needs a CUDA device "
            f"(device={args.device!r}, cuda available={torch.cuda.is_available()}); --smoke runs it on CPU.",
            file=sys.stderr,
        )
        return 2
    device = C.setup_run(args)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = C.environment(device)
    peak = peak_flops(device, args.peak_flops)
    print(
        f"MFU sweep | {env['device']} | peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s | "
        f"{args.precision} | rounds={args.rounds} warmup={args.warmup} steps={args.steps} "
        f"budget={args.budget:.0f} s | {' '.join(sys.argv)}",
        flush=True,
    )
    rows, skipped = [], []
    start = time.perf_counter()
    for index, name in enumerate(args.model):
        family = family_for(name, args)
        share = (args.budget - (time.perf_counter() - start)) / (len(args.model) - index)
        print(f"sweeping {family.spec.label} ({share:.0f} s) ...", flush=True)
        new_rows, new_skipped = sweep_family(family, args, device, peak, share)
        rows += new_rows
        skipped += new_skipped
    print_results(rows, skipped, peak)
    C.emit_json(
        {
            "benchmark": "mfu_sweep",
            **env,
            "peak_flops": peak,
            "args": vars(args),
            "results": rows,
            "best": best_per_family(rows),
            "skipped": skipped,
        }
    )
    return 0


def print_results(rows: list[dict], skipped: list[dict], peak: float | None) -> None:
    columns = [
        ("family", "family", "s"),
        ("setting", "setting", "s"),
        ("variant", "variant", "s"),
        ("batch_size", "batch", "d"),
        ("compile", "compile", "s"),
        ("step_s", "s/step", ".4f"),
        ("images_per_s", "images/s", ".1f"),
        ("gflops_per_step", "GFLOP/step", ".3f"),
        ("achieved_tflops_per_s", "TFLOP/s", ".3f"),
        ("mfu", "MFU", ".1%"),
    ]
    C.print_table("MFU sweep: one knob changed from the reference per setting", rows, columns)
    C.print_table("Best setting per family and variant (highest MFU)", best_per_family(rows), columns)
    if skipped:
        C.print_table(
            "Skipped",
            skipped,
            [("family", "family", "s"), ("setting", "setting", "s"), ("reason", "reason", "s")],
        )
    if peak is None:
        print("peak FLOP/s of this device unknown: pass --peak-flops for MFU", flush=True)


if __name__ == "__main__":
    sys.exit(main())
