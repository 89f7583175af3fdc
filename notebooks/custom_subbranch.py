# ---
# # Source of notebooks/custom_subbranch.ipynb (jupytext "percent" format). Edit this file, then regenerate the
# # notebook with `python tests/test_notebook.py`; tests/test_notebook.py fails when the two differ.
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Your own sub-branch, your own loss, any model
#
# MaskSub's sub-branch is "the same network on a perturbed input, trained to match the main branch". The
# package ships the paper's perturbations (`mask`, `dropout`, `droppath`, ...); this notebook adds a new one in
# about 20 lines, changes the sub-branch's loss by subclassing `MaskSubModule`, and trains both a timm ViT and a
# torchvision ResNet with it on the digits (nothing to download; a couple of minutes on a CPU).

# %%
import contextlib
import logging
import os
import warnings

import lightning as L
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import torchvision

from masksub_lightning import MaskSubModule, SubBranch, register_sub_branch
from masksub_lightning.callbacks import SubBranchPictures
from masksub_lightning.data import DigitsDataModule

EPOCHS = int(os.environ.get("MASKSUB_NOTEBOOK_EPOCHS", "8"))
LIMIT_BATCHES = int(os.environ.get("MASKSUB_NOTEBOOK_LIMIT_BATCHES", "0")) or None  # the test's tiny size
torch.set_num_threads(1)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
print(f"EPOCHS={EPOCHS}, LIMIT_BATCHES={LIMIT_BATCHES}")

# %% [markdown]
# ## A new kind: one random square per image
#
# A kind is a `SubBranch` subclass registered under a name. `perturbed(model, images)` is a context manager
# that yields the sub-branch's input (and would restore anything it changed on the model in a `finally`). This
# one hides a single random square covering `ratio` of each image (Cutout-style), and records the pixel mask in
# `self._last_mask` so that `last_mask` (and the `SubBranchPictures` callback) can show it. Input-level kinds
# work on any model.


# %%
@register_sub_branch("square")
class SquareSubBranch(SubBranch):
    """Zero one random square covering ``ratio`` of the image area, placed independently per image."""

    @contextlib.contextmanager
    def perturbed(self, model, images):
        b, _, h, w = images.shape
        side = max(1, round((self.ratio * h * w) ** 0.5))
        top = torch.randint(0, h - side + 1, (b, 1, 1), device=images.device)
        left = torch.randint(0, w - side + 1, (b, 1, 1), device=images.device)
        rows = torch.arange(h, device=images.device).view(1, h, 1)
        cols = torch.arange(w, device=images.device).view(1, 1, w)
        inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
        self._last_mask = inside  # (B, H, W), True = hidden
        yield images.masked_fill(inside.unsqueeze(1), 0.0)


# %% [markdown]
# ## A new sub-branch loss: KL divergence at a temperature
#
# `MaskSubModule` exposes the pieces of its step as methods: `main_loss`, `sub_loss`, `sub_branch_forward`.
# Overriding `sub_loss` changes what the sub-branch is trained on; here the KL divergence between temperature-
# softened distributions (knowledge-distillation style) instead of the cross-entropy to `softmax(o1)`.


# %%
class TemperatureMaskSub(MaskSubModule):
    def __init__(self, *args, temperature: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = temperature

    def sub_loss(self, sub_logits, main_logits):
        t = self.temperature
        target = F.softmax(main_logits.detach().float() / t, dim=-1)
        log_probs = F.log_softmax(sub_logits.float() / t, dim=-1)
        return F.kl_div(log_probs, target, reduction="batchmean") * t * t


# %% [markdown]
# ## Any model: a timm name or a torchvision network
#
# `model` is a timm name (built with `model_kwargs`) or any `nn.Module` mapping images to logits. The new kind
# is used by its name, like a built-in one (also from YAML: `sub_branch: square`, once the module defining it
# is imported).


# %%
def fit(model, sub_branch="square", **kwargs):
    L.seed_everything(0, verbose=False)
    module = TemperatureMaskSub(
        model, num_classes=10, sub_branch=sub_branch, sub_ratio=0.25, lr=2e-3, warmup_epochs=1, **kwargs
    )
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=LIMIT_BATCHES,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64, img_size=32, train_augment=False))
    accuracy = trainer.callback_metrics["val_acc1"].item()
    return module, accuracy


vit, vit_acc = fit(
    "vit_tiny_patch16_224", model_kwargs=dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3)
)
print(f"timm ViT with the 'square' sub-branch: {vit.sub_branch!r}, val_acc1={vit_acc:.4f}")
resnet, resnet_acc = fit(torchvision.models.resnet18(num_classes=10))
print(f"torchvision ResNet-18 with the 'square' sub-branch: val_acc1={resnet_acc:.4f}")

# %% [markdown]
# ## What the sub-branch saw
#
# `last_mask` of the sub-branch is the pixel mask of its last input; `SubBranchPictures.grid` draws it (the
# callback does the same during training: an image in TensorBoard, or a PNG next to a CSV logger's metrics).
# Top: validation images; bottom: the sub-branch's inputs, the hidden square in red.

# %%
torch.manual_seed(0)
data = DigitsDataModule(batch_size=8, img_size=32)
data.setup("fit")
images, labels = next(iter(data.val_dataloader()))
with resnet.sub_branch.perturbed(resnet.model, images) as hidden:
    pass
mask = resnet.sub_branch.last_mask
print(f"hidden fraction {mask.float().mean().item():.2f}")
picture = SubBranchPictures(num_images=8).grid(images, mask, data)
plt.figure(figsize=(12, 3.4))
plt.imshow(picture.permute(1, 2, 0).numpy())
plt.axis("off")
plt.show()
