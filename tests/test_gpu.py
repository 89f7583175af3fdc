"""GPU-only checks (deselected by default; run with `python -m pytest -m gpu` on a CUDA machine)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_loader, quiet_trainer, tiny_vit_kwargs

from masksub_lightning import MaskSubModule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class SyncCheckedModule(MaskSubModule):
    """Raises if the training step (branches, losses, clipping, optimizer, schedule, logging) syncs with the host."""

    def training_step(self, batch, batch_idx):
        if batch_idx < 2:  # warm-up: lazy CUDA / cuBLAS initialisation may synchronise once
            return super().training_step(batch, batch_idx)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return super().training_step(batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    ("model", "kwargs", "size"), [("vit_tiny_patch16_224", tiny_vit_kwargs(), 32), ("resnet18", {}, 64)]
)
def test_training_step_has_no_host_synchronisation(model, kwargs, size):
    module = SyncCheckedModule(model, num_classes=4, model_kwargs=kwargs, grad_clip_norm=1.0, warmup_epochs=1)
    trainer = quiet_trainer(
        accelerator="gpu",
        max_steps=6,
        precision="bf16-mixed",
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1000,
    )
    trainer.fit(module, make_loader(n=64, size=size, batch_size=8))
    assert trainer.global_step == 6
