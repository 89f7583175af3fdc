"""Watching the training losses for NaN / inf without stalling the GPU.

A diverged run must not train on silently, and a NaN must never reach a saved checkpoint. Checking a loss on the
host every step would make the CPU wait for the GPU (one host synchronisation per step), so on CUDA the check is
deferred: each step's flags are copied to pinned host memory asynchronously and read once the copy has landed
(typically at the next step, by which time the GPU is past that point anyway). Before anything is saved and at
the end of each epoch the module waits for every pending flag. On the CPU the flags are read at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or inf and the policy is to stop."""


@dataclass
class NonFinite:
    """Where a non-finite loss was seen: the optimizer step (1-based, as the logs count) and the branch."""

    step: int
    branch: str


class NonFiniteMonitor:
    """Records per-step "is the loss finite" flags and reports the first step where one was not."""

    def __init__(self) -> None:
        self._pending: deque[tuple[int, Tensor, torch.cuda.Event | None]] = deque()

    def record(self, step: int, loss_main: Tensor, loss_sub: Tensor | None) -> None:
        """Queue the flags of ``step`` (main branch, sub-branch) without waiting for the device."""
        losses = [loss_main.detach().float().reshape(())]
        if loss_sub is not None:
            losses.append(loss_sub.detach().float().reshape(()))
        bad = ~torch.isfinite(torch.stack(losses))  # (1 or 2,) on the loss's device
        if bad.device.type == "cuda":
            host = torch.empty(bad.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((step, host, event))
        else:
            self._pending.append((step, bad, None))

    def poll(self, wait: bool = False) -> NonFinite | None:
        """The first non-finite step among the flags that have landed (all of them with ``wait=True``)."""
        while self._pending:
            step, flags, event = self._pending[0]
            if event is not None and not event.query():  # query() never blocks
                if not wait:
                    return None
                event.synchronize()  # only at flush points (epoch end, before a save), never in a step
            self._pending.popleft()
            if bool(flags.any()):
                self._pending.clear()
                return NonFinite(step, "main branch" if bool(flags[0]) else "sub-branch")
        return None

    def reset(self) -> None:
        """Forget pending flags (after a step was skipped on purpose)."""
        self._pending.clear()


def is_finite(loss_main: Tensor, loss_sub: Tensor | None) -> NonFinite | None:
    """Immediate (synchronising) check used by the ``skip`` policy; ``step`` is filled in by the caller."""
    if not bool(torch.isfinite(loss_main.detach()).all()):
        return NonFinite(0, "main branch")
    if loss_sub is not None and not bool(torch.isfinite(loss_sub.detach()).all()):
        return NonFinite(0, "sub-branch")
    return None
