"""Peak memory of a MaskSub step vs the baseline step (goal: MaskSub / baseline <= 1.05).

``MaskSubModule.training_step`` backpropagates ``L_main / 2`` before the sub-branch runs, so the main branch's
graph is freed first and the step's peak should be one branch's peak. Measured inside a Lightning ``Trainer`` on
steps after ``--warmup`` (the optimizer state exists by then), the two variants alternating for ``--rounds``.

What is measured (same figures on both devices; "allocated" = bytes of tensors handed out by torch's allocator):

* GPU: ``torch.cuda.max_memory_allocated`` over the step (peak stats reset at the step start), and
  ``memory_allocated`` at the step start. Everything live counts (weights, optimizer state, batch, activations).
* CPU: torch's CPU allocator reports every allocation and free to the profiler (``profile_memory=True``); the
  running sum of those events over the step gives the peak *above the step start*. The bytes live at the step
  start are counted from the tensors the step keeps (parameters, buffers, gradients, optimizer state, batch), so
  "peak" is comparable to the GPU figure. Not seen: memory outside torch's allocator (oneDNN scratch pads, Python).

Each step is also split where the sub-branch starts (a wrapper around ``module.sub_branch_forward``): the main
phase peak, what is still live when the sub-branch starts (should be the gradients, not the main graph), and the
sub phase peak.

    python benchmarks/memory.py                  # CPU presets (vit-s-d4 at batch 8, resnet18 at batch 16)
    python benchmarks/memory.py --smoke
    python benchmarks/memory.py --model vit_base_patch16_224 --batch-size 256 --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import sys

import _common as C
import torch
from lightning.pytorch.callbacks import Callback
from torch.profiler import ProfilerActivity, profile, record_function

GOAL = 1.05
MiB = 2**20


def live_state_bytes(module, optimizer, batch) -> int:
    """Bytes of the tensors a step starts with: weights, buffers, gradients, optimizer state and the batch."""
    tensors = [*module.parameters(), *module.buffers(), *batch]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class StepMemory(Callback):
    """Peak memory of the training steps after ``warmup``, split where the sub-branch starts."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.steps: list[dict[str, float]] = []
        self._index = 0
        self._profiler: profile | None = None
        self._annotation: record_function | None = None

    # --- wiring ------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        original = pl_module.sub_branch_forward

        def marked_sub_branch_forward(images):
            self._mark_sub_branch_start()
            return original(images)

        # An instance attribute shadows the method for this fit only; on_train_end removes it.
        pl_module.sub_branch_forward = marked_sub_branch_forward
        self._restore = lambda: vars(pl_module).pop("sub_branch_forward", None)
        if self.device.type == "cpu":
            # One profiler over all measured steps: frees of blocks allocated before it started are not reported.
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._current = None
        if self._index < self.warmup:
            return
        self._current = {"start": float(live_state_bytes(pl_module, trainer.optimizers[0], batch))}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._current["start"] = float(torch.cuda.memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            if self._index == self.warmup:
                self._profiler.start()
            self._annotation = record_function("bench.step")
            self._annotation.__enter__()

    def _mark_sub_branch_start(self) -> None:
        if self._current is None:
            return
        if self.device.type == "cuda":
            self._current["main_peak"] = float(torch.cuda.max_memory_allocated(self.device))
            self._current["at_sub_start"] = float(torch.cuda.memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with record_function("bench.sub_branch_start"):
                pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._index += 1
        if self._current is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = float(torch.cuda.max_memory_allocated(self.device))
            if "main_peak" in self._current:
                self._current["sub_peak"] = peak
            else:
                self._current["main_peak"] = peak
        else:
            self._annotation.__exit__(None, None, None)
        self.steps.append(self._current)
        if self._profiler is not None and self._index == trainer.max_steps:
            self._profiler.stop()
            self._read_cpu_profile()

    def _read_cpu_profile(self) -> None:
        """Replay the allocator's events: running sum of bytes, per step window, split at the sub-branch mark."""
        events = sorted(self._profiler.profiler.kineto_results.events(), key=lambda e: e.start_ns())
        windows = [(e.start_ns(), e.end_ns()) for e in events if e.name() == "bench.step"]
        marks = [e.start_ns() for e in events if e.name() == "bench.sub_branch_start"]
        memory = [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"]
        assert len(windows) == len(self.steps), (len(windows), len(self.steps))
        live, i = 0, 0
        for (begin, end), step in zip(windows, self.steps):
            while i < len(memory) and memory[i][0] < begin:  # between steps (loop bookkeeping)
                live += memory[i][1]
                i += 1
            base = live
            mark = next((m for m in marks if begin <= m <= end), None)
            peaks = {"main": 0, "sub": 0}
            at_mark = None
            while i < len(memory) and memory[i][0] <= end:
                t, nbytes = memory[i]
                if mark is not None and t >= mark and at_mark is None:
                    at_mark = live - base
                live += nbytes
                phase = "sub" if mark is not None and t >= mark else "main"
                peaks[phase] = max(peaks[phase], live - base)
                i += 1
            step["main_peak"] = step["start"] + peaks["main"]
            if mark is not None:
                step["at_sub_start"] = step["start"] + (at_mark if at_mark is not None else live - base)
                step["sub_peak"] = step["start"] + peaks["sub"]


def measure_once(module, batch, device, precision: str, warmup: int, steps: int) -> list[dict[str, float]]:
    recorder = StepMemory(device, warmup)
    trainer = C.make_trainer(device, precision, warmup + steps, [recorder])
    trainer.fit(module, train_dataloaders=C.fixed_loader(batch, warmup + steps))
    for step in recorder.steps:
        step["peak"] = max(step["main_peak"], step.get("sub_peak", 0.0))
    return recorder.steps


def measure(spec: C.ModelSpec, args, device) -> dict:
    channels_last = C.channels_last_for(spec, args.channels_last)
    modules = {
        variant: C.build_module(spec, kind, channels_last=channels_last, sub_ratio=args.sub_ratio)
        for variant, kind in (("baseline", "none"), ("masksub", "mask"))
    }
    batch = C.make_batch(spec, device, channels_last=channels_last)
    steps = {variant: [] for variant in modules}
    for r in range(args.rounds):  # alternate, as for timings (memory should not drift, this shows if it does)
        for variant in modules if r % 2 == 0 else reversed(modules):
            steps[variant] += measure_once(
                modules[variant], batch, device, args.precision, args.warmup, args.steps
            )

    def worst(variant: str, key: str) -> float | None:
        values = [s[key] for s in steps[variant] if key in s]
        return max(values) if values else None

    base, mask = steps["baseline"], steps["masksub"]
    base_peak, mask_peak = worst("baseline", "peak"), worst("masksub", "peak")
    base_start = worst("baseline", "start")
    ratio = mask_peak / base_peak
    return {
        "model": spec.label,
        "batch_size": spec.batch_size,
        "channels_last": channels_last,
        "baseline_start_mib": base_start / MiB,
        "baseline_peak_mib": base_peak / MiB,
        "masksub_main_peak_mib": worst("masksub", "main_peak") / MiB,
        "masksub_at_sub_start_mib": worst("masksub", "at_sub_start") / MiB,
        "masksub_sub_peak_mib": worst("masksub", "sub_peak") / MiB,
        "masksub_peak_mib": mask_peak / MiB,
        "grad_mib": sum(p.numel() * p.element_size() for p in modules["masksub"].parameters()) / MiB,
        "peak_ratio": ratio,
        # Peak above the step start: the activation part alone, the strictest view of "no extra memory".
        "above_start_ratio": (mask_peak - worst("masksub", "start")) / (base_peak - base_start),
        # Largest relative difference between measured steps of one variant (0 when memory is deterministic).
        "peak_spread": max(max(s["peak"] for s in v) / min(s["peak"] for s in v) - 1 for v in (base, mask)),
        "goal_met": ratio <= GOAL,
        "measured_steps": len(base),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="preset or timm name; repeatable")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--sub-ratio", type=float, default=0.5)
    parser.add_argument(
        "--channels-last",
        nargs="?",
        const="on",
        default="off",
        choices=["auto", "on", "off"],
        help="channels-last network and inputs; bare flag: on; auto: CNNs only (for a ViT and a CNN in one run)",
    )
    C.add_common_args(parser, rounds=2, warmup=2, steps=2)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = args.model or ["tiny-vit", "tiny-resnet"]
        args.rounds, args.warmup, args.steps = 1, 1, 1
    args.model = args.model or ["vit-s-d4", "resnet18"]
    device = C.setup_run(args)
    env = C.environment(device)
    source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "CPU allocator events (profiler)"
    print(f"peak memory | {env['device']} | {source} | {args.precision} | {' '.join(sys.argv)}", flush=True)

    results = C.measure_models(args, device, measure)

    C.print_table(
        f"Peak allocated memory per step (MiB): MaskSub (r={args.sub_ratio}) vs baseline",
        results,
        [
            ("model", "model", "s"),
            ("batch_size", "batch", "d"),
            ("baseline_start_mib", "step start", ".1f"),
            ("grad_mib", "grads", ".1f"),
            ("baseline_peak_mib", "base peak", ".1f"),
            ("masksub_main_peak_mib", "MS main peak", ".1f"),
            ("masksub_at_sub_start_mib", "MS at sub start", ".1f"),
            ("masksub_sub_peak_mib", "MS sub peak", ".1f"),
            ("peak_ratio", "peak ratio", ".3f"),
            ("above_start_ratio", "above-start ratio", ".3f"),
            ("peak_spread", "spread", ".1%"),
            ("goal_met", f"ratio<={GOAL}", ""),
        ],
    )
    C.emit_json({"benchmark": "memory", **env, "measure": source, "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
