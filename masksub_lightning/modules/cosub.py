"""CoSubModule: submodel co-training (CoSub; Touvron et al., CVPR 2023), a peer method to compare MaskSub with.

One optimizer step on a (mixed) batch (x, y), as ``--cosub`` in facebookresearch/deit trains::

    o0, o1 = split(f(cat(x, x)))        one forward of 2B images; per-sample drop path gives each copy of an
                                        image its own random depth, so the halves are two submodels of f
    L_label  = (BCE(o0, y) + BCE(o1, y)) / 2
    L_cotrain = (BCE(o0, sigmoid(o1.detach())) + BCE(o1, sigmoid(o0.detach()))) / 2
    loss = (L_label + L_cotrain) / 2    = 0.25 x each of the four terms; one backward

Mixup / CutMix run once, on the batch, before it is duplicated (``DataModule.on_after_batch_transfer``), so both
halves see the same mixed images and targets. The label targets are binarised with ``> bce_target_threshold``
as in DeiT-III (``--bce-loss``); the co-training targets are the other half's sigmoids, never thresholded.

Everything else (data, optimizer, LR schedule, accumulation, clipping, evaluation of the full network, EMA, CLI,
resume) is :class:`~masksub_lightning.modules.masksub.MaskSubModule`'s, with the sub-branch switched off.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from masksub_lightning.method.subbranch import SubBranch
from masksub_lightning.models import network
from masksub_lightning.modules.masksub import MaskSubModule

#: MaskSubModule options CoSub has no use for: its two submodels come from drop path, not from a sub-branch, and
#: both train the whole network (no linear probe).
_NOT_COSUB_OPTIONS = ("sub_branch", "sub_ratio", "sub_branch_kwargs", "linear_probe")


class CoSubModule(MaskSubModule):
    """Trains a classifier with CoSub: two drop-path submodels of one network, each distilled from the other.

    Takes the options of :class:`~masksub_lightning.modules.masksub.MaskSubModule` except the sub-branch ones.
    The model needs stochastic depth (``model_kwargs.drop_path_rate > 0``): with drop path off the two halves
    would be the same network on the same images. The loss is ``bce``, as the deit code forces for ``--cosub``.
    Logged: ``train_loss`` (what is back-propagated), ``train_loss_label`` and ``train_loss_cotrain`` (the mean
    of each pair of terms), ``train_acc`` (both submodels on the training batch).
    """

    loss_part_names = {
        "loss_label": "label loss (both submodels against the labels)",
        "loss_cotrain": "co-training loss (each submodel against the other's prediction)",
    }

    def __init__(
        self,
        model: str | nn.Module = "vit_small_patch16_224",
        num_classes: int = 1000,
        model_kwargs: dict[str, Any] | None = None,
        drop_path_profile: str = "linear",
        efficient_drop_path: bool = False,
        head_init_std: float | None = None,
        freeze: list[str] | None = None,
        pretrained_weights: str | None = None,
        pretrained_exclude: list[str] | None = None,
        loss: Literal["ce", "bce"] = "bce",
        label_smoothing: float = 0.0,
        bce_target_threshold: float | None = 0.0,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        lr_base_batch_size: int | None = None,
        weight_decay: float = 0.05,
        layer_decay: float | None = None,
        no_weight_decay: list[str] | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        scheduler: str = "cosine",
        lr_interval: Literal["step", "epoch"] = "step",
        warmup_epochs: float = 0.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-6,
        grad_clip_norm: float | None = None,
        grad_accumulation: int = 1,
        nonfinite_loss: str = "stop",
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        if loss != "bce":
            raise ValueError(
                f"CoSub trains with binary cross-entropy (facebookresearch/deit --cosub replaces the criterion by "
                f"BCEWithLogitsLoss): loss must be 'bce', got {loss!r}"
            )
        options = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__(**options, sub_branch="none")
        for name in _NOT_COSUB_OPTIONS:  # not options of this class: keep them out of its checkpoints
            self.hparams.pop(name, None)
        check_has_drop_path(self.model, model if isinstance(model, str) else type(model).__name__)

    def set_sub_branch(self, kind: str | SubBranch, ratio: float | None = None, **kwargs: Any) -> None:
        raise TypeError(
            "CoSubModule has no sub-branch: its two submodels come from drop path; use MaskSubModule for a "
            "sub-branch"
        )

    def training_losses(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Both submodels in one forward of the duplicated batch; one backward of the four-term loss."""
        images, target = batch
        size = images.shape[0]
        logits = self.model(self._to_memory_format(torch.cat((images, images))))
        first, second = logits[:size], logits[size:]
        loss_label = (self.main_loss(first, target) + self.main_loss(second, target)) / 2
        # Each half learns from the other's prediction; no gradient flows into the teacher side.
        loss_cotrain = (self.sub_loss(first, second.detach()) + self.sub_loss(second, first.detach())) / 2
        loss = (loss_label + loss_cotrain) / 2
        self.backprop(loss)
        labels = target.argmax(-1) if target.is_floating_point() else target
        self.train_acc.update(logits.detach(), labels.repeat(2))
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=size)
        return {"loss": loss, "loss_label": loss_label, "loss_cotrain": loss_cotrain}


def check_has_drop_path(model: nn.Module, name: str) -> None:
    """Refuse a network whose two CoSub halves would be identical: no drop-path slots, or every rate 0."""
    rates = network.drop_path_rates(model)
    if not rates:
        raise ValueError(
            f"CoSub needs a model with per-block drop path (stochastic depth): its two halves differ only "
            f"through it, and {name} has no drop_path slots; use a timm ViT / DeiT-III / Swin / ResNet / ConvNeXt"
        )
    if max(rates) == 0.0:
        raise ValueError(
            f"CoSub needs drop path: model_kwargs.drop_path_rate must be > 0 (the two halves differ only through "
            f"per-sample drop path; at 0 they are identical), got every rate of {name} at 0.0"
        )
