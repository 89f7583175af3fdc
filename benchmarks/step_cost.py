"""Step cost of MaskSub: (MaskSub step time / baseline step time) against (MaskSub step FLOPs / baseline FLOPs).

Both variants are the same class, ``MaskSubModule``, on the same network weights and the same batch:
``sub_branch="mask"`` (MaskSub at r = 0.5) and ``sub_branch="none"`` (the plain supervised step). Steps run in a
Lightning ``Trainer`` (``max_steps``); a callback timestamps every batch start (after ``cuda.synchronize`` on GPU)
and the first ``--warmup`` steps (pairs, in step mode) of every fit are discarded. Two ways to put the variants
side by side (``--interleave``):

* ``step`` (default): one fit per round of a module built with ``sub_branch="mask"`` whose sub-branch object a
  callback swaps for the ``none`` one on alternate steps, in blocks A B, B A, ... Each MaskSub step is paired with
  the baseline step next to it (seconds apart), which cancels the load swings of a shared machine.
* ``fit``: a separate module and fit per variant, the fits alternating round by round (A B, B A, ...); each round
  gives one ratio of per-step medians.

The reported time ratio is the median of the paired ratios. The FLOP ratio comes from ``FlopCounterMode`` over the
forward and backward passes of both branches vs the baseline's one branch. Goal: time ratio within 3% of the FLOP
ratio (ViT and BEiT token masking ~1.48-1.50, CNN pixel masking 2.0).

    python benchmarks/step_cost.py                       # CPU presets: vit-s-d4 (197 tokens), resnet18 @ 128
    python benchmarks/step_cost.py --smoke               # tiny models, seconds
    python benchmarks/step_cost.py --model beit-s-d4     # BEiT v2 (beit_token_mask: bias gathered per block)
    python benchmarks/step_cost.py --model vit_base_patch16_224 --img-size 224 --batch-size 256 \\
        --device cuda --precision bf16-mixed             # the same measurement on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys

import _common as C

from masksub_lightning.method.subbranch import build_sub_branch

GOAL_GAP = 0.03  # |time ratio / FLOP ratio - 1|
VARIANTS = ("baseline", "masksub")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        help=f"preset ({', '.join(C.PRESETS)}) or timm model name; repeatable (default: vit-s-d4 and resnet18)",
    )
    parser.add_argument("--img-size", type=int, default=None, help="input side for a timm model name")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: the preset's, 64 for timm names"
    )
    parser.add_argument("--sub-ratio", type=float, default=0.5, help="MaskSub mask ratio r")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (GPU runs)")
    parser.add_argument(
        "--channels-last", action="store_true", help="channels-last network and inputs (CNNs)"
    )
    parser.add_argument("--interleave", choices=["step", "fit"], default="step", help="see the module doc")
    C.add_common_args(parser, rounds=3, warmup=1, steps=8)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = args.model or ["tiny-vit", "tiny-resnet"]
        args.rounds, args.warmup, args.steps = min(args.rounds, 2), min(args.warmup, 1), min(args.steps, 4)
    args.model = args.model or ["vit-s-d4", "resnet18"]
    return args


# ------------------------------------------------------------------------------------ step-level interleaving
def time_step_interleaved(spec, args, device, batch) -> dict[str, list[float]]:
    """Paired per-step times: one entry per block (a baseline step next to a MaskSub step), all rounds."""
    module = C.build_module(
        spec, "mask", compile=args.compile, channels_last=args.channels_last, sub_ratio=args.sub_ratio
    )
    branches = {"masksub": module.sub_branch, "baseline": build_sub_branch("none")}

    def switch(pl_module, variant: str) -> None:
        pl_module.sub_branch = branches[variant]  # training_step reads self.sub_branch.active

    try:
        return C.interleaved_step_times(
            module, batch, device, args, lambda: C.InterleavedClock(device, VARIANTS, switch)
        )
    finally:
        module.sub_branch = branches["masksub"]


# ------------------------------------------------------------------------------------- fit-level interleaving
def time_fit_interleaved(spec, args, device, batch) -> dict[str, list[float]]:
    """Per-round medians: one entry per round and variant."""
    modules = {
        variant: C.build_module(
            spec, kind, compile=args.compile, channels_last=args.channels_last, sub_ratio=args.sub_ratio
        )
        for variant, kind in zip(VARIANTS, ("none", "mask"))
    }
    times = {key: [] for key in ("baseline", "masksub", "baseline_compute", "masksub_compute")}

    def one_fit(variant: str) -> float:
        # Per-step sync on GPU: each step is timed on its own and the median taken, as on the CPU.
        clock = C.StepClock(device, args.warmup, sync_every_step=True)
        C.run_lightning(modules[variant], batch, device, args.precision, args.warmup + args.steps + 1, clock)
        times[variant + "_compute"].append(statistics.median(clock.compute_times()[args.warmup :]))
        return clock.step_time()

    step_times = C.interleave({v: (lambda v=v: one_fit(v)) for v in VARIANTS}, args.rounds)
    times.update(step_times)
    return times


# ---------------------------------------------------------------------------------------------------- measure
def measure(spec: C.ModelSpec, args: argparse.Namespace, device) -> dict:
    batch = C.make_batch(spec, device, channels_last=args.channels_last)
    # Counted eagerly on separate modules (a compiled network would hide its ops from the counter).
    eager = {
        variant: C.build_module(spec, kind, channels_last=args.channels_last, sub_ratio=args.sub_ratio)
        for variant, kind in zip(VARIANTS, ("none", "mask"))
    }
    flops = {variant: C.count_step_flops(module, batch) for variant, module in eager.items()}
    masking = eager["masksub"].sub_branch
    del eager
    flop_ratio = flops["masksub"]["total"] / flops["baseline"]["total"]

    timer = time_step_interleaved if args.interleave == "step" else time_fit_interleaved
    times = timer(spec, args, device, batch)
    base, mask = times["baseline"], times["masksub"]
    ratio = C.ratio_stats(mask, base)
    gap = ratio["median"] / flop_ratio - 1
    # Forward + backward only (batch start to the optimizer step): the part the FLOP count describes.
    compute_ratio = C.ratio_stats(times["masksub_compute"], times["baseline_compute"])["median"]
    return {
        "model": spec.label,
        "batch_size": spec.batch_size,
        # What "mask" resolved to: TokenMask or PixelMask (class names with or without a SubBranch suffix).
        "masking": type(getattr(masking, "_impl", masking)).__name__.removesuffix("SubBranch"),
        "interleave": args.interleave,
        "baseline_gflops": flops["baseline"]["total"] / 1e9,
        "masksub_gflops": flops["masksub"]["total"] / 1e9,
        "sub_over_main_flops": flops["masksub"]["sub"] / flops["masksub"]["main"],
        "flop_ratio": flop_ratio,
        "baseline_step_s": statistics.median(base),
        "masksub_step_s": statistics.median(mask),
        "ratio_of_medians": statistics.median(mask) / statistics.median(base),
        "time_ratio": ratio["median"],
        "time_ratio_q1": ratio["q1"],
        "time_ratio_q3": ratio["q3"],
        "time_ratio_min": ratio["min"],
        "time_ratio_max": ratio["max"],
        "time_ratio_pairs": ratio["rounds"],
        "gap": gap,
        "goal_met": abs(gap) <= GOAL_GAP,
        "baseline_compute_s": statistics.median(times["baseline_compute"]),
        "masksub_compute_s": statistics.median(times["masksub_compute"]),
        "compute_time_ratio": compute_ratio,
        "compute_gap": compute_ratio / flop_ratio - 1,
        # Per-step time outside forward / backward (optimizer, schedule, logging, loop), baseline variant.
        "baseline_rest_s": statistics.median(base) - statistics.median(times["baseline_compute"]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = C.setup_run(args)
    env = C.environment(device)
    print(
        f"step cost | {env['device']} | torch {env['torch']} | {args.precision} | interleave={args.interleave} "
        f"rounds={args.rounds} warmup={args.warmup} steps={args.steps} | {' '.join(sys.argv)}",
        flush=True,
    )
    results = C.measure_models(args, device, measure)

    C.print_table(
        f"MaskSub (r={args.sub_ratio}) vs baseline, same MaskSubModule class: median of paired ratios [quartiles]",
        results,
        [
            ("model", "model", "s"),
            ("batch_size", "batch", "d"),
            ("masking", "masking", "s"),
            ("baseline_gflops", "base GFLOP/step", ".1f"),
            ("flop_ratio", "FLOP ratio", ".3f"),
            ("baseline_step_s", "base s/step", ".4f"),
            ("masksub_step_s", "masksub s/step", ".4f"),
            ("time_ratio", "time ratio", ".3f"),
            ("time_ratio_q1", "q1", ".3f"),
            ("time_ratio_q3", "q3", ".3f"),
            ("gap", "gap", "+.1%"),
            ("goal_met", f"|gap|<={GOAL_GAP:.0%}", ""),
            ("compute_time_ratio", "fwd+bwd ratio", ".3f"),
            ("compute_gap", "fwd+bwd gap", "+.1%"),
            ("baseline_rest_s", "rest s/step", ".4f"),
        ],
    )
    C.emit_json(
        {"benchmark": "step_cost", **env, "precision": args.precision, "args": vars(args), "results": results}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
