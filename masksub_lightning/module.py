"""MaskSubModule: MaskSub training for any timm classifier, as a LightningModule.

One optimizer step on a batch (x, y), as in the paper (CVPR 2025, "Masking meets Supervision")::

    main branch    o1 = f(x)                    L_main = criterion(o1, y)        backward(L_main / 2), no all-reduce
    sub-branch     o2 = f(x | drop r)           L_sub  = criterion(o2, softmax(o1.detach()))   backward(L_sub / 2)
    clip -> optimizer step -> zero grad -> LR schedule step

The two backward passes accumulate the gradient of ``(L_main + L_sub) / 2``; the main graph is freed before the
sub-branch runs (peak memory of a single branch), and under DDP only the second backward all-reduces.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from masksub_lightning import checkpointing, guards, network, resume
from masksub_lightning.losses import MaskSubLoss
from masksub_lightning.optim import (
    build_optimizer,
    build_scheduler,
    check_optimizer_name,
    check_scheduler_name,
)
from masksub_lightning.subbranch import SubBranch, build_sub_branch


class MaskSubModule(L.LightningModule):
    """Trains a classifier with MaskSub (or, with ``sub_branch="none"``, plain supervised training).

    Args:
        model: a timm model name (built with ``num_classes`` and ``model_kwargs``) or any ``nn.Module`` classifier
            that maps images (B, 3, H, W) to logits (B, num_classes).
        num_classes: number of classes; must match the model's head.
        model_kwargs: extra ``timm.create_model`` arguments (img_size, drop_path_rate, init_values, ...).
        drop_path_profile: per-block stochastic-depth rates: ``linear`` (timm's ramp from 0 at the first block to
            ``drop_path_rate`` at the last) or ``constant`` (every block at ``drop_path_rate``, as the DeiT-III
            code builds its models).
        head_init_std: re-initialise the classifier weight with a normal draw of this std and a zero bias (2e-5
            for MAE and CLIP fine-tuning); None keeps the model's own initialisation.
        freeze: module names whose parameters are not trained (e.g. ``[patch_embed]`` for CLIP fine-tuning).
        pretrained_weights: a local weights file loaded into the model when fitting starts (see
            ``masksub_lightning.pretrained``; the head is replaced when its size differs).
        pretrained_exclude: module names of the checkpoint not loaded (kept at their fresh initialisation), e.g.
            ``[norm]`` for CLIP fine-tuning.
        sub_branch: sub-branch kind by name (``mask``, ``token_mask``, ``pixel_mask``, ``mask_token``, ``dropout``,
            ``droppath``, ``none``) or a ``SubBranch`` object.
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
        head_init_std: float | None = None,
        freeze: list[str] | None = None,
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
        self.automatic_optimization = False  # two backward passes per optimizer step

        _check_positive("num_classes", num_classes, integer=True)
        _check_positive("lr", lr)
        if lr_base_batch_size is not None:
            _check_positive("lr_base_batch_size", lr_base_batch_size, integer=True)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
        if grad_clip_norm is not None:
            _check_positive("grad_clip_norm", grad_clip_norm)
        if (
            isinstance(sub_ratio, bool)
            or not isinstance(sub_ratio, (int, float))
            or not 0.0 <= sub_ratio < 1.0
        ):
            raise ValueError(f"sub_ratio must be in [0, 1), got {sub_ratio!r}")
        check_optimizer_name(optimizer)
        check_scheduler_name(scheduler)
        if lr_interval not in ("step", "epoch"):
            raise ValueError(f"lr_interval must be 'step' or 'epoch', got {lr_interval!r}")
        _check_positive("grad_accumulation", grad_accumulation, integer=True)
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}")
        if head_init_std is not None:
            _check_positive("head_init_std", head_init_std)
        if drop_path_profile not in network.DROP_PATH_PROFILES:
            allowed = ", ".join(network.DROP_PATH_PROFILES)
            raise ValueError(f"drop_path_profile must be one of {allowed}, got {drop_path_profile!r}")

        self.num_classes = num_classes
        self.model = network.create_network(model, num_classes, model_kwargs or {})
        network.set_drop_path_profile(
            self.model, drop_path_profile, (model_kwargs or {}).get("drop_path_rate")
        )
        if head_init_std is not None:
            network.init_classifier(self.model, head_init_std)
        if freeze:
            network.freeze(self.model, freeze)
        self.criterion = MaskSubLoss(loss, label_smoothing, bce_target_threshold)
        self.sub_branch = build_sub_branch(
            sub_branch, sub_ratio, model=self.model, **(sub_branch_kwargs or {})
        )
        self.sub_branch.setup(self.model)

        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.test_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        # Sample-weighted means synced as sums and counts: exact under DDP with uneven shards (no padding).
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._pretrained_loaded = pretrained_weights is None
        # Per-run state of the training step (not hyperparameters, not saved).
        self._nonfinite = guards.NonFiniteMonitor()
        self._skip_reason: guards.NonFinite | None = None
        self._skipped_steps = 0
        self._group_logs: tuple[dict[str, Tensor], int] | None = None
        # Analysis probes (masksub_lightning.callbacks.BranchGradients) read .grad after the main branch's backward
        # and before clipping; they never change it. Empty unless such a callback is attached.
        self._gradient_probes: list[Any] = []

    # weights_only=True by default (Lightning passes None on to torch.load) and one clear error for unsafe files.
    load_from_checkpoint = checkpointing.load_from_checkpoint

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._pretrained_loaded:
            # Loaded here, not in __init__, so load_from_checkpoint never needs the original weights file.
            from masksub_lightning.pretrained import load_pretrained

            exclude = self.hparams.get("pretrained_exclude") or ()
            report = load_pretrained(self.model, self.hparams.pretrained_weights, exclude=exclude)
            self.print(f"loaded pretrained weights from {self.hparams.pretrained_weights}: {report}")
            self._pretrained_loaded = True

    def configure_model(self) -> None:
        if self.hparams.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.hparams.compile and not getattr(self.model, "_compiled_call_impl", None):
            self.model.compile()  # in place: state-dict keys keep their names

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if self.trainer.train_dataloader is None:
            self.trainer.fit_loop.setup_data()  # batch size and epoch length are needed below
        lr = hp.lr
        if hp.lr_base_batch_size:
            lr = lr * self._global_batch_size() / hp.lr_base_batch_size
        optimizer = build_optimizer(
            self.model, hp.optimizer, lr, hp.weight_decay, hp.layer_decay, **(hp.optimizer_kwargs or {})
        )
        if hp.lr_interval == "epoch":
            epochs = self.trainer.max_epochs
            if epochs is None or epochs < 1:
                raise ValueError("lr_interval='epoch' needs Trainer max_epochs")
            scheduler = build_scheduler(
                optimizer,
                hp.scheduler,
                epochs,
                round(hp.warmup_epochs),
                hp.warmup_lr,
                hp.min_lr,
                per_epoch=True,
            )
            self._check_resumed_schedule(scheduler, "epochs")
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        total_steps, steps_per_epoch = self._optimizer_steps()
        warmup_steps = round(hp.warmup_epochs * steps_per_epoch)
        scheduler = build_scheduler(
            optimizer, hp.scheduler, total_steps, warmup_steps, hp.warmup_lr, hp.min_lr
        )
        self._check_resumed_schedule(scheduler, "optimizer steps")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _check_resumed_schedule(self, scheduler: Any, unit: str) -> None:
        """Refuse a resume whose schedule would differ in length from the checkpoint's.

        Lightning restores the scheduler's state over the one built here, so a resume with another max_epochs,
        max_steps, batch size or grad_accumulation would silently keep the old length (and warmup). The rule:
        resume with the original run's settings; to train on for longer, start a new run from the weights.
        """
        saved = getattr(self, "_resumed_schedule", None)
        if not saved:
            return
        built = {"t_initial": scheduler.t_initial, "warmup_t": getattr(scheduler, "warmup_t", None)}
        if saved != built:
            raise ValueError(
                f"cannot resume: the checkpoint's LR schedule spans {saved['t_initial']} {unit} (warmup "
                f"{saved['warmup_t']}), this run's would span {built['t_initial']} (warmup {built['warmup_t']}): "
                "max_epochs, max_steps, the batch size or grad_accumulation changed. Resume with the original "
                "settings, or start a new run from the weights (--model.init_args.pretrained_weights CKPT)"
            )

    def _optimizer_steps(self) -> tuple[int, int]:
        """(optimizer steps of the whole run, optimizer steps per epoch), counting accumulation groups."""
        accumulation = self.hparams.get("grad_accumulation", 1)
        batches = self.trainer.num_training_batches
        max_epochs, max_steps = self.trainer.max_epochs, self.trainer.max_steps
        if not math.isfinite(batches):
            if accumulation > 1 or self.hparams.warmup_epochs:
                raise ValueError(
                    "grad_accumulation > 1 and warmup_epochs need a train loader with a length "
                    "(not an endless iterable)"
                )
            if max_steps is None or max_steps < 0:
                raise ValueError("the LR schedule needs a finite run: set Trainer max_epochs or max_steps")
            return max_steps, max_steps
        if accumulation > batches:
            raise ValueError(
                f"grad_accumulation={accumulation} is more than the {int(batches)} train batches of an epoch; "
                "use a value <= the number of batches per epoch"
            )
        per_epoch = math.ceil(batches / accumulation)  # a shorter last group still takes a step
        if max_epochs is None or max_epochs < 0:
            if max_steps is None or max_steps < 0:
                raise ValueError("the LR schedule needs a finite run: set Trainer max_epochs or max_steps")
            return max_steps, per_epoch
        total = per_epoch * max(max_epochs, 1)
        if max_steps is not None and max_steps >= 0:
            total = min(total, max_steps)
        return total, per_epoch

    def _global_batch_size(self) -> int:
        """Images per optimizer step over all devices: batch size x world size x grad_accumulation."""
        loader = self.trainer.train_dataloader
        batch_size = getattr(loader, "batch_size", None) or getattr(loader.batch_sampler, "batch_size", None)
        if batch_size is None:
            raise ValueError("lr_base_batch_size needs a train DataLoader with a batch_size")
        return int(batch_size) * self.trainer.world_size * self.hparams.get("grad_accumulation", 1)

    def on_train_start(self) -> None:
        if resume.restore_rng_states(self):  # a resume: each rank continues its saved random streams
            return
        # Lightning seeds every rank alike; masks and mixup draws must differ across ranks (timm and DeiT seed
        # by rank too). Parameters are unaffected: DDP broadcast them from rank 0 already.
        if self.trainer.world_size > 1:
            seed = (torch.initial_seed() + self.global_rank) % 2**32
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)

    # Exact resume (masksub_lightning.resume): every rank's RNG states travel in the checkpoint, and validation
    # inside fit leaves them untouched.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._stop_if_nonfinite(wait=True)  # a NaN never reaches a saved checkpoint
        resume.save_rng_states(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        resume.stash_rng_states(self, checkpoint)  # put back in on_train_start, after Lightning's set-up
        saved = checkpoint.get("lr_schedulers") or [{}]
        self._resumed_schedule = {k: saved[0].get(k) for k in ("t_initial", "warmup_t")} if saved[0] else None

    def on_validation_model_zero_grad(self) -> None:
        super().on_validation_model_zero_grad()
        resume.pause_rng(self)

    def on_validation_epoch_end(self) -> None:
        resume.resume_rng(self)

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

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, target = batch
        images = self._to_memory_format(images)
        opt = self.optimizers()
        group_size, last_in_group = self._accumulation_position(batch_idx)
        scale = 1.0 / group_size  # the optimizer step applies the mean gradient of its micro-batches

        if self.sub_branch.active:
            # Main branch: its gradient stays local (no DDP all-reduce) and its graph is freed before the sub-branch.
            with opt.toggle_model(sync_grad=False):
                main_logits = self.model(images)
                loss_main = self.main_loss(main_logits, target)
                self.manual_backward(loss_main * (scale / 2))
                for probe in self._gradient_probes:  # .grad holds the main branch's share here
                    probe.after_main_backward(self)
            main_logits = main_logits.detach()
            with self._gradient_sync(opt, last_in_group):  # one all-reduce per optimizer step
                loss_sub = self.sub_loss(self.sub_branch_forward(images), main_logits)
                self.manual_backward(loss_sub * (scale / 2))
            loss = (loss_main.detach() + loss_sub.detach()) / 2
        else:
            with self._gradient_sync(opt, last_in_group):
                main_logits = self.model(images)
                loss_main = self.main_loss(main_logits, target)
                self.manual_backward(loss_main * scale)
            loss, loss_sub, main_logits = loss_main.detach(), None, main_logits.detach()

        self._check_finite(loss_main, loss_sub)
        self._collect_training_logs(images.shape[0], loss, loss_main.detach(), loss_sub, main_logits, target)
        if last_in_group:
            self._optimizer_step(opt)
        return loss

    def _optimizer_step(self, opt: Any) -> None:
        """Clip, step, zero the gradient, move a per-step schedule, and log the step's values."""
        if self._skip_this_step():  # nonfinite_loss="skip": drop this step's gradient, count it
            opt.zero_grad(set_to_none=True)
            self._skipped_steps += 1
            self._skip_reason = None
            self._group_logs = None
            self.log("train_skipped_steps", float(self._skipped_steps), on_step=True, on_epoch=False)
            return
        for probe in self._gradient_probes:  # the whole step's gradient, before clipping
            probe.before_optimizer_step(self)
        grad_norm = self._clip_gradients(opt)
        lr = opt.optimizer.param_groups[-1]["lr"]  # the LR this step applies (the schedule moves it below)
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.hparams.lr_interval == "step":
            scheduler.step_update(num_updates=self.global_step)
        self._log_training(grad_norm, lr)

    def _accumulation_position(self, batch_idx: int) -> tuple[int, bool]:
        """(micro-batches in this batch's optimizer step, whether this batch is the last of them).

        Groups of ``grad_accumulation`` consecutive batches; the epoch's last group may be shorter and then
        averages over the batches it has (as one optimizer step on a smaller batch).
        """
        n = self.hparams.get("grad_accumulation", 1)
        if n == 1:
            return 1, True
        per_epoch = int(self.trainer.num_training_batches)
        start = batch_idx - batch_idx % n
        size = min(n, per_epoch - start)
        return size, batch_idx == start + size - 1

    def _gradient_sync(self, opt: Any, sync: bool) -> Any:
        """DDP all-reduces the gradient only on the last backward of an optimizer step."""
        return contextlib.nullcontext() if sync else opt.toggle_model(sync_grad=False)

    # ------------------------------------------------------------------------------------ non-finite losses
    def _check_finite(self, loss_main: Tensor, loss_sub: Tensor | None) -> None:
        """Apply the ``nonfinite_loss`` policy to this batch's losses (see ``masksub_lightning.guards``)."""
        if self.hparams.get("nonfinite_loss", "stop") == "skip":
            found = guards.is_finite(loss_main, loss_sub)  # one host sync: the step must be decided now
            if found is not None and self._skip_reason is None:
                self._skip_reason = found
            return
        self._nonfinite.record(self.global_step + 1, loss_main, loss_sub)
        self._stop_if_nonfinite(wait=False)

    def _skip_this_step(self) -> bool:
        """Skip policy: skip when any rank saw a non-finite loss in this step (the gradient was all-reduced)."""
        if self.hparams.get("nonfinite_loss", "stop") != "skip":
            return False
        return self.trainer.strategy.reduce_boolean_decision(self._skip_reason is not None, all=False)

    def _stop_if_nonfinite(self, wait: bool) -> None:
        found = self._nonfinite.poll(wait=wait)
        if found is None:
            return
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        last_good = (
            getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        ) or None
        raise guards.NonFiniteLossError(
            f"non-finite loss (NaN or inf) at step {found.step} in the {found.branch}; stopping "
            f"(nonfinite_loss='stop'). Last good checkpoint: {last_good or 'none saved yet'}; "
            "nothing from this step on was saved"
        )

    def on_train_epoch_end(self) -> None:
        self._stop_if_nonfinite(wait=True)  # before validation and the epoch's checkpoint
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.hparams.lr_interval == "epoch":
            scheduler.step(epoch=self.current_epoch + 1)  # the LR of the next epoch

    def _clip_gradients(self, opt: Any) -> Tensor | None:
        max_norm = self.hparams.grad_clip_norm
        if not max_norm:
            return None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # 16-mixed: gradients are still scaled here
            scaler.unscale_(opt.optimizer)
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # Sharded parameters: only FSDP can compute the global norm.
            self.clip_gradients(opt, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
            return None
        # torch's clip directly: Lightning's clip_gradients refuses fused optimizers even under bf16 (no scaler).
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def _collect_training_logs(self, batch_size, loss, loss_main, loss_sub, main_logits, target) -> None:
        """Sum this batch's losses into its optimizer step's group (logged once per optimizer step)."""
        values = {"train_loss": loss, "train_loss_main": loss_main}
        if loss_sub is not None:
            values["train_loss_sub"] = loss_sub.detach()
        weighted = {k: v * batch_size for k, v in values.items()}
        if self._group_logs is None:
            self._group_logs = (weighted, batch_size)
        else:
            sums, images = self._group_logs
            self._group_logs = ({k: sums[k] + weighted[k] for k in sums}, images + batch_size)
        hard_target = target.argmax(-1) if target.is_floating_point() else target
        self.train_acc.update(main_logits, hard_target)  # update only: the per-batch value is never needed

    def _log_training(self, grad_norm: Tensor | None, lr: float) -> None:
        # Tensors only: Lightning moves them to the host when it writes logs, not on every step.
        sums, images = self._group_logs
        self._group_logs = None
        values = {k: v / images for k, v in sums.items()}
        if grad_norm is not None:
            values["train_grad_norm"] = grad_norm
        self.log_dict(values, on_step=True, on_epoch=True, batch_size=images)
        self.log("train_acc_main", self.train_acc, on_step=False, on_epoch=True, batch_size=images)
        # A CPU tensor: a Python float would be copied to the GPU, and that copy waits for the whole step.
        self.log("lr", torch.tensor(lr), on_step=True, on_epoch=False, batch_size=images)

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


# ---------------------------------------------------------------------------------------------------- helpers
def _check_positive(name: str, value: Any, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{name} must be a positive {'int' if integer else 'number'}, got {value!r}")
