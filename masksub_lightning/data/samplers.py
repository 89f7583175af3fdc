"""Repeated-augmentation sampler (DeiT / DeiT-III / RSB, Hoffer et al. 2020) that is a DistributedSampler.

Each epoch draws a seeded permutation, repeats every index ``num_repeats`` times in a row and deals the stream
round-robin to the ranks, so the copies of one image land on different ranks (or in the same batch on a single
device) and get different augmentations::

    perm      = [7, 2, 5, ...]
    repeated  = [7, 7, 7, 2, 2, 2, 5, 5, 5, ...]
    rank r    = repeated[r::world_size][:num_selected]

An epoch keeps the length of an ordinary epoch (``ceil(N / world_size)`` samples per rank), so it covers about
``N / num_repeats`` distinct images; this is what DeiT's RASampler does (DeiT also rounds N down to a multiple
of 256, which we skip: it changes nothing but the last few hundred images).

Why not ``timm.data.distributed_sampler.RepeatAugSampler``: it is a plain ``Sampler``, so under DDP Lightning
wraps it in ``DistributedSamplerWrapper`` and shards the already sharded stream a second time, and it
seeds the shuffle with the epoch only. Subclassing ``DistributedSampler`` tells Lightning that the sampler
already shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler


class RepeatedAugSampler(DistributedSampler):
    """Seeded, ``set_epoch``-aware repeated-augmentation sampler for one rank of ``num_replicas``.

    With ``num_repeats=1`` it is an ordinary seeded shuffling DistributedSampler (``drop_last=False``: the
    stream wraps around so every rank gets the same count).

    Args:
        dataset: the dataset (only its length is used).
        num_repeats: how many times each selected image appears per epoch (3 in DeiT-III / RSB).
        num_replicas: world size.
        rank: this process's global rank.
        shuffle: shuffle each epoch (otherwise dataset order).
        seed: base seed; the order is a function of (seed, epoch, num_replicas, rank) only.
    """

    def __init__(
        self,
        dataset: Sized,
        num_repeats: int = 3,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if int(num_repeats) != num_repeats or num_repeats < 1:
            raise ValueError(f"num_repeats must be an integer >= 1, got {num_repeats}")
        # Explicit num_replicas / rank: the parent then never touches torch.distributed.
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.num_repeats = int(num_repeats)
        n = len(dataset)
        # Length of the repeated stream padded to a multiple of the world size, and this rank's share of it.
        self.num_samples = math.ceil(n * self.num_repeats / num_replicas)
        self.total_size = self.num_samples * num_replicas
        # Per-rank epoch length: as many samples as a plain DistributedSampler would give.
        self.num_selected = min(math.ceil(n / num_replicas), self.num_samples)

    def __iter__(self) -> Iterator[int]:
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
        return iter(stream[self.rank : self.total_size : self.num_replicas][: self.num_selected])

    def __len__(self) -> int:
        return self.num_selected
