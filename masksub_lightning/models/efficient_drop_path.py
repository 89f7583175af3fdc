"""Compute-skipping stochastic depth for timm ViT blocks: a dropped sample's residual branch is never computed.

timm's ``DropPath`` runs every block's attention and MLP branch on the whole batch and multiplies the dropped
samples' outputs by zero, so at the DeiT-III rates (0.4-0.6 per block for ViT-L / H) about half of the block
FLOPs are thrown away. With this switch on, each branch runs on the kept samples only::

    keep = x.new_empty((B, 1, 1)).bernoulli_(1 - p)    timm's drop_path call: same law, same RNG stream
    rows = indices of the kept samples                 one host sync: the shapes after it depend on the draw
    x = x.index_add(0, rows, branch(x[rows]) * keep[rows] / (1 - p))

Per sample this is exactly ``x + drop_path(branch(x))``: the same Bernoulli(1 - p) draw, made by the same RNG
call at the same point of the stream (when nothing inside the branch draws random numbers: no dropout in the
block; with dropout the law is the same but the stream is not), scaled by the same ``1 / (1 - p)`` in the
branch's dtype. Eval, ``p = 0`` and identity slots run timm's expression unchanged. The branch always runs on at
least two rows (dropped ones, scaled by 0, pad a smaller count), so every parameter gets a gradient as under timm
even when no sample is kept (DDP without ``find_unused_parameters`` needs that).

The switch swaps each supported block's class for a subclass that only overrides ``forward``: parameters, buffers,
state-dict keys and ``named_modules`` stay exactly timm's, a deep copy (EMA) keeps the switch, and
:func:`disable_efficient_drop_path` puts timm's class back. ``DropPathSubBranch`` keeps working: it flips the
``drop_prob`` of the same ``DropPath`` modules, which this forward reads at call time. Those modules are no longer
called in training at a rate above 0 (the block applies the rate), so hooks on them do not fire; hook the block.

Under ``torch.compile`` the count is read in eager code (a graph break per drop-path); the graph after it is
recompiled once with the row count dynamic, then reused whatever the draw.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import Block, ResPostBlock
from torch import Tensor, nn

from masksub_lightning.models import network


def _rows_to_run(keep: Tensor) -> Tensor:
    """Indices of the kept rows (``keep`` > 0) in batch order, padded with dropped rows to at least two.

    Padding rows are scaled by 0, so they change nothing; they keep every parameter in the graph when no row is
    kept (a gradient for each, as under timm) and keep sizes 0 and 1, which ``torch.compile`` specialises, away.
    """
    flat = keep.reshape(keep.shape[0])
    kept = int(torch.count_nonzero(flat))  # the one host sync: the shapes after it depend on the draw
    order = torch.argsort(
        (flat == 0).to(torch.uint8), stable=True
    )  # kept rows first, each group in batch order
    return order[: min(flat.shape[0], max(kept, 2))]


def add_drop_path_branch(
    x: Tensor, drop_path: nn.Module | None, branch: Callable[..., Tensor], row_args: tuple[Tensor, ...] = ()
) -> Tensor:
    """``x + drop_path(branch(x, *row_args))``, running ``branch`` on the rows ``drop_path`` keeps only.

    ``row_args`` are per-sample tensors (an attention mask with a batch dimension) sliced with the rows.
    """
    prob = float(drop_path.drop_prob) if isinstance(drop_path, DropPath) else 0.0
    if prob == 0.0 or not drop_path.training:  # timm's own expression: no draw, every row
        return x + (branch(x, *row_args) if drop_path is None else drop_path(branch(x, *row_args)))
    keep_prob = 1.0 - prob
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # timm's drop_path draw
    rows = _rows_to_run(keep)
    out = branch(x.index_select(0, rows), *(a.index_select(0, rows) for a in row_args))
    # timm scales in the branch output's dtype: the 0 / 1 draw cast to it, then divided (bf16 rounds 1 / 0.6).
    scale = keep.index_select(0, rows).to(out.dtype)
    if keep_prob > 0.0 and drop_path.scale_by_keep:
        scale = scale.div_(keep_prob)
    dtype = torch.result_type(x, out)  # what timm's `x + out` promotes to (fp32 residual + bf16 branch: fp32)
    return x.to(dtype).index_add(0, rows, (out * scale).to(dtype))


# ------------------------------------------------------------------------------------------------- the blocks
class _SkippingForward:
    """The forward of both block kinds; each defines its two residual branches, ``_attention`` and ``_mlp``."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None and attn_mask.ndim == 4 and attn_mask.shape[0] == x.shape[0]:
            per_sample = (attn_mask,)  # (B, heads or 1, N, N): sliced with the rows
            attention = partial(self._attention, is_causal=is_causal)
        else:  # a mask that broadcasts over the batch (or none) is the same for every row
            per_sample = ()
            attention = partial(self._attention, attn_mask=attn_mask, is_causal=is_causal)
        x = add_drop_path_branch(x, self.drop_path1, attention, per_sample)
        return add_drop_path_branch(x, self.drop_path2, self._mlp)


