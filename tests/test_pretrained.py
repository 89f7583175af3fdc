"""Tests for masksub_lightning.models.weights: checkpoints written in the real formats, loaded into tiny timm ViTs."""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

from masksub_lightning.models.weights import SUPPORTED_SUFFIXES, LoadReport, detect_source, load_pretrained

DIM = 48


def tiny_vit(name: str = "vit_tiny_patch16_224", **kwargs) -> nn.Module:
    args = dict(img_size=32, patch_size=8, depth=2, embed_dim=DIM, num_heads=2, num_classes=10)
    return timm.create_model(name, **{**args, **kwargs})


def randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every tensor distinct random values (LayerNorm weights / LayerScale gammas are not 1 / 1e-6 any more)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g))
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mae_decoder(dim: int = 32, num_patches: int = 16) -> dict[str, torch.Tensor]:
    """The decoder half of an MAE pre-training checkpoint (facebookresearch/mae key names)."""
    return {
        "mask_token": torch.randn(1, 1, dim),
        "decoder_embed.weight": torch.randn(dim, DIM),
        "decoder_embed.bias": torch.randn(dim),
        "decoder_pos_embed": torch.randn(1, num_patches + 1, dim),
        "decoder_blocks.0.norm1.weight": torch.randn(dim),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(3 * dim, dim),
        "decoder_norm.weight": torch.randn(dim),
        "decoder_norm.bias": torch.randn(dim),
        "decoder_pred.weight": torch.randn(8 * 8 * 3, dim),
        "decoder_pred.bias": torch.randn(8 * 8 * 3),
    }


# --------------------------------------------------------------------------------------------------------------------
# MAE


def test_mae_pretrain_checkpoint_loads_every_encoder_tensor(tmp_path):
    # MAE pre-training encoder: no classifier, final norm in `norm` (token pooling layout).
    encoder = randomize(tiny_vit(num_classes=0))
    encoder_sd = snapshot(encoder)
    assert "norm.weight" in encoder_sd and not any(k.startswith("head.") for k in encoder_sd)
    decoder = mae_decoder()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {**encoder_sd, **decoder}}, path)

    # MAE fine-tuning: other num_classes, global average pooling (norm -> Identity, fc_norm = LayerNorm).
    model = tiny_vit(num_classes=7, global_pool="avg", drop_path_rate=0.1)
    assert isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.LayerNorm)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}

    fresh = tiny_vit(num_classes=7, global_pool="avg").fc_norm.state_dict()
    report = load_pretrained(model, path, strict_encoder=True)

    after = model.state_dict()
    for key, value in encoder_sd.items():
        if not key.startswith("norm."):
            assert torch.equal(after[key], value), key
    # MAE fine-tuning builds fc_norm fresh (weight 1, bias 0); the encoder's final norm is not used.
    assert torch.equal(after["fc_norm.weight"], fresh["weight"]) and torch.equal(
        after["fc_norm.bias"], fresh["bias"]
    )
    assert torch.equal(after["fc_norm.weight"], torch.ones(DIM)) and not torch.equal(
        after["fc_norm.weight"], encoder_sd["norm.weight"]
    )
    assert torch.equal(model.head.weight, head_before["weight"])
    assert torch.equal(model.head.bias, head_before["bias"])
    assert model.head.weight.shape == (7, DIM)

    assert report.source == "mae"
    assert set(report.dropped_keys) == set(decoder) | {"norm.weight", "norm.bias"}
    assert all("MAE decoder" in report.dropped_keys[k] for k in decoder)
    assert all("fc_norm is built fresh" in report.dropped_keys[k] for k in ("norm.weight", "norm.bias"))
    assert report.renamed_keys == {}
    assert report.missing_keys == ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]
    assert report.kept_fresh == ["fc_norm.weight", "fc_norm.bias"]
    assert report.missing_encoder_keys == []
    assert report.head_replaced
    assert report.unexpected_keys == []
    assert len(report.loaded_keys) == len(after) - 4
    text = str(report)
    assert "MAE decoder" in text and "fc_norm is built fresh, as MAE fine-tuning does: norm.weight" in text
    assert (
        "kept at their fresh initialisation: fc_norm.weight, fc_norm.bias" in text and "head.weight" in text
    )


