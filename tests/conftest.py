"""Shared fixtures: tiny real timm models and tiny learnable image data."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Tiny members of the real timm families (same code paths as ViT-B / ResNet-50, a few thousand parameters).
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
TINY_RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 32), stem_width=8)


def tiny_vit_kwargs(**overrides):
    return {**TINY_VIT, **overrides}


def make_images(n: int = 64, num_classes: int = 4, size: int = 32, seed: int = 0):
    """Learnable images: each class is a fixed random pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, 3, size, size, generator=g)
    labels = torch.arange(n) % num_classes
    images = prototypes[labels] + 0.5 * torch.randn(n, 3, size, size, generator=g)
    return images, labels


def make_loader(
    n: int = 64, num_classes: int = 4, size: int = 32, batch_size: int = 16, seed: int = 0, shuffle=False
):
    images, labels = make_images(n, num_classes, size, seed)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle, drop_last=True)


class AppliedGradients(L.Callback):
    """The gradient (after clipping and unscaling) and LR each optimizer step applied, read right after it.

    An optimizer step post-hook: Lightning runs the hooks that change ``.grad`` (the module clips in its
    ``on_before_optimizer_step``, after the callbacks' own) inside ``optimizer.step``, before the update, and
    the optimizers do not modify ``.grad``. It fires only for a step that is taken (a GradScaler skips the step of
    an overflowed gradient).
    """

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []

    def on_train_start(self, trainer, pl_module):
        def record(optimizer, args, kwargs):
            self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()})
            self.lrs.append(optimizer.param_groups[0]["lr"])

        self._handle = trainer.optimizers[0].register_step_post_hook(record)

    def on_train_end(self, trainer, pl_module):
        self._handle.remove()


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(autouse=True)
def _seed():
    L.seed_everything(0, verbose=False)
