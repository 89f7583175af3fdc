"""Sub-branch strategies: run the *same* network under a temporary perturbation.

A sub-branch never owns a copy of the network and never subclasses it. It perturbs the input or flips a few plain
attributes of timm's own layers for the duration of one forward pass, and restores everything in ``finally``::

    images --[mask | token drop | dropout p | drop-path p]--> same model --> sub logits

Kinds (the name a YAML config uses):

========== =====================================================================================================
``mask``   ViT family (``patch_drop`` + ``num_prefix_tokens``: vit_*, deit3_*, eva*, ...): MAE-style token drop
           after the position embedding. Every other model: zero a random half of 32x32-pixel cells.
``token_mask``  the ViT token drop, explicitly.
``pixel_mask``  the pixel-cell zeroing, explicitly (any model).
``mask_token``  the authors' Swin variant: masked 32x32-pixel regions replaced by a learned token after patch
           embedding (models whose ``patch_embed`` emits NHWC tokens).
``dropout`` every dropout layer inside the network's blocks set to ``p`` for the sub-branch only.
``droppath`` every block's drop-path set to ``p`` for the sub-branch only.
``none``   no sub-branch: plain supervised training (the A/B baseline).
========== =====================================================================================================

Adding a kind: subclass :class:`SubBranch`, implement ``unsupported_reason`` / ``perturbed`` (and ``setup`` if the
model needs a switch installed once), and decorate it with ``@register_sub_branch("name")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from timm.layers import DropPath, Format
from timm.layers.patch_dropout import PatchDropoutWithIndices, patch_dropout_forward
from torch import Tensor, nn

from masksub_lightning import masking

SUB_BRANCHES: dict[str, type[SubBranch]] = {}


def register_sub_branch(name: str) -> Callable[[type[SubBranch]], type[SubBranch]]:
    """Class decorator: make a :class:`SubBranch` subclass available under ``name`` (e.g. in YAML)."""

    def decorator(cls: type[SubBranch]) -> type[SubBranch]:
        if name in SUB_BRANCHES and SUB_BRANCHES[name] is not cls:
            raise ValueError(
                f"sub-branch name {name!r} is already registered by {SUB_BRANCHES[name].__name__}"
            )
        cls.name = name
        SUB_BRANCHES[name] = cls
        return cls

    return decorator


class UnsupportedModelError(ValueError):
    """The chosen sub-branch kind cannot perturb this model."""


class SubBranch:
    """Base class of sub-branch strategies.

    Args:
        ratio: mask ratio or drop probability of the sub-branch, in [0, 1).
    """

    name: ClassVar[str] = ""
    #: False only for the ``none`` kind: the module then trains the main branch alone.
    active: ClassVar[bool] = True

    def __init__(self, ratio: float = 0.5) -> None:
        if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"sub-branch ratio must be in [0, 1), got {ratio!r}")
        self.ratio = float(ratio)
        self._last_mask: Tensor | None = None

    @property
    def last_mask(self) -> Tensor | None:
        """(B, H, W) bool pixel mask of the last sub-branch input (True = masked) for mask kinds, else None."""
        return self._last_mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"

    def unsupported_reason(self, model: nn.Module) -> str | None:
        """Why this kind cannot perturb ``model`` (None when it can). Must not modify the model."""
        return None

    def setup(self, model: nn.Module) -> None:
        """Check the model and install whatever switch the kind needs; called once, when the module is built."""
        reason = self.unsupported_reason(model)
        if reason is not None:
            able = [name for name, cls in SUB_BRANCHES.items() if cls(0.5).unsupported_reason(model) is None]
            raise UnsupportedModelError(
                f"sub-branch {self.name!r} cannot handle {type(model).__name__}: {reason}. "
                f"Kinds that can handle this model: {', '.join(able)}"
            )

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        """Context in which ``model`` is perturbed; yields the (possibly masked) images to feed it.

        Implementations restore the model exactly in ``finally``, so an exception inside leaves no trace.
        """
        yield images

    def forward(self, model: nn.Module, images: Tensor) -> Tensor:
        """The sub-branch forward pass: logits of ``model`` on ``images`` under the perturbation."""
        with self.perturbed(model, images) as sub_images:
            return model(sub_images)


def build_sub_branch(kind: str | SubBranch, ratio: float = 0.5, **kwargs: Any) -> SubBranch:
    """Turn a registered name (plus ratio and kind-specific options) into a :class:`SubBranch`.

    Raises:
        ValueError: unknown name (the message lists the known ones) or a ratio outside [0, 1).
    """
    if isinstance(kind, SubBranch):
        return kind
    if kind not in SUB_BRANCHES:
        raise ValueError(f"unknown sub-branch {kind!r}; known kinds: {', '.join(sorted(SUB_BRANCHES))}")
    return SUB_BRANCHES[kind](ratio, **kwargs)


# --------------------------------------------------------------------------------------------------------- none
@register_sub_branch("none")
class NoSubBranch(SubBranch):
    """No sub-branch: the module trains with the main loss only (the baseline for A/B comparisons)."""

    active = False

    def __init__(self, ratio: float = 0.5, **ignored: Any) -> None:
        # Options of other kinds (cell_size, ...) are accepted and ignored, so that a baseline twin of a recipe can
        # switch `sub_branch` to "none" without also deleting the sub-branch's options.
        super().__init__(ratio)

    def forward(self, model: nn.Module, images: Tensor) -> Tensor:
        raise RuntimeError("the 'none' sub-branch has no forward pass")


# -------------------------------------------------------------------------------------------------- pixel mask
@register_sub_branch("pixel_mask")
class PixelMask(SubBranch):
    """Zero a random ``round(G * ratio)`` of the G cells of a ``cell_size``-pixel grid, independently per sample.

    Works on any image model (the ResNet / ConvNeXt / EfficientNet variant of the paper); the whole network runs,
    so a MaskSub step costs about 2x a plain one.

    Args:
        ratio: fraction of cells zeroed.
        cell_size: cell side in pixels (32 in the paper).
    """

    def __init__(self, ratio: float = 0.5, cell_size: int = 32) -> None:
        super().__init__(ratio)
        if not isinstance(cell_size, int) or cell_size < 1:
            raise ValueError(f"cell_size must be a positive int (pixels), got {cell_size!r}")
        self.cell_size = cell_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, cell_size={self.cell_size})"

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        hw = (images.shape[-2], images.shape[-1])
        cells = masking.random_grid_mask(
            images.shape[0], masking.grid_shape(hw, self.cell_size), self.ratio, images.device
        )
        self._last_mask = masking.upsample_grid_mask(cells, self.cell_size, hw)  # (B, H, W)
        yield masking.mask_pixels(images, self._last_mask)


# -------------------------------------------------------------------------------------------------- token mask
def _is_token_model(model: nn.Module) -> bool:
    return (
        hasattr(model, "patch_drop") and hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed")
    )


class _RecordingPatchDropout(nn.Module):
    """timm's patch dropout that also remembers which patch tokens it kept (for tests and visualisation)."""

    def __init__(self, prob: float, num_prefix_tokens: int, return_indices: bool) -> None:
        super().__init__()
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens
        self.return_indices = return_indices
        self.keep_indices: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor | None]:
        out, keep = patch_dropout_forward(x, self.prob, self.num_prefix_tokens, False, self.training)
        self.keep_indices = keep  # (B, num_kept) indices into the L patch tokens
        return (out, keep) if self.return_indices else out


