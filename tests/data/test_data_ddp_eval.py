"""Evaluation under DDP counts every sample exactly once: 2-process top-1 equals the single-process top-1."""

from __future__ import annotations

import pytest
import torch
from conftest import quiet_trainer, tiny_vit_kwargs

from masksub_lightning import MaskSubModule
from masksub_lightning.data import DigitsDataModule
from masksub_lightning.data.samplers import ShardedEvalSampler

# val_fraction 0.035 of the 1,797 digits: 63 validation images, which 2 ranks cannot split evenly.
DATA = dict(batch_size=8, val_fraction=0.035, img_size=32)


def test_sharded_eval_sampler_covers_each_index_once():
    shards = [list(ShardedEvalSampler(range(11), num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert [len(ShardedEvalSampler(range(11), 3, r)) for r in range(3)] == [4, 4, 3]


def test_eval_loaders_use_the_unpadded_sampler_and_lightning_keeps_it():
    import lightning as L
    from lightning.pytorch.trainer.states import RunningStage

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    dm = DigitsDataModule(**DATA)
    dm.trainer = trainer
    loader = dm.val_dataloader()
    assert isinstance(loader.sampler, ShardedEvalSampler) and len(loader.sampler) == 32  # rank 0 of 2
    prepared = trainer._data_connector._prepare_dataloader(
        loader, shuffle=False, mode=RunningStage.VALIDATING
    )
    assert prepared is loader


def _module():
    torch.manual_seed(0)
    return MaskSubModule(
        "vit_tiny_patch16_224", num_classes=10, model_kwargs=tiny_vit_kwargs(), optimizer="sgd"
    )


@pytest.mark.slow
def test_two_process_validate_top1_equals_single_process(tmp_path):
    dm = DigitsDataModule(**DATA)
    dm.setup("validate")
    images, labels = dm.datasets["val"].images, dm.datasets["val"].labels
    assert len(labels) == 63

    # Independent reference: the model over all 63 images in this process.
    module = _module()
    module.eval()
    with torch.no_grad():
        correct = (module(dm.build_transform(train=False)(images)).argmax(-1) == labels).float()
    exact = correct.mean().item()
    # What Lightning's padded DistributedSampler would give: rank 1 repeats image 0 to reach 32 samples.
    padded = torch.cat([correct, correct[:1]]).mean().item()
    assert padded != exact  # the check below can tell the two apart

    (single,) = quiet_trainer().validate(_module(), datamodule=DigitsDataModule(**DATA))
    (ddp,) = quiet_trainer(devices=2, strategy="ddp_spawn", default_root_dir=tmp_path).validate(
        _module(), datamodule=DigitsDataModule(**DATA)
    )
    assert single["val_acc1"] == pytest.approx(exact, abs=1e-6)
    assert ddp["val_acc1"] == pytest.approx(exact, abs=1e-6)
    assert ddp["val_acc5"] == pytest.approx(single["val_acc5"], abs=1e-6)
    # (val_loss is not compared: Lightning's sync_dist mean floors the summed batch size over ranks, an int
    # tensor divided by the world size on gloo, so uneven shards shift it; torchmetrics states are exact.)