def test_mae_finetuned_checkpoint_with_fc_norm_and_head_loads_whole_model(tmp_path):
    src = randomize(tiny_vit(num_classes=7, global_pool="avg"))
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": snapshot(src)}, path)

    model = tiny_vit(num_classes=7, global_pool="avg")
    report = load_pretrained(model, path, source="mae")

    for key, value in src.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.dropped_keys == {}
    assert not report.head_replaced


# --------------------------------------------------------------------------------------------------------------------
# Resolution / patch size changes


def test_pos_embed_resized_to_new_grid_class_token_slot_kept(tmp_path):
    src = randomize(tiny_vit(img_size=32))  # grid 4x4
    src_pe = src.pos_embed.detach().clone()
    path = tmp_path / "vit_32.pth"
    torch.save(snapshot(src), path)

    model = tiny_vit(img_size=48)  # grid 6x6
    report = load_pretrained(model, path)

    assert model.pos_embed.shape == (1, 1 + 36, DIM)
    assert torch.equal(model.pos_embed[:, :1], src_pe[:, :1])
    expected = resample_abs_pos_embed(src_pe, new_size=[6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert report.resized_keys == {"pos_embed": ((1, 17, DIM), (1, 37, DIM))}
    assert torch.equal(model.cls_token, src.cls_token)
    assert report.missing_keys == []
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 10)


def test_deit3_checkpoint_gamma_mapped_and_finetuned_at_higher_resolution(tmp_path):
    # DeiT-III (facebookresearch/deit layout): LayerScale as gamma_1 / gamma_2, pos_embed without class slot,
    # pre-trained at a lower resolution (192 -> 224 in the recipe; 32 -> 48 here).
    src = randomize(tiny_vit("deit3_small_patch16_224", img_size=32))
    assert src.no_embed_class and src.pos_embed.shape == (1, 16, DIM)
    src_sd = snapshot(src)
    deit_sd = {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v for k, v in src_sd.items()}
    assert "blocks.0.gamma_1" in deit_sd
    path = tmp_path / "deit_3_tiny_192.pth"
    torch.save({"model": deit_sd}, path)

    model = tiny_vit("deit3_small_patch16_224", img_size=48)
    report = load_pretrained(model, path, strict_encoder=True)

    after = model.state_dict()
    for i in range(2):
        for j in (1, 2):
            assert torch.equal(after[f"blocks.{i}.ls{j}.gamma"], src_sd[f"blocks.{i}.ls{j}.gamma"])
            assert report.renamed_keys[f"blocks.{i}.gamma_{j}"] == f"blocks.{i}.ls{j}.gamma"
    expected = resample_abs_pos_embed(src_sd["pos_embed"], new_size=[6, 6], num_prefix_tokens=0)
    assert after["pos_embed"].shape == (1, 36, DIM)
    torch.testing.assert_close(after["pos_embed"], expected)
    assert torch.equal(after["cls_token"], src_sd["cls_token"])
    assert torch.equal(after["head.weight"], src_sd["head.weight"])  # same num_classes: the head is kept
    assert report.source == "deit3"
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert report.resized_keys == {"pos_embed": ((1, 16, DIM), (1, 36, DIM))}


@pytest.mark.parametrize("direction", ["no_embed_class->class_slot", "class_slot->no_embed_class"])
def test_pos_embed_class_slot_layout_conversion_is_exact(tmp_path, direction):
    deit_kwargs = dict(no_embed_class=True, init_values=1e-2)
    vit_kwargs = dict(init_values=1e-2)
    src_kwargs, dst_kwargs = (
        (deit_kwargs, vit_kwargs) if direction.startswith("no") else (vit_kwargs, deit_kwargs)
    )
    src = randomize(tiny_vit(**src_kwargs)).eval()
    path = tmp_path / "src.pth"
    torch.save(snapshot(src), path)

    model = tiny_vit(**dst_kwargs).eval()
    report = load_pretrained(model, path, strict_encoder=True)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=1e-5, atol=1e-5)
    assert report.notes and "class-token slot" in " ".join(report.notes)


