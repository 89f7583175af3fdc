"""MaskSubModule: MaskSub training for any timm classifier, as a LightningModule.

One optimizer step on a batch (x, y), as in the paper (CVPR 2025, "Masking meets Supervision")::

    main branch    o1 = f(x)                    L_main = criterion(o1, y)        backward(L_main / 2), no all-reduce
    sub-branch     o2 = f(x | drop r)           L_sub  = criterion(o2, softmax(o1.detach()))   backward(L_sub / 2)
    clip -> optimizer step -> zero grad -> LR schedule step

The two backward passes accumulate the gradient of ``(L_main + L_sub) / 2``; the main graph is freed before the
sub-branch runs (peak memory of a single branch), and under DDP only the second backward all-reduces. Everything
around the two branches (accumulation, clipping, schedule, non-finite losses, exact resume, logging) is the shared
:class:`~masksub_lightning.modules.base.TrainingModule`.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from masksub_lightning.method.losses import MaskSubLoss
from masksub_lightning.method.subbranch import SubBranch, build_sub_branch
from masksub_lightning.models import network
from masksub_lightning.models.efficient_drop_path import enable_efficient_drop_path
from masksub_lightning.modules.base import TrainingModule, check_positive, check_training_options


class MaskSubModule(TrainingModule):
    """Trains a classifier with MaskSub (or, with ``sub_branch="none"``, plain supervised training).

    Args:
        model: a timm model name (built with ``num_classes`` and ``model_kwargs``) or any ``nn.Module`` classifier
            that maps images (B, 3, H, W) to logits (B, num_classes).
        num_classes: number of classes; must match the model's head.
        model_kwargs: extra ``timm.create_model`` arguments (img_size, drop_path_rate, init_values, ...).
        drop_path_profile: per-block stochastic-depth rates: ``linear`` (timm's ramp from 0 at the first block to
            ``drop_path_rate`` at the last) or ``constant`` (every block at ``drop_path_rate``, as the DeiT-III
            code builds its models).
        efficient_drop_path: run each block's attention and MLP branch on the samples its drop-path keeps only
            (timm ViT ``Block`` / ``ResPostBlock``; training only). Same draws, same RNG stream and, up to float
            rounding, the same outputs and gradients as timm's ``DropPath``; a block at rate p costs about
            ``1 - p`` of its FLOPs. See ``masksub_lightning.models.efficient_drop_path``.
        head_init_std: re-initialise the classifier weight with a normal draw of this std and a zero bias (2e-5
            for MAE and CLIP fine-tuning); None keeps the model's own initialisation.
        freeze: module names whose parameters are not trained (e.g. ``[patch_embed]`` for CLIP fine-tuning).
        linear_probe: MAE's linear probing (``configs/linprobe/``): a ``BatchNorm1d(affine=False, eps=1e-6)`` goes
            before the linear classifier and only the two train; the rest of the network is frozen (no gradient,
            not in the optimizer) and stays in eval mode (no dropout, drop-path or BatchNorm statistics updates).
            Needs ``sub_branch="none"``; ``head_init_std`` applies to the classifier (MAE: 0.01).
        pretrained_weights: a local weights file loaded into the model when fitting starts (see
            ``masksub_lightning.models.weights``; the head is replaced when its size differs).
        pretrained_exclude: module names of the checkpoint not loaded (kept at their fresh initialisation), e.g.
            ``[norm]`` for CLIP fine-tuning.
        sub_branch: sub-branch kind by name (``mask``, ``token_mask``, ``beit_token_mask``, ``pixel_mask``,
            ``mask_token``, ``dropout``, ``droppath``, ``none``) or a ``SubBranch`` object.
        sub_ratio: mask ratio / drop probability of the sub-branch, in [0, 1).
        sub_branch_kwargs: extra options of the kind (``cell_size`` for the pixel / token-replacement masks).
        loss: ``ce`` (cross-entropy, soft targets for mixup) or ``bce`` (DeiT-III / RSB binary cross-entropy).
        label_smoothing: for ``ce`` with hard labels (with mixup, smoothing belongs to the data pipeline).
        bce_target_threshold: BCE main targets are binarised with ``> threshold``; None keeps them soft.
        optimizer: timm optimizer name (``adamw``, ``lamb``, ``sgd``, ...).
        lr: peak learning rate; multiplied by ``global batch / lr_base_batch_size`` when that is set.
        lr_base_batch_size: batch size ``lr`` refers to (256 for MAE, 512 for Swin); None: use ``lr`` as given.
        weight_decay: weight decay (never applied to norms, biases, position embeddings and tokens).
        layer_decay: layer-wise LR decay factor for fine-tuning; None for none.
        no_weight_decay: parameter names (fnmatch patterns) kept out of weight decay besides norms and biases, in
            place of the model's ``no_weight_decay()`` (None: the model's). The BEiT v2 recipe gives ``[cls_token]``
            so that the relative position tables are decayed, as unilm's fine-tuning does.
        optimizer_kwargs: extra optimizer arguments (``betas``, ``eps``, ``momentum``, ``fused``).
        scheduler: ``cosine``, ``constant``, ``poly``, ``tanh`` or ``wsd``, stepped once per optimizer step.
        lr_interval: ``step`` moves the LR after every optimizer step; ``epoch`` once per epoch, as the DeiT-III
            and RSB (timm 0.5) training scripts do.
        warmup_epochs: linear warmup length in epochs (whole epochs when ``lr_interval`` is ``epoch``).
        warmup_lr: learning rate at the first step of warmup.
        min_lr: learning rate at the end of the schedule.
        grad_clip_norm: clip the gradient's global L2 norm to this value before each step; None for no clipping.
        grad_accumulation: micro-batches per optimizer step. Each micro-batch runs both branches; gradients are
            averaged over the group, all-reduced once per optimizer step under DDP, and the schedule, clipping and
            logging count optimizer steps. Global batch = batch_size x devices x num_nodes x grad_accumulation.
        nonfinite_loss: what a NaN / inf loss does: ``stop`` (default) ends the run with one line naming the step,
            the branch and the last checkpoint, before anything more is saved; ``skip`` drops that optimizer step
            and counts it (``train_skipped_steps``), at the cost of one host sync per step on GPUs.
        compile: ``torch.compile`` the network in place when the Trainer sets up.
        channels_last: channels-last memory format for network and inputs (faster convolutions on GPUs).
    """

    def __init__(
        self,
        model: str | nn.Module = "vit_small_patch16_224",
        num_classes: int = 1000,
        model_kwargs: dict[str, Any] | None = None,
        drop_path_profile: str = "linear",  # "linear" | "constant": checked below, one-line error from the CLI
        efficient_drop_path: bool = False,
        head_init_std: float | None = None,
        freeze: list[str] | None = None,
        linear_probe: bool = False,
        pretrained_weights: str | None = None,
        pretrained_exclude: list[str] | None = None,
        sub_branch: str | SubBranch = "mask",
        sub_ratio: float = 0.5,
        sub_branch_kwargs: dict[str, Any] | None = None,
        loss: Literal["ce", "bce"] = "ce",
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
        nonfinite_loss: str = "stop",  # "stop" | "skip"
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        # Objects are not hyperparameters: a checkpoint must stay loadable with weights_only=True.
        ignore = [
            name for name, v in (("model", model), ("sub_branch", sub_branch)) if not isinstance(v, str)
        ]
        self.save_hyperparameters(ignore=ignore)
        check_training_options(self.hparams)
        _check_module_options(
            num_classes=num_classes,
            sub_branch=sub_branch,
            sub_ratio=sub_ratio,
            head_init_std=head_init_std,
            linear_probe=linear_probe,
            efficient_drop_path=efficient_drop_path,
            drop_path_profile=drop_path_profile,
        )

        self.num_classes = num_classes
        self.model = network.create_network(model, num_classes, model_kwargs or {})
        network.set_drop_path_profile(
            self.model, drop_path_profile, (model_kwargs or {}).get("drop_path_rate")
        )
        if efficient_drop_path:
            enable_efficient_drop_path(self.model)
        if head_init_std is not None:
            network.init_classifier(self.model, head_init_std)
        if freeze:
            network.freeze(self.model, freeze)
        if no_weight_decay:
            _check_names_match(self.model, no_weight_decay)
        # Name of the trained head of a linear probe (a name, not the module: no second copy in the state dict).
        self._probe_head = network.linear_probe_head(self.model) if linear_probe else None
        if linear_probe:
            self.train()  # the frozen network in eval mode from the start
        self.criterion = MaskSubLoss(loss, label_smoothing, bce_target_threshold)
        self.sub_branch = build_sub_branch(
            sub_branch, sub_ratio, model=self.model, **(sub_branch_kwargs or {})
        )
        self.sub_branch.setup(self.model)

        self._add_metrics(num_classes)
        self._pretrained_loaded = pretrained_weights is None

    def _add_metrics(self, num_classes: int) -> None:
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.test_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        # Sample-weighted means synced as sums and counts: exact under DDP with uneven shards (no padding).
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and not self._pretrained_loaded:
            # Loaded here, not in __init__, so load_from_checkpoint never needs the original weights file.
            from masksub_lightning.models.weights import load_pretrained

            exclude = self.hparams.get("pretrained_exclude") or ()
            report = load_pretrained(self.model, self.hparams.pretrained_weights, exclude=exclude)
            self.print(f"loaded pretrained weights from {self.hparams.pretrained_weights}: {report}")
            self._pretrained_loaded = True

    def train(self, mode: bool = True) -> MaskSubModule:
        super().train(mode)
        if getattr(self, "_probe_head", None) is not None:  # Lightning calls train() every epoch
            self.model.eval()
            self.model.get_submodule(self._probe_head).train(mode)
        return self

    def optimizer_target(self) -> nn.Module:
        """What the optimizer trains: the network, or a linear probe's head only."""
        if self._probe_head is not None:
            return self.model.get_submodule(self._probe_head)
        return self.model

    # ---------------------------------------------------------------------------------------------- training
    def forward(self, images: Tensor) -> Tensor:
        """Main-branch logits (what validation, test and predict use)."""
        return self.model(self._to_memory_format(images))

    def sub_branch_forward(self, images: Tensor) -> Tensor:
        """Sub-branch logits: the same network under the sub-branch's perturbation. Override to customise."""
        return self.sub_branch.forward(self.model, images)

    def set_sub_branch(self, kind: str | SubBranch, ratio: float | None = None, **kwargs: Any) -> None:
        """Switch the sub-branch kind: tear the current one down, set the new one up (``ratio``: keep the current).

        The optimizer is built when fitting starts, so switch between fits (a parameter such as ``mask_token``'s
        token comes and goes with its kind).
        """
        ratio = self.sub_branch.ratio if ratio is None else ratio
        new = build_sub_branch(kind, ratio, model=self.model, **kwargs)
        self.sub_branch.teardown(self.model)
        try:
            new.setup(self.model)
        except Exception:
            self.sub_branch.setup(self.model)  # leave the module as it was
            raise
        self.sub_branch = new
        if isinstance(kind, str):  # so that a checkpoint saved from now on rebuilds this kind
            self.hparams.update(sub_branch=kind, sub_ratio=ratio, sub_branch_kwargs=kwargs or None)
        else:  # an object is not a hyperparameter (see __init__)
            self.hparams.pop("sub_branch", None)

    def main_loss(self, main_logits: Tensor, target: Tensor) -> Tensor:
        """The recipe's loss of the main branch against the (possibly mixed) labels. Override to customise."""
        return self.criterion.main(main_logits, target)

    def sub_loss(self, sub_logits: Tensor, main_logits: Tensor) -> Tensor:
        """The sub-branch's loss against the detached main branch's soft prediction. Override to customise."""
        return self.criterion.sub(sub_logits, self.criterion.sub_target(main_logits))

    loss_part_names = {"loss_main": "main branch", "loss_sub": "sub-branch"}

    def training_losses(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Both branches of one micro-batch; each backward carries half of ``(L_main + L_sub) / 2``."""
        images, target = batch
        images = self._to_memory_format(images)
        main_logits = self.model(images)
        loss_main = self.main_loss(main_logits, target)
        self.train_acc.update(
            main_logits.detach(), target.argmax(-1) if target.is_floating_point() else target
        )
        self.log("train_acc_main", self.train_acc, on_step=False, on_epoch=True, batch_size=images.shape[0])
        if not self.sub_branch.active:
            self.backprop(loss_main)
            return {"loss": loss_main, "loss_main": loss_main}
        # The main branch's gradient stays local (no all-reduce) and its graph is freed before the sub-branch.
        self.backprop(loss_main / 2, last=False)
        loss_sub = self.sub_loss(self.sub_branch_forward(images), main_logits.detach())
        self.backprop(loss_sub / 2)
        return {"loss": (loss_main + loss_sub) / 2, "loss_main": loss_main, "loss_sub": loss_sub}

    # ------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc1, self.val_acc5)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc1, self.test_acc5)

    def _evaluate(self, batch, stage: str, acc1: MulticlassAccuracy, acc5: MulticlassAccuracy) -> None:
        images, target = batch
        logits = self(images)  # main branch only: evaluation never uses the sub-branch
        loss = self.main_loss(logits, target)  # the same overridable loss as training
        acc1(logits, target)
        acc5(logits, target)
        batch_size = images.shape[0]
        mean_loss = self.val_loss if stage == "val" else self.test_loss
        mean_loss.update(loss.detach().float(), weight=batch_size)
        self.log(f"{stage}_loss", mean_loss, on_epoch=True, batch_size=batch_size)
        self.log(f"{stage}_acc1", acc1, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log(f"{stage}_acc5", acc5, on_epoch=True, batch_size=batch_size)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(images).float().softmax(-1)
        return {"probs": probs, "preds": probs.argmax(-1)}

    def _to_memory_format(self, images: Tensor) -> Tensor:
        if self.hparams.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images


def _check_names_match(model: nn.Module, patterns: list[str]) -> None:
    """Refuse a ``no_weight_decay`` entry that names no parameter of the model (a typo would decay silently)."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatch(n, p) for n in names)]
    if unmatched:
        raise ValueError(
            f"no_weight_decay entries {unmatched} match no parameter of the model; its top-level parameters "
            f"and modules are {sorted({n.split('.')[0] for n in names})}"
        )


def _check_module_options(
    *,
    num_classes: Any,
    sub_branch: Any,
    sub_ratio: Any,
    head_init_std: Any,
    linear_probe: Any,
    efficient_drop_path: Any,
    drop_path_profile: Any,
) -> None:
    """The MaskSubModule options a wrong value of would only fail later (or silently): one line each, up front.

    (Arguments, not ``self.hparams``: a subclass such as CoSubModule saves only its own options.)
    """
    check_positive("num_classes", num_classes, integer=True)
    if isinstance(sub_ratio, bool) or not isinstance(sub_ratio, (int, float)) or not 0.0 <= sub_ratio < 1.0:
        raise ValueError(f"sub_ratio must be in [0, 1), got {sub_ratio!r}")
    if head_init_std is not None:
        check_positive("head_init_std", head_init_std)
    for flag, value in (("linear_probe", linear_probe), ("efficient_drop_path", efficient_drop_path)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be true or false, got {value!r}")
    if linear_probe and sub_branch != "none":
        raise ValueError(
            f"linear_probe=True trains a classifier on frozen features; sub_branch must be 'none', got {sub_branch!r}"
        )
    if drop_path_profile not in network.DROP_PATH_PROFILES:
        allowed = ", ".join(network.DROP_PATH_PROFILES)
        raise ValueError(f"drop_path_profile must be one of {allowed}, got {drop_path_profile!r}")
