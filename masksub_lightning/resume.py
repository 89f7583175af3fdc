"""Exact resume: every rank's random streams and loader position travel in the checkpoint.

A MaskSub step draws from the global random generators: the sub-branch masks (and drop-path / dropout) from
torch's; a custom DataModule's augmentations or mixing may draw from torch's, NumPy's or Python's. Lightning saves
weights, optimizer, schedule, loop counters and (with a stateful train loader) rank 0's loader position, but no
RNG state, so a resumed run would draw other masks than the interrupted one. ``MaskSubModule`` calls this module
from its hooks:

    on_save_checkpoint          save_rng_states      every rank's RNG states (and, under DDP, train-loader state),
                                                     gathered: checkpoint[RNG_KEY][rank], checkpoint[LOADER_KEY]
    on_load_checkpoint          stash_rng_states     keeps this rank's entries for later
    on_train_start              restore_rng_states   loads a loader position Lightning dropped (issue #20550), then
                                                     puts the RNG states back after Lightning's set-up (instead of
                                                     the module's per-rank re-seeding)
    on_validation_model_zero_grad / on_validation_epoch_end
                                pause_rng / resume_rng   validation inside fit leaves the streams where it found
                                                     them (a validation loader draws a seed from torch's RNG each
                                                     time it is iterated, and a resume skips or re-runs a
                                                     validation, which would shift every later draw)

Everything stored is a tensor, an int, a float, a string or a list / dict of those, so the checkpoint stays
loadable with ``torch.load(..., weights_only=True)``.

:class:`ResumeCheckpoint` writes the checkpoint to resume from: ``resume.ckpt`` every N optimizer steps (mid-epoch
included) and at the step boundary where a SIGTERM is noticed. ``docs/reliability.md`` lists what is and is not
guaranteed.
"""

from __future__ import annotations

import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng

#: Checkpoint key of the per-rank RNG states: a list indexed by global rank.
RNG_KEY = "masksub_rng_states"
#: Checkpoint key of the per-rank train-loader states under DDP: a list indexed by global rank.
LOADER_KEY = "masksub_train_loader_states"

_PENDING = "_masksub_rng_pending"  # this rank's saved states, waiting for on_train_start
_PAUSED = "_masksub_rng_paused"  # the training streams while validation runs


# --------------------------------------------------------------------------------------- one process's states
def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU and current CUDA device), numpy and Python random states."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device only: a DDP process draws on its own GPU, and reading every visible device's state
        # would create a CUDA context on each of them.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` returned (the CUDA state on the current device)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)
        else:
            rank_zero_warn("the checkpoint holds a CUDA RNG state but CUDA is not available: not restored")


