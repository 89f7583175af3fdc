"""Checkpoint callbacks: a ``last.ckpt`` that is always the latest state, and a checkpoint to resume from.

* :class:`AlwaysLastCheckpoint` is Lightning's ``ModelCheckpoint`` except that ``save_last=True`` rewrites
  ``last.ckpt`` at every save point, not only when a new best checkpoint is written (Lightning 2.6 keeps a stale
  ``last.ckpt`` once the monitored metric stops improving, and resuming from it would repeat epochs). It also
  checks, before training starts, that the checkpoint directory is writable and has room for a checkpoint.
* :class:`ResumeCheckpoint` keeps ``resume.ckpt``, written every N optimizer steps (mid-epoch included) and at the
  step boundary where a SIGTERM (or SLURM's requeue signal) is noticed.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from masksub_lightning.training.checkpoint_io import (
    OutputDirError,
    check_output_dir,
    checkpoint_size_estimate,
    remove_stale_temp_files,
)

__all__ = ["AlwaysLastCheckpoint", "ResumeCheckpoint"]


class AlwaysLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` (``save_last=True``) is rewritten at every save point.

    Lightning 2.6 writes ``last.ckpt`` only when a top-k checkpoint was saved at the same step, and at the end of
    training only if it was never written: once the monitored metric stops improving ``last.ckpt`` goes stale.
    Here it is also written at each validation / epoch end where no top-k checkpoint was saved, and at the end of
    training when steps were taken since the last save (``max_steps`` or ``max_time`` ending mid-epoch). Resuming
    from ``last.ckpt`` therefore continues where the run stopped.

    Before training, the checkpoint directory is checked (created, written, enough free space for a checkpoint:
    :func:`checkpoint_size_estimate`) and leftovers of interrupted :class:`AtomicCheckpointIO` saves are removed. The state key is the
    plain ``ModelCheckpoint``'s, so checkpoints of either class resume with the other.
    """

    @property
    def state_key(self) -> str:
        key = super().state_key
        return "ModelCheckpoint" + key[len(type(self).__qualname__) :]

    def setup(self, trainer: Any, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        problem = None
        if (
            stage == "fit"
            and trainer.is_global_zero
            and self.dirpath is not None
            and not trainer.fast_dev_run
        ):
            try:
                need = checkpoint_size_estimate(pl_module, trainer.callbacks)
                check_output_dir(self.dirpath, "checkpoint directory", need)
                remove_stale_temp_files(self.dirpath)
            except OutputDirError as err:
                problem = str(err)
        # Every rank raises, not only rank 0: the others would otherwise wait for it at the next collective.
        problem = trainer.strategy.broadcast(problem)
        if problem:
            raise OutputDirError(problem)

    def _latest_due(self, trainer: Any) -> bool:
        return self.save_last is True and self._last_global_step_saved != trainer.global_step

    def on_validation_end(self, trainer: Any, pl_module: LightningModule) -> None:
        applies = not self._should_skip_saving_checkpoint(
            trainer
        ) and not self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        if applies and self._latest_due(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: LightningModule) -> None:
        applies = not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(
            trainer
        )
        super().on_train_epoch_end(trainer, pl_module)
        if applies and self._latest_due(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: Any, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer) and self._latest_due(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ResumeCheckpoint(ModelCheckpoint):
    """Keeps one checkpoint to resume from, ``resume.ckpt``, overwritten every ``every_n_train_steps`` steps.

    Independent of the best / last checkpoints (whose saves wait for a validation metric): it is written from the
    first steps of the first epoch on, at optimizer-step boundaries, and also at the boundary where a SIGTERM is
    noticed (Lightning finishes the current step and then stops). A SIGTERM that arrives during validation
    stops the run mid-validation, where the state is not a step boundary: no checkpoint is written then, and the
    previous ``resume.ckpt`` stays the one to resume from. SIGKILL leaves the previous one too.

    Under SLURM with Lightning's auto-requeue (``SLURMEnvironment``), the requeue signal (SIGUSR1) is held until
    the next optimizer-step boundary, where all ranks write Lightning's ``hpc_ckpt_<n>.ckpt`` together and rank 0
    requeues the job (Lightning's own handler, run there instead of inside the signal handler, which may be the
    middle of a step or of a collective). The requeued job resumes from that checkpoint exactly.

    Resume with ``masksub fit ... --ckpt_path <dir>/resume.ckpt`` (same config; another number of processes
    with the same global batch continues the epoch with the samples not yet seen, see ``docs/reliability.md``).

    Args:
        every_n_train_steps: optimizer steps between saves (mid-epoch included).
        dirpath: directory of ``resume.ckpt``; None: the run's checkpoint directory (next to ``last.ckpt``).
        filename: file name without ``.ckpt``.
        save_on_sigterm: also save when Lightning stops the run for a SIGTERM.
        slurm_requeue_at_step_boundary: hold SLURM's requeue signal until the next step boundary (above).

    Raises:
        ValueError: ``every_n_train_steps`` is not a positive integer.
    """

    def __init__(
        self,
        every_n_train_steps: int = 100,
        dirpath: str | None = None,
        filename: str = "resume",
        save_on_sigterm: bool = True,
        slurm_requeue_at_step_boundary: bool = True,
    ) -> None:
        if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int):
            raise ValueError(f"every_n_train_steps must be a positive int, got {every_n_train_steps!r}")
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be a positive int, got {every_n_train_steps!r}")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            save_last=False,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,  # always the same file: the newest state replaces the previous one
        )
        self.save_on_sigterm = save_on_sigterm
        self.slurm_requeue_at_step_boundary = slurm_requeue_at_step_boundary
        self._requeue: Any = None  # Lightning's SLURM requeue handler, when held back
        self._requeue_signal: int | None = None  # the requeue signal received and not yet acted on
        self._requeued = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(resume_every_n_train_steps=self._every_n_train_steps)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.slurm_requeue_at_step_boundary:
            self._hold_slurm_requeue(trainer)

    def _hold_slurm_requeue(self, trainer: L.Trainer) -> None:
        """Make Lightning register a note-taking SIGUSR1 handler instead of its save-and-requeue one.

        ``setup`` runs before Lightning registers its signal handlers (at the start of fit), and it registers
        ``_slurm_sigusr_handler_fn`` looked up on the connector: an instance attribute takes its place.
        """
        environment = trainer._accelerator_connector.cluster_environment
        connector = trainer._signal_connector
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        self._requeue = type(connector)._slurm_sigusr_handler_fn.__get__(connector)
        connector._slurm_sigusr_handler_fn = self._note_requeue_signal
        self._requeue_signal, self._requeued = None, False

    def _note_requeue_signal(self, signum: int, frame: Any) -> None:
        # Signal-handler context: only take note (a save here could be mid-step or inside a collective).
        if not self._requeued:
            self._requeue_signal = int(signum)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        """Save every ``every_n_train_steps`` optimizer steps, whatever the monitored metrics."""
        self._save_every_n_steps(trainer)
        self._requeue_at_step_boundary(trainer, pl_module)

    def _save_every_n_steps(self, trainer: L.Trainer) -> None:
        if trainer.global_step % self._every_n_train_steps or self._should_skip_saving_checkpoint(trainer):
            return
        # Straight to the save: the parent's manual-optimization branch would warn about pre-step weights.
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def _requeue_at_step_boundary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """If any rank got SLURM's requeue signal: at a step boundary, Lightning's save and requeue, all ranks."""
        if self._requeue is None or self._requeued:
            return
        if any(p.grad is not None for p in pl_module.parameters()):
            return  # inside a gradient-accumulation group (the same micro-batch on every rank)
        # One small all-reduce per step: the signal reaches the ranks at different times.
        if not trainer.strategy.reduce_boolean_decision(self._requeue_signal is not None, all=False):
            return
        self._requeued = True
        self._requeue(self._requeue_signal or signal.SIGUSR1, None)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """No epoch-end saves: ``resume.ckpt`` follows the step count only."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """No epoch-end saves: ``resume.ckpt`` follows the step count only."""

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Save at the step boundary where Lightning stops for a SIGTERM (not mid-validation)."""
        if not (self.save_on_sigterm and isinstance(exception, SIGTERMException)):
            return
        if trainer.validating or trainer.sanity_checking:
            rank_zero_warn(
                "SIGTERM during validation: no resume checkpoint written (the run stopped mid-validation); "
                "resume from the previous one"
            )
            return
        if any(p.grad is not None for p in pl_module.parameters()):
            # Mid gradient-accumulation group: the accumulated gradient is not part of a checkpoint.
            rank_zero_warn(
                "SIGTERM inside a gradient-accumulation group: no resume checkpoint written; "
                "resume from the previous one"
            )
            return
        filepath = os.path.join(
            self.dirpath or trainer.default_root_dir, f"{self.filename}{self.FILE_EXTENSION}"
        )
        trainer.save_checkpoint(filepath)
        self._last_global_step_saved = trainer.global_step
