"""Token drop for timm's BEiT family (``timm.models.beit.Beit``): the switch the ``beit_token_mask`` kind installs.

A BEiT has no patch dropout, and its position signal is (BEiT v2: only) the relative position bias each block's
attention looks up for all ``N + 1`` tokens, class token first: ``(1, heads, N + 1, N + 1)``, passed to SDPA as the
attention mask. Keeping K of the N patch tokens therefore also means gathering that bias at the kept tokens, per
sample, in every block; without the gather the kept tokens would lose their positions. One :class:`BeitTokenDrop`
per model does both, and is inactive (the model unchanged) outside :meth:`BeitTokenDrop.dropping`::

    x = patch_embed + cls (+ pos_embed) -> pos_drop --hook--> class token + int(L (1 - r)) random patches / sample
    model.rel_pos_bias() (shared, if any) --hook--> (heads, N+1, N+1) gathered to (B, heads, 1+K, 1+K)
    blocks[i].attn._get_rel_pos_bias()              (KeptTokenAttention) timm's own lookup, then the same gather

Nothing here owns a parameter: the model's state dict and module names stay those timm built, and ``remove`` puts
every attention's class back and removes the hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from timm.layers.patch_dropout import patch_dropout_forward
from timm.models import beit
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def is_beit(model: nn.Module) -> bool:
    """A timm BEiT / BEiT v2 (``timm.models.beit.Beit`` or a subclass)."""
    return isinstance(model, beit.Beit)


def gather_pair_bias(bias: Tensor, token_index: Tensor) -> Tensor:
    """``bias[h, i, j]`` over all tokens -> ``out[b, h, s, t] = bias[h, token_index[b, s], token_index[b, t]]``.

    Args:
        bias: (1, heads, T, T) or (heads, T, T) attention bias over every token.
        token_index: (B, S) the tokens each sample keeps (indices into the T).
    """
    heads, tokens = bias.shape[-3], bias.shape[-1]
    batch, kept = token_index.shape
    pairs = (token_index[:, :, None] * tokens + token_index[:, None, :]).reshape(-1)  # (B * S * S,)
    gathered = bias.reshape(heads, tokens * tokens)[:, pairs]  # (heads, B * S * S)
    return gathered.view(heads, batch, kept, kept).transpose(0, 1)


class KeptTokenAttention(beit.Attention):
    """timm's BEiT attention whose relative position bias is gathered at the kept tokens while a drop is active.

    :class:`BeitTokenDrop` swaps an attention's class to this one (same parameters, buffers and forward) and back;
    ``masksub_token_index`` is set on the instance only during the sub-branch's forward.
    """

    masksub_token_index: Tensor | None = None  # (B, 1 + K): class token (0) and the kept patches (1 + index)

    def _get_rel_pos_bias(self) -> Tensor:
        bias = super()._get_rel_pos_bias()
        if self.masksub_token_index is None:  # main branch, eval: timm's bias
            return bias
        return gather_pair_bias(bias, self.masksub_token_index)


def _attentions(model: nn.Module) -> list[nn.Module]:
    """The blocks' attentions that look up a relative position bias table of their own."""
    return [
        block.attn
        for block in model.blocks
        if getattr(block.attn, "relative_position_bias_table", None) is not None
    ]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`BeitTokenDrop` cannot be installed on ``model`` (None when it can)."""
    if not is_beit(model):
        return "beit_token_mask needs a timm BEiT model (timm.models.beit.Beit); ViT-family models use token_mask"
    if getattr(model, "grad_checkpointing", False):
        return (
            "gradient checkpointing recomputes the blocks after the sub-branch's forward, without its kept "
            "tokens; turn it off (set_grad_checkpointing(False))"
        )
    for i, block in enumerate(model.blocks):
        if type(block.attn) not in (beit.Attention, KeptTokenAttention):
            return f"blocks.{i}.attn is a {type(block.attn).__name__}, not timm's BEiT Attention"
    return None


class BeitTokenDrop:
    """The token-drop switch of one timm BEiT: forward hooks on ``pos_drop`` and ``rel_pos_bias``, and the blocks'
    attentions swapped to :class:`KeptTokenAttention`. Found again from the model by :func:`find_switch`.

    Tokens are dropped as timm's patch dropout does (``timm.layers.patch_dropout``, the ViT ``token_mask`` law):
    the class token and a uniformly random ``max(1, int(L * (1 - ratio)))`` of the L patch tokens per sample.
    """

    def __init__(self, model: nn.Module) -> None:
        self.ratio: float | None = None  # the drop ratio while dropping() is active, else None (main branch)
        self.keep_indices: Tensor | None = None  # (B, K) indices into the L patch tokens, of the last drop
        self.token_index: Tensor | None = None  # (B, 1 + K): class token (0) and kept patches, while dropping
        self._attentions = _attentions(model)
        for attn in self._attentions:
            attn.__class__ = KeptTokenAttention
        self._handles: list[RemovableHandle] = [model.pos_drop.register_forward_hook(self._drop_tokens)]
        if getattr(model, "rel_pos_bias", None) is not None:
            self._handles.append(model.rel_pos_bias.register_forward_hook(self._gather_shared_bias))

    def remove(self) -> None:
        """Remove the hooks and give every attention timm's class back."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._set_token_index(None)
        for attn in self._attentions:
            if type(attn) is KeptTokenAttention:
                attn.__class__ = beit.Attention
        self._attentions = []

    @contextlib.contextmanager
    def dropping(self, ratio: float) -> Iterator[None]:
        """Every forward of the model inside drops tokens at ``ratio`` (a fresh draw each); restored after."""
        self.ratio, self.keep_indices = ratio, None
        try:
            yield
        finally:
            self.ratio = None
            self._set_token_index(None)

    def _set_token_index(self, token_index: Tensor | None) -> None:
        """Give every swapped attention the kept tokens; None removes the instance attribute (the class default
        None remains), so the attention's ``vars()`` are timm's again."""
        self.token_index = token_index
        for attn in self._attentions:
            if token_index is None:
                attn.__dict__.pop("masksub_token_index", None)
            else:
                attn.masksub_token_index = token_index

    def _drop_tokens(self, module: nn.Module, args: Any, tokens: Tensor) -> Tensor | None:
        if self.ratio is None:
            return None  # main branch: untouched
        kept, keep = patch_dropout_forward(tokens, self.ratio, 1, ordered=False, training=True)
        if keep is None:  # ratio 0: every token kept, timm's bias as it is
            return None
        self.keep_indices = keep
        cls = torch.zeros(keep.shape[0], 1, dtype=keep.dtype, device=keep.device)
        self._set_token_index(torch.cat([cls, keep + 1], dim=1))
        return kept

    def _gather_shared_bias(self, module: nn.Module, args: Any, bias: Tensor) -> Tensor | None:
        # Beit.forward_features calls rel_pos_bias() after pos_drop: the tokens of this forward are known.
        return None if self.token_index is None else gather_pair_bias(bias, self.token_index)


def find_switch(model: nn.Module) -> BeitTokenDrop | None:
    """The :class:`BeitTokenDrop` installed on ``model`` (its hook on ``pos_drop``), or None."""
    pos_drop = getattr(model, "pos_drop", None)
    for hook in getattr(pos_drop, "_forward_hooks", {}).values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, BeitTokenDrop):
            return owner
    return None
