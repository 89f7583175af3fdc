"""Framework overhead: MaskSubModule in a Lightning Trainer vs a plain PyTorch loop doing the same step.

The plain loop below is written out by hand: main forward, ``backward(L_main / 2)``, the sub-branch forward
through the *same* ``SubBranch`` object, ``backward(L_sub / 2)``, optimizer step, zero grad, scheduler step. It
uses the module's own network, loss and sub-branch objects and an optimizer / schedule built by the same factories
with the same settings, and it reads the same fixed-batch DataLoader, so the two differ only by what Lightning adds
(loop, hooks, ``LightningOptimizer``, ``toggle_model``, ``self.log``, the accuracy metric).

Both are timed batch start to batch start (everything the loop does per step counts). Two ways to pair them
(``--interleave``):

* ``step`` (CPU default): in one Lightning fit, a callback runs one plain-loop step after every Lightning step
  (own loader iterator, optimizer and schedule; timed on its own); Lightning's step is the batch-to-batch interval
  minus that plain step. Each Lightning step is paired with the plain step right after it.
* ``fit`` (GPU default): alternating fits and plain runs; on GPU each is one window synchronized only at its ends,
  so the CPU runs ahead of the GPU as in real training (a host sync inside the step shows up here).

The ratio is the median of the paired ratios. Goal: Lightning at most 2% slower. The absolute difference (ms per
step) is printed too: it is what carries over to other step sizes. ``--log-ablation`` adds a diagnostic Lightning
run with the module's per-step logging disabled. Steps per fit are calibrated to about ``--budget`` seconds.

    python benchmarks/overhead.py                       # tiny-vit (overhead-dominated) and vit-s-d4 (compute)
    python benchmarks/overhead.py --smoke
    python benchmarks/overhead.py --model vit_base_patch16_224 --batch-size 256 --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import _common as C
import torch

from masksub_lightning.training.optim import build_optimizer, build_scheduler

GOAL = 1.02


class PlainLoop:
    """The step of ``MaskSubModule.training_step`` in plain PyTorch, on the module's own network, loss and
    sub-branch objects, with an optimizer and schedule from the same factories and settings."""

    def __init__(self, module, device: torch.device, precision: str, total_steps: int) -> None:
        hp = self.hp = module.hparams
        self.model, self.criterion, self.sub_branch = module.model, module.criterion, module.sub_branch
        self.device = device
        self.model.to(device)
        if hp.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if hp.compile and not getattr(self.model, "_compiled_call_impl", None):
            self.model.compile()  # shares the compiled graphs with the Lightning run of the same module
        self.model.train()
        self.optimizer = build_optimizer(
            self.model, hp.optimizer, hp.lr, hp.weight_decay, hp.layer_decay, **(hp.optimizer_kwargs or {})
        )
        self.scheduler = build_scheduler(
            self.optimizer, hp.scheduler, total_steps, 0, hp.warmup_lr, hp.min_lr
        )
        self.bf16 = precision == "bf16-mixed"
        self.updates = 0

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, images: torch.Tensor, target: torch.Tensor) -> None:
        model, criterion, sub_branch = self.model, self.criterion, self.sub_branch
        images = images.to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)
        if self.hp.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        with self.autocast():
            main_logits = model(images)
            loss_main = criterion.main(main_logits, target)
        if sub_branch.active:
            (loss_main / 2).backward()  # frees the main graph before the sub-branch runs
            main_logits = main_logits.detach()
            with self.autocast():
                sub_logits = sub_branch.forward(model, images)
                loss_sub = criterion.sub(sub_logits, criterion.sub_target(main_logits))
            (loss_sub / 2).backward()
        else:
            loss_main.backward()

        if self.hp.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.hp.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.scheduler.step_update(num_updates=self.updates)


def plain_step_time(
    module,
    batch: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    precision: str,
    warmup: int,
    steps: int,
    sync_every_step: bool = True,
) -> float:
    """A plain loop over the fixed-batch loader, timed like ``_common.time_lightning`` (``warmup + steps + 1``
    steps, batch-start timestamps); returns the step time."""
    total = warmup + steps + 1
    loop = PlainLoop(module, device, precision, total)
    clock = C.StepClock(device, warmup, sync_every_step)
    clock.expected = total - 1
    for images, target in C.fixed_loader(batch, total):
        clock.tick()
        loop.step(images, target)
    return clock.step_time()


class PlainStepAfterEachBatch(C.StepClock):
    """Step-level pairing: after every Lightning step, one plain-loop step (its own loader iterator, optimizer
    and schedule) timed on its own. Lightning's step i is then (batch start i+1 - batch start i) minus the plain
    step that ran in between, so both are measured seconds apart, under the same machine load."""

    def __init__(self, module, batch, device: torch.device, precision: str, total_steps: int) -> None:
        super().__init__(device, warmup=0, sync_every_step=True)
        self.loop = PlainLoop(module, device, precision, total_steps)
        self.batches = iter(C.fixed_loader(batch, total_steps))
        self.plain: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        C.synchronize(self.device)
        start = time.perf_counter()
        self.loop.step(*next(self.batches))  # fetching from the loader is part of the plain loop's step
        C.synchronize(self.device)
        self.plain.append(time.perf_counter() - start)

    def paired(self, warmup: int) -> tuple[list[float], list[float]]:
        between = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        lightning = [t - p for t, p in zip(between, self.plain)]
        return lightning[warmup:], self.plain[warmup : len(lightning)]


def paired_step_times(module, batch, device, precision: str, warmup: int, steps: int):
    total = warmup + steps + 1
    clock = PlainStepAfterEachBatch(module, batch, device, precision, total)
    C.run_lightning(module, batch, device, precision, total, clock)
    return clock.paired(warmup)


@contextlib.contextmanager
def per_step_logging_disabled(module):
    """Diagnostic only (``--log-ablation``): the module's per-step logging (``_log_step``, its ``self.log`` calls)
    replaced by a no-op, to show how much of the overhead is per-step logging."""
    module._log_step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module._log_step


def calibrate_steps(module, batch, device, precision: str, budget_s: float) -> int:
    """Measured steps per fit so that one fit measures about ``budget_s`` seconds (3 at least)."""
    step_s = C.time_lightning(module, batch, device, precision, warmup=1, steps=2)
    return max(3, min(500, round(budget_s / step_s)))


def measure(spec: C.ModelSpec, args, device) -> dict:
    module = C.build_module(
        spec,
        args.sub_branch,
        compile=args.compile,
        channels_last=args.channels_last,
        fused_adamw=args.fused_adamw,
    )
    batch = C.make_batch(spec, device, channels_last=args.channels_last)
    steps = args.steps or calibrate_steps(module, batch, device, args.precision, args.budget)
    mode = args.interleave or ("step" if device.type == "cpu" else "fit")
    # Lightning configurations, each compared with the plain loop: as shipped, and (diagnostic) without logging.
    configs = {"lightning": contextlib.nullcontext}
    if args.log_ablation:
        configs["lightning_no_log"] = lambda: per_step_logging_disabled(module)

    pairs: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in configs}
    if mode == "step":
        for _ in range(args.rounds):
            for name, context in configs.items():
                with context():
                    light, plain = paired_step_times(
                        module, batch, device, args.precision, args.warmup, steps
                    )
                pairs[name][0].extend(light)
                pairs[name][1].extend(plain)
    else:
        # GPU: one synchronized window per fit, so the CPU can run ahead as in real training.
        timed = dict(
            device=device,
            precision=args.precision,
            warmup=args.warmup,
            steps=steps,
            sync_every_step=device.type != "cuda",
        )

        def lightning_fit(context) -> float:
            with context():
                return C.time_lightning(module, batch, **timed)

        variants = {name: (lambda c=context: lightning_fit(c)) for name, context in configs.items()}
        variants["plain"] = lambda: plain_step_time(module, batch, **timed)
        times = C.interleave(variants, args.rounds)
        pairs = {name: (times[name], times["plain"]) for name in configs}

    def summary(light: list[float], plain: list[float]) -> dict:
        ratio = C.ratio_stats(light, plain)
        return {
            "plain_step_s": statistics.median(plain),
            "lightning_step_s": statistics.median(light),
            "overhead_ms": statistics.median(a - b for a, b in zip(light, plain)) * 1e3,
            "ratio": ratio["median"],
            "ratio_q1": ratio["q1"],
            "ratio_q3": ratio["q3"],
            "pairs": len(light),
        }

    row = {
        "model": spec.label,
        "batch_size": spec.batch_size,
        "sub_branch": args.sub_branch,
        "interleave": mode,
        "steps_per_fit": steps,
        **summary(*pairs["lightning"]),
    }
    row["goal_met"] = row["ratio"] <= GOAL
    if args.log_ablation:
        no_log = summary(*pairs["lightning_no_log"])
        row["overhead_without_logging_ms"] = no_log["overhead_ms"]
        row["ratio_without_logging"] = no_log["ratio"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="preset or timm name; repeatable")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--sub-branch", default="mask", help="sub-branch kind of both sides (none: baseline)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--fused-adamw", action="store_true")
    parser.add_argument(
        "--interleave",
        choices=["step", "fit"],
        default=None,
        help="step: a plain step after every Lightning step, paired (CPU default); "
        "fit: alternating fits, window-timed on GPU (GPU default)",
    )
    parser.add_argument(
        "--log-ablation",
        action="store_true",
        help="also time Lightning with the module's per-step logging disabled (diagnostic)",
    )
    parser.add_argument("--budget", type=float, default=6.0, help="measured seconds per fit (sets --steps)")
    C.add_common_args(parser, rounds=7, warmup=2, steps=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = args.model or ["tiny-vit"]
        args.rounds, args.warmup, args.steps = min(args.rounds, 2), 1, args.steps or 5
    args.model = args.model or ["tiny-vit", "vit-s-d4"]
    device = C.setup_run(args)
    env = C.environment(device)
    print(f"framework overhead | {env['device']} | {args.precision} | {' '.join(sys.argv)}", flush=True)

    results = C.measure_models(args, device, measure)

    C.print_table(
        "Lightning MaskSubModule vs plain PyTorch loop, same two-branch step: median of paired ratios [quartiles]",
        results,
        [
            ("model", "model", "s"),
            ("batch_size", "batch", "d"),
            ("sub_branch", "sub", "s"),
            ("interleave", "interleave", "s"),
            ("pairs", "pairs", "d"),
            ("plain_step_s", "plain s/step", ".4f"),
            ("lightning_step_s", "Lightning s/step", ".4f"),
            ("overhead_ms", "overhead ms/step", "+.2f"),
            ("ratio", "ratio", ".4f"),
            ("ratio_q1", "q1", ".4f"),
            ("ratio_q3", "q3", ".4f"),
            ("goal_met", f"ratio<={GOAL}", ""),
            ("overhead_without_logging_ms", "ms/step w/o logging", "+.2f"),
            ("ratio_without_logging", "ratio w/o logging", ".4f"),
        ],
    )
    C.emit_json({"benchmark": "overhead", **env, "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
