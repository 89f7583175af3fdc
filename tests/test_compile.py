"""torch.compile of the network: two graphs (main, sub-branch), no recompiles after warm-up."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import make_loader, quiet_trainer, tiny_vit_kwargs

from masksub_lightning import MaskSubModule


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mask", "droppath"])
def test_compiled_training_does_not_recompile_after_warmup(kind):
    torch._dynamo.reset()
    module = MaskSubModule(
        "vit_tiny_patch16_224", num_classes=4, model_kwargs=tiny_vit_kwargs(), sub_branch=kind, compile=True
    )
    frames = []

    class CountCompiles(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    trainer = quiet_trainer(
        max_epochs=2, callbacks=[CountCompiles()], num_sanity_val_steps=0, limit_val_batches=0
    )
    trainer.fit(module, make_loader(n=64, batch_size=8))  # 8 steps per epoch, 16 in all
    assert trainer.global_step == 16
    assert frames[1] > 0, "nothing was compiled"
    assert frames[-1] == frames[1], f"graphs compiled after warm-up: {frames}"
    assert not any(k.startswith("_orig_mod") for k in module.state_dict())  # compiled in place