class EfficientDropPathBlock(_SkippingForward, Block):
    """timm's pre-norm ViT ``Block`` (LayerScale ``ls1`` / ``ls2`` included) with compute-skipping drop-path."""

    def _attention(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))

    def _mlp(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))


class EfficientDropPathResPostBlock(_SkippingForward, ResPostBlock):
    """timm's post-norm ViT ``ResPostBlock`` with compute-skipping drop-path."""

    def _attention(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self.norm1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal))

    def _mlp(self, x: Tensor) -> Tensor:
        return self.norm2(self.mlp(x))


#: timm block class -> its compute-skipping subclass (exact classes: a subclass may have its own forward).
EFFICIENT_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {
    Block: EfficientDropPathBlock,
    ResPostBlock: EfficientDropPathResPostBlock,
}


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :func:`enable_efficient_drop_path` cannot handle ``model`` (None when it can)."""
    owners = {type(owner) for owner, _, _ in network.drop_path_slots(model)}
    if not owners:
        return f"{type(model).__name__} has no drop-path slots (drop_path* attributes of its blocks)"
    done = set(EFFICIENT_BLOCKS.values())
    unknown = sorted(cls.__name__ for cls in owners if cls not in EFFICIENT_BLOCKS and cls not in done)
    if unknown:
        return f"its drop-path slots sit in {', '.join(unknown)} blocks"
    return None


def enable_efficient_drop_path(model: nn.Module) -> int:
    """Switch every supported block of ``model`` to compute-skipping drop-path; returns how many were switched.

    Args:
        model: a timm ViT-family model whose drop-path slots all sit in ``Block`` / ``ResPostBlock`` blocks.

    Raises:
        ValueError: the model has no drop-path slots or has them in other block types (one line naming them).
    """
    reason = unsupported_reason(model)
    if reason is not None:
        allowed = ", ".join(f"timm vision_transformer.{cls.__name__}" for cls in EFFICIENT_BLOCKS)
        raise ValueError(
            f"efficient_drop_path=True cannot handle {type(model).__name__}: {reason}; supported: {allowed}"
        )
    switched = 0
    for module in model.modules():
        efficient = EFFICIENT_BLOCKS.get(type(module))
        if efficient is not None:
            module.__class__ = efficient  # forward only: parameters, buffers and submodules are untouched
            switched += 1
    return switched


def disable_efficient_drop_path(model: nn.Module) -> int:
    """Give every switched block timm's class back (the model is then exactly as timm built it)."""
    timm_class = {efficient: original for original, efficient in EFFICIENT_BLOCKS.items()}
    restored = 0
    for module in model.modules():
        original = timm_class.get(type(module))
        if original is not None:
            module.__class__ = original
            restored += 1
    return restored
