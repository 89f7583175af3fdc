"""Two CPU processes under DDP (ddp_spawn, gloo): same gradient as one process, one all-reduce per step."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import lightning as L
import torch
from conftest import make_images, quiet_trainer, tiny_vit_kwargs
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, TensorDataset

from masksub_lightning import MaskSubModule, SubBranch, register_sub_branch

ALLREDUCE_CALLS = {"n": 0}
STEPS = 3


def counting_allreduce_hook(state, bucket):
    """DDP comm hook: count gradient all-reduces (one per bucket per synchronising backward)."""
    ALLREDUCE_CALLS["n"] += 1
    return default_hooks.allreduce_hook(state, bucket)


@register_sub_branch("test_left_half")
class LeftHalf(SubBranch):
    """A deterministic mask (left half zeroed) so that one process and two ranks see the same sub-branch input."""

    @contextlib.contextmanager
    def perturbed(self, model, images):
        masked = images.clone()
        masked[..., : images.shape[-1] // 2] = 0
        yield masked


class ShardedData(L.LightningDataModule):
    """Rank r trains on its own contiguous slice of one fixed batch (no distributed sampler shuffling)."""

    def __init__(self, images, labels):
        super().__init__()
        self.images, self.labels = images, labels

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        per_rank = len(self.images) // world
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        data = TensorDataset(self.images[part].repeat(STEPS, 1, 1, 1), self.labels[part].repeat(STEPS))
        return DataLoader(data, batch_size=per_rank)


class SaveGradsAndCounts(L.Callback):
    def __init__(self, out: Path):
        self.out = out
        self.grads = []

    def on_train_start(self, trainer, pl_module):
        # Lightning registers ddp_comm_hook on CUDA only; register the counting hook on the CPU DDP model directly.
        if trainer.world_size > 1:
            trainer.strategy.model.register_comm_hook(state=None, hook=counting_allreduce_hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:  # what the first mask / mixup draw of this rank would see
            (self.out / f"draw_rank{trainer.global_rank}.json").write_text(json.dumps(torch.rand(4).tolist()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()})

    def on_train_end(self, trainer, pl_module):
        torch.save(self.grads, self.out / f"grads_rank{trainer.global_rank}.pt")
        (self.out / f"allreduce_rank{trainer.global_rank}.json").write_text(json.dumps(ALLREDUCE_CALLS))


def test_two_process_ddp_matches_one_process_with_one_allreduce_per_step(tmp_path):
    images, labels = make_images(n=8, num_classes=4)
    module = MaskSubModule(
        "vit_tiny_patch16_224",
        num_classes=4,
        model_kwargs=tiny_vit_kwargs(),
        sub_branch="test_left_half",
        optimizer="sgd",
        lr=0.1,
        weight_decay=0.0,
        scheduler="constant",
    )
    single_module = copy.deepcopy(module)

    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    strategy = DDPStrategy(
        start_method="spawn",
        process_group_backend="gloo",
        bucket_cap_mb=1000,  # one bucket: one hook call per synchronising backward
    )
    ddp = quiet_trainer(
        devices=2,
        strategy=strategy,
        max_steps=STEPS,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        callbacks=[SaveGradsAndCounts(ddp_dir)],
    )
    ddp.fit(module, datamodule=ShardedData(images, labels))

    single_dir = tmp_path / "single"
    single_dir.mkdir()
    single = quiet_trainer(
        max_steps=STEPS, num_sanity_val_steps=0, callbacks=[SaveGradsAndCounts(single_dir)]
    )
    single.fit(single_module, datamodule=ShardedData(images, labels))

    for rank in (0, 1):
        assert json.loads((ddp_dir / f"allreduce_rank{rank}.json").read_text())["n"] == STEPS
    draws = [json.loads((ddp_dir / f"draw_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert draws[0] != draws[1], "both ranks would draw the same masks"
    reference = torch.load(single_dir / "grads_rank0.pt", weights_only=True)
    assert len(reference) == STEPS
    for rank in (0, 1):
        grads = torch.load(ddp_dir / f"grads_rank{rank}.pt", weights_only=True)
        for step in range(STEPS):
            for name, ref in reference[step].items():
                torch.testing.assert_close(
                    grads[step][name], ref, rtol=1e-4, atol=1e-6, msg=f"{name} step {step}"
                )
