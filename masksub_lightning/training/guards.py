"""Watching the training losses for NaN / inf without stalling the GPU.

A diverged run must not train on silently, and a NaN must never reach a saved checkpoint. Checking a loss on the
host every step would make the CPU wait for the GPU (one host synchronisation per step), so on CUDA the check is
deferred: each step's flags are copied to pinned host memory asynchronously and read once the copy has landed
(typically at the next step, by which time the GPU is past that point anyway). Before anything is saved and at
the end of each epoch the module waits for every pending flag. On the CPU the flags are read at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or inf and the policy is to stop."""


@dataclass
class NonFinite:
    """Where a non-finite loss was seen: the optimizer step (1-based, as the logs count) and the loss part."""

    step: int
    part: str  # e.g. "main branch", "sub-branch"


class NonFiniteMonitor:
    """Records per-step "is the loss finite" flags and reports the first step where one was not."""

    def __init__(self) -> None:
        self._pending: deque[tuple[int, list[str], Tensor, torch.cuda.Event | None]] = deque()

    def record(self, step: int, parts: Mapping[str, Tensor]) -> None:
        """Queue the flags of ``step``'s named loss parts without waiting for the device."""
        names = list(parts)
        bad = ~torch.isfinite(torch.stack([parts[k].detach().float().reshape(()) for k in names]))
        if bad.device.type == "cuda":
            host = torch.empty(bad.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((step, names, host, event))
        else:
            self._pending.append((step, names, bad, None))

    def poll(self, wait: bool = False) -> NonFinite | None:
        """The first non-finite step among the flags that have landed (all of them with ``wait=True``)."""
        while self._pending:
            step, names, flags, event = self._pending[0]
            if event is not None and not event.query():  # query() never blocks
                if not wait:
                    return None
                event.synchronize()  # only at flush points (epoch end, before a save), never in a step
            self._pending.popleft()
            if bool(flags.any()):
                self._pending.clear()
                return NonFinite(step, names[int(flags.int().argmax())])
        return None

    def reset(self) -> None:
        """Forget pending flags (after a step was skipped on purpose)."""
        self._pending.clear()


def first_nonfinite(parts: Mapping[str, Tensor]) -> NonFinite | None:
    """The first non-finite part among named losses, now (one host sync; the ``skip`` policy needs it at once);
    None when all are finite. ``step`` is filled in by the caller."""
    for name, loss in parts.items():
        if not bool(torch.isfinite(loss.detach()).all()):
            return NonFinite(0, name)
    return None
