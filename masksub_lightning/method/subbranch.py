"""Sub-branch strategies: run the *same* network under a temporary perturbation.

A sub-branch never owns a copy of the network and never subclasses it. Every kind follows one lifecycle::

    setup(model)       once: check the model, install the switch the kind needs (a patch-dropout module,
                       a forward hook, switchable drop-paths), inactive on the main branch
    perturbed(model, images)
                       per step: flip plain attributes (or build a fresh input mask), yield the images to feed
                       the model, restore every attribute in ``finally`` (also after an exception)
    teardown(model)    remove what setup installed (hooks, modules, parameters): the model is as timm built it

    images --[mask | token drop | dropout p | drop-path p]--> same model --> sub logits

Kinds (the name a YAML config uses -> the class :func:`build_sub_branch` returns):

=================== ========================== ==========================================================================
``mask``            resolved per model         the paper's default: ``token_mask`` for the ViT family (``patch_drop`` +
                                               ``num_prefix_tokens``: vit_*, deit3_*, eva*, ...), ``beit_token_mask``
                                               for timm's BEiT (beit_*, beitv2_*), ``pixel_mask`` for every other model
``token_mask``      TokenMaskSubBranch         MAE-style token drop after the position embedding
``beit_token_mask`` BeitTokenMaskSubBranch     the same drop on a BEiT, its relative position bias gathered at the kept
                                               tokens in every block (``method/beit_tokens.py``)
``pixel_mask``      PixelMaskSubBranch         zero a random half of 32x32-pixel cells (any model)
``mask_token``      MaskTokenSubBranch         the authors' Swin variant: masked 32x32-pixel regions replaced by a
                                               learned token after patch embedding (``patch_embed`` emits NHWC)
``dropout``         DropoutSubBranch           every dropout layer inside the network's blocks set to ``p``
``droppath``        DropPathSubBranch          every block's drop-path set to ``p``
``none``            NoSubBranch                no sub-branch: plain supervised training (the A/B baseline)
=================== ========================== ==========================================================================

Adding a kind: subclass :class:`SubBranch`, implement ``unsupported_reason`` / ``perturbed`` (and ``setup`` /
``teardown`` if the model needs a switch installed once), and decorate it with ``@register_sub_branch("name")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from timm.layers import DropPath, Format
from timm.layers.patch_dropout import PatchDropoutWithIndices, patch_dropout_forward
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from masksub_lightning.method import beit_tokens, masking
from masksub_lightning.models import network

#: Registered kind name -> its class.
SUB_BRANCHES: dict[str, type[SubBranch]] = {}


def register_sub_branch(name: str) -> Callable[[type[SubBranch]], type[SubBranch]]:
    """Class decorator: make a :class:`SubBranch` subclass available under ``name`` (e.g. in YAML)."""

    def decorator(cls: type[SubBranch]) -> type[SubBranch]:
        if name in MODEL_DEPENDENT_KINDS or (name in SUB_BRANCHES and SUB_BRANCHES[name] is not cls):
            owner = SUB_BRANCHES[name].__name__ if name in SUB_BRANCHES else "build_sub_branch"
            raise ValueError(f"sub-branch name {name!r} is already registered by {owner}")
        cls.name = name
        SUB_BRANCHES[name] = cls
        return cls

    return decorator


def _resolve_mask(model: nn.Module, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``mask``: token drop for the ViT and BEiT families, pixel cells otherwise; ``cell_size`` only matters for the
    latter."""
    if "cell_size" in options:
        _check_cell_size(options["cell_size"])  # a bad value is an error even where it is not used
    if beit_tokens.is_beit(model):
        return "beit_token_mask", {k: v for k, v in options.items() if k != "cell_size"}
    if _is_token_model(model):
        return "token_mask", {k: v for k, v in options.items() if k != "cell_size"}
    return "pixel_mask", options


#: Names whose class depends on the model: name -> (model, options) -> (registered name, its options).
MODEL_DEPENDENT_KINDS: dict[str, Callable[[nn.Module, dict[str, Any]], tuple[str, dict[str, Any]]]] = {
    "mask": _resolve_mask
}


