"""Step cost of compute-skipping drop-path: step time with ``efficient_drop_path`` / with timm's DropPath.

One ``MaskSubModule`` per (model, rate), every block at the rate (``drop_path_profile: constant``, as the DeiT-III
recipes); a callback switches the blocks between timm's class and the compute-skipping one before every step, in
blocks A B, B A, ... (step-level interleaving: each step is paired with the one next to it, seconds apart, which
cancels the load swings of a shared machine). The reported ratio is the median of the paired ratios, for the whole
step and for its forward + backward (batch start to the optimizer step: the part FLOPs describe).

Expected ratio = (1 - block share) + block share x kept fraction, where the block share is the blocks' part of the
step's FLOPs (``FlopCounterMode``, forward + backward) and the kept fraction is E[max(K, 2)] / B for K ~ Binomial(B,
1 - p): the rows a branch runs on (at least two, see ``masksub_lightning.models.efficient_drop_path``). The
optimizer and the elementwise work outside the blocks are not in the FLOP count, so the whole step's ratio sits
above the expected one by their share.

    python benchmarks/efficient_drop_path.py                    # vit-s-d4 and vit-l-d2 at p = 0.1, 0.2, 0.4, 0.5
    python benchmarks/efficient_drop_path.py --rate 0.45 --rate 0.6 --model vit-l-d2   # the ViT-L / H recipes' rates
    python benchmarks/efficient_drop_path.py --smoke            # tiny model, seconds
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import _common as C
import torch

from masksub_lightning.models.efficient_drop_path import (
    disable_efficient_drop_path,
    enable_efficient_drop_path,
)
from masksub_lightning.modules.masksub import MaskSubModule

VARIANTS = ("timm", "efficient")
#: A CPU-sized ViT-L: its width and heads (1024, 16; MLP 4096) at depth 2, at the DeiT-III ViT-L stage-1 input of
#: 160 px (100 patches + 1 class token). A shorter sequence (64 px: 17 tokens) makes the matmuls too thin for the
#: CPU to run at full rate, and the step then costs about the same whatever the row count.
C.PRESETS.setdefault(
    "vit-l-d2", C.ModelSpec("vit_large_patch16_224", dict(img_size=160, depth=2), 160, 1000, 8)
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", action="append", help="preset or timm name; repeatable (default: vit-s-d4, vit-l-d2)"
    )
    parser.add_argument("--rate", action="append", type=float, help="drop-path rate; repeatable")
    parser.add_argument("--img-size", type=int, default=None, help="input side for a timm model name")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's (8)")
    parser.add_argument(
        "--sub-branch", default="none", help="none (the baseline step, default) or mask (MaskSub)"
    )
    C.add_common_args(parser, rounds=2, warmup=1, steps=4)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = args.model or ["tiny-vit"]
        args.rate = args.rate or [0.1, 0.5]
        args.rounds, args.warmup, args.steps = min(args.rounds, 2), min(args.warmup, 1), min(args.steps, 2)
    args.model = args.model or ["vit-s-d4", "vit-l-d2"]
    args.rate = args.rate or [0.1, 0.2, 0.4, 0.5]
    if not all(0.0 < p < 1.0 for p in args.rate):
        parser.error(f"--rate must be in (0, 1), got {args.rate}")
    return args


def kept_fraction(batch: int, rate: float) -> float:
    """E[min(B, max(K, 2))] / B for K ~ Binomial(B, 1 - rate): the rows a branch runs on, as a fraction."""
    keep = 1.0 - rate
    rows = sum(
        math.comb(batch, k) * keep**k * rate ** (batch - k) * min(batch, max(k, 2)) for k in range(batch + 1)
    )
    return rows / batch


def block_flop_share(module: MaskSubModule, batch) -> float:
    """The blocks' share of one training step's FLOPs (forward + backward of every branch), timm's DropPath."""
    images, target = batch[0][:8], batch[1][:8]  # every sample costs the same: the share needs no more
    module.model.train()
    with C.flop_counter() as counter:
        main = module(images)
        module.main_loss(main, target).backward()
        if module.sub_branch.active:
            module.sub_loss(module.sub_branch_forward(images), main.detach()).backward()
    module.model.zero_grad(set_to_none=True)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    # Module names are qualified from the outermost module the counter saw: the shortest one ending in "blocks".
    blocks = counts[min((n for n in counts if n.endswith(".blocks")), key=len)]
    return blocks / counts["Global"]


