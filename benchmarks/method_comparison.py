"""Baseline, MaskSub and CoSub side by side on one network: step time, peak memory, and accuracy on digits.

The three methods of the package, built with the same network (same weights: same seed), the same optimizer and
the same BCE loss (CoSub needs BCE, so all three use it):

* ``baseline``: ``MaskSubModule(sub_branch="none")``, the plain supervised step;
* ``masksub``: ``MaskSubModule(sub_branch="mask")``, a main branch and a half-masked sub-branch, two backwards;
* ``cosub``: ``CoSubModule``, the batch duplicated into one forward of two drop-path submodels, one backward.

Every network gets the same stochastic depth (``--drop-path``): CoSub needs it, and the other two train with it
too, so that the comparison is of methods, not of regularisation.

(a) Step cost. One network, one Lightning fit per round, whose steps cycle through the three methods in blocks
(A B C, C B A, ...), as ``step_cost.py`` alternates its two; each step is timed (``_common.StepClock``), the first
``--warmup`` blocks of a fit are dropped, and each method's time is divided by the baseline step of its block. Peak memory is measured as ``memory.py`` does (CUDA peak stats on a GPU; torch's CPU allocator events on the
CPU), one fit per method. What to expect from the arithmetic: MaskSub about 1.5x the
baseline's FLOPs on a ViT (its sub-branch sees half of the tokens), CoSub exactly 2x (2B images forward and
backward; both are counted and printed next to the time ratios); memory: MaskSub frees its main graph before the sub-branch (about 1x), CoSub holds the activations of
2B images at once (up to 2x the activation part).

(b) Accuracy. scikit-learn's handwritten digits (the quickstart's data: 1,437 training, 360 validation images,
upsampled to 32 px, no augmentation), the quickstart's ViT (4 blocks, width 96, 16 tokens) with drop path, AdamW
2e-3, cosine with 2 warmup epochs, ``--digits-epochs`` epochs for each method and seed; val top-1 after the last
epoch, mean +- std over ``--seeds``. Same seed: same initial weights and the same training order for the three.

    python benchmarks/method_comparison.py                # CPU: vit-s-d4 cost, then digits 3 seeds x 15 epochs
    python benchmarks/method_comparison.py --smoke        # tiny sizes, seconds: checks the script runs
    python benchmarks/method_comparison.py --device cuda --model vit_base_patch16_224 --batch-size 128 \\
        --precision bf16-mixed --skip-accuracy            # the step-cost part on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import _common as C
import lightning as L
import memory
import torch

from masksub_lightning import CoSubModule, MaskSubModule
from masksub_lightning.data import DigitsDataModule
from masksub_lightning.method.subbranch import build_sub_branch

METHODS = ("baseline", "masksub", "cosub")
MiB = 2**20
# The quickstart's network (configs/quickstart.yaml); --smoke: the unit tests' tiny ViT.
DIGITS_VIT = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0)
TINY_DIGITS_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="preset or timm name for (a) (default: vit-s-d4)")
    parser.add_argument("--img-size", type=int, default=None, help="input side for a timm model name")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--drop-path", type=float, default=0.1, help="drop_path_rate of every network")
    parser.add_argument("--seeds", type=int, default=3, help="digits runs per method (seeds 0..N-1)")
    parser.add_argument("--digits-epochs", type=int, default=15, help="epochs per digits run")
    parser.add_argument("--skip-accuracy", action="store_true", help="only (a), the step cost and memory")
    parser.add_argument("--skip-cost", action="store_true", help="only (b), the digits accuracy")
    C.add_common_args(parser, rounds=2, warmup=2, steps=4)
    args = parser.parse_args(argv)
    args.limit_train_batches = None
    if args.smoke:
        args.model = args.model or "tiny-vit"
        args.rounds, args.warmup, args.steps = 1, 1, 2
        args.seeds, args.digits_epochs, args.limit_train_batches = 2, 1, 3
    args.model = args.model or "vit-s-d4"
    return args


def build(
    method: str,
    name: str,
    model_kwargs: dict[str, Any],
    num_classes: int,
    seed: int,
    cls=CoSubModule,
    **options,
):
    """One of the three methods on the same network: same seed, same optimizer, BCE for all."""
    torch.manual_seed(seed)
    common = dict(num_classes=num_classes, model_kwargs=dict(model_kwargs), loss="bce", **options)
    if method == "cosub":
        return cls(name, **common)
    return MaskSubModule(name, sub_branch="mask" if method == "masksub" else "none", **common)


# ------------------------------------------------------------------------------------------------ (a) step cost
class AlternatingMethods(CoSubModule):
    """One network trained by the three methods' steps in turn: ``method`` picks the step a batch gets.

    ``cosub``: CoSubModule's own step; ``masksub`` / ``baseline``: MaskSubModule's step with the ``mask`` / ``none``
    sub-branch (the code each method's module runs). Timing them in one fit, step next to step, cancels the load
    swings of a shared machine, which separate fits do not (their medians moved 2-3x within a minute here).
    """

    method = "baseline"

    def configure_model(self) -> None:
        super().configure_model()
        if hasattr(self, "branches"):  # a later round's fit
            return
        mask = build_sub_branch("mask", 0.5, model=self.model)
        mask.setup(self.model)  # installs its switch, inactive outside the sub-branch forward
        self.branches = {"masksub": mask, "baseline": build_sub_branch("none")}

    def training_losses(self, batch):
        if self.method == "cosub":
            return super().training_losses(batch)
        self.sub_branch = self.branches[self.method]
        return MaskSubModule.training_losses(self, batch)


def set_method(pl_module, method: str) -> None:
    pl_module.method = method


def time_interleaved(spec, kwargs, args, device, batch) -> dict[str, list[float]]:
    """Per-step times of each method, one per block (the three steps of a block run seconds apart)."""
    module = build("cosub", spec.name, kwargs, spec.num_classes, 0, optimizer="adamw", cls=AlternatingMethods)
    return C.interleaved_step_times(
        module, batch, device, args, lambda: C.InterleavedClock(device, METHODS, set_method)
    )


def measure_cost(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    spec = C.resolve_spec(args.model, args.img_size, args.batch_size)
    kwargs = {**spec.model_kwargs, "drop_path_rate": args.drop_path}
    batch = C.make_batch(spec, device)
    print(f"step cost of {spec.label}, batch {spec.batch_size} ...", flush=True)
    times = time_interleaved(spec, kwargs, args, device, batch)
    modules = {m: build(m, spec.name, kwargs, spec.num_classes, 0, optimizer="adamw") for m in METHODS}
    # Memory does not drift with load (memory.py's steps agree to the byte): one fit of two steps per method.
    steps = {
        m: memory.measure_once(modules[m], batch, device, args.precision, args.warmup, 2) for m in METHODS
    }
    # Model FLOPs of a step (forward + backward): CoSub's is one step of the model on the duplicated batch.
    images, target = batch
    doubled = (torch.cat((images, images)), torch.cat((target, target)))
    flops = {m: C.count_step_flops(modules[m], batch)["total"] for m in ("baseline", "masksub")}
    flops["cosub"] = C.count_step_flops(modules["cosub"], doubled, max_count_batch=16)["total"]
    peak = {m: max(s["peak"] for s in steps[m]) for m in METHODS}
    start = {m: max(s["start"] for s in steps[m]) for m in METHODS}
    result: dict[str, Any] = {
        "model": spec.label,
        "batch_size": spec.batch_size,
        "blocks": len(times["baseline"]),
    }
    for m in METHODS:
        ratio = C.ratio_stats(times[m], times["baseline"])
        result[m] = {
            "step_s": statistics.median(times[m]),
            "time_ratio": ratio["median"],
            "time_ratio_blocks": ratio["rounds"],
            "flop_ratio": flops[m] / flops["baseline"],
            "peak_mib": peak[m] / MiB,
            "peak_ratio": peak[m] / peak["baseline"],
            # The activation part alone (peak above what the step starts with: weights, grads, optimizer state).
            "above_start_ratio": (peak[m] - start[m]) / (peak["baseline"] - start["baseline"]),
        }
    return result


# ------------------------------------------------------------------------------------------------- (b) accuracy
def digits_run(method: str, seed: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Train ``method`` on the digits for ``args.digits_epochs`` epochs; val top-1 after the last one."""
    L.seed_everything(seed, verbose=False)
    data = DigitsDataModule(
        batch_size=64, img_size=32, train_augment=False, seed=seed, persistent_workers=False
    )
    kwargs = {**(TINY_DIGITS_VIT if args.smoke else DIGITS_VIT), "drop_path_rate": args.drop_path}
    module = build(
        method, "vit_tiny_patch16_224", kwargs, 10, seed, optimizer="adamw", lr=2e-3, weight_decay=0.05,
        scheduler="cosine", warmup_epochs=min(2, args.digits_epochs - 1),
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cuda" if device.type == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_epochs=args.digits_epochs,
        limit_train_batches=args.limit_train_batches,
        check_val_every_n_epoch=args.digits_epochs,  # validate once, after the last epoch
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    return {"top1": 100 * trainer.callback_metrics["val_acc1"].item(), "wall_s": time.perf_counter() - start}


def measure_accuracy(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for seed in range(args.seeds):
        for m in METHODS if seed % 2 == 0 else reversed(METHODS):
            runs[m].append(digits_run(m, seed, args, device))
            print(
                f"  digits seed {seed} {m}: top-1 {runs[m][-1]['top1']:.2f}% in {runs[m][-1]['wall_s']:.0f} s"
            )
    result: dict[str, Any] = {"epochs": args.digits_epochs, "seeds": args.seeds}
    for m in METHODS:
        top1 = [r["top1"] for r in runs[m]]
        result[m] = {
            "top1": top1,
            "mean": statistics.mean(top1),
            "std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "wall_s": sum(r["wall_s"] for r in runs[m]),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = C.setup_run(args)
    env = C.environment(device)
    print(f"method comparison | {env['device']} | {args.precision} | {' '.join(sys.argv)}", flush=True)
    payload: dict[str, Any] = {"benchmark": "method_comparison", **env, "args": vars(args)}
    if not args.skip_cost:
        cost = payload["cost"] = measure_cost(args, device)
        C.print_table(
            f"(a) {cost['model']}, batch {cost['batch_size']}, drop path {args.drop_path}: vs the baseline "
            f"(time: median of {cost['blocks']} ratios of steps run side by side)",
            [{"method": m, **cost[m]} for m in METHODS],
            [
                ("method", "method", "s"),
                ("step_s", "s/step", ".4f"),
                ("time_ratio", "time ratio", ".3f"),
                ("flop_ratio", "FLOP ratio", ".3f"),
                ("peak_mib", "peak MiB", ".1f"),
                ("peak_ratio", "peak ratio", ".3f"),
                ("above_start_ratio", "above-start ratio", ".3f"),
            ],
        )
    if not args.skip_accuracy:
        acc = payload["accuracy"] = measure_accuracy(args, device)
        C.print_table(
            f"(b) digits val top-1 (%), {acc['epochs']} epochs, {acc['seeds']} seeds",
            [{"method": m, **acc[m]} for m in METHODS],
            [
                ("method", "method", "s"),
                ("mean", "mean", ".2f"),
                ("std", "std", ".2f"),
                ("wall_s", "wall s", ".0f"),
            ],
        )
    C.emit_json(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
