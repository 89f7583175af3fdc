"""Loading microsoft/unilm BEiT v2 pre-training checkpoints (``beitv2_base_patch16_224_pt1k.pth`` layout).

The synthetic files are built from a tiny timm BEiT in the pre-training layout (one shared relative position table,
no table per block, a final norm) plus the masked-image-modelling parts unilm saves with it (``mask_token``,
``lm_head``, ``cls_pt_layers``) and the index buffers it stores, wrapped in ``model`` (unilm's torch checkpoints)
or ``module`` (DeepSpeed).
"""

from __future__ import annotations

import pytest
import timm
import torch

from masksub_lightning.models.weights import detect_source, load_pretrained

TINY_BEIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def fine_tune_model():
    """BEiT v2 as the fine-tuning builds it: a table per block, mean pooling + fc_norm, a 4-class head."""
    return timm.create_model("beitv2_base_patch16_224", num_classes=4, **TINY_BEIT)


def pretraining_state() -> dict[str, torch.Tensor]:
    encoder = timm.create_model(
        "beitv2_base_patch16_224",
        num_classes=0,
        global_pool="",  # the pre-training keeps its final norm
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        **TINY_BEIT,
    )
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) for k, v in encoder.state_dict().items()}
    assert "rel_pos_bias.relative_position_bias_table" in state and "norm.weight" in state
    tokens = (32 // 8) ** 2 + 1
    state.update(
        {
            "rel_pos_bias.relative_position_index": torch.zeros(tokens, tokens, dtype=torch.long),
            "mask_token": torch.zeros(1, 1, 32),
            "lm_head.weight": torch.randn(64, 32, generator=g),
            "lm_head.bias": torch.zeros(64),
            "cls_pt_layers.0.attn.qkv.weight": torch.randn(96, 32, generator=g),
            "cls_pt_layers.0.gamma_1": torch.ones(32),
        }
    )
    return state


@pytest.mark.parametrize("wrapper", ["model", "module"])
def test_the_shared_table_goes_into_every_block_and_pretraining_parts_are_dropped(tmp_path, wrapper):
    state = pretraining_state()
    path = tmp_path / "beitv2_pt.pth"
    torch.save({wrapper: state}, path)
    model = fine_tune_model()
    fresh_fc_norm = model.fc_norm.weight.clone()
    report = load_pretrained(model, path)

    assert report.source == "beit" and detect_source(state) == "beit"
    shared = state["rel_pos_bias.relative_position_bias_table"]
    for i, block in enumerate(model.blocks):
        assert torch.equal(block.attn.relative_position_bias_table, shared), i
        assert block.attn.relative_position_bias_table.data_ptr() != shared.data_ptr()  # a copy per block
        assert torch.equal(
            block.gamma_1, state[f"blocks.{i}.gamma_1"]
        )  # BEiT's LayerScale names, not renamed
        assert torch.equal(block.attn.qkv.weight, state[f"blocks.{i}.attn.qkv.weight"])
    assert torch.equal(model.cls_token, state["cls_token"])
    assert torch.equal(model.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert not report.renamed_keys
    dropped = report.dropped_keys
    assert dropped["rel_pos_bias.relative_position_bias_table"].startswith(
        "shared table copied into the 2 blocks"
    )
    assert dropped["rel_pos_bias.relative_position_index"] == "index buffer, rebuilt by the model"
    for key in ("mask_token", "lm_head.weight", "lm_head.bias", "cls_pt_layers.0.attn.qkv.weight"):
        assert dropped[key] == "BEiT pre-training only (masked image modelling)", key
    # Mean pooling: the encoder's final norm is not copied into the fresh fc_norm (unilm: norm = Identity).
    assert dropped["norm.weight"].startswith("the model pools before its norm")
    assert torch.equal(model.fc_norm.weight, fresh_fc_norm)
    assert report.missing_encoder_keys == [] and report.unexpected_keys == []
    assert set(report.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert "copied the shared rel_pos_bias.relative_position_bias_table [52, 2] into each of 2 blocks" in str(
        report
    )


def test_a_model_with_a_shared_table_keeps_it_shared(tmp_path):
    state = pretraining_state()
    path = tmp_path / "beitv2_pt.pth"
    torch.save({"model": state}, path)
    model = timm.create_model(
        "beitv2_base_patch16_224",
        num_classes=4,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        **TINY_BEIT,
    )
    report = load_pretrained(model, path)
    assert torch.equal(
        model.rel_pos_bias.relative_position_bias_table, state["rel_pos_bias.relative_position_bias_table"]
    )
    assert "rel_pos_bias.relative_position_bias_table" not in report.dropped_keys
    assert report.missing_encoder_keys == [] and report.unexpected_keys == []


def test_a_timm_beit_classifier_is_read_as_beit_not_deit3(tmp_path):
    source = fine_tune_model()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    path = tmp_path / "beit_ft.pth"
    torch.save(source.state_dict(), path)
    model = fine_tune_model()
    report = load_pretrained(model, path)
    assert report.source == "beit" and not report.renamed_keys  # gamma_1 stays gamma_1
    assert report.missing_encoder_keys == [] and report.unexpected_keys == []
    for key, value in source.state_dict().items():
        if not key.startswith("fc_norm"):  # the model pools before its norm: fc_norm stays fresh, as for MAE
            assert torch.equal(model.state_dict()[key], value), key
