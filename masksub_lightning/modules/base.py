"""TrainingModule: the one manual-optimization training step that every LightningModule of the package shares.

A subclass writes its forward passes and losses (``training_losses``); this class owns the step around them::

    training_step(batch, batch_idx)
      training_losses(batch)                subclass: forwards, losses, self.backprop(loss) for each backward pass
        self.backprop(loss, last=...)       loss / micro-batches per optimizer step; the DDP / FSDP2 gradient sync
                                            happens only on the last backward of the last micro-batch
      non-finite losses                     nonfinite_loss: stop (default) or skip, decided across ranks
      last micro-batch of its group:
        opt.step()                          Lightning unscales 16-mixed gradients, then on_before_optimizer_step
                                              clips them (here, once, for every module), then the optimizer steps
                                              (the GradScaler skips it if the gradients overflowed)
        zero grad, schedule step, after_optimizer_step() (subclass hook: LUT's teacher), one log row per step

and the run around it: the optimizer and its LR schedule (per step or per epoch, LR scaled with the global batch,
refused on resume when its length changed), the RNG hooks that make resume exact (``masksub_lightning.training.resume``),
``torch.compile`` / channels-last in ``configure_model``, and ``load_from_checkpoint`` with ``weights_only=True``.

The options it reads are constructor arguments of each subclass, under the same names (checked by
:func:`check_training_options`): ``optimizer``, ``lr``, ``lr_base_batch_size``, ``weight_decay``, ``layer_decay``,
``no_weight_decay``, ``optimizer_kwargs``, ``scheduler``, ``lr_interval``, ``warmup_epochs``, ``warmup_lr``, ``min_lr``,
``grad_clip_norm``, ``grad_accumulation``, ``nonfinite_loss``, ``compile``, ``channels_last``.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn

from masksub_lightning.training import checkpoint_io, guards, precision, resume, sharding
from masksub_lightning.training.optim import (
    build_optimizer,
    build_scheduler,
    check_optimizer_name,
    check_scheduler_name,
)

#: Options whose absence from a subclass's hyperparameters means this default.
_DEFAULTS = {
    "layer_decay": None,
    "no_weight_decay": None,
    "optimizer_kwargs": None,
    "lr_interval": "step",
    "grad_clip_norm": None,
    "grad_accumulation": 1,
    "nonfinite_loss": "stop",
    "compile": False,
    "channels_last": False,
}


def check_training_options(options: Mapping[str, Any]) -> None:
    """Refuse a bad training option at construction, with one line naming it, its value and what is allowed."""
    get = {**_DEFAULTS, **options}.get
    check_positive("lr", get("lr"))
    if get("lr_base_batch_size") is not None:
        check_positive("lr_base_batch_size", get("lr_base_batch_size"), integer=True)
    for name in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr"):
        value = get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    layer_decay = get("layer_decay")
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    no_decay = get("no_weight_decay")
    if no_decay is not None and (isinstance(no_decay, str) or not all(isinstance(n, str) for n in no_decay)):
        raise ValueError(
            f"no_weight_decay must be a list of parameter names such as ['cls_token'], got {no_decay!r}"
        )
    if get("grad_clip_norm") is not None:
        check_positive("grad_clip_norm", get("grad_clip_norm"))
    check_positive("grad_accumulation", get("grad_accumulation"), integer=True)
    check_optimizer_name(get("optimizer"))
    check_scheduler_name(get("scheduler"))
    if get("lr_interval") not in ("step", "epoch"):
        raise ValueError(f"lr_interval must be 'step' or 'epoch', got {get('lr_interval')!r}")
    if get("nonfinite_loss") not in ("stop", "skip"):
        raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {get('nonfinite_loss')!r}")


@dataclass
class _MicroBatch:
    """Backward bookkeeping of the micro-batch being trained."""

    scale: float  # 1 / micro-batches in its optimizer step: the step applies their mean gradient
    last_in_group: bool  # the last micro-batch of its optimizer step: its last backward syncs gradients
    synced: bool = False  # a backward with last=True ran


class TrainingModule(L.LightningModule):
    """Base LightningModule for manual-optimization training (see the module docstring).

    Subclasses implement :meth:`training_losses` and keep the network under ``self.model``; optionally
    :meth:`optimizer_target` (what the optimizer trains), :meth:`optimizer_defaults` and
    :meth:`after_optimizer_step`. ``loss_part_names`` says how a non-finite loss is reported per loss part.
    """

    #: How the non-finite-loss message names each key that ``training_losses`` returns.
    loss_part_names: Mapping[str, str] = {"loss": "training loss"}

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False  # the step backpropagates (possibly several times) itself
        self._micro_batch: _MicroBatch | None = None
        self._nonfinite = guards.NonFiniteMonitor()
        self._skip_reason: guards.NonFinite | None = None
        self._skipped_steps = 0
        self._group_logs: tuple[dict[str, Tensor], int] | None = None
        self._grad_norm: Tensor | None = None
        self._total_steps = 1
        self._sharded_roots: list[
            nn.Module
        ] = []  # FSDP2 roots (configure_model), switched off for no-sync backwards

    # weights_only=True by default (Lightning passes None on to torch.load) and one clear error for unsafe files.
    load_from_checkpoint = checkpoint_io.load_from_checkpoint

    def _option(self, name: str) -> Any:
        return self.hparams.get(name, _DEFAULTS.get(name))

    # ------------------------------------------------------------------------------------ what subclasses write
    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        """Forward passes and losses of one micro-batch; back-propagate each through :meth:`backprop`.

        Returns named loss parts: ``loss`` (the total, for the logs) and any others; each is logged as
        ``train_<name>`` once per optimizer step and checked for NaN / inf.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement training_losses(batch)")

    def optimizer_target(self) -> nn.Module:
        """The module whose parameters the optimizer trains (weight-decay and layer-decay groups come from it)."""
        return self.model

    def optimizer_defaults(self) -> dict[str, Any]:
        """Optimizer arguments used when ``optimizer_kwargs`` is not given."""
        return {}

    def after_optimizer_step(self) -> None:
        """Called right after each optimizer step (``global_step`` already counts it)."""

    # ------------------------------------------------------------------------------------------- the step
    def backprop(self, loss: Tensor, *, last: bool = True) -> None:
        """Back-propagate ``loss`` of this micro-batch, averaged over the micro-batches of its optimizer step.

        ``last=False`` for every backward of the micro-batch but its last one: gradients then accumulate locally,
        and the DDP all-reduce (FSDP2 reduce-scatter) runs once per optimizer step, on the last backward of its
        last micro-batch.
        """
        micro = self._micro_batch
        if micro is None:
            raise RuntimeError("backprop() is for use inside training_losses()")
        sync = last and micro.last_in_group
        with contextlib.nullcontext() if sync else self._no_gradient_sync():
            self.manual_backward(loss * micro.scale)
        micro.synced = micro.synced or last

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        group_size, last_in_group = self._accumulation_position(batch_idx)
        self._micro_batch = _MicroBatch(1.0 / group_size, last_in_group)
        try:
            losses = {k: v.detach() for k, v in self.training_losses(batch).items()}
            if not self._micro_batch.synced:
                raise RuntimeError(
                    f"{type(self).__name__}.training_losses must back-propagate through self.backprop(loss); "
                    "its last call per micro-batch with last=True (the one that synchronises gradients)"
                )
        finally:
            self._micro_batch = None
        self._check_finite(losses)
        self._collect_logs(losses, extract_batch_size(batch))
        if last_in_group:
            self._optimizer_step(opt)
        return losses["loss"]

    def _accumulation_position(self, batch_idx: int) -> tuple[int, bool]:
        """(micro-batches in this batch's optimizer step, whether this batch is the last of them).

        Groups of ``grad_accumulation`` consecutive batches; the epoch's last group may be shorter and then
        averages over the batches it has (as one optimizer step on a smaller batch).
        """
        n = self._option("grad_accumulation")
        if n == 1:
            return 1, True
        per_epoch = int(self.trainer.num_training_batches)
        start = batch_idx - batch_idx % n
        size = min(n, per_epoch - start)
        return size, batch_idx == start + size - 1

    @contextlib.contextmanager
    def _no_gradient_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients without the data-parallel reduction (DDP or FSDP2)."""
        roots = self._sharded_roots
        if not roots:  # DDP (no_sync) or a single device (nothing to do)
            with self.optimizers().toggle_model(sync_grad=False):
                yield
            return
        for root in roots:
            root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for root in roots:
                root.set_requires_gradient_sync(True)

    def _optimizer_step(self, opt: Any) -> None:
        """Step (clipping happens in on_before_optimizer_step), zero the gradient, move the schedule, log."""
        if self._skip_this_step():  # nonfinite_loss="skip": drop this step's gradient, count it
            opt.zero_grad(set_to_none=True)
            self._skipped_steps += 1
            self._skip_reason = None
            self._group_logs = None
            self.log("train_skipped_steps", float(self._skipped_steps), on_step=True, on_epoch=False)
            return
        lr = opt.optimizer.param_groups[-1]["lr"]  # the LR this step applies (the schedule moves it below)
        self._grad_norm = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None and self._option("lr_interval") == "step":
            scheduler.step_update(num_updates=self.global_step)
        self.after_optimizer_step()
        self._log_step(self._grad_norm, lr)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip here, the one place every module and precision shares: after Lightning's 16-mixed unscale.

        A fused optimizer under a GradScaler is still scaled at this point and is unscaled first. The norm logged
        as ``train_grad_norm`` is the true (unscaled) one before clipping.
        """
        max_norm = self._option("grad_clip_norm")
        if not max_norm:
            return
        precision.unscale_gradients(self.trainer, optimizer)
        self._grad_norm = precision.clip_grad_norm(self.optimizer_target().parameters(), max_norm)

    # ----------------------------------------------------------------------------------- non-finite losses
    def _check_finite(self, losses: dict[str, Tensor]) -> None:
        """Apply the ``nonfinite_loss`` policy to this micro-batch's losses (see ``masksub_lightning.training.guards``)."""
        parts = {k: v for k, v in losses.items() if k != "loss"} or losses
        named = {self.loss_part_names.get(k, k): v for k, v in parts.items()}
        if self._option("nonfinite_loss") == "skip":
            found = guards.first_nonfinite(named)  # one host sync: the step must be decided now
            if found is not None and self._skip_reason is None:
                self._skip_reason = found
            return
        self._nonfinite.record(self.global_step + 1, named)
        self._stop_if_nonfinite(wait=False)

    def _skip_this_step(self) -> bool:
        """Skip policy: skip when any rank saw a non-finite loss in this step (the gradient was all-reduced)."""
        if self._option("nonfinite_loss") != "skip":
            return False
        return self.trainer.strategy.reduce_boolean_decision(self._skip_reason is not None, all=False)

    def _stop_if_nonfinite(self, wait: bool) -> None:
        found = self._nonfinite.poll(wait=wait)
        if found is None:
            return
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        last_good = (
            getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        ) or None
        raise guards.NonFiniteLossError(
            f"non-finite loss (NaN or inf) at step {found.step} in the {found.part}; stopping "
            f"(nonfinite_loss='stop'). Last good checkpoint: {last_good or 'none saved yet'}; "
            "nothing from this step on was saved"
        )

    def on_train_epoch_end(self) -> None:
        self._stop_if_nonfinite(wait=True)  # before validation and the epoch's checkpoint
        scheduler = self.lr_schedulers()
        if scheduler is not None and self._option("lr_interval") == "epoch":
            scheduler.step(epoch=self.current_epoch + 1)  # the LR of the next epoch

    # --------------------------------------------------------------------------------------------- logging
    def _collect_logs(self, losses: dict[str, Tensor], batch_size: int) -> None:
        """Sum this micro-batch's losses into its optimizer step's group (logged once per optimizer step)."""
        weighted = {f"train_{k}": v * batch_size for k, v in losses.items()}
        if self._group_logs is None:
            self._group_logs = (weighted, batch_size)
        else:
            sums, images = self._group_logs
            self._group_logs = ({k: sums[k] + weighted[k] for k in sums}, images + batch_size)

    def _log_step(self, grad_norm: Tensor | None, lr: float) -> None:
        # Tensors only: Lightning moves them to the host when it writes logs, not on every step.
        sums, images = self._group_logs
        self._group_logs = None
        values = {k: v / images for k, v in sums.items()}
        if grad_norm is not None:
            values["train_grad_norm"] = grad_norm
        self.log_dict(values, on_step=True, on_epoch=True, batch_size=images)
        # A CPU tensor: a Python float would be copied to the GPU, and that copy waits for the whole step.
        self.log("lr", torch.tensor(lr), on_step=True, on_epoch=False, batch_size=images)

    # ---------------------------------------------------------------------------------- optimizer, schedule
    def configure_model(self) -> None:
        if self._option("channels_last"):
            self.model.to(memory_format=torch.channels_last)
        sharded = self._trainer is not None and sharding.is_sharded(self.trainer.strategy)
        if sharded and not sharding.sharded_roots(self):  # configure_model runs again for validate / test
            self.shard(self.device_mesh["data_parallel"])
        self._sharded_roots = sharding.sharded_roots(self) if sharded else []  # found once, not at every step
        if self._option("compile") and not getattr(self.model, "_compiled_call_impl", None):
            self.model.compile()  # in place: state-dict keys keep their names

    def shard(self, mesh: Any) -> None:
        """FSDP2: shard every network the step trains (see ``masksub_lightning.training.sharding``).

        Every trainable parameter must end up under a sharded root, or its gradient would not be reduced.
        """
        sharding.shard_network(self.model, mesh)

    def setup(self, stage: str) -> None:
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(
                "strategy 'fsdp' (FSDPStrategy, FSDP1) cannot run a backward inside training_step under manual "
                "optimization; use --trainer.strategy fsdp2 (FSDP2) or ddp"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if self.trainer.train_dataloader is None:
            self.trainer.fit_loop.setup_data()  # batch size and epoch length are needed below
        lr = hp.lr
        if hp.get("lr_base_batch_size"):
            lr = lr * self._global_batch_size() / hp.lr_base_batch_size
        kwargs = self._option("optimizer_kwargs")
        optimizer = build_optimizer(
            self.optimizer_target(),
            hp.optimizer,
            lr,
            hp.weight_decay,
            self._option("layer_decay"),
            no_weight_decay=self._option("no_weight_decay"),
            **(self.optimizer_defaults() if kwargs is None else dict(kwargs)),
        )
        total_steps, steps_per_epoch = self._optimizer_steps()
        self._total_steps = total_steps
        if self._option("lr_interval") == "epoch":
            epochs = self.trainer.max_epochs
            if epochs is None or epochs < 1:
                raise ValueError("lr_interval='epoch' needs Trainer max_epochs")
            length, warmup, unit = epochs, round(hp.warmup_epochs), "epochs"
        else:
            length, warmup, unit = total_steps, round(hp.warmup_epochs * steps_per_epoch), "optimizer steps"
        scheduler = build_scheduler(
            optimizer,
            hp.scheduler,
            length,
            warmup,
            hp.warmup_lr,
            hp.min_lr,
            per_epoch=unit == "epochs",
        )
        self._check_resumed_schedule(scheduler, unit)
        interval = "epoch" if unit == "epochs" else "step"
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def _check_resumed_schedule(self, scheduler: Any, unit: str) -> None:
        """Refuse a resume whose schedule would differ in length from the checkpoint's.

        Lightning restores the scheduler's state over the one built here, so a resume with another max_epochs,
        max_steps, batch size or grad_accumulation would silently keep the old length (and warmup). The rule:
        resume with the original run's settings; to train on for longer, start a new run from the weights.
        """
        saved = getattr(self, "_resumed_schedule", None)
        if not saved:
            return
        built = {"t_initial": scheduler.t_initial, "warmup_t": getattr(scheduler, "warmup_t", None)}
        if saved != built:
            raise ValueError(
                f"cannot resume: the checkpoint's LR schedule spans {saved['t_initial']} {unit} (warmup "
                f"{saved['warmup_t']}), this run's would span {built['t_initial']} (warmup {built['warmup_t']}): "
                "max_epochs, max_steps, the batch size or grad_accumulation changed. Resume with the original "
                "settings, or start a new run from the weights (--model.init_args.pretrained_weights CKPT)"
            )

    def _optimizer_steps(self) -> tuple[int, int]:
        """(optimizer steps of the whole run, optimizer steps per epoch), counting accumulation groups."""
        accumulation = self._option("grad_accumulation")
        batches = self.trainer.num_training_batches
        max_epochs, max_steps = self.trainer.max_epochs, self.trainer.max_steps
        if not math.isfinite(batches):
            if accumulation > 1 or self.hparams.warmup_epochs:
                raise ValueError(
                    "grad_accumulation > 1 and warmup_epochs need a train loader with a length "
                    "(not an endless iterable)"
                )
            if max_steps is None or max_steps < 0:
                raise ValueError("the LR schedule needs a finite run: set Trainer max_epochs or max_steps")
            return max_steps, max_steps
        if accumulation > batches:
            raise ValueError(
                f"grad_accumulation={accumulation} is more than the {int(batches)} train batches of an epoch; "
                "use a value <= the number of batches per epoch"
            )
        per_epoch = math.ceil(batches / accumulation)  # a shorter last group still takes a step
        if max_epochs is None or max_epochs < 0:
            if max_steps is None or max_steps < 0:
                raise ValueError("the LR schedule needs a finite run: set Trainer max_epochs or max_steps")
            return max_steps, per_epoch
        total = per_epoch * max(max_epochs, 1)
        if max_steps is not None and max_steps >= 0:
            total = min(total, max_steps)
        return total, per_epoch

    def _global_batch_size(self) -> int:
        """Images per optimizer step over all devices: batch size x world size x grad_accumulation."""
        loader = self.trainer.train_dataloader
        batch_size = getattr(loader, "batch_size", None) or getattr(loader.batch_sampler, "batch_size", None)
        if batch_size is None:
            raise ValueError("lr_base_batch_size needs a train DataLoader with a batch_size")
        return int(batch_size) * self.trainer.world_size * self._option("grad_accumulation")

    # ------------------------------------------------------------------------------- RNG and exact resume
    def on_train_start(self) -> None:
        if resume.restore_rng_states(self):  # a resume: each rank continues its saved random streams
            return
        # Lightning seeds every rank alike; masks and mixup draws must differ across ranks (timm and DeiT seed
        # by rank too). Parameters are unaffected: DDP broadcast them from rank 0 already.
        if self.trainer.world_size > 1:
            seed = (torch.initial_seed() + self.global_rank) % 2**32
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)

    # Every rank's RNG states travel in the checkpoint, and validation inside fit leaves them untouched.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._stop_if_nonfinite(wait=True)  # a NaN never reaches a saved checkpoint
        resume.save_rng_states(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        resume.stash_rng_states(self, checkpoint)  # put back in on_train_start, after Lightning's set-up
        saved = checkpoint.get("lr_schedulers") or [{}]
        self._resumed_schedule = {k: saved[0].get(k) for k in ("t_initial", "warmup_t")} if saved[0] else None

    def on_validation_model_zero_grad(self) -> None:
        super().on_validation_model_zero_grad()
        resume.pause_rng(self)

    def on_validation_epoch_end(self) -> None:
        resume.resume_rng(self)


def check_positive(name: str, value: Any, integer: bool = False) -> None:
    """Refuse anything but a positive number (a positive int with ``integer``), naming the option."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{name} must be a positive {'int' if integer else 'number'}, got {value!r}")
