"""Exact resume: every rank's random streams and loader position travel in the checkpoint.

A MaskSub step draws from the global random generators: the sub-branch masks (and drop-path / dropout) from
torch's; a custom DataModule's augmentations or mixing may draw from torch's, NumPy's or Python's. Lightning saves
weights, optimizer, schedule, loop counters and (with a stateful train loader) rank 0's loader position, but no
RNG state, so a resumed run would draw other masks than the interrupted one. ``MaskSubModule`` calls this module
from its hooks:

    on_save_checkpoint          save_rng_states      every rank's RNG states (and, under DDP, train-loader state),
                                                     gathered: checkpoint[RNG_KEY][rank], checkpoint[LOADER_KEY];
                                                     how the global batch is made: checkpoint[LAYOUT_KEY]
    on_load_checkpoint          stash_rng_states     keeps this rank's entries for later; with another world size,
                                                     batch size or accumulation (the global batch kept) moves
                                                     Lightning's batch counters to the same sample of the epoch
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

:class:`~masksub_lightning.callbacks.ResumeCheckpoint` writes the checkpoint to resume from: ``resume.ckpt`` every N
optimizer steps (mid-epoch included) and at the step boundary where a SIGTERM is noticed; under SLURM it moves
Lightning's requeue checkpoint to a step boundary too. ``docs/reliability.md`` lists what is and is not guaranteed; ``docs/cluster.md`` has the
multi-node, SLURM and other-world-size commands.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng

from masksub_lightning.data.base import micro_batches_per_step

#: Checkpoint key of the per-rank RNG states: a list indexed by global rank.
RNG_KEY = "masksub_rng_states"
#: Checkpoint key of the per-rank train-loader states under DDP: a list indexed by global rank.
LOADER_KEY = "masksub_train_loader_states"
#: Checkpoint key of how the global batch was made: world size, per-process batch size, gradient accumulation.
LAYOUT_KEY = "masksub_train_layout"

_PENDING = "_masksub_rng_pending"  # this rank's saved states, waiting for on_train_start
_FRESH = "fresh"  # pending instead of states: the saved ones belong to ranks of another world size
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
    layout = train_layout(module)
    if layout is not None:
        checkpoint[LAYOUT_KEY] = layout
    if trainer.world_size == 1:
        checkpoint[RNG_KEY] = [state]
        return
    loader = _fit_loop_state(checkpoint).get("combined_loader")
    gathered = gather_rng_states(trainer, {"rng": state, "loader": loader})
    checkpoint[RNG_KEY] = [g["rng"] for g in gathered]
    if loader is not None:
        checkpoint[LOADER_KEY] = [g["loader"] for g in gathered]


def stash_rng_states(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint``: keep this rank's saved states until :func:`restore_rng_states`.

    Resumed with another world size, batch size or gradient accumulation (the global batch kept), the saved
    position in the epoch is carried over (:func:`continue_with_new_layout`) and the random streams are freshly
    seeded (the saved ones belong to ranks that no longer exist).

    Raises:
        ValueError: the layout changed in a way that cannot continue the epoch exactly (see
            :func:`continue_with_new_layout`).
    """
    states = checkpoint.get(RNG_KEY)
    setattr(module, _PENDING, None)
    if states is None:
        return
    trainer = module._trainer  # the property raises when detached (load_from_checkpoint)
    if trainer is None:
        return
    saved_world, world = len(states), trainer.world_size
    remapped = continue_with_new_layout(module, checkpoint)
    if remapped:
        rank_zero_warn(_new_layout_message(checkpoint[LAYOUT_KEY], train_layout(module)))
    if saved_world == world:
        setattr(module, _PENDING, states[trainer.global_rank])
    elif remapped:
        setattr(module, _PENDING, _FRESH)
    else:
        rank_zero_warn(
            f"the checkpoint holds RNG states of {saved_world} rank(s) but this run has {world}: "
            "training resumes with freshly seeded random streams (weights, optimizer and schedule are "
            "restored; the masks and mixing draws differ from an uninterrupted run)"
        )
        return
    loaders = checkpoint.get(LOADER_KEY)
    fit_state = _fit_loop_state(checkpoint)
    if loaders and "combined_loader" in fit_state:
        # Lightning restores the loader from this entry later in the same restore: make it this rank's (after a
        # world-size change any saved rank's: the sampler reads the global position from it).
        fit_state["combined_loader"] = loaders[trainer.global_rank % len(loaders)]


# ------------------------------------------------------------------------- another world size on resume
def train_layout(module: L.LightningModule) -> dict[str, int] | None:
    """How this run makes its global batch: ``world_size``, ``batch_size`` (per process), ``grad_accumulation``.

    None when the batch size is unknown (a train loader without ``batch_size`` and a DataModule without one).
    """
    trainer = module.trainer
    # The loader when it is built (saving), else the DataModule's setting (loading: before the loader exists).
    batch = getattr(trainer.train_dataloader, "batch_size", None) or getattr(
        trainer.datamodule, "batch_size", None
    )
    if not _positive_int(batch):
        return None
    return {
        "world_size": trainer.world_size,
        "batch_size": batch,
        "grad_accumulation": micro_batches_per_step(trainer, module),
    }