def sub_branch_names() -> list[str]:
    """Every name ``build_sub_branch`` accepts: the model-dependent ones first, then the registered kinds."""
    return [*MODEL_DEPENDENT_KINDS, *SUB_BRANCHES]


def build_sub_branch(
    kind: str | SubBranch, ratio: float = 0.5, model: nn.Module | None = None, **kwargs: Any
) -> SubBranch:
    """Turn a name (plus ratio and kind-specific options) into a :class:`SubBranch` for ``model``.

    ``mask`` resolves to the concrete kind for the model (:class:`TokenMaskSubBranch` for the ViT family,
    :class:`PixelMaskSubBranch` otherwise), so it needs ``model``; the other names do not. The result is not set
    up yet: call its ``setup(model)``.

    Raises:
        ValueError: unknown name (the message lists the known ones), a ratio outside [0, 1), a bad option, or
            ``mask`` without a model.
    """
    if isinstance(kind, SubBranch):
        return kind
    if kind in MODEL_DEPENDENT_KINDS:
        _check_ratio(ratio)
        if model is None:
            raise ValueError(
                f"sub-branch {kind!r} picks its kind from the model: pass model=... (or name the kind: "
                f"{', '.join(SUB_BRANCHES)})"
            )
        kind, kwargs = MODEL_DEPENDENT_KINDS[kind](model, kwargs)
    if kind not in SUB_BRANCHES:
        raise ValueError(f"unknown sub-branch {kind!r}; known kinds: {', '.join(sorted(sub_branch_names()))}")
    return SUB_BRANCHES[kind](ratio, **kwargs)


class UnsupportedModelError(ValueError):
    """The chosen sub-branch kind cannot perturb this model."""


def _check_ratio(ratio: Any) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"sub-branch ratio must be in [0, 1), got {ratio!r}")


def _check_cell_size(cell_size: Any) -> None:
    if isinstance(cell_size, bool) or not isinstance(cell_size, int) or cell_size < 1:
        raise ValueError(f"cell_size must be a positive int (pixels), got {cell_size!r}")


class SubBranch:
    """Base class of sub-branch strategies.

    Args:
        ratio: mask ratio or drop probability of the sub-branch, in [0, 1).
    """

    name: ClassVar[str] = ""
    #: False only for the ``none`` kind: the module then trains the main branch alone.
    active: ClassVar[bool] = True

    def __init__(self, ratio: float = 0.5) -> None:
        _check_ratio(ratio)
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
        """Check the model and install whatever switch the kind needs; called once, when the module is built.

        Subclasses that install something call ``super().setup(model)`` first and undo it in :meth:`teardown`.
        Calling setup twice on the same model installs nothing twice.
        """
        reason = self.unsupported_reason(model)
        if reason is not None:
            raise UnsupportedModelError(
                f"sub-branch {self.name!r} cannot handle {type(model).__name__}: {reason}. "
                f"Kinds that can handle this model: {', '.join(_kinds_that_can_handle(model))}"
            )

    def teardown(self, model: nn.Module) -> None:
        """Remove everything :meth:`setup` installed on ``model`` (a no-op for kinds that install nothing)."""

    def check_image_size(self, image_size: int | tuple[int, int], model: nn.Module | None = None) -> None:
        """Raise a ValueError when this kind cannot perturb ``image_size`` images (the data's size, known at set-up,
        before any batch; the masks of the pixel kinds must tile the image). The default accepts any size."""

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


def _kinds_that_can_handle(model: nn.Module) -> list[str]:
    able = []
    for name in sub_branch_names():
        try:
            branch = build_sub_branch(name, 0.5, model=model)
        except (TypeError, ValueError):  # a kind with required options: cannot tell, leave it out
            continue
        if branch.unsupported_reason(model) is None:
            able.append(name)
    return able


def _restore_slot(owner: nn.Module, attr: str, old: Any, registered: bool) -> None:
    """Put ``old`` back in ``owner.attr`` where setup installed a module; ``registered``: ``old`` sat in a submodule
    slot (a registered slot keeps its position, so named_modules keeps its order; a plain ``None`` attribute becomes
    a plain attribute again)."""
    if old is None and not registered:
        delattr(owner, attr)  # drop the submodule slot setattr created
    setattr(owner, attr, old)


