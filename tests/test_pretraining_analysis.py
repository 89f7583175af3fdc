"""ViT analyses (masksub_lightning.models.vit_analysis) against brute-force computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from masksub_lightning.models.vit_analysis import (
    attention_maps,
    average_attention_distance,
    effective_rank,
    feature_singular_values,
    load_vit,
    plot_attention_distance,
    plot_singular_values,
)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def vit():
    return timm.create_model("vit_small_patch16_224", num_classes=0, **TINY).eval()


def test_attention_maps_are_the_softmax_of_q_k():
    net = vit()
    x = torch.randn(2, 3, 32, 32)
    maps = attention_maps(net, x)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)
    assert (
        net.blocks[0].attn.fused_attn
        == timm.create_model("vit_small_patch16_224", **TINY).blocks[0].attn.fused_attn
    )
    # Block 0 by hand: tokens -> norm1 -> qkv -> softmax(q k^T / sqrt(d)).
    tokens = net.norm_pre(net._pos_embed(net.patch_embed(x)))
    attn = net.blocks[0].attn
    qkv = attn.qkv(net.blocks[0].norm1(tokens)).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    expected = (qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(16)).softmax(-1)
    assert torch.allclose(maps[0], expected, atol=1e-5)


def test_average_attention_distance_by_brute_force():
    net = vit()
    x = torch.randn(3, 3, 32, 32)
    aad = average_attention_distance(net, x)
    maps = attention_maps(net, x)
    assert aad.shape == (2, 2)
    for layer in range(2):
        for head in range(2):
            total = 0.0
            for b in range(3):
                for i in range(16):
                    row = maps[layer][b, head, 1 + i, 1:]
                    row = row / row.sum()
                    yi, xi = divmod(i, 4)
                    for j in range(16):
                        yj, xj = divmod(j, 4)
                        total += row[j].item() * 8 * math.hypot(yi - yj, xi - xj)
            assert aad[layer, head].item() == pytest.approx(total / (3 * 16), rel=1e-4)


def test_uniform_attention_gives_the_mean_pairwise_patch_distance():
    net = vit()
    for blk in net.blocks:  # q = k = 0: every attention row is uniform
        torch.nn.init.zeros_(blk.attn.qkv.weight)
        torch.nn.init.zeros_(blk.attn.qkv.bias)
    pairs = [8 * math.hypot(a // 4 - b // 4, a % 4 - b % 4) for a in range(16) for b in range(16)]
    aad = average_attention_distance(net, torch.randn(2, 3, 32, 32))
    assert torch.allclose(aad, torch.full((2, 2), sum(pairs) / 256), atol=1e-4)


def test_feature_singular_values_match_numpy():
    net = vit()
    x = torch.randn(4, 3, 32, 32)
    sv = feature_singular_values(net, x)
    assert sv.shape == (2, 32) and (sv[:, :-1] >= sv[:, 1:] - 1e-6).all()
    feats = net.blocks[0](net.norm_pre(net._pos_embed(net.patch_embed(x))))[:, 1:].reshape(-1, 32).detach()
    cov = torch.from_numpy(np.cov(feats.double().numpy(), rowvar=False))
    assert torch.allclose(sv[0].double(), torch.linalg.svdvals(cov), rtol=1e-4, atol=1e-6)
    assert effective_rank(torch.ones(1, 8)).item() == pytest.approx(8.0)
    assert effective_rank(torch.tensor([[1.0, 0.0, 0.0]])).item() == pytest.approx(1.0)


def test_load_vit_and_plots(tmp_path):
    net = vit()
    torch.save({"model": net.state_dict()}, tmp_path / "enc.pth")
    loaded = load_vit("vit_small_patch16_224", tmp_path / "enc.pth", **TINY)
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight, net.blocks[1].mlp.fc2.weight) and not loaded.training
    with pytest.raises(ValueError, match="not a timm ViT"):
        load_vit("resnet18")
    pytest.importorskip("matplotlib")
    x = torch.randn(2, 3, 32, 32)
    plot_attention_distance({"a": average_attention_distance(net, x)}, tmp_path / "aad.png")
    plot_singular_values({"a": feature_singular_values(net, x)}, tmp_path / "sv.png")
    assert (tmp_path / "aad.png").stat().st_size > 0 and (tmp_path / "sv.png").stat().st_size > 0
