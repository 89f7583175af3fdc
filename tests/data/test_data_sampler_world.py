"""The training sampler's epoch is one global stream dealt to the ranks: the same epoch for any world size with
the same global batch, and a saved position that another world size continues from."""

from __future__ import annotations

from collections import Counter

import pytest

from masksub_lightning.data import RepeatedAugSampler

N, GLOBAL = 101, 16  # 96 positions an epoch (6 optimizer steps of 16); 32 images 3 times each


def _ranks(world: int, global_batch: int | None = GLOBAL, epoch: int = 2) -> list[RepeatedAugSampler]:
    samplers = []
    for rank in range(world):
        sampler = RepeatedAugSampler(
            range(N), 3, num_replicas=world, rank=rank, seed=3, with_seeds=True, global_batch=global_batch
        )
        sampler.set_epoch(epoch)
        samplers.append(sampler)
    return samplers


def _global(per_rank: list[list]) -> list:
    """The ranks' samples in global order: position p of rank r is global position p x world + r."""
    world = len(per_rank)
    return [per_rank[r][p] for p in range(len(per_rank[0])) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_the_epoch_is_the_same_global_stream_on_every_world_size(world):
    stream = _global([list(s) for s in _ranks(world)])
    assert stream == _global([list(s) for s in _ranks(1)])  # the same (index, augmentation seed) per position
    assert len(stream) == 96 and all(len(s) == 96 // world for s in _ranks(world))
    assert Counter(Counter(i for i, _ in stream).values()) == {3: 32}
    # Without a global batch the epoch is a DistributedSampler's, ceil(N / world) per rank: world-dependent.
    assert [len(s) for s in _ranks(1, None)] == [101] and {len(s) for s in _ranks(4, None)} == {26}


@pytest.mark.parametrize(("world", "new_world"), [(4, 2), (2, 4), (4, 1), (1, 8)])
def test_a_saved_position_continues_on_another_world_size_with_the_samples_not_yet_handed_out(
    world, new_world
):
    full = _global([list(s) for s in _ranks(1)])
    cut = _ranks(world)
    for sampler in cut:  # every rank 8 samples in (the ranks advance in lockstep)
        iterator = iter(sampler)
        for _ in range(8):
            next(iterator)
    state = cut[0].state_dict()  # rank 0's: what Lightning keeps
    assert state["consumed"] == 8 * world and state["global_batch"] == GLOBAL
    resumed = _ranks(new_world)
    for sampler in resumed:  # Lightning's order: load, then set_epoch with the saved epoch
        sampler.load_state_dict(state)
        sampler.set_epoch(2)
    assert _global([list(s) for s in resumed]) == full[8 * world :]


def test_states_that_cannot_continue_exactly_are_refused():
    four = _ranks(4)[0]
    next(iter(four))  # consumed: 4 samples, not a multiple of 8 ranks
    with pytest.raises(ValueError, match=r"global_batch=16 but this sampler has global_batch=32"):
        RepeatedAugSampler(range(N), 3, num_replicas=2, seed=3, global_batch=32).load_state_dict(
            four.state_dict()
        )
    with pytest.raises(
        ValueError, match=r"consumed=4 samples of epoch 2, which does not split over num_replicas=8"
    ):
        RepeatedAugSampler(range(N), 3, num_replicas=8, seed=3, global_batch=16).load_state_dict(
            four.state_dict()
        )
    with pytest.raises(
        ValueError, match=r"num_replicas=4 but this sampler has num_replicas=2: another world size"
    ):
        RepeatedAugSampler(range(N), 3, num_replicas=2, seed=3).load_state_dict(
            _ranks(4, None)[0].state_dict()
        )
    with pytest.raises(ValueError, match=r"global_batch=10 is invalid: must be a multiple of num_replicas=4"):
        RepeatedAugSampler(range(N), 3, num_replicas=4, global_batch=10)