# ------------------------------------------------------------------------------------ checkpoint hooks
def gather_rng_states(trainer: L.Trainer, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``state`` as a list indexed by global rank (a collective: all ranks must call it)."""
    strategy = trainer.strategy
    if trainer.world_size == 1:
        return [state]
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            f"{type(strategy).__name__} runs {trainer.world_size} processes without torch.distributed: "
            "per-rank RNG states cannot be gathered"
        )
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, _to_cpu(state))
    return gathered


def save_rng_states(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: store every rank's training RNG states under :data:`RNG_KEY`.

    Called on every rank (Lightning's ``save_checkpoint`` is collective; rank 0 writes the file). While
    validation runs inside fit the training streams are the paused ones, not the current ones. Under DDP each
    rank's train-loader state goes in too (:data:`LOADER_KEY`): Lightning keeps only rank 0's, and every rank
    would resume at rank 0's place in the sample stream.
    """
    trainer = module._trainer  # the property raises when detached
    if trainer is None:
        return
    state = getattr(module, _PAUSED, None) or capture_rng_state()
    if trainer.world_size == 1:
        checkpoint[RNG_KEY] = [state]
        return
    loader = _fit_loop_state(checkpoint).get("combined_loader")
    gathered = gather_rng_states(trainer, {"rng": state, "loader": loader})
    checkpoint[RNG_KEY] = [g["rng"] for g in gathered]
    if loader is not None:
        checkpoint[LOADER_KEY] = [g["loader"] for g in gathered]


def stash_rng_states(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint``: keep this rank's saved states until :func:`restore_rng_states`."""
    states = checkpoint.get(RNG_KEY)
    setattr(module, _PENDING, None)
    if states is None:
        return
    trainer = module._trainer  # the property raises when detached (load_from_checkpoint)
    if trainer is None:
        return
    if len(states) != trainer.world_size:
        rank_zero_warn(
            f"the checkpoint holds RNG states of {len(states)} rank(s) but this run has {trainer.world_size}: "
            "training resumes with freshly seeded random streams (weights, optimizer and schedule are "
            "restored; the masks and mixing draws differ from an uninterrupted run)"
        )
        return
    setattr(module, _PENDING, states[trainer.global_rank])
    loaders = checkpoint.get(LOADER_KEY)
    fit_state = _fit_loop_state(checkpoint)
    if loaders is not None and len(loaders) == trainer.world_size and "combined_loader" in fit_state:
        # Lightning restores the loader from this entry later in the same restore: make it this rank's.
        fit_state["combined_loader"] = loaders[trainer.global_rank]


def _fit_loop_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The fit loop's own state in a checkpoint (where Lightning keeps the train-loader state); {} if none."""
    return checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})


def restore_rng_states(module: L.LightningModule) -> bool:
    """``on_train_start``: put this rank's saved states back; True if there were some (the run is a resume).

    Lightning calls ``on_train_start`` after the checkpoint is restored and the sanity check has run (inside its
    own RNG isolation), right before the first batch is drawn: the same point the states were captured at.
    """
    if restore_pending_loader_state(module.trainer) or getattr(module, _PENDING, None) is not None:
        _set_epoch_learning_rate(module)
    state = getattr(module, _PENDING, None)
    if state is None:
        return False
    set_rng_state(state)
    setattr(module, _PENDING, None)
    _isolate_skipped_validation(module.trainer)
    return True


def _set_epoch_learning_rate(module: L.LightningModule) -> None:
    """With a per-epoch LR (``lr_interval="epoch"``), set the LR of the epoch being resumed.

    Resumed from a checkpoint written after an epoch's last batch, Lightning counts the epoch as done but runs
    none of its end hooks, so the module's ``on_train_epoch_end`` never moves the LR to the next epoch's value.
    The LR of epoch ``e`` is a function of ``e`` alone (timm's ``step(epoch=e)``), so setting it again is exact,
    and a no-op for a checkpoint from the middle of an epoch.
    """
    hparams = getattr(module, "hparams", {})
    if hparams.get("lr_interval") != "epoch":
        return
    scheduler = module.lr_schedulers()
    if scheduler is not None:
        scheduler.step(epoch=module.trainer.current_epoch)


def _isolate_skipped_validation(trainer: L.Trainer) -> None:
    """Keep the validation that a resume skips from drawing on the restored streams.

    Resumed from a checkpoint written after an epoch's last batch, Lightning does not re-run that epoch's
    validation: it fast-forwards the validation loop, which iterates the validation loader once, and an
    iteration draws a seed from torch's RNG (a loader without its own ``generator``). In the uninterrupted run
    that draw happened inside a paused validation; here it would shift every later mask.
    """
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    skip = getattr(val_loop, "increment_progress_to_evaluation_end", None)
    if skip is None or getattr(skip, "_masksub_isolated", False):
        return

    def isolated_skip() -> None:
        with isolate_rng():
            skip()

    isolated_skip._masksub_isolated = True  # type: ignore[attr-defined]
    val_loop.increment_progress_to_evaluation_end = isolated_skip