@register_sub_branch("token_mask")
class TokenMask(SubBranch):
    """MAE-style token drop for ViT-family timm models.

    After the position embedding, every prefix token (class / register tokens) is kept along with a uniformly
    random ``int(L * (1 - ratio))`` of the L patch tokens per sample; the transformer runs on the shorter sequence
    (about half the cost at ratio 0.5, so a MaskSub step costs about 1.5x a plain one). Implemented by swapping the
    model's ``patch_drop`` layer for the sub-branch forward.
    """

    def __init__(self, ratio: float = 0.5) -> None:
        super().__init__(ratio)
        self.last_keep_indices: Tensor | None = None
        self._last_geometry: tuple[tuple[int, int], int, tuple[int, int]] | None = None

    def unsupported_reason(self, model: nn.Module) -> str | None:
        if not _is_token_model(model):
            return "token masking needs a ViT-family timm model (with patch_embed, patch_drop and num_prefix_tokens)"
        return None

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        original = model.patch_drop
        # EVA-style models call patch_drop only when it is not None and expect (tokens, keep_indices) back.
        with_indices = original is None or isinstance(original, PatchDropoutWithIndices)
        dropper = _RecordingPatchDropout(self.ratio, model.num_prefix_tokens, return_indices=with_indices)
        dropper.train(model.training)
        model.patch_drop = dropper
        try:
            yield images
        finally:
            model.patch_drop = original
            self.last_keep_indices = dropper.keep_indices
            embed = model.patch_embed
            self._last_geometry = (tuple(embed.grid_size), embed.patch_size[0], tuple(images.shape[-2:]))

    @property
    def last_mask(self) -> Tensor | None:
        """Pixel view of the dropped tokens, (B, H, W) with True = dropped; built on demand (visualisation)."""
        keep = self.last_keep_indices
        if keep is None or self._last_geometry is None:
            return None
        (grid_h, grid_w), patch, image_hw = self._last_geometry
        token_mask = torch.ones(keep.shape[0], grid_h * grid_w, dtype=torch.bool, device=keep.device)
        token_mask.scatter_(1, keep, False)
        return masking.upsample_grid_mask(token_mask.view(-1, grid_h, grid_w), patch, image_hw)