def switch_blocks(pl_module, variant: str) -> None:
    """Give the blocks the step's variant: timm's class, or the compute-skipping one."""
    switch = enable_efficient_drop_path if variant == "efficient" else disable_efficient_drop_path
    switch(pl_module.model)


def build(spec: C.ModelSpec, rate: float, sub_branch: str) -> MaskSubModule:
    torch.manual_seed(0)
    return MaskSubModule(
        spec.name,
        num_classes=spec.num_classes,
        model_kwargs={**spec.model_kwargs, "drop_path_rate": rate},
        drop_path_profile="constant",
        sub_branch=sub_branch,
        optimizer="adamw",
    )


def time_pairs(module, args, device, batch) -> dict[str, list[float]]:
    return C.interleaved_step_times(
        module, batch, device, args, lambda: C.InterleavedClock(device, VARIANTS, switch_blocks)
    )


def measure(spec: C.ModelSpec, args, device) -> list[dict]:
    batch = C.make_batch(spec, device)
    rows = []
    for rate in args.rate:
        module = build(spec, rate, args.sub_branch)
        share = block_flop_share(module, batch)
        kept = kept_fraction(spec.batch_size, rate)
        expected = (1.0 - share) + share * kept
        times = time_pairs(module, args, device, batch)
        step = C.ratio_stats(times["efficient"], times["timm"])
        compute = C.ratio_stats(times["efficient_compute"], times["timm_compute"])
        rows.append(
            {
                "model": spec.label,
                "batch_size": spec.batch_size,
                "rate": rate,
                "block_flop_share": share,
                "kept_fraction": kept,
                "expected_ratio": expected,
                "timm_step_s": statistics.median(times["timm"]),
                "efficient_step_s": statistics.median(times["efficient"]),
                "time_ratio": step,
                "compute_ratio": compute,
                "compute_over_expected": compute["median"] / expected,
            }
        )
        print(
            f"  p={rate}: step ratio {step['median']:.3f}, fwd+bwd {compute['median']:.3f}, "
            f"expected {expected:.3f}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = C.setup_run(args)
    env = C.environment(device)
    print(
        f"efficient drop-path | {env['device']} | torch {env['torch']} | {args.precision} | sub_branch="
        f"{args.sub_branch} rounds={args.rounds} warmup={args.warmup} steps={args.steps} | {' '.join(sys.argv)}",
        flush=True,
    )
    results = [row for rows in C.measure_models(args, device, measure) for row in rows]
    for row in results:
        row["step_ratio"], row["fwd_bwd_ratio"] = row["time_ratio"]["median"], row["compute_ratio"]["median"]
    C.print_table(
        "efficient_drop_path / timm DropPath, same module, steps interleaved: median of paired ratios",
        results,
        [
            ("model", "model", "s"),
            ("batch_size", "batch", "d"),
            ("rate", "p", ".2f"),
            ("block_flop_share", "block FLOP share", ".3f"),
            ("kept_fraction", "kept rows", ".3f"),
            ("expected_ratio", "expected", ".3f"),
            ("timm_step_s", "timm s/step", ".4f"),
            ("efficient_step_s", "efficient s/step", ".4f"),
            ("step_ratio", "step ratio", ".3f"),
            ("fwd_bwd_ratio", "fwd+bwd ratio", ".3f"),
            ("compute_over_expected", "fwd+bwd / expected", ".3f"),
        ],
    )
    C.emit_json({"benchmark": "efficient_drop_path", **env, "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
