"""Optimizer and learning-rate schedule of the recipes, built from timm's factories.

* Optimizers by timm name (``adamw``, ``lamb``, ``sgd``, ... see ``timm.optim.list_optimizers()``), with weight decay
  excluded for norms, biases and every 1-D parameter plus the model's ``no_weight_decay()`` set (position embeddings,
  class / register tokens; BEiT's relative position tables) or a recipe's own list in its place, and optional
  layer-wise LR decay (timm's ``layer_decay``). LARS (``lars``, ``larc``, ``nlars``, ``nlarc``) scales the steps
  of the weight matrices by the trust ratio, with or without weight decay, and steps biases and norm parameters as
  plain momentum SGD (the LARS of MoCo v3 and MAE's linear probe).
* Per-step schedules (warmup then cosine, ...) from ``timm.scheduler.create_scheduler_v2``, counted in optimizer
  steps so warmup and decay do not depend on epoch boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import timm.optim
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.optim import Optimizer

#: timm's LARS variants (one class, ``timm.optim.Lars``).
LARS_NAMES = ("lars", "larc", "nlars", "nlarc")

#: Schedules that decay per step; "constant" is warmup then a flat LR (layer-decay scales still applied).
SCHEDULERS = ("cosine", "constant", "poly", "tanh", "wsd")


def check_optimizer_name(name: str) -> None:
    """Raise a ValueError naming ``name`` and the allowed names if timm has no such optimizer."""
    known = timm.optim.list_optimizers()
    if name.lower() not in known:
        raise ValueError(f"unknown optimizer {name!r}; timm knows: {', '.join(sorted(known))}")


def check_scheduler_name(name: str) -> None:
    """Raise a ValueError naming ``name`` and the allowed names if it is not a supported schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    no_weight_decay: Sequence[str] | None = None,
    **kwargs: Any,
) -> Optimizer:
    """An optimizer over ``model``'s parameters with the recipes' weight-decay exclusions and layer decay.

    Args:
        model: the network (its ``no_weight_decay()`` and ``group_matcher()`` are used when present).
        name: timm optimizer name.
        lr: peak learning rate (already scaled by batch size, if the recipe scales it).
        weight_decay: decay applied to weight matrices / kernels only.
        layer_decay: layer-wise LR decay factor (e.g. 0.65 for MAE ViT-B fine-tuning), None for none.
        no_weight_decay: parameter names (fnmatch patterns) kept out of weight decay besides the 1-D parameters and
            biases, in place of the model's ``no_weight_decay()``; None uses the model's. BEiT fine-tuning gives
            ``[cls_token]``: timm's BEiT list also spares the relative position tables, unilm's does not.
        **kwargs: passed to the optimizer (betas, eps, momentum, fused, ...).
    """
    check_optimizer_name(name)
    group_fn = None
    if no_weight_decay is not None:  # timm's own grouping, with this list instead of model.no_weight_decay()
        grouping = (
            param_groups_weight_decay
            if layer_decay is None
            else partial(param_groups_layer_decay, layer_decay=layer_decay)
        )
        group_fn = partial(grouping, weight_decay=weight_decay, no_weight_decay_list=list(no_weight_decay))
    optimizer = timm.optim.create_optimizer_v2(
        model,
        opt=name,
        lr=lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        filter_bias_and_bn=True,
        param_group_fn=group_fn,
        **kwargs,
    )
    if name.lower() in LARS_NAMES and "always_adapt" not in kwargs:
        split_lars_groups(optimizer)
    return optimizer


def split_lars_groups(optimizer: Optimizer) -> None:
    """Give a fresh timm ``Lars`` MAE's (MoCo v3's) rule: trust-ratio steps for every > 1-D parameter, none else.

    timm's Lars applies the trust ratio only in groups whose weight_decay != 0 (or with ``always_adapt``), so
    with the linear probe's weight decay of 0 it would be plain momentum SGD; and with weight decay 0 timm puts
    weights and biases in one group. Each group is split in two, settings kept: its > 1-D parameters with
    ``always_adapt=True``, the rest (biases, norms) with ``always_adapt=False``.
    """
    if optimizer.state:
        raise ValueError("split_lars_groups needs an optimizer that has not stepped yet")
    groups = []
    for group in optimizer.param_groups:
        matrices = [p for p in group["params"] if p.ndim > 1]
        others = [p for p in group["params"] if p.ndim <= 1]
        groups += [
            {**group, "params": params, "always_adapt": adapt}
            for params, adapt in ((matrices, True), (others, False))
            if params
        ]
    optimizer.param_groups = groups


def build_scheduler(
    optimizer: Optimizer,
    name: str,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_lr: float = 1e-6,
    min_lr: float = 1e-6,
    per_epoch: bool = False,
) -> Scheduler:
    """A timm schedule over ``total_steps`` optimizer steps; call ``step_update(num_updates=step)`` after each.

    With ``per_epoch=True`` the units are epochs instead: call ``step(epoch=e)`` at each epoch boundary.
    """
    check_scheduler_name(name)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    # timm counts in "epochs" x updates_per_epoch: one "epoch" per step keeps every quantity in optimizer steps.
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=name,
        num_epochs=total_steps,
        warmup_epochs=min(warmup_steps, total_steps),
        warmup_lr=warmup_lr,
        min_lr=min_lr,
        step_on_epochs=per_epoch,
        updates_per_epoch=1,
    )
    assert scheduler is not None
    return scheduler