def test_patch_kernel_resampled_for_a_different_patch_size(tmp_path):
    src = randomize(tiny_vit(patch_size=8))
    src_kernel = src.patch_embed.proj.weight.detach().clone()
    path = tmp_path / "p8.pth"
    torch.save(snapshot(src), path)

    model = tiny_vit(patch_size=4)  # grid 8x8
    report = load_pretrained(model, path)

    assert model.patch_embed.proj.weight.shape == (DIM, 3, 4, 4)
    torch.testing.assert_close(
        model.patch_embed.proj.weight.detach(), resample_patch_embed(src_kernel, [4, 4])
    )
    assert report.resized_keys["patch_embed.proj.weight"] == ((DIM, 3, 8, 8), (DIM, 3, 4, 4))
    assert report.resized_keys["pos_embed"] == ((1, 17, DIM), (1, 65, DIM))


# --------------------------------------------------------------------------------------------------------------------
# CLIP


def test_clip_timm_layout_keeps_norm_pre_and_replaces_projection_head(tmp_path):
    src = randomize(tiny_vit("vit_base_patch16_clip_224", num_classes=16))  # head = image projection
    src_sd = snapshot(src)
    path = tmp_path / "clip.safetensors"
    save_file(src_sd, str(path))

    model = tiny_vit("vit_base_patch16_clip_224", num_classes=5)
    report = load_pretrained(model, path, strict_encoder=True)

    after = model.state_dict()
    assert torch.equal(after["norm_pre.weight"], src_sd["norm_pre.weight"])
    assert all(torch.equal(after[k], v) for k, v in src_sd.items() if not k.startswith("head."))
    assert report.source == "clip"
    assert set(report.dropped_keys) == {"head.weight", "head.bias"}
    assert "different num_classes" in report.dropped_keys["head.weight"]
    assert after["head.weight"].shape == (5, DIM)


