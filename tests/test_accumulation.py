"""Gradient accumulation in the manual-optimization step (`grad_accumulation`).

N micro-batches of size B / N must apply the same update as one batch of size B (with the sub-branch's masks
fixed), the schedule and `global_step` count optimizer steps, a shorter last group of an epoch averages over the
batches it has, and under DDP an optimizer step costs one all-reduce however many micro-batches it has.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import AppliedGradients, make_images, quiet_trainer, tiny_vit_kwargs
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, TensorDataset

from masksub_lightning import MaskSubModule, SubBranch, register_sub_branch

CALLS = {"allreduce": 0}


@register_sub_branch("test_top_half")
class TopHalf(SubBranch):
    """A fixed mask (top half zeroed): the sub-branch input does not depend on how the batch is split."""

    @contextlib.contextmanager
    def perturbed(self, model, images):
        masked = images.clone()
        masked[..., : images.shape[-2] // 2, :] = 0
        yield masked


def make_module(accumulation: int, **overrides) -> MaskSubModule:
    torch.manual_seed(0)
    kwargs = dict(
        num_classes=4,
        model_kwargs=tiny_vit_kwargs(),
        sub_branch="test_top_half",
        optimizer="sgd",
        lr=0.05,
        weight_decay=0.0,
        warmup_epochs=1,
        warmup_lr=0.01,
        grad_clip_norm=0.5,  # clipping must see the whole step's gradient, not a micro-batch's
        grad_accumulation=accumulation,
    )
    return MaskSubModule("vit_tiny_patch16_224", **{**kwargs, **overrides})


Record = AppliedGradients  # gradient (after clipping) and LR of every optimizer step


def fit(module, batch_size: int, n: int = 32, epochs: int = 2) -> Record:
    images, labels = make_images(n=n, num_classes=4)
    record = Record()
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)  # fixed order
    trainer = quiet_trainer(max_epochs=epochs, num_sanity_val_steps=0, callbacks=[record])
    trainer.fit(module, train_dataloaders=loader)
    record.global_step = trainer.global_step
    return record


def test_micro_batches_apply_the_update_of_one_big_batch():
    whole, micro = make_module(1), make_module(4)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), micro.state_dict().values()))
    ref, acc = fit(whole, batch_size=16), fit(micro, batch_size=4)
    # 32 images / 16 = 2 optimizer steps per epoch either way, 2 epochs.
    assert ref.global_step == acc.global_step == 4 and len(ref.grads) == len(acc.grads) == 4
    assert acc.lrs == pytest.approx(ref.lrs, rel=1e-12)  # the schedule counts optimizer steps
    assert acc.lrs[0] == pytest.approx(0.01) and acc.lrs[2] < acc.lrs[1]  # warmup over 1 epoch (2 steps)
    for step, (g_ref, g_acc) in enumerate(zip(ref.grads, acc.grads)):
        for name in g_ref:
            torch.testing.assert_close(
                g_acc[name], g_ref[name], rtol=1e-4, atol=1e-7, msg=f"{name} step {step}"
            )
    for (name, p_ref), p_acc in zip(whole.model.named_parameters(), micro.model.parameters()):
        torch.testing.assert_close(p_acc, p_ref, rtol=1e-4, atol=1e-6, msg=name)


def test_without_the_sub_branch_too():
    ref = fit(make_module(1, sub_branch="none"), batch_size=16, epochs=1)
    acc = fit(make_module(2, sub_branch="none"), batch_size=8, epochs=1)
    for g_ref, g_acc in zip(ref.grads, acc.grads, strict=True):
        for name in g_ref:
            torch.testing.assert_close(g_acc[name], g_ref[name], rtol=1e-4, atol=1e-7)


def test_the_last_short_group_of_an_epoch_averages_over_its_batches():
    # 5 batches per epoch with groups of 2: steps of 2, 2 and 1 micro-batches -> 3 optimizer steps per epoch.
    flat = dict(grad_clip_norm=None, warmup_epochs=0, scheduler="constant")  # same LRs at 16 or 20 images
    acc = fit(make_module(2, **flat), batch_size=4, n=20, epochs=1)
    assert acc.global_step == 3 and len(acc.grads) == 3
    # The third step is the last batch alone: the gradient of (main + sub) / 2 on that batch, at the weights the
    # first two steps (batches 0-3, the same in a run over 16 images) left.
    images, labels = make_images(n=20, num_classes=4)
    run = make_module(2, **flat)
    first_two = fit(run, batch_size=4, n=16, epochs=1)  # the same first two steps (batches 0-3)
    assert first_two.global_step == 2
    run.train()
    run.model.zero_grad()
    last_images, last_labels = images[16:], labels[16:]
    logits = run.model(last_images)
    loss_main = run.main_loss(logits, last_labels)
    loss_sub = run.sub_loss(run.sub_branch_forward(last_images), logits.detach())
    ((loss_main + loss_sub) / 2).backward()
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(acc.grads[2][name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_bad_accumulation_is_refused():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"grad_accumulation must be a positive int, got"):
            make_module(bad)
    module = make_module(8)
    with pytest.raises(ValueError, match=r"grad_accumulation=8 is more than the 2 train batches of an epoch"):
        fit(module, batch_size=16, n=32, epochs=1)


# --------------------------------------------------------------------------------------------------- DDP
def counting_allreduce_hook(state, bucket):
    CALLS["allreduce"] += 1
    return default_hooks.allreduce_hook(state, bucket)


class Shard(L.LightningDataModule):
    """Rank r gets rows r, r + world, ...: two ranks x 2 micro-batches of 2 = the single run's batches of 8."""

    def __init__(self, images, labels, batch_size):
        super().__init__()
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        # Interleave so that micro-batch k of every rank together holds rows of the single run's k-th quarter.
        idx = torch.arange(len(self.images)).view(-1, world * self.batch_size)
        mine = idx[:, rank * self.batch_size : (rank + 1) * self.batch_size].reshape(-1)
        return DataLoader(TensorDataset(self.images[mine], self.labels[mine]), batch_size=self.batch_size)


class CountAndSave(Record):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        if trainer.world_size > 1:  # Lightning registers comm hooks on CUDA only
            trainer.strategy.model.register_comm_hook(state=None, hook=counting_allreduce_hook)

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        torch.save(self.grads, self.out / f"grads{trainer.global_rank}.pt")
        (self.out / f"calls{trainer.global_rank}.json").write_text(
            json.dumps({**CALLS, "steps": trainer.global_step})
        )


def test_ddp_one_allreduce_per_optimizer_step_and_the_single_process_gradient(tmp_path):
    images, labels = make_images(n=32, num_classes=4)
    module, reference = make_module(2, grad_clip_norm=None), make_module(1, grad_clip_norm=None)
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", bucket_cap_mb=1000)
    ddp = quiet_trainer(
        devices=2,
        strategy=strategy,
        max_epochs=1,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        callbacks=[CountAndSave(tmp_path)],
    )
    ddp.fit(module, datamodule=Shard(images, labels, batch_size=4))  # 2 ranks x 2 micro-batches x 4 = 16

    single = Record()
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    quiet_trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[single]).fit(reference, loader)
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"calls{rank}.json").read_text())
        assert (
            calls["steps"] == 2 and calls["allreduce"] == 2
        )  # 4 micro-batches, 2 optimizer steps, 2 all-reduces
        grads = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        for step in range(2):
            for name, ref in single.grads[step].items():
                torch.testing.assert_close(grads[step][name], ref, rtol=1e-4, atol=1e-6, msg=f"{name} {step}")
