"""A checkpoint resumed with another world size, batch size or gradient accumulation (the global batch kept).

Lightning's batch counters are per process; :mod:`masksub_lightning.training.resume` moves them to the same sample of the
epoch in the new unit before Lightning restores them, and refuses layouts that cannot continue exactly.
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest

from masksub_lightning.training.resume import (
    LAYOUT_KEY,
    LOADER_KEY,
    RNG_KEY,
    capture_rng_state,
    continue_with_new_layout,
    stash_rng_states,
)


def _module(world: int, batch: int, accumulation: int, rank: int = 0) -> SimpleNamespace:
    trainer = SimpleNamespace(
        world_size=world,
        global_rank=rank,
        train_dataloader=None,  # not built yet when the checkpoint is loaded
        datamodule=SimpleNamespace(batch_size=batch),
        accumulate_grad_batches=1,
    )
    return SimpleNamespace(_trainer=trainer, trainer=trainer, hparams={"grad_accumulation": accumulation})


def _checkpoint(world: int, batch: int, accumulation: int, batches: int) -> dict:
    """Saved in on_train_batch_end after ``batches`` batches of epoch 1 (11 batches in epoch 0 before)."""
    sampler = {
        "epoch": 1,
        "position": batches * batch,
        "consumed": batches * batch * world,
        "num_replicas": world,
        "rank": 0,
        "dataset_size": 90,
        "global_batch": batch * world * accumulation,
        "seed": 0,
        "num_repeats": 3,
    }
    loader = {"_sampler_iter_state": {"samples_yielded": batches * batch, "sampler_state": sampler}}
    done = {"ready": batches, "started": batches, "processed": batches, "completed": batches - 1}
    progress = {"total": {k: v + 11 for k, v in done.items()}, "current": dict(done), "is_last_batch": False}
    return {
        RNG_KEY: [capture_rng_state() for _ in range(world)],
        LAYOUT_KEY: {"world_size": world, "batch_size": batch, "grad_accumulation": accumulation},
        **({LOADER_KEY: [copy.deepcopy(loader) for _ in range(world)]} if world > 1 else {}),
        "loops": {
            "fit_loop": {"state_dict": {"combined_loader": [loader]}, "epoch_loop.batch_progress": progress}
        },
    }


def _progress(checkpoint: dict) -> dict:
    return checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]


def test_another_world_size_moves_the_batch_counters_to_the_same_sample_and_seeds_fresh_streams():
    checkpoint = _checkpoint(world=4, batch=4, accumulation=1, batches=2)  # 2 steps of 16 into the epoch
    module = _module(world=2, batch=4, accumulation=2, rank=1)
    with pytest.warns(UserWarning, match="resuming a checkpoint of 4 processes on 2: the epoch continues"):
        stash_rng_states(module, checkpoint)
    # 32 samples consumed = 4 batches of 4 on each of 2 processes (the restart stage kept: completed + 1)
    assert _progress(checkpoint)["current"] == {"ready": 4, "started": 4, "processed": 4, "completed": 3}
    assert _progress(checkpoint)["total"] == {"ready": 15, "started": 15, "processed": 15, "completed": 14}
    assert module._masksub_rng_pending == "fresh"  # the saved streams belong to ranks 0-3 of 4
    fit_state = checkpoint["loops"]["fit_loop"]["state_dict"]
    assert fit_state["combined_loader"] is checkpoint[LOADER_KEY][1]  # a saved rank's loader state


def test_the_same_world_size_with_another_batch_size_keeps_each_ranks_streams():
    checkpoint = _checkpoint(world=2, batch=4, accumulation=2, batches=4)  # 2 steps of 16
    module = _module(world=2, batch=8, accumulation=1, rank=1)
    with pytest.warns(
        UserWarning, match=r"checkpoint of batch_size 4 x 2 processes x grad_accumulation 2 with bat"
    ):
        stash_rng_states(module, checkpoint)
    assert _progress(checkpoint)["current"]["processed"] == 2
    assert module._masksub_rng_pending is checkpoint[RNG_KEY][1]


def test_an_unchanged_layout_or_an_older_checkpoint_is_left_alone():
    checkpoint = _checkpoint(world=4, batch=4, accumulation=1, batches=2)
    before = copy.deepcopy(_progress(checkpoint))
    assert not continue_with_new_layout(_module(4, 4, 1), checkpoint)
    del checkpoint[LAYOUT_KEY]
    assert not continue_with_new_layout(_module(2, 4, 2), checkpoint)
    assert _progress(checkpoint) == before


@pytest.mark.parametrize(
    ("world", "batch", "accumulation", "message"),
    [
        (
            2,
            4,
            1,
            "cannot resume on 2 processes: the checkpoint's global batch was 16 (batch_size 4 x 4 processes x "
            "grad_accumulation 1), this run's is 8 (batch_size 4 x 2 processes x grad_accumulation 1); "
            "set grad_accumulation=2 or batch_size=8 to keep it",
        ),
        (3, 4, 1, "this run's is 12 (batch_size 4 x 3 processes x grad_accumulation 1); choose batch_size x"),
        (2, 3, 1, "this run's is 6 (batch_size 3 x 2 processes x grad_accumulation 1); set batch_size=8 to"),
    ],
)
def test_a_changed_global_batch_is_refused_naming_what_keeps_it(world, batch, accumulation, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        continue_with_new_layout(_module(world, batch, accumulation), _checkpoint(4, 4, 1, batches=2))


@pytest.mark.parametrize("where", ["inside_a_step", "inside_an_accumulation_group"])
def test_a_checkpoint_off_a_step_boundary_is_refused(where):
    if where == "inside_a_step":  # Lightning's hpc checkpoint from a signal handler: the batch is fetched
        checkpoint = _checkpoint(world=4, batch=4, accumulation=1, batches=2)
        checkpoint[LOADER_KEY][0]["_sampler_iter_state"]["sampler_state"]["position"] += 4
    else:  # 3 micro-batches of 4 x 2 processes: 24 samples, not whole steps of 16
        checkpoint = _checkpoint(world=2, batch=4, accumulation=2, batches=3)
    with pytest.raises(ValueError, match="cannot resume on 1 process: the checkpoint was not written at an"):
        continue_with_new_layout(_module(1, 4, 4), checkpoint)
