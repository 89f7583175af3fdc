"""The LUT paper's analyses of a ViT, for any timm ViT (pre-trained, fine-tuned, MAE / LUT / MaskSub):

* :func:`average_attention_distance`: per layer and head, the attention-weighted mean distance (pixels) between a
  query patch and the key patches, averaged over query patches and images, on the unmasked forward (class / register
  tokens dropped from rows and columns, rows renormalised). Low = local heads, high = global heads.
* :func:`feature_singular_values`: per layer, the singular values of the covariance of the patch-token features (a
  flatter spectrum = more of the feature space in use); :func:`effective_rank` summarises one spectrum.
* :func:`plot_attention_distance`, :func:`plot_singular_values`: the figures (matplotlib, an optional import).

Example::

    from masksub_lightning.models.vit_analysis import load_vit, average_attention_distance, plot_attention_distance
    net = load_vit("vit_base_patch16_224", "encoder.pth")          # e.g. a LUT / MAE export
    aad = average_attention_distance(net, images)                  # (layers, heads), pixels
    plot_attention_distance({"LUT": aad}, "aad.png")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

__all__ = [
    "attention_maps",
    "average_attention_distance",
    "effective_rank",
    "feature_singular_values",
    "load_vit",
    "plot_attention_distance",
    "plot_singular_values",
]


def load_vit(name: str, weights: str | Path | None = None, **model_kwargs: Any) -> nn.Module:
    """A timm ViT (no classifier) in eval mode, with ``weights`` loaded by ``masksub_lightning.models.weights``."""
    net = timm.create_model(name, num_classes=0, **model_kwargs)
    _check_vit(net)
    if weights is not None:
        from masksub_lightning.models.weights import load_pretrained

        load_pretrained(net, weights)
    return net.eval()


def _check_vit(net: nn.Module) -> None:
    blocks = getattr(net, "blocks", None)
    if blocks is None or not hasattr(net, "patch_embed") or not all(hasattr(b, "attn") for b in blocks):
        raise ValueError(
            f"{type(net).__name__} is not a timm ViT (needs patch_embed and blocks with attn); the analyses "
            "read per-token attention and features"
        )


@contextlib.contextmanager
def _unfused(net: nn.Module) -> Iterator[None]:
    """Turn timm's fused attention off (its softmax weights are never materialised), then back on."""
    saved = [(blk.attn, getattr(blk.attn, "fused_attn", None)) for blk in net.blocks]
    try:
        for attn, _ in saved:
            attn.fused_attn = False
        yield
    finally:
        for attn, flag in saved:
            if flag is not None:
                attn.fused_attn = flag


@torch.no_grad()
def attention_maps(net: nn.Module, images: Tensor) -> list[Tensor]:
    """Softmax attention of every block on the unmasked forward: a list of (B, heads, N, N), N with prefix tokens.

    Read at the input of each block's ``attn.attn_drop`` (timm applies it right after the softmax).
    """
    _check_vit(net)
    maps: list[Tensor] = []
    handles = [
        blk.attn.attn_drop.register_forward_hook(lambda mod, args, out: maps.append(args[0].float().cpu()))
        for blk in net.blocks
    ]
    was_training = net.training
    try:
        net.eval()
        with _unfused(net):
            net.forward_features(images)
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    if len(maps) != len(net.blocks):
        raise ValueError(
            f"captured {len(maps)} attention maps for {len(net.blocks)} blocks: unsupported attention"
        )
    return maps


def _patch_distances(grid_hw: tuple[int, int], patch_size: int) -> Tensor:
    """(L, L) Euclidean distances in pixels between patch centres of a row-major grid."""
    gh, gw = grid_hw
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).float() * patch_size
    return torch.cdist(centres, centres)


@torch.no_grad()
def average_attention_distance(net: nn.Module, images: Tensor) -> Tensor:
    """Average attention distance in pixels, (layers, heads).

    For each head: ``mean over images and query patches i of sum_j A[i, j] * patch_size * ||grid_i - grid_j||``,
    with the class / register rows and columns dropped and each row renormalised to sum to 1.
    """
    prefix = int(getattr(net, "num_prefix_tokens", 1))
    grid = tuple(int(g) for g in net.patch_embed.grid_size)
    patch = int(net.patch_embed.patch_size[0])
    dist = _patch_distances(grid, patch)  # (L, L)
    out = []
    for attn in attention_maps(net, images):
        a = attn[:, :, prefix:, prefix:]
        a = a / a.sum(dim=-1, keepdim=True)
        out.append((a * dist).sum(dim=-1).mean(dim=(0, 2)))  # (heads,)
    return torch.stack(out)


@torch.no_grad()
def feature_singular_values(net: nn.Module, images: Tensor, include_prefix: bool = False) -> Tensor:
    """Singular values (descending) of the feature covariance after each block, (layers, D).

    Features are the block's output tokens (patch tokens only unless ``include_prefix``) of all images, centred
    per channel; the covariance is ``X^T X / (n - 1)``.
    """
    _check_vit(net)
    prefix = 0 if include_prefix else int(getattr(net, "num_prefix_tokens", 1))
    feats: list[Tensor] = []
    handles = [
        blk.register_forward_hook(lambda m, a, out: feats.append(out.float().cpu())) for blk in net.blocks
    ]
    was_training = net.training
    try:
        net.eval()
        net.forward_features(images)
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    spectra = []
    for f in feats:
        x = f[:, prefix:].reshape(-1, f.shape[-1]).double()
        x = x - x.mean(dim=0, keepdim=True)
        cov = x.T @ x / max(x.shape[0] - 1, 1)
        spectra.append(torch.linalg.svdvals(cov).float())
    return torch.stack(spectra)


def effective_rank(singular_values: Tensor) -> Tensor:
    """exp(entropy) of the normalised spectrum (Roy & Vetterli), per row: D for a flat spectrum, 1 for rank one."""
    p = singular_values / singular_values.sum(dim=-1, keepdim=True)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    return entropy.exp()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the plots need matplotlib: pip install matplotlib") from err
    return plt


def plot_attention_distance(results: Mapping[str, Tensor], path: str | Path | None = None) -> Any:
    """One dot per head at (layer, distance) for each model in ``results`` (name -> (layers, heads)); a figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, aad) in enumerate(results.items()):
        layers, heads = aad.shape
        x = torch.arange(layers).repeat_interleave(heads).float() + 0.15 * (i - (len(results) - 1) / 2)
        ax.scatter(x.numpy(), aad.flatten().numpy(), s=12, alpha=0.7, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("average attention distance (pixels)")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_singular_values(results: Mapping[str, Tensor], path: str | Path | None = None, layers=None) -> Any:
    """Normalised singular-value spectra (log scale) of chosen layers (default: the last) per model; a figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, sv in results.items():
        for layer in layers if layers is not None else [sv.shape[0] - 1]:
            s = sv[layer] / sv[layer].max()
            ax.plot(s.clamp_min(1e-12).log10().numpy(), label=f"{name} layer {layer}")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("log10 normalised singular value")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
