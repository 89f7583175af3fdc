"""Gradients under mixed precision: unscaled exactly once, clipped and measured in true units.

Under ``16-mixed`` the loss is multiplied by a GradScaler's factor before each backward, so ``.grad`` holds scaled
gradients until they are unscaled. In a manual-optimization step Lightning's ``MixedPrecision.optimizer_step``
unscales them itself, right before ``on_before_optimizer_step``, except for optimizers that unscale inside their
own ``step`` (fused AdamW / Adam / SGD): for those ``.grad`` is still scaled in that hook, and a second
``unscale_`` on the others raises ("unscale_() has already been called"). Everything that reads or changes
gradients before the step goes through :func:`gradients_are_scaled` / :func:`unscale_gradients`, so this rule is
written once. ``32``, ``bf16-mixed`` and ``bf16-true`` have no scaler: every function here is then a no-op.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


def grad_scaler(trainer: Any) -> torch.amp.GradScaler | None:
    """The Trainer's enabled GradScaler, or None (no ``16-mixed``, or a scaler that is switched off)."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def gradients_are_scaled(trainer: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``.grad`` still carries the GradScaler's factor in ``on_before_optimizer_step``.

    True only for an optimizer that unscales inside ``step`` (torch's fused optimizers set
    ``_step_supports_amp_scaling``, the attribute Lightning and GradScaler check); every other optimizer was
    unscaled by Lightning before the hook.
    """
    return grad_scaler(trainer) is not None and getattr(optimizer, "_step_supports_amp_scaling", False)


def unscale_gradients(trainer: Any, optimizer: torch.optim.Optimizer) -> None:
    """In ``on_before_optimizer_step``: make ``.grad`` hold true gradients if it does not yet.

    For a fused optimizer this unscales here (the GradScaler then tells the fused step not to unscale again, and
    still skips the step when it found inf / NaN); for any other optimizer Lightning already did, and this does
    nothing.
    """
    if gradients_are_scaled(trainer, optimizer):
        grad_scaler(trainer).unscale_(optimizer)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the global L2 norm of the gradients to ``max_norm``; returns the norm before clipping.

    torch's ``get_total_norm`` + ``clip_grads_with_norm_``, with one addition for sharded (FSDP2) parameters: their
    norm is a DTensor holding this rank's part, made whole (one all-reduce) before it scales every shard alike.
    An overflowed ``16-mixed`` step gives an inf norm here; the GradScaler skips that step.
    """
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    full_tensor = getattr(total, "full_tensor", None)  # a DTensor under FSDP2
    if callable(full_tensor):
        total = full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
