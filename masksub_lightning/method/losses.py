"""MaskSub losses: the recipe's criterion for the main branch, a relaxed self-distillation loss for the sub-branch.

Both are computed in float32 (under bf16 autocast too), because the sub-branch target is a softmax of logits.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor

LossKind = Literal["ce", "bce"]


class MaskSubLoss:
    """Main-branch and sub-branch losses for one recipe.

    ``ce``: cross-entropy. Hard int64 targets (B,) use ``label_smoothing``; float (B, C) soft targets (mixup /
    cutmix, or smoothing applied by the data pipeline) use soft-target cross-entropy. The sub-branch target is
    ``softmax(main_logits.detach())``.

    ``bce``: binary cross-entropy as in DeiT-III and RSB. The main target (one-hot or mixed) is binarised with
    ``> bce_target_threshold`` (0.0: every class with non-zero mass is a positive); ``None`` keeps soft targets.
    The sub-branch target is ``sigmoid(main_logits.detach())``, used as given (never thresholded).

    Args:
        kind: "ce" or "bce".
        label_smoothing: smoothing for hard-label cross-entropy, in [0, 1).
        bce_target_threshold: binarisation threshold of BCE main targets, or None.
    """

    def __init__(
        self, kind: LossKind = "ce", label_smoothing: float = 0.0, bce_target_threshold: float | None = 0.0
    ) -> None:
        if kind not in ("ce", "bce"):
            raise ValueError(f"loss must be 'ce' or 'bce', got {kind!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if kind == "bce" and label_smoothing:
            raise ValueError("label_smoothing applies to 'ce' only; BCE recipes (DeiT-III, RSB) use none")
        self.kind = kind
        self.label_smoothing = label_smoothing
        self.bce_target_threshold = bce_target_threshold
        # timm's BCE: index targets one-hot (no smoothing), then binarised with `> threshold` when one is set; the
        # sub-branch's sigmoid targets are never thresholded.
        self._bce_main = BinaryCrossEntropy(smoothing=0.0, target_threshold=bce_target_threshold)
        self._bce_sub = BinaryCrossEntropy(smoothing=0.0)

    def __repr__(self) -> str:
        return f"MaskSubLoss(kind={self.kind!r}, label_smoothing={self.label_smoothing})"

    def main(self, logits: Tensor, target: Tensor) -> Tensor:
        """The recipe's loss of the main branch against the (possibly mixed) labels."""
        logits = logits.float()
        if self.kind == "ce":
            if target.is_floating_point():
                return soft_cross_entropy(logits, target.float())
            return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        return self._bce_main(logits, target.float() if target.is_floating_point() else target)

    def sub_target(self, main_logits: Tensor) -> Tensor:
        """The sub-branch's soft target: softmax (CE) or sigmoid (BCE) of the detached main logits, float32."""
        main_logits = main_logits.detach().float()
        return main_logits.softmax(-1) if self.kind == "ce" else main_logits.sigmoid()

    def sub(self, logits: Tensor, soft_target: Tensor) -> Tensor:
        """Sub-branch loss against :meth:`sub_target`; no label smoothing, no thresholding."""
        logits = logits.float()
        if self.kind == "ce":
            return soft_cross_entropy(logits, soft_target)
        return self._bce_sub(logits, soft_target)


#: Mean over the batch of ``-sum_c target_c * log_softmax(logits)_c`` (timm's own implementation).
soft_cross_entropy = SoftTargetCrossEntropy()
