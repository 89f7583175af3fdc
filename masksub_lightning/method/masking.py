"""Pure tensor helpers for the masked sub-branch.

Mask convention, used everywhere in this package: a boolean mask is ``True`` where the input is **masked**
(removed, zeroed or replaced) and ``False`` where it is kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def num_masked_cells(num_cells: int, ratio: float) -> int:
    """How many of ``num_cells`` grid cells a pixel / mask-token mask hides: ``ratio * num_cells`` rounded half up."""
    return math.floor(num_cells * ratio + 0.5)


def num_kept_tokens(num_tokens: int, ratio: float) -> int:
    """How many of ``num_tokens`` patch tokens token dropping keeps: ``int(L * (1 - ratio))``, at least one.

    This is the MAE / authors' rule and the one ``timm.layers.PatchDropout`` uses.
    """
    return max(1, int(num_tokens * (1.0 - ratio)))


def random_grid_mask(batch_size: int, grid_hw: tuple[int, int], ratio: float, device=None) -> Tensor:
    """Draw an independent random cell mask per sample.

    Exactly ``num_masked_cells(H * W, ratio)`` cells are masked in each sample, chosen uniformly at random.

    Returns:
        Bool tensor (B, H, W), True = masked.
    """
    gh, gw = grid_hw
    num_cells = gh * gw
    num_masked = num_masked_cells(num_cells, ratio)
    # A random permutation per sample: the cells ranked first num_masked are masked.
    ranks = torch.rand(batch_size, num_cells, device=device).argsort(dim=1).argsort(dim=1)
    return (ranks < num_masked).view(batch_size, gh, gw)


def upsample_grid_mask(mask: Tensor, cell_size: int, out_hw: tuple[int, int]) -> Tensor:
    """Expand a (B, gh, gw) cell mask to a (B, H, W) mask of ``cell_size``-sized cells, cropped to ``out_hw``."""
    b, gh, gw = mask.shape
    # expand + reshape: no data-dependent sizes, so no host synchronisation on GPUs and compile-friendly.
    full = (
        mask[:, :, None, :, None]
        .expand(b, gh, cell_size, gw, cell_size)
        .reshape(b, gh * cell_size, gw * cell_size)
    )
    return full[:, : out_hw[0], : out_hw[1]]


def tiling_cell_sizes(hw: tuple[int, int], min_cells: int = 4) -> list[int]:
    """Every cell side that tiles an (H, W) grid exactly into at least ``min_cells`` cells, largest first."""
    side = math.gcd(hw[0], hw[1])
    return [d for d in range(side, 0, -1) if side % d == 0 and (hw[0] // d) * (hw[1] // d) >= min_cells]


def tiling_cell_size(hw: tuple[int, int], cell_size: int, min_cells: int = 4) -> int | None:
    """The cell side a mask of ``cell_size`` cells uses on an (H, W) grid, or None when no side qualifies.

    The largest side ``d <= cell_size`` that tiles the grid exactly (``d`` divides H and W) into at least
    ``min_cells`` cells, and no smaller than half of ``cell_size``. Exact tiling makes every cell the same size, so
    the masked fraction of every sample is ``num_masked_cells(G, ratio) / G``; at least 4 cells keep that within
    1/8 of the ratio (a single cell would be masked entirely or not at all). Examples for ``cell_size`` 32:
    224 -> 32 (7 x 7 cells), 32 -> 16 (2 x 2), 40 -> 20, 380 -> 20, 227 -> None.
    """
    for side in tiling_cell_sizes(hw, min_cells):
        if side <= cell_size:
            return side if 2 * side >= cell_size else None
    return None


def grid_shape(hw: tuple[int, int], cell_size: int) -> tuple[int, int]:
    """Cells needed to cover an (H, W) image with ``cell_size`` cells; a partial last row / column is a cell too."""
    return math.ceil(hw[0] / cell_size), math.ceil(hw[1] / cell_size)


def mask_pixels(images: Tensor, mask: Tensor) -> Tensor:
    """Zero the masked pixels of (B, C, H, W) ``images`` given a (B, H, W) bool mask (True = masked)."""
    keep = (~mask).unsqueeze(1).to(images.dtype)  # (B, 1, H, W)
    return images * keep


def replace_with_token(tokens: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """Replace masked positions of NHWC ``tokens`` (B, H, W, C) by ``mask_token`` (C,); mask is (B, H, W)."""
    m = mask.unsqueeze(-1).to(tokens.dtype)  # (B, H, W, 1)
    return tokens * (1.0 - m) + mask_token.to(tokens.dtype) * m