def continue_with_new_layout(module: L.LightningModule, checkpoint: dict[str, Any]) -> bool:
    """Carry the position in the epoch over to another layout of the same global batch; True if it did.

    The package's sampler keeps its position as samples of the epoch's global order consumed by all ranks, and
    loads it into any world size (:class:`~masksub_lightning.data.samplers.RepeatedAugSampler`). Lightning's
    batch counters are per process, so they are moved here to the same point in the new unit, before Lightning
    restores them: gradient-accumulation groups then line up with optimizer steps, and the epoch ends after the
    same steps as the uninterrupted run's.

    Raises:
        ValueError: the global batch changed (the consumed samples are then not whole steps, and the epoch and
            the LR schedule would differ), or the checkpoint is not at an optimizer-step boundary.
    """
    saved, sampler = checkpoint.get(LAYOUT_KEY), _sampler_state(checkpoint)
    if saved is None or sampler is None or sampler.get("global_batch") is None:
        return False  # an older checkpoint, or not the package's sampler (which refuses another world size)
    now = train_layout(module)
    if now is None or now == saved:
        return False
    old_global, new_global = _global_batch(saved), _global_batch(now)
    if old_global != new_global:
        raise ValueError(
            f"cannot resume on {_processes(now['world_size'])}: the checkpoint's global batch was {old_global} "
            f"({_describe(saved)}), this run's is {new_global} ({_describe(now)}); {_keep(old_global, now)}"
        )
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    done = _batches_done(progress) if progress else None
    consumed = int(sampler["position"]) * int(sampler["num_replicas"])
    if done is None or done * saved["batch_size"] != int(sampler["position"]) or consumed % old_global:
        raise ValueError(
            f"cannot resume on {_processes(now['world_size'])}: the checkpoint was not written at an optimizer-step "
            f"boundary (epoch {sampler['epoch']}, {consumed} samples consumed, global batch {old_global}); resume "
            f"it with {_describe(saved)}, or from a resume.ckpt / last.ckpt"
        )
    _shift_batch_progress(progress, consumed // (now["batch_size"] * now["world_size"]) - done)
    return True


def _new_layout_message(saved: dict[str, int], now: dict[str, int]) -> str:
    if saved["world_size"] == now["world_size"]:
        what, draws = f"of {_describe(saved)} with {_describe(now)}", "differ"
    else:
        what = f"of {_processes(saved['world_size'])} on {now['world_size']}"
        draws = "are seeded afresh"
    return (
        f"resuming a checkpoint {what}: the epoch continues with the samples not yet seen, with the same "
        f"optimizer steps and learning rates; the random draws (masks, drop path, Mixup / CutMix) {draws}, so the "
        "weights differ from an uninterrupted run"
    )


def _global_batch(layout: dict[str, int]) -> int:
    return layout["batch_size"] * layout["world_size"] * layout["grad_accumulation"]


def _describe(layout: dict[str, int]) -> str:
    return (
        f"batch_size {layout['batch_size']} x {_processes(layout['world_size'])} x "
        f"grad_accumulation {layout['grad_accumulation']}"
    )


def _keep(global_batch: int, layout: dict[str, int]) -> str:
    """What to set so that ``layout`` makes ``global_batch`` again."""
    world = layout["world_size"]
    ways = []
    if global_batch % (layout["batch_size"] * world) == 0:
        ways.append(f"grad_accumulation={global_batch // (layout['batch_size'] * world)}")
    if global_batch % (layout["grad_accumulation"] * world) == 0:
        ways.append(f"batch_size={global_batch // (layout['grad_accumulation'] * world)}")
    if not ways:
        return f"choose batch_size x processes x grad_accumulation = {global_batch}"
    return f"set {' or '.join(ways)} to keep it"


def _processes(n: int) -> str:
    return f"{n} process{'' if n == 1 else 'es'}"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _sampler_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The package sampler's state inside a saved train-loader state (torchdata nests it), or None."""
    loaders = checkpoint.get(LOADER_KEY) or _fit_loop_state(checkpoint).get("combined_loader") or []
    return _find_sampler_state(loaders[0]) if loaders else None


def _find_sampler_state(state: Any) -> dict[str, Any] | None:
    if isinstance(state, dict):
        if {"epoch", "position", "num_replicas", "dataset_size"} <= state.keys():
            return state
        state = list(state.values())
    if isinstance(state, list):
        for item in state:
            found = _find_sampler_state(item)
            if found is not None:
                return found
    return None


def _batches_done(progress: dict[str, Any]) -> int:
    """Batches of the epoch that the saved run trained on, per process, as Lightning counts them on restore.

    Saved in ``on_train_batch_end``, the last batch is processed but not yet completed; Lightning then counts
    it as done (its restart stage "on train batch end").
    """
    total, current = progress["total"], progress["current"]
    batch_end = total["started"] == total["ready"] == total["processed"] == total["completed"] + 1
    return int(current["processed"] if batch_end else current["completed"])


def _shift_batch_progress(progress: dict[str, Any], shift: int) -> None:
    """Move every batch counter by ``shift``: the same relations (Lightning's restart stage), the new unit."""
    for part in ("total", "current"):
        for name in ("ready", "started", "processed", "completed"):
            progress[part][name] += shift


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
    if isinstance(state, str):  # _FRESH: another world size
        seed_fresh_streams(module.trainer)
    else:
        set_rng_state(state)
    setattr(module, _PENDING, None)
    _isolate_skipped_validation(module.trainer)
    return True


def seed_fresh_streams(trainer: L.Trainer) -> None:
    """Seed this rank's torch, NumPy and Python streams from (the run's seed, the step, the rank).

    For a resume on another world size: the new streams are reproducible (the same resume draws the same
    masks) and differ from those every rank started the run with.
    """
    entropy = [torch.initial_seed() % 2**63, trainer.global_step, trainer.global_rank]
    seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


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
