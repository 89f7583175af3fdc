"""The MAE / LUT pre-training recipes (configs/pretrain/) and the LUT fine-tuning recipes (configs/lut/).

* every pre-training recipe parses through the `masksub` CLI, its header agrees with the resolved config, and it
  carries the LUT paper's settings (encoded below from docs/method.md "Pre-training: MAE and LUT");
* every pre-training recipe trains two steps on CPU through `masksub fit` (shrunken model, fake ImageNet) and
  exports its encoder, which the LUT and MAE fine-tuning recipes then load, with and without MaskSub.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from test_recipes import CPU_RUN, TINY_VIT, make_parser

from masksub_lightning.commands.cli import build_cli
from masksub_lightning.commands.errors import ConfigError
from masksub_lightning.commands.recipes import find_recipes

sys.path.insert(0, str(Path(__file__).parent / "data"))
from fake_data import write_imagenet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = {r.path: r for r in find_recipes(CONFIGS)}
PRETRAIN = sorted(p for p in RECIPES if p.startswith("pretrain/"))
LUT_FT = sorted(p for p in RECIPES if p.startswith("lut/"))

# The LUT paper (docs/method.md "Pre-training: MAE and LUT"): ImageNet-1k top-1 after fine-tuning, by
# (method, size, pre-training epochs); 400 epochs only for ViT-B (lambda 0.25 ablation row and MAE baseline).
PAPER = {
    ("mae", "small", 1600): 81.4,
    ("mae", "base", 1600): 83.7,
    ("mae", "large", 1600): 85.6,
    ("lut", "small", 1600): 82.0,
    ("lut", "base", 1600): 84.2,
    ("lut", "large", 1600): 86.0,
    ("mae", "base", 400): 82.8,
    ("lut", "base", 400): 83.5,
}
TIMM = {"small": "vit_small_patch16_224", "base": "vit_base_patch16_224", "large": "vit_large_patch16_224"}
PRETRAIN_MODEL = dict(
    mask_ratio=0.75,
    norm_pix_loss=True,
    decoder_dim=512,
    decoder_depth=8,
    decoder_num_heads=16,
    optimizer="adamw",
    optimizer_kwargs={"betas": [0.9, 0.95]},
    lr=1.5e-4,
    lr_base_batch_size=256,
    weight_decay=0.05,
    scheduler="cosine",
    warmup_epochs=40,
    min_lr=0.0,
)
LUT_MODEL = dict(momentum=0.996, proj_hidden_dim=4096, mae_weight=1.0)
BC_WEIGHT = {"small": 1.0, "base": 0.25, "large": 0.25}  # ViT-L: the paper gives none; ViT-B's
# Fine-tuning (LUT paper): size -> epochs, base lr, layer decay; drop-path 0.1, batch 1024, 5 warmup epochs.
FINETUNE = {"small": (300, 5e-4, 0.75), "base": (100, 2.5e-4, 0.65), "large": (50, 1e-3, 0.65)}


def parse(stem: str) -> tuple[str, str, int]:
    method, _, size, epochs = Path(stem).stem.split("_")
    return method, size, int(epochs.removesuffix("ep"))


@pytest.fixture(scope="module")
def parser():
    return make_parser()


def resolved(parser, rel: str) -> dict:
    return parser.parse_args(["fit", "--config", str(CONFIGS / rel)]).fit.as_dict()


def test_the_recipe_set():
    assert len(PRETRAIN) == 12 and len(LUT_FT) == 6
    assert {parse(p) for p in PRETRAIN} == {
        (m, s, e) for m in ("mae", "lut") for s in TIMM for e in (1600, 400)
    }


@pytest.mark.parametrize("path", PRETRAIN)
def test_pretraining_recipe_matches_its_header_and_the_paper(parser, path):
    recipe, cfg = RECIPES[path], resolved(parser, path)
    method, size, epochs = parse(path)
    model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert cfg["model"]["class_path"] == f"masksub_lightning.{method.upper()}Module"
    assert cfg["data"]["class_path"] == "masksub_lightning.data.PretrainImageNetDataModule"
    assert data["views"] == method and data["img_size"] == model["model_kwargs"]["img_size"] == 224
    assert model["model"] == TIMM[size] and trainer["max_epochs"] == epochs == recipe.epochs
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] * model["grad_accumulation"] == 4096
    assert recipe.global_batch == 4096 and recipe.sub_branch == "none"
    assert trainer["logger"]["init_args"]["name"] == path.removesuffix(".yaml")
    assert trainer["precision"] == "bf16-mixed" and trainer["strategy"] == "ddp"
    assert cfg["checkpoint"]["monitor"] == "val_loss" and cfg["checkpoint"]["mode"] == "min"
    for key, value in PRETRAIN_MODEL.items():
        assert model[key] == value, key
    if method == "lut":
        for key, value in LUT_MODEL.items():
            assert model[key] == value, key
        assert model["bc_weight"] == BC_WEIGHT[size]
    twin = RECIPES[recipe.twin]
    assert twin.twin == path and parse(twin.path)[1:] == (size, epochs) and parse(twin.path)[0] != method
    paper = PAPER.get((method, size, epochs))
    if paper is None:
        assert recipe.top1 is None and "not in docs/method.md" in recipe.paper
    else:
        assert recipe.top1 == {"masksub": None, "baseline": paper} and recipe.target_top1 == paper


@pytest.mark.parametrize("path", LUT_FT)
def test_lut_finetune_recipes_follow_the_paper(parser, path):
    recipe, cfg = RECIPES[path], resolved(parser, path)
    size = Path(path).stem.split("_")[1]
    epochs, lr, layer_decay = FINETUNE[size]
    model = cfg["model"]["init_args"]
    assert (recipe.epochs, model["lr"], model["layer_decay"]) == (epochs, lr, layer_decay)
    assert model["model_kwargs"]["drop_path_rate"] == 0.1 and model["warmup_epochs"] == 5
    assert model["model_kwargs"]["global_pool"] == "avg" and recipe.global_batch == 1024
    assert recipe.top1 == {"masksub": None, "baseline": PAPER[("lut", size, 1600)]}
    assert recipe.pretrained_from == f"pretrain/lut_vit_{size}_1600ep.yaml"
    assert (
        model["pretrained_weights"]
        == f"runs/pretrain/lut_vit_{size}_1600ep/version_0/checkpoints/encoder.pth"
    )


# ----------------------------------------------------------------------------------------- two CPU steps each
@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet(root)
    return root


def run(args: list[str]):
    with mock.patch.object(sys, "argv", ["masksub"]):
        return build_cli(args)


def tiny_args(config: Path, root: Path, out: Path) -> list[str]:
    return [
        "fit",
        "--config",
        str(config),
        *CPU_RUN,
        f"--trainer.default_root_dir={out}",
        f"--data.init_args.root={root}",
        "--data.init_args.batch_size=4",
        "--data.init_args.img_size=32",
        *(f"--model.init_args.model_kwargs.{k}={json.dumps(v)}" for k, v in TINY_VIT.items()),
    ]


# The default suite runs one recipe per method; the other sizes and epoch counts (same code path) are slow-marked.
FAST = {"pretrain/lut_vit_small_1600ep.yaml", "pretrain/mae_vit_base_400ep.yaml", "lut/vit_small.yaml"}


def fast_or_slow(paths: list[str]) -> list:
    return [p if p in FAST else pytest.param(p, marks=pytest.mark.slow) for p in paths]


@pytest.mark.parametrize("path", fast_or_slow(PRETRAIN))
def test_pretraining_recipe_trains_two_steps_and_exports(imagenet, tmp_path, path, capsys):
    args = tiny_args(CONFIGS / path, imagenet, tmp_path)
    args += [
        "--model.init_args.grad_accumulation=1",
        "--model.init_args.decoder_dim=16",
        "--model.init_args.decoder_depth=1",
        "--model.init_args.decoder_num_heads=2",
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
    ]
    if path.startswith("pretrain/lut"):
        args.append("--model.init_args.proj_hidden_dim=32")
    cli = run(args)
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train_loss_step"]) and "val_loss" in metrics
    assert ("train_loss_bc_step" in metrics) == path.startswith("pretrain/lut")
    exported = torch.load(tmp_path / "ckpt" / "encoder.pth", weights_only=True)["model"]
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], cli.model.model.blocks[0].attn.qkv.weight.cpu())
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "finetune", ["lut/vit_small.yaml", "lut/vit_small_baseline.yaml", "mae/vit_base.yaml"]
)
def test_finetune_recipes_load_an_exported_lut_encoder(imagenet, tmp_path, finetune, capsys):
    out = tmp_path / "pre"
    pre = run(
        [
            *tiny_args(CONFIGS / "pretrain/lut_vit_small_1600ep.yaml", imagenet, out),
            "--model.init_args.grad_accumulation=1",
            "--model.init_args.proj_hidden_dim=32",
            "--model.init_args.decoder_dim=16",
            "--model.init_args.decoder_depth=1",
            "--model.init_args.decoder_num_heads=2",
            f"--checkpoint.dirpath={out / 'ckpt'}",
        ]
    )
    encoder = {k: v.detach().clone() for k, v in pre.model.model.state_dict().items()}
    capsys.readouterr()
    # One step at the first warmup learning rate (0): the weights stay those loaded.
    ft = run(
        [
            *tiny_args(CONFIGS / finetune, imagenet, tmp_path / "ft"),
            "--trainer.max_steps=1",
            "--trainer.limit_train_batches=1",
            f"--model.init_args.pretrained_weights={out / 'ckpt' / 'encoder.pth'}",
        ]
    )
    text = capsys.readouterr().out
    assert "loaded pretrained weights" in text and "missing (0)" in text and "unexpected (0)" in text
    net = ft.model.model.state_dict()
    for key in ("blocks.1.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed", "cls_token"):
        assert torch.allclose(net[key], encoder[key], atol=1e-7), key
    assert ft.model.hparams.sub_branch == ("none" if "baseline" in finetune else "mask")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--model.init_args.momentum=1.5", r"momentum must be a number in \[0.0, 1.0\], got 1.5"),
        ("--model.init_args.mask_ratio=0.3", "LUT's two views need disjoint visible sets"),
        ("--model.init_args.model=resnet18", "needs a timm VisionTransformer"),
        ("--data.init_args.view_sizes=[32, 16]", "both LUT views must be img_size=32"),
    ],
)
def test_a_bad_pretraining_config_is_one_line(imagenet, tmp_path, option, message):
    with pytest.raises(ConfigError, match=message) as err:
        run([*tiny_args(CONFIGS / "pretrain/lut_vit_small_1600ep.yaml", imagenet, tmp_path), option])
    assert "\n" not in str(err.value)
