"""One training run for tests/test_fsdp2.py, launched as a plain process or under torchrun (CPU, gloo).

    python tests/fsdp2_worker.py KIND STRATEGY OUT [--steps N] [--stop-at N] [--resume CKPT]

KIND: masksub | mae | lut. STRATEGY: single (one process, the whole batch) | ddp | fsdp2. Every run sees the same
16 samples in the same optimizer steps: rank r of W takes its interleaved share of each global batch of 8. It
writes, per rank, the gradient of every step (whole tensors, gathered from the shards), the final weights, and the
number of reduce-scatter / all-reduce calls. Sampling is made independent of the world size where the method
draws at random (MAE's token shuffle comes from the pixels, MaskSub's sub-branch is dropout at p=0), so runs on
different world sizes must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_images, tiny_vit_kwargs

from masksub_lightning import LUTModule, MAEModule, MaskSubModule
from masksub_lightning.callbacks import ResumeCheckpoint
from masksub_lightning.training.sharding import FSDP2Strategy

GLOBAL_BATCH, SAMPLES = 8, 16
CALLS = {"reduce_scatter": 0, "all_reduce": 0}


def _count(name: str, key: str) -> None:
    original = getattr(dist, name, None)
    if original is None:
        return

    def counted(*args, **kwargs):
        CALLS[key] += 1
        return original(*args, **kwargs)

    setattr(dist, name, counted)


for _name in ("reduce_scatter_single", "reduce_scatter_tensor"):  # the name FSDP2 uses differs by release
    _count(_name, "reduce_scatter")


class PixelShuffleMAE(MAEModule):
    """MAE whose token shuffle is a function of each sample's pixels: the same on any world size."""

    def draw_shuffle(self, batch_size, device, generator=None):
        return self._pixels[:, : self.num_patches].argsort(dim=1)

    def compute_losses(self, batch):
        self._pixels = self._images(batch).flatten(1)
        return super().compute_losses(batch)


class PixelShuffleLUT(LUTModule):
    draw_shuffle = PixelShuffleMAE.draw_shuffle

    def compute_losses(self, batch):
        self._pixels = self._views(batch)[:, 0].flatten(1)
        return super().compute_losses(batch)


def make_module(kind: str) -> L.LightningModule:
    torch.manual_seed(0)
    common = dict(lr=0.05, weight_decay=0.0, warmup_epochs=0, grad_clip_norm=0.5)
    if kind == "masksub":  # dropout at p=0: a deterministic sub-branch with its own (second) backward
        return MaskSubModule(
            "vit_tiny_patch16_224",
            num_classes=4,
            model_kwargs=tiny_vit_kwargs(),
            sub_branch="dropout",
            sub_ratio=0.0,
            optimizer="sgd",
            **common,
        )
    pre = dict(
        model="vit_small_patch16_224",
        model_kwargs=tiny_vit_kwargs(),
        decoder_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        lr_base_batch_size=None,
        export_on_fit_end=False,
        optimizer="sgd",  # AdamW would turn 1e-6 rounding differences of near-zero gradients into lr-sized steps
        **common,
    )
    return PixelShuffleMAE(**pre) if kind == "mae" else PixelShuffleLUT(proj_hidden_dim=32, **pre)


class Shard(L.LightningDataModule):
    """Rank r of W takes rows r*b .. r*b+b-1 of every global batch of 8 (b = 8 / W), in a fixed order."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        images, labels = make_images(n=SAMPLES, num_classes=4)
        if kind == "lut":  # two views: the image and a flipped copy
            images = torch.stack([images, images.flip(-1)], dim=1)
        self.images, self.labels = images, labels

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        per_rank = GLOBAL_BATCH // world
        rows = torch.arange(SAMPLES).view(-1, GLOBAL_BATCH)[:, rank * per_rank : (rank + 1) * per_rank]
        mine = rows.reshape(-1)
        # Stateful (as the package's DataModules): a mid-epoch resume continues the epoch where it stopped.
        return StatefulDataLoader(TensorDataset(self.images[mine], self.labels[mine]), batch_size=per_rank)


class Record(L.Callback):
    """The gradient each optimizer step applied (whole tensors) and the collective calls per step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.calls: list[dict[str, int]] = []

    def on_train_start(self, trainer, module):
        def after_step(optimizer, args, kwargs):
            self.grads.append({n: _whole(p.grad).clone() for n, p in _trained(module) if p.grad is not None})
            self.calls.append(dict(CALLS))
            CALLS.update(reduce_scatter=0, all_reduce=0)

        CALLS.update(reduce_scatter=0, all_reduce=0)
        self._handle = trainer.optimizers[0].register_step_post_hook(after_step)

    def on_train_end(self, trainer, module):
        self._handle.remove()


def _trained(module):
    return module.optimizer_target().named_parameters()


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _count_ddp_allreduce(trainer) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state, bucket):
        CALLS["all_reduce"] += 1
        return default_hooks.allreduce_hook(state, bucket)

    trainer.strategy.model.register_comm_hook(state=None, hook=hook)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["masksub", "mae", "lut"])
    parser.add_argument("strategy", choices=["single", "ddp", "fsdp2"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of the run (2 per epoch)")
    parser.add_argument("--stop-at", type=int, default=0, help="write OUT/resume.ckpt at this step and stop")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--no-sync-switch", action="store_true", help="reduce on every backward (a control)")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategies = {
        "single": "auto",
        "ddp": L.pytorch.strategies.DDPStrategy(process_group_backend="gloo"),
        "fsdp2": FSDP2Strategy(process_group_backend="gloo"),
    }
    module = make_module(args.kind)
    if args.no_sync_switch:
        import contextlib

        module._no_gradient_sync = contextlib.nullcontext
    record = Record()

    class CountDDPAndStop(L.Callback):
        def on_train_start(self, trainer, pl_module):
            if args.strategy == "ddp":
                _count_ddp_allreduce(trainer)

        def on_train_batch_end(self, trainer, *rest):
            if trainer.global_step == args.stop_at:
                trainer.should_stop = True  # as a preempted job: the schedule keeps the run's full length

    callbacks = [CountDDPAndStop(), record]
    if args.stop_at:
        callbacks.append(ResumeCheckpoint(every_n_train_steps=args.stop_at, dirpath=str(args.out)))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategies[args.strategy],
        max_epochs=args.steps * GLOBAL_BATCH // SAMPLES,
        logger=False,
        enable_checkpointing=bool(args.stop_at),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=Shard(args.kind), ckpt_path=args.resume)
    rank = trainer.global_rank
    tag = f"{args.strategy}{world}_rank{rank}" + ("_resumed" if args.resume else "")
    weights = {n: _whole(p.detach()).clone() for n, p in _trained(module)}
    torch.save({"grads": record.grads, "weights": weights}, args.out / f"{tag}.pt")
    (args.out / f"{tag}.json").write_text(json.dumps({"calls": record.calls, "steps": trainer.global_step}))


if __name__ == "__main__":
    main()
