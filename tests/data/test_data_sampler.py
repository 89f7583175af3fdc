"""Repeated-augmentation sampler: seeded order, repeats spread over ranks, Lightning DDP leaves it alone."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import RunningStage

from masksub_lightning.data import DigitsDataModule, RepeatedAugSampler


def _indices(n, world, rank, repeats=3, seed=0, epoch=0):
    sampler = RepeatedAugSampler(range(n), num_repeats=repeats, num_replicas=world, rank=rank, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_order_is_a_function_of_seed_world_rank_and_epoch():
    assert _indices(50, 2, 1, seed=3, epoch=4) == _indices(50, 2, 1, seed=3, epoch=4)
    assert _indices(50, 2, 1, seed=3, epoch=4) != _indices(50, 2, 1, seed=3, epoch=5)
    assert _indices(50, 2, 1, seed=3, epoch=4) != _indices(50, 2, 1, seed=4, epoch=4)
    assert _indices(50, 2, 0, seed=3, epoch=4) != _indices(50, 2, 1, seed=3, epoch=4)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_sample_repeated_three_times_across_ranks(world):
    n = 24  # divisible by 3 and by every world size, so nothing is padded or cut mid-sample
    per_rank = [_indices(n, world, rank, epoch=1) for rank in range(world)]
    assert all(len(r) == n // world for r in per_rank)  # epoch length as without repeated aug
    counts = Counter(i for r in per_rank for i in r)
    assert len(counts) == n // 3 and set(counts.values()) == {3}


def test_copies_of_a_sample_go_to_different_ranks():
    # World size 3 with 3 repeats: rank r gets copy r of every sample, so all ranks see the same images.
    ranks = [_indices(30, 3, r) for r in range(3)]
    assert ranks[0] == ranks[1] == ranks[2]
    assert len(set(ranks[0])) == 10
    # One device: the 3 copies are consecutive (they land in the same batch, as in DeiT).
    single = _indices(30, 1, 0)
    assert all(single[i] == single[i + 1] == single[i + 2] for i in range(0, 30, 3))


def test_no_repeats_is_a_seeded_distributed_shuffle():
    ranks = [_indices(10, 3, r, repeats=1, seed=7) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]  # ceil(10 / 3), padded by wrapping around
    assert set().union(*ranks) == set(range(10))
    assert sum(len(r) for r in ranks) - len(set().union(*ranks)) == 2  # exactly the 2 padding samples repeat


def test_invalid_repeats():
    with pytest.raises(ValueError, match="num_repeats"):
        RepeatedAugSampler(range(4), num_repeats=0)


def test_datamodule_sampler_follows_trainer_world_and_lightning_does_not_wrap_it():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    dm = DigitsDataModule(batch_size=8, repeated_aug=3, seed=5)
    dm.trainer = trainer
    loader = dm.train_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, RepeatedAugSampler)
    assert (sampler.num_replicas, sampler.rank, sampler.num_repeats, sampler.seed) == (2, 0, 3, 5)
    assert sampler.global_batch == 16 and len(sampler) == 712  # whole global batches: 1437 // 16 * 16 / 2
    assert loader.drop_last and len(loader) == 712 // 8
    # With the default use_distributed_sampler=True, Lightning keeps our sampler (no second sharding).
    assert not trainer._data_connector._requires_distributed_sampler(loader)
    prepared = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    assert prepared is loader
    # Same order as a sampler built by hand for rank 0 of 2 (a prefix: whole global batches only); the loader's
    # keys are (index, sample seed) pairs.
    assert sampler.indices() == [i for i, _ in sampler] == _indices(1437, 2, 0, seed=5)[:712]


def test_single_device_loader_without_trainer():
    dm = DigitsDataModule(batch_size=8, seed=1)
    loader = dm.train_dataloader()
    assert (loader.sampler.num_replicas, loader.sampler.num_repeats) == (1, 1)
    indices = loader.sampler.indices()  # whole batches of 8: 1432 of the 1437 images, each once
    assert len(indices) == len(set(indices)) == 1432 and set(indices) <= set(range(1437))
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, training=False)
    assert list(dm.train_dataloader().sampler) == list(loader.sampler)  # same seed -> same order


class _RecordSampler(L.LightningModule):
    """Writes, per rank and epoch, the indices its train sampler yields."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.layer = torch.nn.Linear(3 * 8 * 8, 10)

    def on_train_epoch_start(self) -> None:
        sampler = self.trainer.train_dataloader.sampler
        record = dict(
            type=type(sampler).__name__,
            replicas=sampler.num_replicas,
            epoch=sampler.epoch,
            indices=sampler.indices(),
        )
        path = Path(self.out) / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps(record))

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_real_ddp_run_shards_once_with_default_distributed_sampler(tmp_path):
    dm = DigitsDataModule(batch_size=16, img_size=8, repeated_aug=3, seed=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_RecordSampler(str(tmp_path)), datamodule=dm)
    for epoch in (0, 1):
        recs = [json.loads((tmp_path / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert all(
            r["type"] == "RepeatedAugSampler" and r["replicas"] == 2 and r["epoch"] == epoch for r in recs
        )
        for rank, rec in enumerate(recs):
            assert rec["indices"] == _indices(1437, 2, rank, seed=2, epoch=epoch)
        counts = Counter(recs[0]["indices"] + recs[1]["indices"])
        assert max(counts.values()) == 3


def test_ranks_augment_their_copies_of_an_image_differently():
    # World size 3, 3 repeats: every rank loads the same images in the same order; the augmentations must
    # still differ across ranks (worker seeds mix in the rank), and repeat exactly for the same rank and seed.
    first = {}
    for run, rank in enumerate((0, 1, 2, 0)):
        torch.manual_seed(123)  # every rank's global RNG is seeded the same (as seed_everything does)
        dm = DigitsDataModule(batch_size=6, num_workers=1, persistent_workers=False, repeated_aug=3, seed=4)
        dm.trainer = SimpleNamespace(world_size=3, global_rank=rank, training=True)
        first[run] = next(iter(dm.train_dataloader()))
    assert all(torch.equal(first[0][1], first[r][1]) for r in (1, 2, 3))  # same labels: same images
    assert not torch.equal(first[0][0], first[1][0]) and not torch.equal(first[1][0], first[2][0])
    assert torch.equal(first[0][0], first[3][0])  # reproducible