def _to_openai_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a timm CLIP image tower in OpenAI CLIP names, the way the original checkpoints store it."""
    out = {}
    for k, v in sd.items():
        if k == "cls_token":
            out["visual.class_embedding"] = v[0, 0]
        elif k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
        elif k == "head.weight":
            out["visual.proj"] = v.t().contiguous()
        elif k == "head.bias":
            continue
        else:
            for timm_name, clip_name in [
                ("patch_embed.proj", "conv1"),
                ("norm_pre", "ln_pre"),
                ("blocks.", "transformer.resblocks."),
                ("norm1", "ln_1"),
                ("norm2", "ln_2"),
                ("attn.qkv.", "attn.in_proj_"),
                ("attn.proj", "attn.out_proj"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ]:
                k = k.replace(timm_name, clip_name)
            k = "ln_post" + k[len("norm") :] if k.startswith("norm.") else k
            out["visual." + k] = v
    out["token_embedding.weight"] = torch.randn(20, DIM)
    out["transformer.resblocks.0.ln_1.weight"] = torch.randn(DIM)
    out["logit_scale"] = torch.tensor(4.6)
    return out


def test_clip_openai_layout_converted_and_text_tower_dropped(tmp_path):
    src = randomize(tiny_vit("vit_base_patch16_clip_224", num_classes=16))
    src_sd = snapshot(src)
    path = tmp_path / "openai_clip.pt"
    torch.save(_to_openai_clip(src_sd), path)

    model = tiny_vit("vit_base_patch16_clip_224", num_classes=16)
    report = load_pretrained(model, path, strict_encoder=True)

    after = model.state_dict()
    for k, v in src_sd.items():
        expected = torch.zeros_like(v) if k == "head.bias" else v  # OpenAI's projection has no bias
        assert torch.equal(after[k], expected), k
    assert report.source == "clip"
    text_keys = {"token_embedding.weight", "transformer.resblocks.0.ln_1.weight", "logit_scale"}
    assert all("text tower" in report.dropped_keys[k] for k in text_keys)
    assert report.missing_keys == [] and report.unexpected_keys == []


def test_clip_recipe_openai_checkpoint_pools_tokens_through_a_fresh_norm(tmp_path):
    # FT-CLIP: fc_norm on the patch tokens, then the mean, with fc_norm built fresh. In timm: global_pool="avg",
    # fc_norm=False (norm applied per token before pooling) and exclude=["norm"] so CLIP's ln_post is not loaded.
    src = randomize(tiny_vit("vit_base_patch16_clip_224", num_classes=16))
    src_sd = snapshot(src)
    path = tmp_path / "openai_clip.pt"
    torch.save(_to_openai_clip(src_sd), path)
    kwargs = dict(num_classes=5, global_pool="avg", fc_norm=False)
    fresh = tiny_vit("vit_base_patch16_clip_224", **kwargs).norm.state_dict()

    model = tiny_vit("vit_base_patch16_clip_224", **kwargs)
    assert isinstance(model.norm, nn.LayerNorm) and isinstance(model.fc_norm, nn.Identity)
    report = load_pretrained(model, path, exclude=["norm"], strict_encoder=True)

    after = model.state_dict()
    for k, v in src_sd.items():
        if k.startswith("norm."):
            assert torch.equal(after[k], fresh[k[len("norm.") :]]), k
            assert not torch.equal(after[k], v), k
        elif not k.startswith("head."):
            assert torch.equal(after[k], v), k
    assert torch.equal(after["norm_pre.weight"], src_sd["norm_pre.weight"])  # "norm" does not match norm_pre
    assert report.dropped_keys["norm.weight"] == "excluded: kept at its fresh initialisation"
    assert report.dropped_keys["norm.bias"] == "excluded: kept at its fresh initialisation"
    assert "different num_classes" in report.dropped_keys["head.weight"]
    assert report.kept_fresh == ["norm.weight", "norm.bias"]
    assert report.missing_keys == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert report.missing_encoder_keys == [] and report.unexpected_keys == []
    assert "kept at their fresh initialisation: norm.weight, norm.bias" in str(report)
    # The forward pass is timm's: per-token fresh LayerNorm, then the mean over the patch tokens, then the head.
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        expected = model.head(tokens[:, model.num_prefix_tokens :].mean(dim=1))
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    ("exclude", "fresh_prefixes"),
    [
        (["norm"], ["norm."]),
        (["blocks.1", "cls_token"], ["blocks.1.", "cls_token"]),
        (["blocks.0.attn.qkv.weight"], ["blocks.0.attn.qkv.weight"]),
    ],
)
def test_exclude_leaves_exactly_the_named_tensors_fresh(tmp_path, exclude, fresh_prefixes):
    src = randomize(tiny_vit())
    path = tmp_path / "vit.safetensors"
    save_file(snapshot(src), str(path))
    torch.manual_seed(0)
    fresh = snapshot(tiny_vit())
    torch.manual_seed(0)
    model = tiny_vit()

    report = load_pretrained(model, path, exclude=exclude, strict_encoder=True)

    expected_fresh = [k for k in fresh if k.startswith(tuple(fresh_prefixes))]
    assert expected_fresh and report.kept_fresh == expected_fresh
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k] if k in expected_fresh else src.state_dict()[k]), k
    assert report.dropped_keys == dict.fromkeys(expected_fresh, "excluded: kept at its fresh initialisation")
    assert report.missing_keys == expected_fresh and report.missing_encoder_keys == []


@pytest.mark.parametrize(
    ("exclude", "message"),
    [
        ("norm", r"exclude must be a list of module names such as \['norm'\], got 'norm'"),
        (["nrom"], r"exclude names \['nrom'\] match no tensor of the model"),
        (["blocks.1"], r"exclude names \['blocks.1'\] match no tensor"),  # depth 1: blocks.1 does not exist
        (["norm_"], r"exclude names \['norm_'\]"),  # a name, not a string prefix
    ],
)
def test_exclude_rejects_names_of_nothing(tmp_path, exclude, message):
    path = tmp_path / "w.pth"
    torch.save(snapshot(tiny_vit(depth=1)), path)
    with pytest.raises(ValueError, match=message):
        load_pretrained(tiny_vit(depth=1), path, exclude=exclude)


def test_any_timm_checkpoint_non_vit_classifier_replaced(tmp_path):
    src = randomize(timm.create_model("test_resnet", num_classes=3))
    path = tmp_path / "resnet.bin"
    torch.save(snapshot(src), path)

    model = timm.create_model("test_resnet", num_classes=5)
    report = load_pretrained(model, path, strict_encoder=True)

    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in src.state_dict().items() if not k.startswith("fc."))
    assert report.head_keys == ["fc.weight", "fc.bias"]
    assert set(report.dropped_keys) == {"fc.weight", "fc.bias"}
    assert report.missing_keys == ["fc.weight", "fc.bias"] and report.unexpected_keys == []


# --------------------------------------------------------------------------------------------------------------------
# Containers and file formats


def test_safetensors_round_trip(tmp_path):
    src = randomize(tiny_vit())
    path = tmp_path / "vit.safetensors"
    save_file(snapshot(src), str(path))

    model = tiny_vit()
    report = load_pretrained(model, path)

    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert report.source == "timm"
    assert sorted(report.loaded_keys) == sorted(src.state_dict())
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.resized_keys == {}


class _TinyModule(L.LightningModule):
    """Stores its network as ``model``, like MaskSubModule, plus a tensor of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.register_buffer("class_weights", torch.ones(10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y, weight=self.class_weights)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_checkpoint_round_trip(tmp_path):
    module = _TinyModule(randomize(tiny_vit()))
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    trained = snapshot(module.model)

    model = tiny_vit()
    report = load_pretrained(model, path, strict_encoder=True)

    for k, v in trained.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert report.dropped_keys == {"class_weights": "outside the LightningModule's `model` attribute"}
    assert report.missing_keys == [] and report.unexpected_keys == []


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(
            lambda sd: {"model": sd, "args": argparse.Namespace(lr=1e-3, model="vit"), "epoch": 3}, id="args"
        ),
        pytest.param(  # DeiT-III fine-tunes from the raw weights, not the EMA kept next to them
            lambda sd: {"model": sd, "model_ema": {k: v + 1 for k, v in sd.items()}}, id="raw-not-ema"
        ),
        pytest.param(lambda sd: {"module": sd}, id="deepspeed"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="ddp"),
        pytest.param(lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, id="compile"),
        pytest.param(
            lambda sd: {"state_dict": {f"model._orig_mod.{k}": v for k, v in sd.items()}}, id="lit-compile"
        ),
    ],
)
def test_containers_and_prefixes_unwrapped(tmp_path, wrap):
    src = randomize(tiny_vit())
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(snapshot(src)), path)

    model = tiny_vit()
    report = load_pretrained(model, path, strict_encoder=True)

    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert report.missing_keys == [] and report.unexpected_keys == []


