"""Callbacks that `masksub fit` configs name by class_path in tests/test_recipes_train.py.

A module of its own (not the test file) so that ``--trainer.callbacks+={"class_path": "recipe_train_callbacks.X"}``
imports it by name: pytest puts tests/ on sys.path, and a subprocess needs ``PYTHONPATH=tests``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging


class StopAfterSteps(L.Callback):
    """Stop the run once ``global_step`` reaches ``steps`` optimizer steps.

    Instead of ``--trainer.max_steps``: that would shorten the LR schedule (its length is
    ``min(max_epochs x steps per epoch, max_steps)``), and a resume with another schedule length is refused.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def _trainable(module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
    """The parameters of the networks the optimizer trains, by their names in the module's state dict (MAE / LUT:
    without the EMA teacher, which moves without the optimizer)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(p)]: p for p in module.optimizer_target().parameters()}


def _snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().float().clone() for n, t in tensors.items()}


class StepRecorder(L.Callback):
    """What a test needs to check a run step by step, read from inside it.

    * ``start_step``: ``global_step`` when training starts (after a checkpoint is restored);
    * ``lrs[t]``: at optimizer step ``t`` (the ``global_step`` before it), the schedule's value in every param
      group, i.e. the group's lr divided by its layer-decay ``lr_scale``;
    * ``losses``: the training loss of every micro-batch, as a float;
    * ``start`` / ``end``: the trained parameters when training starts and after the last optimizer step (read at
      the batch end, before an EMA callback copies its average into the model at ``on_train_end``);
    * ``frozen``: the names of the trained networks' parameters with ``requires_grad=False``;
    * ``scales``: the GradScaler's scale at each step under ``16-mixed`` (empty without a scaler);
    * ``grad_norms_logged[t]``: the ``train_grad_norm`` the module logged for step ``t`` (the norm before clipping;
      logged only when the recipe clips), ``grad_norms_applied[t]``: the norm of the gradient step ``t`` applied
      (read in an optimizer step post-hook: after clipping and unscaling; a step a GradScaler skips has none);
    * ``average_start``: an EMA (WeightAveraging) callback's average of the trained parameters at the start;
    * ``compute_dtypes``: the dtypes the first linear / conv layer of the trained networks computed in while
      training (float16 / bfloat16 under mixed precision autocast).
    """

    def __init__(self) -> None:
        self.start_step: int | None = None
        self.lrs: dict[int, list[float]] = {}
        self.losses: list[float] = []
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}
        self.frozen: list[str] = []
        self.scales: list[float] = []
        self.grad_norms_logged: dict[int, float] = {}
        self.grad_norms_applied: dict[int, float] = {}
        self.average_start: dict[str, torch.Tensor] | None = None
        self.compute_dtypes: set[torch.dtype] = set()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step
        params = _trainable(pl_module)
        self.start = _snapshot(params)
        self.frozen = [n for n, p in params.items() if not p.requires_grad]
        for callback in trainer.callbacks:
            if isinstance(callback, WeightAveraging) and callback._average_model is not None:
                average = callback._average_model.module.state_dict()
                self.average_start = _snapshot({n: average[n] for n in params})

        def applied(optimizer: Any, args: Any, kwargs: Any) -> None:
            grads = [p.grad.float() for p in params.values() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            self.grad_norms_applied[trainer.global_step] = float(norm)

        layer = next(
            m
            for m in pl_module.optimizer_target().modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        )

        def computed(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            if module.training:
                self.compute_dtypes.add(output.dtype)

        self._hooks = [
            trainer.optimizers[0].register_step_post_hook(applied),
            layer.register_forward_hook(computed),
        ]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        self.lrs[trainer.global_step] = [g["lr"] / g.get("lr_scale", 1.0) for g in optimizer.param_groups]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.scales.append(float(scaler.get_scale()))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss) if loss is not None else math.nan)
        self.end = _snapshot(_trainable(pl_module))
        logged = trainer.callback_metrics.get("train_grad_norm_step")
        step = trainer.global_step - 1  # the step this batch completed, if it was the last of its group
        if logged is not None and step in self.lrs and step not in self.grad_norms_logged:
            self.grad_norms_logged[step] = float(logged)