@register_sub_branch("mask")
class Mask(SubBranch):
    """The paper's default: token drop on ViT-family models, pixel-cell zeroing on every other model.

    Args:
        ratio: mask ratio (0.5 in every recipe of the paper).
        cell_size: pixel cell side for non-ViT models.
    """

    def __init__(self, ratio: float = 0.5, cell_size: int = 32) -> None:
        super().__init__(ratio)
        self.cell_size = cell_size
        self._pixel = PixelMask(ratio, cell_size)  # validates cell_size early
        self._token = TokenMask(ratio)
        self._impl: SubBranch | None = None

    def __repr__(self) -> str:
        impl = type(self._impl).__name__ if self._impl else "unresolved"
        return f"Mask(ratio={self.ratio}, cell_size={self.cell_size}, impl={impl})"

    def setup(self, model: nn.Module) -> None:
        self._impl = self._token if _is_token_model(model) else self._pixel
        self._impl.setup(model)

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        if self._impl is None:
            self.setup(model)
        assert self._impl is not None
        with self._impl.perturbed(model, images) as sub_images:
            yield sub_images

    @property
    def last_mask(self) -> Tensor | None:
        return self._impl.last_mask if self._impl is not None else None


# ------------------------------------------------------------------------------------------------- mask token
@register_sub_branch("mask_token")
class MaskToken(SubBranch):
    """The authors' Swin variant: masked regions replaced by a learned token right after patch embedding.

    A random ``round(G * ratio)`` of the G ``cell_size``-pixel regions (8 x 8 tokens at Swin's stride 4) are
    replaced. The token is a parameter registered on the patch embedding itself
    (``model.patch_embed.masksub_mask_token``, shape (C,), so the usual 1-D rule keeps it out of weight decay and
    layer decay groups it with the stem); a forward hook on ``patch_embed`` does the replacement only while the
    sub-branch runs.

    Args:
        ratio: fraction of regions replaced.
        cell_size: region side in pixels; must be a multiple of the patch embedding's stride.
    """

    token_name = "masksub_mask_token"

    def __init__(self, ratio: float = 0.5, cell_size: int = 32) -> None:
        super().__init__(ratio)
        if not isinstance(cell_size, int) or cell_size < 1:
            raise ValueError(f"cell_size must be a positive int (pixels), got {cell_size!r}")
        self.cell_size = cell_size
        self._active_mask: Tensor | None = None
        self._hooked: set[int] = set()

    def unsupported_reason(self, model: nn.Module) -> str | None:
        embed = getattr(model, "patch_embed", None)
        if embed is None or getattr(embed, "output_fmt", None) != Format.NHWC:
            return "mask_token needs a patch_embed that emits NHWC tokens (timm Swin-style models)"
        stride = embed.patch_size[0]
        if self.cell_size % stride:
            return f"cell_size {self.cell_size} is not a multiple of the patch stride {stride}"
        return None

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        embed = model.patch_embed
        if not hasattr(embed, self.token_name):
            token = nn.Parameter(torch.zeros(embed.proj.out_channels))
            nn.init.trunc_normal_(token, std=0.02)
            embed.register_parameter(self.token_name, token)
        if id(embed) not in self._hooked:
            embed.register_forward_hook(self._replace_masked_tokens)
            self._hooked.add(id(embed))

    def _replace_masked_tokens(self, module: nn.Module, args: Any, tokens: Tensor) -> Tensor | None:
        if self._active_mask is None:
            return None  # main branch, eval: untouched
        return masking.replace_with_token(tokens, self._active_mask, getattr(module, self.token_name))

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        stride = model.patch_embed.patch_size[0]
        tokens_per_cell = self.cell_size // stride
        token_hw = (images.shape[-2] // stride, images.shape[-1] // stride)
        cells = masking.random_grid_mask(
            images.shape[0], masking.grid_shape(token_hw, tokens_per_cell), self.ratio, images.device
        )
        self._active_mask = masking.upsample_grid_mask(cells, tokens_per_cell, token_hw)  # (B, h, w) tokens
        try:
            yield images
        finally:
            self._last_tokens = (self._active_mask, stride, tuple(images.shape[-2:]))
            self._active_mask = None

    @property
    def last_mask(self) -> Tensor | None:
        """Pixel view of the replaced tokens, (B, H, W) with True = replaced; built on demand."""
        if getattr(self, "_last_tokens", None) is None:
            return None
        token_mask, stride, image_hw = self._last_tokens
        return masking.upsample_grid_mask(token_mask, stride, image_hw)


# ------------------------------------------------------------------------------------------ dropout / droppath
def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Top-level names of the classifier head, whose dropout is not part of the blocks."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or "head"
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return tuple({n.split(".")[0] for n in names} | {"head", "head_drop", "fc", "classifier"})


def block_dropouts(model: nn.Module) -> list[nn.Dropout]:
    """Dropout layers inside the network's blocks: not direct children of the model, not in the head."""
    heads = _head_prefixes(model)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and "." in name and not name.startswith(heads):
            found.append(module)
    return found


@register_sub_branch("dropout")
class Dropout(SubBranch):
    """Every dropout layer inside the blocks (attention and MLP dropouts in a ViT) set to ``ratio``."""

    def unsupported_reason(self, model: nn.Module) -> str | None:
        if not block_dropouts(model):
            return "it has no dropout layers inside its blocks"
        return None

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        with _attribute_set(block_dropouts(model), "p", self.ratio):
            yield images


@contextlib.contextmanager
def _attribute_set(layers: list[nn.Module], attr: str, value: float) -> Iterator[None]:
    """Set ``attr`` of every layer to ``value`` inside the context; restore each layer's own value after."""
    saved = [getattr(layer, attr) for layer in layers]
    try:
        for layer in layers:
            setattr(layer, attr, value)
        yield
    finally:
        for layer, old in zip(layers, saved):
            setattr(layer, attr, old)


def _drop_path_slots(model: nn.Module) -> Iterator[tuple[nn.Module, str, Any]]:
    """(owner, attribute, value) for every ``drop_path*`` slot of every block: a DropPath, an Identity or None."""
    for module in model.modules():
        names = set(module._modules) | {k for k, v in vars(module).items() if v is None}
        for attr in sorted(names):
            if attr.startswith("drop_path"):
                value = getattr(module, attr)
                if value is None or isinstance(value, (DropPath, nn.Identity)):
                    yield module, attr, value


@register_sub_branch("droppath")
class DropPathSub(SubBranch):
    """Every block's drop-path (stochastic depth) set to ``ratio`` for the sub-branch only.

    timm builds ``nn.Identity`` (or ``None``) where a block's rate is 0; ``setup`` swaps those for
    ``DropPath(0.0)`` — same output, no parameters, state dict unchanged — so every block can be switched.
    """

    def unsupported_reason(self, model: nn.Module) -> str | None:
        if next(_drop_path_slots(model), None) is None:
            return "it has no drop-path slots (drop_path* attributes) in its blocks"
        return None

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        for owner, attr, value in list(_drop_path_slots(model)):
            if not isinstance(value, DropPath):
                setattr(owner, attr, DropPath(0.0))

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        layers = [m for m in model.modules() if isinstance(m, DropPath)]
        with _attribute_set(layers, "drop_prob", self.ratio):
            yield images