# --------------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_pretrained(tiny_vit(), path)


def test_unknown_suffix_names_it_and_the_allowed_ones(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"'\.npz'") as err:
        load_pretrained(tiny_vit(), path)
    assert all(s in str(err.value) for s in SUPPORTED_SUFFIXES)


def test_unknown_source_rejected(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(snapshot(tiny_vit()), path)
    with pytest.raises(ValueError, match="Unknown source 'dino'"):
        load_pretrained(tiny_vit(), path, source="dino")  # type: ignore[arg-type]


def test_checkpoint_of_another_architecture_is_rejected_with_keys_of_both_sides(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"model": snapshot(timm.create_model("test_resnet", num_classes=3))}, path)
    model = tiny_vit()
    before = snapshot(model)

    with pytest.raises(ValueError, match="wrong model name") as err:
        load_pretrained(model, path)

    message = str(err.value)
    assert "matches only 0 of the model's" in message
    assert "cls_token" in message  # a model key
    assert "conv1.0.weight" in message  # a checkpoint key
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing was loaded


def test_checkpoint_of_another_width_is_rejected_naming_shapes(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(snapshot(tiny_vit(embed_dim=64)), path)
    with pytest.raises(ValueError, match=r"does not match the model's \[48\]"):
        load_pretrained(tiny_vit(), path)


def test_strict_encoder_names_missing_tensors_and_default_warns(tmp_path, caplog):
    path = tmp_path / "depth2.pth"
    torch.save(snapshot(randomize(tiny_vit(depth=2))), path)

    with pytest.raises(
        RuntimeError, match=r"strict_encoder=True: 12 non-classifier.*blocks\.2\.norm1\.weight"
    ):
        load_pretrained(tiny_vit(depth=3), path, strict_encoder=True)

    with caplog.at_level(logging.WARNING, logger="masksub_lightning.models.weights"):
        report = load_pretrained(tiny_vit(depth=3), path)
    assert report.missing_encoder_keys == [
        k for k in tiny_vit(depth=3).state_dict() if k.startswith("blocks.2.")
    ]
    assert any("blocks.2." in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


class _WritesMarker:
    """A pickle that, when unpickled, writes a file: the harmless stand-in for running arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "code ran")


def test_pickle_that_runs_code_is_refused_naming_the_file_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "mae_pretrain_evil.pth"
    torch.save({"model": snapshot(tiny_vit()), "payload": _WritesMarker(marker)}, path)

    model = tiny_vit()
    before = snapshot(model)

    with pytest.raises(pickle.UnpicklingError) as err:
        load_pretrained(model, path)

    message = str(err.value)
    assert str(path) in message and "weights_only=True" in message
    assert "other than tensors and plain containers" in message
    assert not marker.exists()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # Control: the payload is live, an unrestricted unpickler does run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_unreadable_file_names_it(tmp_path):
    path = tmp_path / "truncated.pth"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=f"Could not read {re.escape(str(path))}"):
        load_pretrained(tiny_vit(), path)


# --------------------------------------------------------------------------------------------------------------------
# Helpers


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["cls_token", "blocks.0.attn.qkv.weight", "decoder_embed.weight", "mask_token"], "mae"),
        (["cls_token", "blocks.0.gamma_1", "blocks.0.gamma_2"], "deit3"),
        (["visual.class_embedding", "token_embedding.weight"], "clip"),
        (["cls_token", "norm_pre.weight", "head.weight"], "clip"),
        (["cls_token", "blocks.0.ls1.gamma", "fc_norm.weight"], "timm"),
    ],
)
def test_detect_source(keys, expected):
    assert detect_source(dict.fromkeys(keys, torch.zeros(1))) == expected


def test_report_str_is_readable():
    report = LoadReport(
        path="w.pth",
        source="mae",
        loaded_keys=["a"],
        missing_keys=["head.weight", "blocks.9.x"],
        dropped_keys={f"decoder_blocks.{i}.w": "MAE decoder (pre-training only)" for i in range(20)},
        head_keys=["head.weight"],
    )
    text = str(report)
    assert text.splitlines()[0] == "Loaded 1/3 model tensors from w.pth (source: mae)"
    assert "MAE decoder (pre-training only): decoder_blocks.0.w" in text and "and 12 more" in text
    assert "missing (1): blocks.9.x" in text
    assert "classifier kept from the model (freshly initialised): head.weight" in text
