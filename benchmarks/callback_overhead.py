"""Cost of the analysis callbacks (masksub_lightning.callbacks): on vs off, measured side by side in one run.

Two measurements (goal: under 2% at the default settings):

* ``vit step``: one Lightning fit on a fixed batch with ``BranchGradients(every_n_steps=2)``, so measured and
  unmeasured steps alternate. A measured step's extra time is its batch-to-batch interval minus the median of its
  two unmeasured neighbours' (median over pairs); the time spent inside the callback's hooks is also timed directly.
  The overhead at the default interval N = 50 is ``extra / (N x unmeasured step)``; an unmeasured step costs the
  hooks' early returns (timed directly, microseconds).
* ``digits``: the quickstart run (configs/quickstart.yaml: the digits ViT, CSV logger) fitted twice, without and
  with all three callbacks at their defaults (``BranchGradients()``, ``MaskedInputLoss()``,
  ``SubBranchPictures()``), alternating the order over rounds. Reported: the time spent inside the callbacks' hooks
  as a fraction of the fit (timed directly in the run with callbacks: insensitive to machine load), and the wall-time
  ratio of the two fits (what a user sees; noisy on a shared machine).

    python benchmarks/callback_overhead.py                  # vit-s-d4 step + 25-epoch digits fits
    python benchmarks/callback_overhead.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import _common as C
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from masksub_lightning import MaskSubModule
from masksub_lightning.callbacks import BranchGradients, MaskedInputLoss, SubBranchPictures
from masksub_lightning.data import DigitsDataModule

GOAL = 1.02
DEFAULT_INTERVAL = BranchGradients().every_n_steps
HOOKS = (
    "on_train_batch_start",
    "after_main_backward",
    "before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
)
QUICKSTART_VIT = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0)


class HookTimer:
    """Wraps the hook methods of callbacks on the instance: seconds spent per (callback, hook) call."""

    def __init__(self, callbacks: list[Any]) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        for callback in callbacks:
            for hook in HOOKS:  # the hooks the callback defines (not Callback's no-ops)
                if getattr(type(callback), hook, None) not in (None, getattr(Callback, hook, None)):
                    setattr(callback, hook, self._timed(type(callback).__name__, getattr(callback, hook)))

    def _timed(self, owner: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls[f"{owner}.{fn.__name__}"].append(time.perf_counter() - start)

        return wrapper

    def total(self) -> float:
        return sum(sum(v) for v in self.calls.values())


# ----------------------------------------------------------------------------------------------------- vit step
def measure_step(spec: C.ModelSpec, args, device: torch.device) -> dict[str, Any]:
    module = C.build_module(spec, "mask")
    batch = C.make_batch(spec, device)
    probe = BranchGradients(every_n_steps=2)
    timer = HookTimer([probe])
    clock = C.StepClock(device, warmup=0)
    total = args.warmup + 2 * args.steps + 1
    trainer = C.make_trainer(device, args.precision, total, [clock, probe])
    trainer.fit(module, train_dataloaders=C.fixed_loader(batch, total))
    intervals = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]  # interval i = step i (+ loop)
    extras, plain = [], []
    for i in range(args.warmup + (args.warmup % 2), len(intervals) - 1, 2):  # even global steps are measured
        neighbours = [intervals[j] for j in (i - 1, i + 1) if args.warmup <= j < len(intervals) and j % 2]
        if neighbours:
            extras.append(intervals[i] - statistics.median(neighbours))
            plain.extend(neighbours)
    step_s = statistics.median(plain)
    extra_s = statistics.median(extras)
    measured_hooks = [
        a + m + b
        for a, m, b in zip(
            timer.calls["BranchGradients.on_train_batch_start"][::2],
            timer.calls["BranchGradients.after_main_backward"][::2],
            timer.calls["BranchGradients.before_optimizer_step"][::2],
        )
    ]
    idle_hooks = [
        a + m + b
        for a, m, b in zip(
            timer.calls["BranchGradients.on_train_batch_start"][1::2],
            timer.calls["BranchGradients.after_main_backward"][1::2],
            timer.calls["BranchGradients.before_optimizer_step"][1::2],
        )
    ]
    hook_s = statistics.median(measured_hooks[1:] or measured_hooks)
    idle_s = statistics.median(idle_hooks)
    return {
        "model": spec.label,
        "batch_size": spec.batch_size,
        "pairs": len(extras),
        "step_s": step_s,
        "measured_step_extra_ms": extra_s * 1e3,
        "measured_step_hooks_ms": hook_s * 1e3,
        "unmeasured_step_hooks_us": idle_s * 1e6,
        "ratio_every_step": (step_s + extra_s) / step_s,
        "ratio_default": 1 + (extra_s / DEFAULT_INTERVAL + idle_s) / step_s,
        "ratio_default_hooks": 1 + (hook_s / DEFAULT_INTERVAL + idle_s) / step_s,
    }


# ------------------------------------------------------------------------------------------------------- digits
def digits_fit(epochs: int, with_callbacks: bool, log_dir: str) -> tuple[float, float, dict[str, float]]:
    """The quickstart fit; returns (fit seconds, seconds inside the callbacks' hooks, per-hook seconds)."""
    L.seed_everything(0, verbose=False)
    module = MaskSubModule(
        "vit_tiny_patch16_224",
        num_classes=10,
        model_kwargs=QUICKSTART_VIT,
        sub_branch="mask",
        lr=2e-3,
        weight_decay=0.05,
        warmup_epochs=min(2, epochs),
    )
    data = DigitsDataModule(batch_size=64, img_size=32, train_augment=False)
    callbacks = [BranchGradients(), MaskedInputLoss(), SubBranchPictures()] if with_callbacks else []
    timer = HookTimer(callbacks)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(log_dir, name="on" if with_callbacks else "off"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    per_hook = {k: sum(v) for k, v in timer.calls.items()}
    return seconds, timer.total(), per_hook


def measure_digits(args) -> dict[str, Any]:
    off, on, hooks, per_hook = [], [], [], defaultdict(float)
    with tempfile.TemporaryDirectory() as log_dir:
        for round_ in range(args.rounds):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            for with_callbacks in order:
                seconds, inside, parts = digits_fit(args.epochs, with_callbacks, log_dir)
                (on if with_callbacks else off).append(seconds)
                if with_callbacks:
                    hooks.append(inside / seconds)
                    for k, v in parts.items():
                        per_hook[k] += v / args.rounds
                print(
                    f"  digits fit, callbacks {'on ' if with_callbacks else 'off'}: {seconds:.1f} s",
                    flush=True,
                )
    return {
        "epochs": args.epochs,
        "rounds": args.rounds,
        "fit_off_s": statistics.median(off),
        "fit_on_s": statistics.median(on),
        "wall_ratio": statistics.median(b / a for a, b in zip(off, on)),
        "hooks_fraction": statistics.median(hooks),
        "per_hook_s": dict(per_hook),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="preset or timm name for the step measurement")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=25, help="digits fit length (the quickstart's 25)")
    C.add_common_args(parser, rounds=2, warmup=4, steps=30)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = args.model or ["tiny-vit"]
        args.rounds, args.warmup, args.steps, args.epochs = 1, 2, 4, 1
    args.model = args.model or ["vit-s-d4"]
    device = C.setup_run(args)
    env = C.environment(device)
    print(f"callback overhead | {env['device']} | {args.precision} | {' '.join(sys.argv)}", flush=True)

    steps = C.measure_models(args, device, measure_step)
    C.print_table(
        f"BranchGradients on a ViT step: measured steps alternate with unmeasured ones in one fit; "
        f"ratio at every_n_steps={DEFAULT_INTERVAL} (default) = 1 + (extra / {DEFAULT_INTERVAL} + idle hooks) / step",
        steps,
        [
            ("model", "model", "s"),
            ("batch_size", "batch", "d"),
            ("pairs", "pairs", "d"),
            ("step_s", "step s", ".4f"),
            ("measured_step_extra_ms", "measured step +ms", "+.2f"),
            ("measured_step_hooks_ms", "in hooks ms", ".2f"),
            ("unmeasured_step_hooks_us", "idle hooks us", ".1f"),
            ("ratio_every_step", "ratio every step", ".4f"),
            ("ratio_default", "ratio default", ".4f"),
            ("ratio_default_hooks", "ratio default (hooks)", ".4f"),
        ],
    )
    digits = measure_digits(args) if args.device == "cpu" else None
    if digits is not None:
        C.print_table(
            "digits quickstart fit, all three callbacks at their defaults vs none (alternating fits)",
            [digits],
            [
                ("epochs", "epochs", "d"),
                ("rounds", "rounds", "d"),
                ("fit_off_s", "off s", ".1f"),
                ("fit_on_s", "on s", ".1f"),
                ("wall_ratio", "wall ratio", ".4f"),
                ("hooks_fraction", "time in hooks / fit", ".4f"),
            ],
        )
        for hook, seconds in sorted(digits["per_hook_s"].items()):
            print(f"  {hook}: {seconds:.3f} s per fit")
    goal_met = all(r["ratio_default"] <= GOAL for r in steps) and (
        digits is None or 1 + digits["hooks_fraction"] <= GOAL
    )
    C.emit_json(
        {
            "benchmark": "callback_overhead",
            **env,
            "args": vars(args),
            "steps": steps,
            "digits": digits,
            "goal_met": goal_met,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
