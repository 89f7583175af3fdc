"""Samplers that are DistributedSamplers, so Lightning's ``use_distributed_sampler`` leaves them alone.

:class:`RepeatedAugSampler` (training; DeiT / DeiT-III / RSB, Hoffer et al. 2020) draws a seeded permutation each
epoch, repeats every index ``num_repeats`` times in a row and deals the stream round-robin to the ranks, so the
copies of one image land on different ranks (or in the same batch on a single device) and get different
augmentations::

    perm      = [7, 2, 5, ...]
    repeated  = [7, 7, 7, 2, 2, 2, 5, 5, 5, ...]
    rank r    = repeated[r::world_size][:num_selected]

The global stream (the repeated permutation) depends on (seed, epoch) only; the world size only decides how it is
dealt. An epoch keeps the length of an ordinary epoch, so it covers about ``N / num_repeats`` distinct images;
this is what DeiT's RASampler does. Its length:

* with ``global_batch`` (the images of one optimizer step over all ranks, which the package's DataModules pass):
  the first ``(N // global_batch) * global_batch`` positions of the stream, i.e. whole optimizer steps (DeiT
  rounds N down to a multiple of 256 the same way). That is the same epoch, step for step, for every world
  size, per-process batch and gradient accumulation with this global batch;
* without: ``ceil(N / world_size)`` samples per rank (the stream wraps around to pad), as a DistributedSampler.

It is resumable mid-epoch: ``state_dict()`` holds the epoch and the samples of it consumed by all ranks together
(``consumed``, a position in the global stream) and ``load_state_dict()`` makes the next iteration continue
there, which torchdata's ``StatefulDataLoader`` uses. With ``global_batch`` the state loads into a sampler of
another world size: rank r of the new world continues with global positions ``consumed + r, consumed + r +
world_size, ...``, so the epoch goes on with exactly the samples not yet handed out. With ``with_seeds=True`` it
yields ``(index, sample_seed)`` pairs, the seed a function of (seed, epoch, position in the global stream) only,
so an augmentation can be reproduced after a resume whatever the number of workers or ranks.

:class:`ShardedEvalSampler` (validation / test) gives rank r the indices ``r, r + world, ...`` with no padding,
so every sample is evaluated exactly once over all ranks (Lightning's DistributedSampler pads with duplicates).

Why not ``timm.data.distributed_sampler.RepeatAugSampler``: it is a plain ``Sampler``, so under DDP Lightning
wraps it in ``DistributedSamplerWrapper`` and shards the already sharded stream a second time, and it
seeds the shuffle with the epoch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (splitmix64 finaliser chained over the values).

    Cheap enough to call once per sample in pure Python, and unlike ``seed + epoch`` sums, neighbouring inputs
    (epoch 1 / position 0 vs epoch 0 / position 1) give unrelated seeds.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


class RepeatedAugSampler(DistributedSampler):
    """Seeded, ``set_epoch``-aware, resumable repeated-augmentation sampler for one rank of ``num_replicas``.

    With ``num_repeats=1`` it is an ordinary seeded shuffling DistributedSampler (without ``global_batch`` the
    stream wraps around so every rank gets the same count).

    Args:
        dataset: the dataset (only its length is used).
        num_repeats: how many times each selected image appears per epoch (3 in DeiT-III / RSB).
        num_replicas: world size.
        rank: this process's global rank.
        shuffle: shuffle each epoch (otherwise dataset order).
        seed: base seed; the global stream is a function of (seed, epoch) only.
        with_seeds: yield ``(index, sample_seed)`` pairs instead of indices (for :class:`SampleDataset`).
        global_batch: images per optimizer step over all ranks (per-process batch x world size x gradient
            accumulation). Given, an epoch is the largest whole number of global batches (the same epoch for any
            world size with this global batch) and a saved state loads into a sampler of another world size.

    Raises:
        ValueError: ``num_repeats`` is not an integer >= 1, or ``global_batch`` is not a positive multiple of
            ``num_replicas``.
    """

    def __init__(
        self,
        dataset: Sized,
        num_repeats: int = 3,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        with_seeds: bool = False,
        global_batch: int | None = None,
    ) -> None:
        if isinstance(num_repeats, bool) or int(num_repeats) != num_repeats or num_repeats < 1:
            raise ValueError(f"num_repeats={num_repeats!r} is invalid: must be an integer >= 1")
        # Explicit num_replicas / rank: the parent then never touches torch.distributed.
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.num_repeats = int(num_repeats)
        self.with_seeds = with_seeds
        self.global_batch = _check_global_batch(global_batch, num_replicas)
        n = len(dataset)
        # Length of the repeated stream padded to a multiple of the world size, and this rank's share of it.
        self.num_samples = math.ceil(n * self.num_repeats / num_replicas)
        self.total_size = self.num_samples * num_replicas
        if self.global_batch is None:  # as many samples per rank as a plain DistributedSampler gives
            self.num_selected = min(math.ceil(n / num_replicas), self.num_samples)
        else:  # whole optimizer steps; at most n <= n * num_repeats positions, so the stream never wraps
            self.num_selected = n // self.global_batch * self.global_batch // num_replicas
        self.position = 0  # samples of the current epoch handed out by this rank so far
        self._resume_at: int | None = None

    def indices(self) -> list[int]:
        """This rank's indices of the current epoch, in order: global positions ``rank, rank + world, ...``."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        stream = torch.repeat_interleave(order, self.num_repeats).tolist()
        # Pad by wrapping around so every rank gets the same count.
        stream = (stream * math.ceil(self.total_size / len(stream)))[: self.total_size]
        return stream[self.rank : self.total_size : self.num_replicas][: self.num_selected]

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        # Take the resume position now, not lazily in the generator: the loader may build an iterator, drop it
        # unused and build another (torchdata does after loading a finished state). The epoch is read lazily,
        # at the first sample, as with a plain DataLoader (set_epoch may come between iter() and next()).
        start, self._resume_at = self._resume_at or 0, None
        self.position = start
        return self._generate(start)

    def _generate(self, start: int) -> Iterator[Any]:
        epoch, indices = self.epoch, self.indices()
        for position in range(start, len(indices)):
            self.position = position + 1
            if self.with_seeds:
                # Position in the global (all-rank) stream: the copies of an image on other ranks differ.
                yield indices[position], mix_seed(self.seed, epoch, position * self.num_replicas + self.rank)
            else:
                yield indices[position]

    def __len__(self) -> int:
        return self.num_selected

    @property
    def epoch_length(self) -> int:
        """Samples of one epoch over all ranks together."""
        return self.num_selected * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        # A different epoch starts from its beginning; the same epoch keeps a loaded resume position
        # (Lightning calls set_epoch with the resumed epoch after load_state_dict).
        if epoch != self.epoch:
            self._resume_at = None
        super().set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: epoch, samples handed out (this rank's and all ranks'), and what must match.

        ``consumed`` counts all ranks together: the ranks advance in lockstep, so after ``position`` samples
        on each rank the global stream's first ``position x num_replicas`` positions are handed out.
        """
        return {
            "epoch": self.epoch,
            "position": self.position,
            "consumed": self.position * self.num_replicas,
            "epoch_length": self.epoch_length,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "num_repeats": self.num_repeats,
            "dataset_size": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s epoch and global position on the next ``iter()``.

        The state may come from another rank (Lightning checkpoints rank 0's loader state only; all ranks hand
        out the same number of samples) and, for samplers built with the same ``global_batch``, from another
        world size: this rank then takes its share of the positions not yet consumed.

        Raises:
            ValueError: the state comes from a different seed, repeat count, dataset or global batch, or from
                another world size without a common ``global_batch``, so the stream it describes is not this
                sampler's; or its consumed count does not split evenly over this world size.
        """
        self._check_same_stream(state)
        epoch = int(state["epoch"])
        consumed = int(state.get("consumed", int(state["position"]) * int(state["num_replicas"])))
        if consumed % self.num_replicas:
            raise ValueError(
                f"RepeatedAugSampler state has consumed={consumed} samples of epoch {epoch}, which does not split "
                f"over num_replicas={self.num_replicas}: resume on {state['num_replicas']} processes"
            )
        position = consumed // self.num_replicas
        if position >= self.num_selected:  # the saved epoch was complete: the next one starts from scratch
            epoch, position = epoch + 1, 0
        if self.epoch > epoch:
            # set_epoch already moved on: Lightning ended the saved epoch early (limit_train_batches) and now
            # runs the next one, which starts from its beginning.
            self._resume_at = None
            return
        self.epoch = epoch
        self._resume_at = position
        self.position = position

    def _check_same_stream(self, state: dict[str, Any]) -> None:
        """ValueError unless ``state`` describes this sampler's global stream and epoch length."""
        for key in ("seed", "num_repeats", "dataset_size", "global_batch"):
            mine = len(self.dataset) if key == "dataset_size" else getattr(self, key)
            if key in state and state[key] != mine:
                raise ValueError(
                    f"RepeatedAugSampler state has {key}={state[key]!r} but this sampler has {key}={mine!r}: "
                    "an exact resume needs the same seed, repeated_aug, dataset and global batch"
                )
        world = state.get("num_replicas", self.num_replicas)
        if world != self.num_replicas and (self.global_batch is None or state.get("global_batch") is None):
            raise ValueError(
                f"RepeatedAugSampler state has num_replicas={world!r} but this sampler has "
                f"num_replicas={self.num_replicas!r}: another world size resumes exactly only for samplers "
                "built with the same global_batch (the package's DataModules pass it)"
            )


def _check_global_batch(global_batch: Any, num_replicas: int) -> int | None:
    if global_batch is None:
        return None
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global_batch={global_batch!r} is invalid: must be a positive integer or None")
    if global_batch % num_replicas:
        raise ValueError(
            f"global_batch={global_batch} is invalid: must be a multiple of num_replicas={num_replicas} "
            "(per-process batch x world size x gradient accumulation)"
        )
    return global_batch


class ShardedEvalSampler(DistributedSampler):
    """Rank r of ``num_replicas`` gets indices ``r, r + num_replicas, ...``: no padding, no shuffling.

    Shards differ in length by at most one sample; metrics that sum counts over ranks (torchmetrics) are then
    exactly the single-process numbers. A DistributedSampler subclass, so Lightning does not replace it.
    Lightning's ``UnrepeatedDistributedSampler`` gives the same shards (checked for 0-39 samples on 1-5 ranks) but
    asserts when a rank gets no sample (fewer samples than processes), which this one allows.

    Args:
        dataset: the dataset (only its length is used).
        num_replicas: world size.
        rank: this process's global rank.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