def restore_pending_loader_state(trainer: L.Trainer) -> bool:
    """Load the train loader's saved position if Lightning skipped it; True if it did.

    Lightning loads a stateful loader's state only when it builds the train loader after the checkpoint is
    restored. Asking for ``trainer.estimated_stepping_batches`` or calling ``fit_loop.setup_data()`` in
    ``configure_optimizers`` (as the LR schedule needs) builds it earlier, and the saved position is then
    silently dropped: the resumed epoch starts again from its first batch (Lightning issue #20550). This loads
    the pending state and re-creates the loader's iterator, as Lightning's own resume path would have.
    """
    fit_loop = trainer.fit_loop
    pending = getattr(fit_loop, "_combined_loader_states_to_load", None)
    if not (pending and fit_loop.restarting and fit_loop._combined_loader is not None):
        return False
    # The epoch first: a loader that fast-forwards its sampler on load must replay this epoch's order.
    for loader in fit_loop._combined_loader.flattened:
        _set_sampler_epoch(loader, fit_loop.epoch_progress.current.processed)
    if not fit_loop.epoch_loop.batch_progress.is_last_batch:
        fit_loop._combined_loader._load_state_dicts(pending)
    # else: saved after the epoch's last batch. Lightning counts that epoch as done and trains the next one on
    # this same iterator (it does not call iter() again when resuming), so it must be a fresh one: the saved
    # position would replay the rest of the finished epoch's order (with limit_train_batches) or nothing.
    fit_loop._combined_loader_states_to_load = []
    if fit_loop._data_fetcher is not None:
        iter(fit_loop._data_fetcher)  # the iterator made before the restore would start the epoch over
    return True


def pause_rng(module: L.LightningModule) -> None:
    """Before validation inside fit: remember the training streams (validation may draw from them)."""
    trainer = module._trainer
    if trainer is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
        setattr(module, _PAUSED, capture_rng_state())


def resume_rng(module: L.LightningModule) -> None:
    """After validation inside fit: continue the training streams from where validation found them."""
    state = getattr(module, _PAUSED, None)
    if state is not None:
        set_rng_state(state)
        setattr(module, _PAUSED, None)


def _to_cpu(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v) for v in state]
    return state


# --------------------------------------------------------------------------------------------- callback
class ResumeCheckpoint(ModelCheckpoint):
    """Keeps one checkpoint to resume from, ``resume.ckpt``, overwritten every ``every_n_train_steps`` steps.

    Independent of the best / last checkpoints (whose saves wait for a validation metric): it is written from the
    first steps of the first epoch on, at optimizer-step boundaries, and also at the boundary where a SIGTERM is
    noticed (Lightning finishes the current step and then stops). A SIGTERM that arrives during validation
    stops the run mid-validation, where the state is not a step boundary: no checkpoint is written then, and the
    previous ``resume.ckpt`` stays the one to resume from. SIGKILL leaves the previous one too.

    Resume with ``masksub fit ... --ckpt_path <dir>/resume.ckpt`` (same config, same number of ranks).

    Args:
        every_n_train_steps: optimizer steps between saves (mid-epoch included).
        dirpath: directory of ``resume.ckpt``; None: the run's checkpoint directory (next to ``last.ckpt``).
        filename: file name without ``.ckpt``.
        save_on_sigterm: also save when Lightning stops the run for a SIGTERM.

    Raises:
        ValueError: ``every_n_train_steps`` is not a positive integer.
    """

    def __init__(
        self,
        every_n_train_steps: int = 100,
        dirpath: str | None = None,
        filename: str = "resume",
        save_on_sigterm: bool = True,
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

    @property
    def state_key(self) -> str:
        return self._generate_state_key(resume_every_n_train_steps=self._every_n_train_steps)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        """Save every ``every_n_train_steps`` optimizer steps, whatever the monitored metrics."""
        if trainer.global_step % self._every_n_train_steps or self._should_skip_saving_checkpoint(trainer):
            return
        # Straight to the save: the parent's manual-optimization branch would warn about pre-step weights.
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

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
