"""Shared pieces of the benchmarks.

* model specs: small CPU presets whose compute still dominates a step, tiny ``--smoke`` presets, or any timm name;
* a loader that hands out one pre-built batch every step (no decoding, no collation: we time the step, not data);
* ``MaskSubModule`` / ``Trainer`` factories with identical settings for every variant;
* ``StepClock``: a callback (or a plain-loop helper) that timestamps the start of every training batch;
* ``count_step_flops``: model FLOPs of one MaskSub step, per branch, with ``FlopCounterMode``;
* round-robin interleaving of variants, ratio statistics, a text table and the final JSON line.

Scripts run as ``python benchmarks/<script>.py``; Python puts ``benchmarks/`` on ``sys.path``, so ``import _common`` works.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import lightning as L
import timm
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from masksub_lightning.modules.masksub import MaskSubModule

# ------------------------------------------------------------------------------------------------- model specs


@dataclass(frozen=True)
class ModelSpec:
    """A network to benchmark: timm name, extra ``create_model`` kwargs, input side, classes, default batch."""

    name: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    num_classes: int = 1000
    batch_size: int = 64
    preset: str = ""  # the PRESETS key it came from, if any

    @property
    def label(self) -> str:
        return self.preset or f"{self.name}@{self.img_size}"


PRESETS: dict[str, ModelSpec] = {
    # CPU: ViT-S width (384, 6 heads) at depth 4; 112 px with 8 px patches gives 196 patch tokens + 1 class token,
    # the same sequence as ViT-B/16 at 224, so the sub-branch runs 1 + 98 of 197 tokens exactly as on the GPU.
    "vit-s-d4": ModelSpec("vit_small_patch16_224", dict(img_size=112, patch_size=8, depth=4), 112, 1000, 8),
    # CPU: ResNet-18 at 128 px (4 x 4 cells of 32 px, half of them zeroed in the sub-branch).
    "resnet18": ModelSpec("resnet18", {}, 128, 1000, 16),
    # CPU: BEiT v2 at the same ViT-S width, depth and 197-token sequence (relative position bias per block, no
    # absolute position embedding): the sub-branch runs 1 + 98 tokens with each block's bias gathered at them.
    "beit-s-d4": ModelSpec(
        "beitv2_base_patch16_224",
        dict(img_size=112, patch_size=8, embed_dim=384, depth=4, num_heads=6),
        112,
        1000,
        8,
    ),
    # --smoke: the tiny members of the same families the unit tests use (same code paths, milliseconds per step).
    "tiny-vit": ModelSpec(
        "vit_small_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
        32,
        10,
        16,
    ),
    "tiny-beit": ModelSpec(
        "beitv2_base_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
        32,
        10,
        16,
    ),
    "tiny-resnet": ModelSpec(
        "resnet18", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 32), stem_width=8), 64, 10, 16
    ),
}


def resolve_spec(
    name: str, img_size: int | None = None, batch_size: int | None = None, num_classes: int = 1000
) -> ModelSpec:
    """A preset by key, or a timm model name at ``img_size`` (default: the model's own input size).

    Models with a fixed input size (ViTs: position embeddings) are built for ``img_size``; others take any size.
    """
    if name in PRESETS:
        spec = PRESETS[name]
        if img_size is not None and img_size != spec.img_size:
            raise SystemExit(
                f"preset {name!r} is defined at {spec.img_size} px; use a timm name to change it"
            )
        return replace(spec, batch_size=batch_size or spec.batch_size, preset=name)
    if not timm.is_model(name):
        raise SystemExit(f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) or a timm model name")
    cfg = timm.get_pretrained_cfg(name)
    size = img_size or (cfg.input_size[-1] if cfg else 224)
    kwargs = {"img_size": size} if cfg is not None and cfg.fixed_input_size else {}
    return ModelSpec(name, kwargs, size, num_classes, batch_size or 64)


def build_module(
    spec: ModelSpec,
    sub_branch: str,
    *,
    seed: int = 0,
    compile: bool = False,
    channels_last: bool = False,
    fused_adamw: bool = False,
    sub_ratio: float = 0.5,
) -> MaskSubModule:
    """A MaskSubModule with the same network weights (same seed) and optimizer settings for every variant."""
    torch.manual_seed(seed)
    return MaskSubModule(
        spec.name,
        num_classes=spec.num_classes,
        model_kwargs=dict(spec.model_kwargs),
        sub_branch=sub_branch,
        sub_ratio=sub_ratio,
        optimizer="adamw",
        optimizer_kwargs={"fused": True} if fused_adamw else None,
        scheduler="cosine",
        compile=compile,
        channels_last=channels_last,
    )


def channels_last_for(spec: ModelSpec, mode: str) -> bool:
    """``mode`` "on" / "off", or "auto": channels-last for CNNs only. A model built for a fixed input size
    (``img_size`` in its kwargs: position embeddings) is taken for a transformer, where it buys nothing."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"channels-last mode must be 'auto', 'on' or 'off', got {mode!r}")
    return mode == "on" or (mode == "auto" and "img_size" not in spec.model_kwargs)


# ---------------------------------------------------------------------------------------------------------- data


class FixedBatch(Dataset):
    """``length`` items, each the same whole batch: the loader then costs a Python call per step, nothing else."""

    def __init__(self, images: Tensor, target: Tensor, length: int) -> None:
        self.images, self.target, self.length = images, target, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images, self.target


def make_batch(
    spec: ModelSpec, device: torch.device, channels_last: bool = False, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Random images and hard labels, already on ``device`` (and channels-last if asked: no per-step copy)."""
    g = torch.Generator().manual_seed(seed)
    batch_size = spec.batch_size
    images = torch.randn(batch_size, 3, spec.img_size, spec.img_size, generator=g)
    target = torch.randint(0, spec.num_classes, (batch_size,), generator=g)
    images = images.to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device)


def fixed_loader(batch: tuple[Tensor, Tensor], steps: int) -> DataLoader:
    # batch_size=None: no automatic batching, the pre-built batch passes through untouched.
    return DataLoader(FixedBatch(*batch, length=steps), batch_size=None, shuffle=False)


# ------------------------------------------------------------------------------------------------------ trainer


def quiet() -> None:
    """Silence Lightning's per-fit banners and the warnings a synthetic, validation-free run triggers."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*validation_step.*")
    warnings.filterwarnings("ignore", message=r".*val_dataloader.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*every_n_train_steps.*")


def make_trainer(
    device: torch.device, precision: str, max_steps: int, callbacks: list[Callback]
) -> L.Trainer:
    """A Trainer that only trains: no logger, checkpoint, progress bar, summary or validation."""
    return L.Trainer(
        accelerator="cuda" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        benchmark=device.type == "cuda",  # cudnn autotuning, as any GPU training run would use
        callbacks=callbacks,
    )


# ------------------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(Callback):
    """Timestamps (``time.perf_counter``) the start of every training batch.

    The interval between two batch starts is one full step as the loop runs it: the step itself plus whatever
    the loop does between steps (fetching the batch, hooks, logging bookkeeping). Run ``warmup + steps + 1``
    batches to get ``steps`` measured intervals after ``warmup`` discarded ones.

    It also timestamps ``on_before_optimizer_step`` (Lightning calls it inside ``opt.step()``, after both backward
    passes): batch start to there is the forward / backward compute, the part FLOP counts describe; the rest of
    the step is the optimizer, the schedule, logging and the loop.

    Args:
        device: CUDA devices are synchronized before a timestamp is taken.
        warmup: leading batches whose time is discarded.
        sync_every_step: synchronize at every batch (per-step times, median-able) or only at the first and last
            measured timestamps (one window mean; lets the CPU run ahead of the GPU as in real training).
    """

    def __init__(self, device: torch.device, warmup: int, sync_every_step: bool = True) -> None:
        self.device, self.warmup, self.sync_every_step = device, warmup, sync_every_step
        self.stamps: list[float] = []
        self.before_optimizer: list[float] = []
        self.expected: int | None = None

    def tick(self) -> None:
        index = len(self.stamps)
        if self.sync_every_step or index == self.warmup or index == self.expected:
            synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.expected = trainer.max_steps - 1  # index of the last timestamp (start of the extra batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.tick()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.sync_every_step:
            synchronize(self.device)
        self.before_optimizer.append(time.perf_counter())

    def compute_times(self) -> list[float]:
        """Per step: batch start to ``on_before_optimizer_step`` (forward + backward of every branch)."""
        return [b - a for a, b in zip(self.stamps, self.before_optimizer)]

    def step_time(self) -> float:
        """Median step time (per-step sync) or window mean (sync at the ends only), in seconds."""
        measured = self.stamps[self.warmup :]
        if len(measured) < 2:
            raise RuntimeError(f"need warmup + 2 timestamps at least, got {len(self.stamps)}")
        if self.sync_every_step:
            return statistics.median(b - a for a, b in itertools.pairwise(measured))
        return (measured[-1] - measured[0]) / (len(measured) - 1)


def run_lightning(
    module: MaskSubModule,
    batch: tuple[Tensor, Tensor],
    device: torch.device,
    precision: str,
    total_steps: int,
    clock: StepClock,
) -> None:
    """Fit ``module`` for ``total_steps`` optimizer steps on the fixed batch, ``clock`` timing the steps."""
    trainer = make_trainer(device, precision, total_steps, [clock])
    trainer.fit(module, train_dataloaders=fixed_loader(batch, total_steps))
    if trainer.global_step != total_steps:
        raise RuntimeError(f"expected {total_steps} optimizer steps, Lightning ran {trainer.global_step}")


def time_lightning(
    module: MaskSubModule,
    batch: tuple[Tensor, Tensor],
    device: torch.device,
    precision: str,
    warmup: int,
    steps: int,
    sync_every_step: bool = True,
) -> float:
    """Fit for ``warmup + steps + 1`` optimizer steps; return the step time (``StepClock.step_time``)."""
    clock = StepClock(device, warmup, sync_every_step)
    run_lightning(module, batch, device, precision, warmup + steps + 1, clock)
    return clock.step_time()


class InterleavedClock(StepClock):
    """A step clock that sets each step's variant before it starts, in blocks A B C, C B A, A B C, ...

    Every variant runs once per block, seconds from the others, which cancels the load swings of a shared machine.
    ``switch(pl_module, variant)`` applies a variant to the module; :attr:`variants` records each step's.
    """

    def __init__(
        self, device: torch.device, order: Sequence[str], switch: Callable[[Any, str], None]
    ) -> None:
        super().__init__(device, warmup=0, sync_every_step=True)
        self.order, self.switch = tuple(order), switch
        self.variants: list[str] = []

    def variant_of(self, step: int) -> str:
        block, position = divmod(step, len(self.order))
        return (self.order if block % 2 == 0 else self.order[::-1])[position]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)  # the previous step ends first
        variant = self.variant_of(len(self.variants))
        self.switch(pl_module, variant)
        self.variants.append(variant)


def interleaved_step_times(
    module: Any,
    batch: tuple[Tensor, Tensor],
    device: torch.device,
    args: Any,
    make_clock: Callable[[], InterleavedClock],
) -> dict[str, list[float]]:
    """Per-step times of each variant over ``args.rounds`` fits of ``module`` (``args.warmup`` blocks discarded,
    ``args.steps`` measured per fit): ``{variant: [s, ...], variant + "_compute": [forward + backward s, ...]}``."""
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        clock = make_clock()
        n = len(clock.order)
        total = n * (args.warmup + args.steps) + 1  # +1: the last measured step ends at the next batch start
        run_lightning(module, batch, device, args.precision, total, clock)
        compute = clock.compute_times()
        for i in range(n * args.warmup, total - 1):
            variant = clock.variants[i]
            times.setdefault(variant, []).append(clock.stamps[i + 1] - clock.stamps[i])
            times.setdefault(variant + "_compute", []).append(compute[i])
    return times


def interleave(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every variant once per round, alternating the order (A B, B A, ...) so drift hits all alike."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            times[name].append(variants[name]())
            # Progress with the fit's wall time (the first fit of a compiled module includes compilation):
            # a run cut short by a time limit still leaves its finished measurements in the log.
            print(
                f"  round {r + 1}/{rounds} {name}: {times[name][-1]:.5f} s/step "
                f"(fit wall {time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    return times


def ratio_stats(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """Paired ratios (both terms measured side by side) and their median, quartiles, min and max."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {
        "median": statistics.median(ratios),
        "q1": q1,
        "q3": q3,
        "min": min(ratios),
        "max": max(ratios),
        "rounds": [round(r, 4) for r in ratios],
    }


# -------------------------------------------------------------------------------------------------------- FLOPs

# On CPU, scaled_dot_product_attention runs a kernel FlopCounterMode has no formula for (torch 2.14 counts only the
# CUDA flash / efficient / cuDNN kernels), so ViT attention would silently count as zero. Same formulas, CPU ops.
_aten = torch.ops.aten
_CPU_SDPA_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    ),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v)
    ),
}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS)


def count_step_flops(module: MaskSubModule, batch: tuple[Tensor, Tensor], max_count_batch: int = 8) -> dict:
    """Model FLOPs (matmul / conv / attention, forward + backward) of one training step, per branch.

    Runs the step's compute the way ``training_step`` does (main forward + loss + backward, then the sub-branch
    through ``module.sub_branch_forward``) on the first ``max_count_batch`` samples and scales to the full batch:
    every sample costs the same (the token mask keeps the same count per sample), so the count is exact.
    The optimizer is not counted (elementwise; no matmul FLOPs).
    """
    images, target = batch
    n = min(max_count_batch, images.shape[0])
    scale = images.shape[0] / n
    images, target = images[:n], target[:n]
    model = module.model.to(images.device)
    was_training = model.training
    model.train()
    with flop_counter() as counter:
        main_logits = module(images)
        loss_main = module.main_loss(main_logits, target)
        (loss_main / 2).backward()
    flops = {"main": counter.get_total_flops() * scale, "sub": 0.0}
    if module.sub_branch.active:
        with flop_counter() as counter:
            sub_logits = module.sub_branch_forward(images)
            loss_sub = module.sub_loss(sub_logits, main_logits.detach())
            (loss_sub / 2).backward()
        flops["sub"] = counter.get_total_flops() * scale
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    flops["total"] = flops["main"] + flops["sub"]
    return flops


# ------------------------------------------------------------------------------------------------------- output


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """What a figure depends on: date, device, library versions, threads."""
    import lightning

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "date": datetime.date.today().isoformat(),
        "device": f"{device.type}: {name}",
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
    }


def print_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """``columns``: (key, header, format spec). Missing / None values print as '-'."""

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return format(value, fmt)

    cells = [[cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    print(flush=True)


def measure_models(
    args, device: torch.device, measure: Callable[..., dict[str, Any]]
) -> list[dict[str, Any]]:
    """Run ``measure(spec, args, device)`` for every model preset named in ``args.model``, in order."""
    results = []
    for name in args.model:
        spec = resolve_spec(name, args.img_size, args.batch_size)
        print(f"measuring {spec.label}, batch {spec.batch_size} ...", flush=True)
        start = time.perf_counter()
        results.append(measure(spec, args, device))
        # One line per model as soon as it is done (kept if a later model runs past a time limit).
        print(
            f"done {spec.label} in {time.perf_counter() - start:.1f} s: {json.dumps(results[-1], default=float)}",
            flush=True,
        )
    return results


def emit_json(payload: dict[str, Any]) -> None:
    """The last line of stdout: one JSON object (what tests and scripts parse)."""
    print(json.dumps(payload, default=float), flush=True)


def add_common_args(parser, rounds: int, warmup: int, steps: int) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument(
        "--rounds", type=int, default=rounds, help="interleaved rounds (one fit per variant each)"
    )
    parser.add_argument(
        "--warmup", type=int, default=warmup, help="discarded steps at the start of every fit"
    )
    parser.add_argument("--steps", type=int, default=steps, help="measured steps per fit")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default on CPU: 1, see README: 2 OpenMP threads on a shared 2-core box "
        "swing 0.5-4 s per step when another job runs; 1 thread is slower but steady)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models, few steps: checks the script runs")


def setup_run(args) -> torch.device:
    """Common start of every script: threads, quiet logs, the device (refused if CUDA is asked but absent)."""
    quiet()
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return device
