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


# ---------------------------------------------------------------------------------------------- recipe smoke
TINY_SWIN = dict(img_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
RN = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 32), stem_width=8)
PRE = dict(model="vit_small_patch16_224", model_kwargs=tiny_vit_kwargs(), decoder_dim=16, decoder_depth=1)
PRE.update(decoder_num_heads=2, lr_base_batch_size=None, warmup_epochs=0, export_on_fit_end=False)


def _recipe_like(family: str):
    """(module, precision, loader) of one recipe family at a tiny size, with the settings that matter on a GPU."""
    from test_pretraining import two_view_loader

    from masksub_lightning import LUTModule, MAEModule

    fused = {"fused": True}
    if (
        family == "swin_16mixed_clip"
    ):  # the six Swin recipes: fp16 with a GradScaler, clipping, mask-token branch
        module = MaskSubModule(
            "swin_tiny_patch4_window7_224",
            4,
            model_kwargs=TINY_SWIN,
            sub_branch="mask_token",
            grad_clip_norm=5.0,
            optimizer_kwargs=fused,
        )
        return module, "16-mixed", make_loader(n=32, size=64, batch_size=8)
    if family == "deit3_bf16_compile":  # DeiT-III: bf16, BCE, compiled, LAMB
        module = MaskSubModule(
            "vit_tiny_patch16_224",
            4,
            model_kwargs=tiny_vit_kwargs(),
            loss="bce",
            optimizer="lamb",
            compile=True,
            grad_clip_norm=1.0,
        )
        return module, "bf16-mixed", make_loader(n=32, batch_size=8)
    if family == "rsb_channels_last":  # RSB ResNet: pixel mask, channels-last, bf16
        module = MaskSubModule(
            "resnet18", 4, model_kwargs=RN, loss="bce", channels_last=True, optimizer_kwargs=fused
        )
        return module, "bf16-mixed", make_loader(n=32, size=64, batch_size=8)
    if family == "finetune_16mixed_layer_decay":  # MAE / CLIP fine-tunes: layer decay, accumulation, fp16
        module = MaskSubModule(
            "vit_tiny_patch16_224",
            4,
            model_kwargs=tiny_vit_kwargs(),
            layer_decay=0.65,
            grad_accumulation=2,
            grad_clip_norm=1.0,
        )
        return module, "16-mixed", make_loader(n=64, batch_size=8)
    if family == "mae_pretrain_bf16":
        return MAEModule(**PRE, grad_clip_norm=1.0), "bf16-mixed", make_loader(n=32, batch_size=8)
    if family == "lut_pretrain_16mixed":
        return LUTModule(**PRE, proj_hidden_dim=32, grad_clip_norm=1.0), "16-mixed", two_view_loader(32, 8)
    raise ValueError(family)


FAMILIES = [
    "swin_16mixed_clip",
    "deit3_bf16_compile",
    "rsb_channels_last",
    "finetune_16mixed_layer_decay",
    "mae_pretrain_bf16",
    "lut_pretrain_16mixed",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_recipe_smoke(family):
    """Three optimizer steps of each recipe family on the GPU in its precision (real GradScaler for 16-mixed)."""
    module, precision, loader = _recipe_like(family)
    before = {k: v.detach().clone() for k, v in module.optimizer_target().state_dict().items()}
    trainer = quiet_trainer(
        accelerator="gpu", max_steps=3, precision=precision, num_sanity_val_steps=0, limit_val_batches=0
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 3
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler is not None and trainer.precision_plugin.scaler.is_enabled()
    after = module.optimizer_target().state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before if before[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert torch.isfinite(trainer.callback_metrics["train_loss_step"])