@contextlib.contextmanager
def _attribute_set(layers: list[Any], attr: str, value: float) -> Iterator[None]:
    """Set ``attr`` of every layer to ``value`` inside the context; restore each layer's own value after."""
    saved = [getattr(layer, attr) for layer in layers]
    try:
        for layer in layers:
            setattr(layer, attr, value)
        yield
    finally:
        for layer, old in zip(layers, saved):
            setattr(layer, attr, old)


def _hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (
        (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    )


def _fixed_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The only input size ``model`` accepts (a strict timm patch embedding), else None (known at the first call).

    A CNN's ``pretrained_cfg['input_size']`` is not used: it is the pretraining resolution, not a constraint, and
    recipes train CNNs at other sizes (CIFAR at 32 px).
    """
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if (
        size is None
        or not getattr(embed, "strict_img_size", False)
        or getattr(embed, "dynamic_img_size", False)
    ):
        return None
    return int(size[0]), int(size[1])


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
class PixelMaskSubBranch(SubBranch):
    """Zero a random ``round(G * ratio)`` of the G cells of a square-cell grid, independently per sample.

    Works on any image model (the ResNet / ConvNeXt / EfficientNet variant of the paper); the whole network runs,
    so a MaskSub step costs about 2x a plain one.

    Cell size rule: cells tile the image exactly and there are at least 4 of them, so that every sample has the
    same masked fraction ``round(G * ratio) / G`` (within 1/8 of the ratio). The cell side is the largest one
    ``<= cell_size`` that divides both image sides and leaves >= 4 cells, and it must be at least half of
    ``cell_size``: with ``cell_size`` 32, 224 px images get 32 px cells (7 x 7, as in the paper), 32 px images
    (CIFAR) 16 px cells (2 x 2), 40 px images 20 px cells; 227 px images are rejected. A ValueError naming the
    image size and the cell sizes that fit is raised at ``setup`` when the model accepts only one input size (a
    strict timm patch embedding), by :meth:`check_image_size` (``masksub`` calls it with the data's image size
    before training), otherwise at the first call. :attr:`last_cell_size` is the side last used.

    Args:
        ratio: fraction of cells zeroed.
        cell_size: largest cell side in pixels (32 in the paper).
    """

    def __init__(self, ratio: float = 0.5, cell_size: int = 32) -> None:
        super().__init__(ratio)
        _check_cell_size(cell_size)
        self.cell_size = cell_size
        self.last_cell_size: int | None = None
        self._cells: dict[tuple[int, int], int] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, cell_size={self.cell_size})"

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        size = _fixed_image_size(model)
        if size is not None:
            self.cell_for(size)

    def check_image_size(self, image_size: int | tuple[int, int], model: nn.Module | None = None) -> None:
        self.cell_for(_hw(image_size))

    def cell_for(self, image_hw: tuple[int, int]) -> int:
        """The cell side used on ``image_hw`` images (see the class docstring); ValueError when none fits."""
        image_hw = (int(image_hw[0]), int(image_hw[1]))
        if image_hw not in self._cells:
            self._cells[image_hw] = tiling_side(self, image_hw, stride=1)
        return self._cells[image_hw]

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        hw = (images.shape[-2], images.shape[-1])
        cell = self.cell_for(hw)
        cells = masking.random_grid_mask(
            images.shape[0], (hw[0] // cell, hw[1] // cell), self.ratio, images.device
        )
        self.last_cell_size = cell
        self._last_mask = masking.upsample_grid_mask(cells, cell, hw)  # (B, H, W)
        yield masking.mask_pixels(images, self._last_mask)


# -------------------------------------------------------------------------------------------------- token mask
_TokenGeometry = tuple[tuple[int, int], int, tuple[int, int]]  # (token grid, patch side, image size)


def _is_token_model(model: nn.Module) -> bool:
    return (
        hasattr(model, "patch_drop") and hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed")
    )


class SwitchablePatchDropout(nn.Module):
    """timm's patch dropout with its rate as a plain attribute, installed once in place of a ViT's ``patch_drop``.

    On the main branch ``prob`` is the rate of the layer it replaced (0.0 where timm built an ``nn.Identity`` or
    ``None``), so the main branch is unchanged; :class:`TokenMaskSubBranch` sets it to the mask ratio for the
    sub-branch only. It also remembers which patch tokens the last drop kept (tests and visualisation).

    Args:
        replaced: the model's own ``patch_drop`` (kept, unregistered, to be put back at teardown).
        registered: whether ``replaced`` sat in a submodule slot (False for a plain ``None`` attribute).
        num_prefix_tokens: class / register tokens in front of the patch tokens, never dropped.
        return_indices: return ``(tokens, keep_indices)`` as EVA-style models expect.
    """

    def __init__(
        self, replaced: nn.Module | None, registered: bool, num_prefix_tokens: int, return_indices: bool
    ) -> None:
        super().__init__()
        self.prob = float(getattr(replaced, "prob", 0.0))
        self.ordered = bool(getattr(replaced, "ordered", False))
        self.num_prefix_tokens = num_prefix_tokens
        self.return_indices = return_indices
        self.keep_indices: Tensor | None = None
        # A plain attribute, not a submodule: state_dict and named_modules stay those of the timm model.
        object.__setattr__(self, "replaced", replaced)
        object.__setattr__(self, "replaced_registered", registered)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, num_prefix_tokens={self.num_prefix_tokens}"

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor | None]:
        out, keep = patch_dropout_forward(x, self.prob, self.num_prefix_tokens, self.ordered, self.training)
        if keep is not None:  # only when tokens were dropped: the main branch writes nothing
            self.keep_indices = keep  # (B, num_kept) indices into the L patch tokens
        return (out, keep) if self.return_indices else out


@register_sub_branch("token_mask")
class TokenMaskSubBranch(SubBranch):
    """MAE-style token drop for ViT-family timm models.

    After the position embedding, every prefix token (class / register tokens) is kept along with a uniformly
    random ``int(L * (1 - ratio))`` of the L patch tokens per sample; the transformer runs on the shorter sequence
    (about half the cost at ratio 0.5, so a MaskSub step costs about 1.5x a plain one). ``setup`` installs one
    :class:`SwitchablePatchDropout` as the model's ``patch_drop``; the sub-branch only flips its ``prob``;
    ``teardown`` puts the original ``patch_drop`` back.
    """

    def __init__(self, ratio: float = 0.5) -> None:
        super().__init__(ratio)
        self.last_keep_indices: Tensor | None = None
        self._last_geometry: _TokenGeometry | None = None

    def unsupported_reason(self, model: nn.Module) -> str | None:
        if not _is_token_model(model):
            return "token masking needs a ViT-family timm model (with patch_embed, patch_drop and num_prefix_tokens)"
        return None

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        original = model.patch_drop
        if isinstance(original, SwitchablePatchDropout):
            return
        # EVA-style models call patch_drop only when it is not None and expect (tokens, keep_indices) back.
        with_indices = original is None or isinstance(original, PatchDropoutWithIndices)
        registered = "patch_drop" in model._modules
        switch = SwitchablePatchDropout(
            original, registered, model.num_prefix_tokens, return_indices=with_indices
        )
        switch.train(model.training)
        model.patch_drop = switch

    def teardown(self, model: nn.Module) -> None:
        switch = getattr(model, "patch_drop", None)
        if isinstance(switch, SwitchablePatchDropout):
            if switch.replaced is not None:
                switch.replaced.train(model.training)  # it missed every train() / eval() while unregistered
            _restore_slot(model, "patch_drop", switch.replaced, switch.replaced_registered)

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        switch = getattr(model, "patch_drop", None)
        if not isinstance(switch, SwitchablePatchDropout):
            raise RuntimeError(f"{type(self).__name__} is not set up on this model: call setup(model) first")
        switch.keep_indices = None
        try:
            with _attribute_set([switch], "prob", self.ratio):
                yield images
        finally:
            self.last_keep_indices = switch.keep_indices
            self._last_geometry = _token_geometry(model, images)

    @property
    def last_mask(self) -> Tensor | None:
        """Pixel view of the dropped tokens, (B, H, W) with True = dropped; built on demand (visualisation)."""
        return _dropped_token_pixels(self.last_keep_indices, self._last_geometry)


def _token_geometry(model: nn.Module, images: Tensor) -> _TokenGeometry:
    embed = model.patch_embed
    return tuple(embed.grid_size), embed.patch_size[0], tuple(images.shape[-2:])


def _dropped_token_pixels(keep: Tensor | None, geometry: _TokenGeometry | None) -> Tensor | None:
    """(B, H, W) pixel mask, True where a patch token was dropped; ``keep``: (B, K) kept patch indices."""
    if keep is None or geometry is None:
        return None
    (grid_h, grid_w), patch, image_hw = geometry
    token_mask = torch.ones(keep.shape[0], grid_h * grid_w, dtype=torch.bool, device=keep.device)
    token_mask.scatter_(1, keep, False)
    return masking.upsample_grid_mask(token_mask.view(-1, grid_h, grid_w), patch, image_hw)


# ---------------------------------------------------------------------------------------------- BEiT token mask
@register_sub_branch("beit_token_mask")
class BeitTokenMaskSubBranch(SubBranch):
    """Token drop for timm's BEiT / BEiT v2: the ``token_mask`` count law, with the relative position bias gathered.

    After the position embedding the class token and a uniformly random ``int(L * (1 - ratio))`` of the L patch
    tokens are kept per sample, as :class:`TokenMaskSubBranch` does; every block's relative position bias (and the
    shared one, if the model has it) is gathered per sample at the kept tokens, their only position signal in BEiT
    v2. ``setup`` installs one :class:`~masksub_lightning.method.beit_tokens.BeitTokenDrop` (forward hooks on
    ``pos_drop`` and ``rel_pos_bias``, the attentions' class swapped for one whose bias lookup gathers), inactive on
    the main branch; ``teardown`` removes it, leaving the model as timm built it.
    """

    def __init__(self, ratio: float = 0.5) -> None:
        super().__init__(ratio)
        self.last_keep_indices: Tensor | None = None
        self._last_geometry: _TokenGeometry | None = None

    def unsupported_reason(self, model: nn.Module) -> str | None:
        return beit_tokens.unsupported_reason(model)

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        if beit_tokens.find_switch(model) is None:
            beit_tokens.BeitTokenDrop(model)  # kept alive by its hooks on the model

    def teardown(self, model: nn.Module) -> None:
        switch = beit_tokens.find_switch(model)
        if switch is not None:
            switch.remove()

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        switch = beit_tokens.find_switch(model)
        if switch is None:
            raise RuntimeError(f"{type(self).__name__} is not set up on this model: call setup(model) first")
        if getattr(model, "grad_checkpointing", False):  # turned on after setup
            raise RuntimeError(f"{self.name}: {beit_tokens.unsupported_reason(model)}")
        try:
            with switch.dropping(self.ratio):
                yield images
        finally:
            self.last_keep_indices = switch.keep_indices
            self._last_geometry = _token_geometry(model, images)

    @property
    def last_mask(self) -> Tensor | None:
        """Pixel view of the dropped tokens, (B, H, W) with True = dropped; built on demand (visualisation)."""
        return _dropped_token_pixels(self.last_keep_indices, self._last_geometry)


# ------------------------------------------------------------------------------------------------- mask token
@register_sub_branch("mask_token")
class MaskTokenSubBranch(SubBranch):
    """The authors' Swin variant: masked regions replaced by a learned token right after patch embedding.

    A random ``round(G * ratio)`` of the G ``cell_size``-pixel regions (8 x 8 tokens at Swin's stride 4) are
    replaced. ``setup`` registers the token on the patch embedding itself (``model.patch_embed.masksub_mask_token``,
    shape (C,), so the usual 1-D rule keeps it out of weight decay and layer decay groups it with the stem) and a
    forward hook on ``patch_embed`` that does the replacement only while the sub-branch runs; ``teardown`` removes
    both.

    Regions follow the cell size rule of :class:`PixelMaskSubBranch` on the token grid: they tile it exactly,
    number at least 4, and are the largest side ``<= cell_size`` (and at least half of it) that does; Swin at 224
    px gets 32 px regions (7 x 7 of 8 x 8 tokens). A ValueError names the sizes that fit, at ``setup`` for a strict
    patch embedding, in :meth:`check_image_size` (the data's size, before training), otherwise at the first call.

    Args:
        ratio: fraction of regions replaced.
        cell_size: largest region side in pixels; must be a multiple of the patch embedding's stride.
    """

    token_name = "masksub_mask_token"

    def __init__(self, ratio: float = 0.5, cell_size: int = 32) -> None:
        super().__init__(ratio)
        _check_cell_size(cell_size)
        self.cell_size = cell_size
        self._active_mask: Tensor | None = None
        self._last_tokens: tuple[Tensor, int, tuple[int, int]] | None = None
        self._hooks: dict[int, RemovableHandle] = {}  # id(patch_embed) -> its replacement hook
        self._regions: dict[tuple[int, int, int], int] = {}  # (token rows, token cols, stride) -> side

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, cell_size={self.cell_size})"

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
        size = _fixed_image_size(model)
        if size is not None:
            self.region_for(size, model.patch_embed.patch_size[0])
        embed = model.patch_embed
        if not hasattr(embed, self.token_name):
            token = nn.Parameter(torch.zeros(embed.proj.out_channels))
            nn.init.trunc_normal_(token, std=0.02)
            embed.register_parameter(self.token_name, token)
        if id(embed) not in self._hooks:
            self._hooks[id(embed)] = embed.register_forward_hook(self._replace_masked_tokens)

    def teardown(self, model: nn.Module) -> None:
        embed = getattr(model, "patch_embed", None)
        if embed is None:
            return
        handle = self._hooks.pop(id(embed), None)
        if handle is not None:
            handle.remove()
        if self.token_name in embed._parameters:
            delattr(embed, self.token_name)

    def check_image_size(self, image_size: int | tuple[int, int], model: nn.Module | None = None) -> None:
        embed = getattr(model, "patch_embed", None)
        if embed is not None:  # the regions are counted in tokens: the stride is the model's
            self.region_for(_hw(image_size), embed.patch_size[0])

    def region_for(self, image_hw: tuple[int, int], stride: int) -> int:
        """Region side in tokens on ``image_hw`` images at patch ``stride``; ValueError when none fits."""
        key = (int(image_hw[0]) // stride, int(image_hw[1]) // stride, stride)
        if key not in self._regions:
            self._regions[key] = tiling_side(self, image_hw, stride)
        return self._regions[key]

    def _replace_masked_tokens(self, module: nn.Module, args: Any, tokens: Tensor) -> Tensor | None:
        if self._active_mask is None:
            return None  # main branch, eval: untouched
        return masking.replace_with_token(tokens, self._active_mask, getattr(module, self.token_name))

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        if id(model.patch_embed) not in self._hooks:
            raise RuntimeError(f"{type(self).__name__} is not set up on this model: call setup(model) first")
        stride = model.patch_embed.patch_size[0]
        side = self.region_for(images.shape[-2:], stride)
        token_hw = (images.shape[-2] // stride, images.shape[-1] // stride)
        cells = masking.random_grid_mask(
            images.shape[0], (token_hw[0] // side, token_hw[1] // side), self.ratio, images.device
        )
        self._active_mask = masking.upsample_grid_mask(cells, side, token_hw)  # (B, h, w) tokens
        try:
            yield images
        finally:
            self._last_tokens = (self._active_mask, stride, tuple(images.shape[-2:]))
            self._active_mask = None

    @property
    def last_mask(self) -> Tensor | None:
        """Pixel view of the replaced tokens, (B, H, W) with True = replaced; built on demand."""
        if self._last_tokens is None:
            return None
        token_mask, stride, image_hw = self._last_tokens
        return masking.upsample_grid_mask(token_mask, stride, image_hw)


# ------------------------------------------------------------------------------------------ dropout / droppath
def block_dropouts(model: nn.Module) -> list[nn.Dropout]:
    """Dropout layers inside the network's blocks: not direct children of the model, not in the head."""
    heads = tuple({name.split(".")[0] for name in network.classifier_names(model)})
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and "." in name and not name.startswith(heads):
            found.append(module)
    return found


@register_sub_branch("dropout")
class DropoutSubBranch(SubBranch):
    """Every dropout layer inside the blocks (attention and MLP dropouts in a ViT) set to ``ratio``."""

    def unsupported_reason(self, model: nn.Module) -> str | None:
        if not block_dropouts(model):
            return "it has no dropout layers inside its blocks"
        return None

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        with _attribute_set(block_dropouts(model), "p", self.ratio):
            yield images


class SwitchableDropPath(DropPath):
    """``DropPath(0.0)`` installed where timm built an ``nn.Identity`` / ``None``; remembers what it replaced."""

    def __init__(self, replaced: nn.Module | None, registered: bool) -> None:
        super().__init__(0.0)
        # Plain attributes, not submodules: put back by DropPathSubBranch.teardown.
        object.__setattr__(self, "replaced", replaced)
        object.__setattr__(self, "replaced_registered", registered)


@register_sub_branch("droppath")
class DropPathSubBranch(SubBranch):
    """Every block's drop-path (stochastic depth) set to ``ratio`` for the sub-branch only.

    timm builds ``nn.Identity`` (or ``None``) where a block's rate is 0; ``setup`` swaps those for a
    :class:`SwitchableDropPath` (a ``DropPath(0.0)``: same output, no parameters, state dict unchanged) so every
    block can be switched, and ``teardown`` swaps back exactly the slots it replaced.
    """

    def unsupported_reason(self, model: nn.Module) -> str | None:
        if next(network.drop_path_slots(model), None) is None:
            return "it has no drop-path slots (drop_path* attributes) in its blocks"
        return None

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        for owner, attr, value in list(network.drop_path_slots(model)):
            if not isinstance(value, DropPath):
                registered = attr in owner._modules
                setattr(owner, attr, SwitchableDropPath(value, registered))

    def teardown(self, model: nn.Module) -> None:
        installed = [
            (owner, attr, child)
            for owner in model.modules()
            for attr, child in owner._modules.items()
            if isinstance(child, SwitchableDropPath)
        ]
        for owner, attr, child in installed:
            _restore_slot(owner, attr, child.replaced, child.replaced_registered)

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, images: Tensor) -> Iterator[Tensor]:
        layers = [m for m in model.modules() if isinstance(m, DropPath)]
        with _attribute_set(layers, "drop_prob", self.ratio):
            yield images


def tiling_side(branch: SubBranch, image_hw: tuple[int, int], stride: int) -> int:
    """The side (in grid units) of the square cells a masking kind uses on ``image_hw`` images, one rule for all.

    The grid is the image's pixels (``stride`` 1: pixel masks) or its tokens at patch ``stride`` (mask-token
    regions); the side is the largest one up to ``branch.cell_size`` (in pixels) that tiles the grid exactly into
    at least 4 cells and is at least half of it (:func:`masking.tiling_cell_size`).

    Raises:
        ValueError: none fits; the message lists the cell sizes (in pixels) that would.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    grid = (h // stride, w // stride)
    side = masking.tiling_cell_size(grid, branch.cell_size // stride)
    if side is not None:
        return side
    fits = [stride * c for c in masking.tiling_cell_sizes(grid) if c > 1]
    tokens = f" ({grid[0]}x{grid[1]} tokens at stride {stride})" if stride > 1 else ""
    raise ValueError(
        f"{branch.name}: cell_size={branch.cell_size} cannot mask {h}x{w} images{tokens} at ratio {branch.ratio}: "
        f"cells must tile the {'token grid' if tokens else 'image'} exactly, number at least 4 and be at least half "
        f"of cell_size ({(branch.cell_size + 1) // 2} px). Cell sizes that tile {h}x{w} into >= 4 cells: "
        f"{fits or 'none'}; set sub_branch_kwargs.cell_size to one of them or resize the images"
    )
