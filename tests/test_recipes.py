"""The training recipes under configs/ and the `masksub recipes` command.

* every recipe parses through the `masksub` CLI parser, and its `# recipe:` header agrees with the resolved config
  (epochs, sub-branch, global batch, twin, stages);
* the DeiT-III, MAE, RSB and Swin recipes carry the hyperparameters of docs/method.md, encoded below as tables, and
  every recipe's paper top-1 is the one of docs/method.md's results table;
* every recipe trains two optimizer steps on CPU through `masksub fit` with its own hyperparameters (optimizer, lr
  schedule, loss, mixup / cutmix, repeated aug, sub-branch kind, layer decay, EMA, pre-trained weights in the
  recipe's format) on a shrunken member of its model family, with fake data written in its dataset's real layout;
* `masksub recipes` lists every recipe with its target.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import timm
import torch
import yaml
from jsonargparse import capture_parser
from lightning.pytorch.callbacks import EMAWeightAveraging

from masksub_lightning.commands import main as cli_main
from masksub_lightning.commands.cli import build_cli
from masksub_lightning.commands.recipes import (
    Recipe,
    RecipeHeaderError,
    find_recipes,
    format_table,
    load_recipe,
    read_header,
)
from masksub_lightning.commands.recipes import main as recipes_main
from masksub_lightning.modules.cosub import _NOT_COSUB_OPTIONS

sys.path.insert(0, str(Path(__file__).parent / "data"))
from fake_data import (
    write_cifar10,
    write_cifar100,
    write_flowers102,
    write_imagenet,
    write_inat_json,
    write_stanford_cars,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = find_recipes(CONFIGS)
BY_PATH = {r.path: r for r in RECIPES}
SHARED_BLOCKS = sorted((CONFIGS / "_base").glob("*.yaml"))


def recipe_id(recipe: Recipe) -> str:
    return recipe.path.removesuffix(".yaml")


def is_pretraining(recipe: Recipe) -> bool:
    """MAE / LUT pre-training recipes (not MaskSubModule runs): checked in tests/test_pretraining_recipes.py."""
    return recipe.path.startswith("pretrain/")


def is_linear_probe(recipe: Recipe) -> bool:
    """Linear probes of a pre-trained encoder: no MaskSub arm; the twin probes the other pre-training's encoder."""
    return recipe.path.startswith("linprobe/")


# Classification recipes (MaskSubModule): the ones the tests below parse and train.
CLASSIFICATION = [r for r in RECIPES if not is_pretraining(r)]
# Folders whose paper numbers are the LUT paper's (tests/test_pretraining_recipes.py; linprobe/: LINPROBE below),
# not docs/method.md's table.
LUT_PAPER_FOLDERS = ("lut/", "pretrain/", "linprobe/")


# ------------------------------------------------------------------------------------------- docs/method.md tables
# "Headline results": (baseline, + MaskSub) ImageNet-1k top-1, by the recipe that produces the number.
HEADLINE = {
    "deit3/vit_small_400ep": (80.4, 81.1),
    "deit3/vit_base_400ep_ft224": (83.5, 84.1),
    "deit3/vit_large_400ep_ft224": (84.5, 85.2),
    "deit3/vit_huge_400ep_ft224": (85.1, 85.7),
    "deit3/vit_small_800ep": (81.4, 81.7),
    "deit3/vit_base_800ep_ft224": (83.8, 84.2),
    "deit3/vit_large_800ep_ft224": (84.9, 85.3),
    "deit3/vit_huge_800ep_ft224": (85.2, 85.7),
    "mae/vit_base": (83.6, 83.9),
    "mae/vit_large": (85.9, 86.1),
    "mae/vit_huge": (86.9, 87.2),
    "clip/vit_base16": (84.8, 85.2),
    "clip/vit_large14": (87.5, 87.8),
    "resnet_rsb/resnet50": (79.7, 80.0),
    "resnet_rsb/resnet101": (81.4, 82.1),
    "resnet_rsb/resnet152": (81.8, 82.8),
    "swin/swin_tiny": (81.3, 81.4),
    "swin/swin_small": (83.0, 83.4),
    "swin/swin_base": (83.5, 83.9),
    "beitv2/vit_base": (85.5, 85.6),
}

# CoSub, the peer method: docs/method.md's cost line (CoSub 800 ep 84.2 vs DeiT-III 800 ep 83.8), by recipe.
COSUB = {"deit3/vit_base_800ep_cosub": (83.8, 84.2)}
# The CoSub recipe's settings are those of this DeiT-III row (docs/recipes.md "CoSub"); deit's --cosub changes
# only the step.
COSUB_ROW = {"deit3/vit_base_800ep_cosub": ("vit_base", 800)}

# "DeiT-III from scratch": (model, epochs) -> timm model, input, lr, wd, drop-path, GPUs, per-GPU batch.
DEIT3 = {
    ("vit_small", 400): ("deit3_small_patch16_224", 224, 4e-3, 0.03, 0.0, 8, 256),
    ("vit_small", 800): ("deit3_small_patch16_224", 224, 4e-3, 0.05, 0.05, 8, 256),
    ("vit_base", 400): ("deit3_base_patch16_224", 192, 3e-3, 0.03, 0.1, 8, 256),
    ("vit_base", 800): ("deit3_base_patch16_224", 192, 3e-3, 0.05, 0.2, 8, 256),
    ("vit_large", 400): ("deit3_large_patch16_224", 192, 3e-3, 0.03, 0.4, 64, 32),
    ("vit_large", 800): ("deit3_large_patch16_224", 192, 3e-3, 0.05, 0.45, 64, 32),
    ("vit_huge", 400): ("deit3_huge_patch14_224", 160, 3e-3, 0.03, 0.5, 64, 32),
    ("vit_huge", 800): ("deit3_huge_patch14_224", 160, 3e-3, 0.05, 0.6, 64, 32),
}
DEIT3_MODEL = dict(
    optimizer="lamb",
    scheduler="cosine",
    warmup_epochs=5,
    loss="bce",
    bce_target_threshold=0.0,
    label_smoothing=0.0,
    lr_base_batch_size=None,
)
DEIT3_DATA = dict(
    auto_augment="3a",
    color_jitter=0.3,
    hflip=0.5,
    repeated_aug=3,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    label_smoothing=0.0,
    reprob=0.0,
    eval_crop_pct=1.0,
)
# "DeiT-III fine-tune at 224": drop-path by model; 20 ep, AdamW 1e-5, wd 0.1, smoothing 0.1, RandAugment, no RA, CE.
DEIT3_FT_DROP_PATH = {"vit_base": 0.2, "vit_large": 0.45, "vit_huge": 0.55}
DEIT3_FT_MODEL = dict(optimizer="adamw", lr=1e-5, weight_decay=0.1, loss="ce", lr_base_batch_size=None)
DEIT3_FT_DATA = dict(
    auto_augment="rand-m9-mstd0.5-inc1",
    label_smoothing=0.1,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    repeated_aug=1,
    img_size=224,
    eval_crop_pct=1.0,
)
# "MAE fine-tune": model -> timm model, epochs, global batch, base lr (x batch / 256), layer decay, drop-path.
MAE = {
    "vit_base": ("vit_base_patch16_224", 100, 1024, 5e-4, 0.65, 0.1),
    "vit_large": ("vit_large_patch16_224", 50, 1024, 1e-3, 0.75, 0.2),
    "vit_huge": ("vit_huge_patch14_224", 50, 1024, 1e-3, 0.75, 0.3),
}
MAE_MODEL = dict(
    optimizer="adamw",
    weight_decay=0.05,
    warmup_epochs=5,
    lr_base_batch_size=256,
    loss="ce",
    scheduler="cosine",
)
MAE_DATA = dict(reprob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, repeated_aug=1)
# Linear probing (docs/recipes.md; facebookresearch/mae main_linprobe.py and its FINETUNE guide): recipe -> the LUT
# paper's 400-epoch ViT-B linear-probe top-1 of that pre-training (docs/method.md).
LINPROBE = {"linprobe/mae_vit_base_400ep.yaml": 61.5, "linprobe/lut_vit_base_400ep.yaml": 67.9}
LINPROBE_MODEL = dict(
    model="vit_base_patch16_224",
    linear_probe=True,
    head_init_std=0.01,
    sub_branch="none",
    loss="ce",
    label_smoothing=0.0,
    optimizer="lars",
    lr=0.1,
    lr_base_batch_size=256,
    weight_decay=0.0,
    layer_decay=None,
    scheduler="cosine",
    warmup_epochs=10,
    warmup_lr=0.0,
    min_lr=0.0,
    optimizer_kwargs=None,  # timm's LARS defaults: momentum 0.9, trust coefficient 0.001
)
LINPROBE_DATA = dict(
    train_crop="rrc",
    scale=(0.08, 1.0),
    hflip=0.5,
    auto_augment=None,
    color_jitter=None,
    reprob=0.0,
    mixup_alpha=0.0,
    cutmix_alpha=0.0,
    label_smoothing=0.0,
    repeated_aug=1,
    img_size=224,
    eval_crop_pct=0.875,
    interpolation="bicubic",
)
# "ResNet RSB" and "Swin".
RSB_MODEL = dict(
    optimizer="lamb",
    lr=5e-3,
    weight_decay=0.02,
    scheduler="cosine",
    warmup_epochs=5,
    loss="bce",
    label_smoothing=0.0,
    lr_base_batch_size=None,
)
RSB_DATA = dict(
    repeated_aug=3,
    auto_augment="rand-m7-mstd0.5",
    mixup_alpha=0.1,
    cutmix_alpha=1.0,
    img_size=224,
    eval_crop_pct=0.95,
    label_smoothing=0.0,
)
SWIN_DROP_PATH = {"swin_tiny": 0.2, "swin_small": 0.3, "swin_base": 0.5}
SWIN_MODEL = dict(
    optimizer="adamw",
    lr=5e-4,
    lr_base_batch_size=512,
    weight_decay=0.05,
    warmup_epochs=20,
    grad_clip_norm=5.0,
    loss="ce",
    sub_branch="mask_token",
)
SWIN_DATA = dict(
    label_smoothing=0.1,
    auto_augment="rand-m9-mstd0.5-inc1",
    color_jitter=0.4,
    reprob=0.25,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_parser():
    """The `masksub` CLI's own parser (subcommands fit / validate / ...), captured before it parses anything."""
    with mock.patch.object(sys, "argv", ["masksub"]):  # LightningCLI warns when pytest's argv is set too
        return capture_parser(lambda: build_cli(args=["fit"]))


@pytest.fixture(scope="module")
def parser():
    return make_parser()


_RESOLVED: dict[str, dict[str, Any]] = {}


def resolve(parser, rel: str, *overrides: str) -> dict[str, Any]:
    """The fully resolved `fit` config of configs/<rel> (what `masksub fit --config ... --print_config` shows)."""
    key = "\n".join((rel, *overrides))
    if key not in _RESOLVED:
        cfg = parser.parse_args(["fit", "--config", str(CONFIGS / rel), *overrides])
        _RESOLVED[key] = cfg.fit.as_dict()
    return _RESOLVED[key]


def init(cfg: dict[str, Any], group: str) -> dict[str, Any]:
    return cfg[group]["init_args"]


def global_batch(cfg: dict[str, Any]) -> int:
    trainer = cfg["trainer"]
    accumulation = init(cfg, "model").get("grad_accumulation", 1)
    return init(cfg, "data")["batch_size"] * trainer["devices"] * trainer["num_nodes"] * accumulation


def assert_subset(actual: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    for key, value in expected.items():
        assert key in actual, f"{what}: {key} missing"
        if isinstance(value, float):
            assert actual[key] == pytest.approx(value, rel=1e-9), (
                f"{what}: {key}={actual[key]!r}, docs/method.md: {value}"
            )
        else:
            assert actual[key] == value, f"{what}: {key}={actual[key]!r}, docs/method.md: {value!r}"


# ----------------------------------------------------------------------------------------- layout and headers
def test_every_config_is_a_recipe_or_a_shared_block():
    assert len(RECIPES) >= 60 and SHARED_BLOCKS
    for path in sorted(CONFIGS.rglob("*.yaml")):
        rel = path.relative_to(CONFIGS)
        if rel.parts[0] == "_base":
            assert read_header(path) is None, f"{rel}: shared blocks carry no recipe header"
            assert path.read_text().startswith("# Shared block, not a recipe"), rel
        elif rel.name.startswith("quickstart"):
            assert read_header(path) is None
        else:
            assert rel.as_posix() in BY_PATH, f"{rel} has no '# recipe:' header"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_an_included_block_comes_first(path):
    # `config: <file>` loads that file and then applies the keys after it; keys before it would be overwritten.
    keys = list(yaml.safe_load(path.read_text()))
    if "config" in keys:
        assert keys[0] == "config", f"{path.relative_to(CONFIGS)}: `config:` must be the first key"
        assert (path.parent / yaml.safe_load(path.read_text())["config"]).is_file()


def test_composition_overrides_single_keys_and_keeps_the_rest(parser, tmp_path):
    """What the recipes rely on: `config: <relative path>` then dotted keys change single values, deep in dicts too."""
    (tmp_path / "blocks").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "blocks" / "base.yaml").write_text(
        "trainer:\n  max_epochs: 400\n  devices: 8\n"
        "model:\n  class_path: masksub_lightning.MaskSubModule\n  init_args:\n"
        "    model_kwargs: {init_values: 1.0e-4, drop_path_rate: 0.0}\n    optimizer: lamb\n    lr: 4.0e-3\n"
        "data:\n  class_path: masksub_lightning.data.ImageNetDataModule\n  init_args:\n"
        "    root: data/imagenet\n    auto_augment: 3a\n    repeated_aug: 3\n"
    )
    (tmp_path / "runs" / "leaf.yaml").write_text(
        "config: ../blocks/base.yaml\ntrainer.max_epochs: 800\nmodel.init_args.model_kwargs.drop_path_rate: 0.2\n"
        "model.init_args.lr: 3.0e-3\n"
    )
    (tmp_path / "runs" / "twin.yaml").write_text("config: leaf.yaml\nmodel.init_args.sub_branch: none\n")
    cfg = parser.parse_args(["fit", "--config", str(tmp_path / "runs" / "twin.yaml")]).fit.as_dict()
    assert cfg["trainer"]["max_epochs"] == 800 and cfg["trainer"]["devices"] == 8
    model = init(cfg, "model")
    assert model["model_kwargs"] == {"init_values": 1e-4, "drop_path_rate": 0.2}
    assert (model["optimizer"], model["lr"], model["sub_branch"]) == ("lamb", 3e-3, "none")
    assert (init(cfg, "data")["auto_augment"], init(cfg, "data")["repeated_aug"]) == ("3a", 3)
    # A misspelt key is an error, not a silently ignored value (raised: `masksub` prints it as one line).
    (tmp_path / "runs" / "typo.yaml").write_text("config: leaf.yaml\ntrainer.max_epoch: 3\n")
    with pytest.raises(argparse.ArgumentError, match=r"does not accept option 'trainer\.max_epoch'"):
        parser.parse_args(["fit", "--config", str(tmp_path / "runs" / "typo.yaml")])


@pytest.mark.parametrize("recipe", CLASSIFICATION, ids=recipe_id)
def test_recipe_parses_and_matches_its_header(parser, recipe):
    cfg = resolve(parser, recipe.path)
    model, data, trainer = init(cfg, "model"), init(cfg, "data"), cfg["trainer"]
    module = "CoSubModule" if recipe.arm == "cosub" else "MaskSubModule"
    assert cfg["model"]["class_path"] == f"masksub_lightning.{module}"
    assert cfg["data"]["class_path"].startswith("masksub_lightning.data.")
    assert trainer["max_epochs"] == recipe.epochs
    if recipe.arm == "cosub":  # CoSubModule has no sub-branch options: its submodels come from drop path
        assert not {"sub_branch", "sub_ratio"} & set(model)
        assert model["model_kwargs"]["drop_path_rate"] > 0
    else:
        assert model["sub_branch"] == recipe.sub_branch
        assert model["sub_ratio"] == 0.5
    assert global_batch(cfg) == recipe.global_batch, (
        "batch_size x devices x num_nodes != the recipe's global batch"
    )
    assert trainer["accelerator"] == "gpu" and trainer["strategy"] == "ddp"
    assert timm.is_model(model["model"]), model["model"]
    if "img_size" in model["model_kwargs"]:
        assert model["model_kwargs"]["img_size"] == data["img_size"]
    assert trainer["logger"]["init_args"]["name"] == recipe_id(recipe), (
        "each recipe logs under runs/<its path>"
    )

    twin = BY_PATH[recipe.twin]
    if recipe.arm == "cosub":  # the baseline's own twin is the MaskSub run of the same row
        assert twin.arm == "baseline" and BY_PATH[twin.twin].arm == "masksub"
    elif is_linear_probe(recipe):  # both arms without a sub-branch: the twin probes another pre-training
        assert twin.twin == recipe.path
        assert is_linear_probe(twin) and twin.arm == recipe.arm == "baseline"
        assert twin.pretrained_from != recipe.pretrained_from
    else:
        assert twin.twin == recipe.path and {twin.arm, recipe.arm} == {"masksub", "baseline"}
    compared = ("model", "epochs", "global_batch") + (
        () if is_linear_probe(recipe) or recipe.arm == "cosub" else ("top1",)
    )
    for field in compared:
        assert getattr(twin, field) == getattr(recipe, field), field
    if recipe.result_after:  # stage 1 of a two-stage row: the later stage holds the number
        later = BY_PATH[recipe.result_after]
        assert recipe.top1 is None and later.pretrained_from == recipe.path and later.arm == recipe.arm
    if recipe.pretrained_from:  # the placeholder checkpoint path points at that recipe's run
        source = BY_PATH[recipe.pretrained_from]
        assert source.arm == recipe.arm or is_pretraining(source)  # one pre-trained encoder serves both arms
        assert model["pretrained_weights"].startswith(f"runs/{recipe_id(source)}/version_0/checkpoints/")


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.arm == "masksub"], ids=recipe_id)
def test_twins_differ_only_in_the_sub_branch(parser, recipe):
    masksub, baseline = resolve(parser, recipe.path), resolve(parser, recipe.twin)

    def strip(cfg):
        cfg = json.loads(json.dumps(cfg, default=str))
        cfg.pop("config", None)
        model = init(cfg, "model")
        for key in ("sub_branch", "pretrained_weights"):
            model.pop(key)
        cfg["trainer"]["logger"]["init_args"].pop("name")
        return cfg

    assert init(baseline, "model")["sub_branch"] == "none" and init(masksub, "model")["sub_branch"] != "none"
    assert strip(masksub) == strip(baseline)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.arm == "cosub"], ids=recipe_id)
def test_a_cosub_recipe_differs_from_its_baseline_only_in_the_module(parser, recipe):
    cosub, baseline = resolve(parser, recipe.path), resolve(parser, recipe.twin)

    def strip(cfg, *keys):
        cfg = json.loads(json.dumps(cfg, default=str))
        cfg.pop("config", None)
        cfg["model"].pop("class_path")
        for key in keys:
            init(cfg, "model").pop(key)
        cfg["trainer"]["logger"]["init_args"].pop("name")
        return cfg

    assert cosub["model"]["class_path"] == "masksub_lightning.CoSubModule"
    assert baseline["model"]["class_path"] == "masksub_lightning.MaskSubModule"
    assert strip(cosub) == strip(baseline, *_NOT_COSUB_OPTIONS)


def test_paper_numbers_are_those_of_method_md():
    with_numbers = {
        recipe_id(r).removesuffix("_baseline")
        for r in RECIPES
        if r.top1 is not None and not r.path.startswith(LUT_PAPER_FOLDERS) and r.arm != "cosub"
    }
    assert with_numbers == set(HEADLINE)
    assert {recipe_id(r) for r in RECIPES if r.arm == "cosub"} == set(COSUB)
    for rid, (baseline, cosub) in COSUB.items():
        assert BY_PATH[f"{rid}.yaml"].top1 == {"cosub": cosub, "baseline": baseline}
        assert BY_PATH[f"{rid}.yaml"].target_top1 == cosub
    for rid, (baseline, masksub) in HEADLINE.items():
        for path in (f"{rid}.yaml", f"{rid}_baseline.yaml"):
            assert BY_PATH[path].top1 == {"masksub": masksub, "baseline": baseline}, path
        assert BY_PATH[f"{rid}.yaml"].target_top1 == masksub
        assert BY_PATH[f"{rid}_baseline.yaml"].target_top1 == baseline
    # Rows whose numbers docs/method.md does not record say so instead of inventing them.
    for recipe in RECIPES:
        if recipe.top1 is None:
            assert recipe.result_after or "not in docs/method.md" in recipe.paper, recipe.path


# ------------------------------------------------------------------------------------- hyperparameters vs docs/method.md
@pytest.mark.parametrize("row", sorted(DEIT3), ids=lambda row: f"{row[0]}_{row[1]}ep")
def test_deit3_recipes_follow_method_md(parser, row):
    timm_name, size, lr, wd, drop_path, gpus, per_gpu = DEIT3[row]
    key, epochs = row
    for path in (f"deit3/{key}_{epochs}ep.yaml", f"deit3/{key}_{epochs}ep_baseline.yaml"):
        cfg = resolve(parser, path)
        model, data, trainer = init(cfg, "model"), init(cfg, "data"), cfg["trainer"]
        assert_subset(model, {**DEIT3_MODEL, "model": timm_name, "lr": lr, "weight_decay": wd}, path)
        assert_subset(
            model["model_kwargs"], {"img_size": size, "drop_path_rate": drop_path, "init_values": 1e-4}, path
        )
        assert model["model_kwargs"].get("drop_rate", 0.0) == 0.0
        assert_subset(data, {**DEIT3_DATA, "img_size": size, "batch_size": per_gpu}, path)
        assert trainer["max_epochs"] == epochs and trainer["devices"] * trainer["num_nodes"] == gpus
        assert global_batch(cfg) == 2048
        assert not trainer.get("callbacks"), "the DeiT-III number is the raw model's: no EMA callback"

        if key == "vit_small":
            continue
        ft_path = path.replace("ep", "ep_ft224", 1)
        ft = resolve(parser, ft_path)
        ft_model, ft_data = init(ft, "model"), init(ft, "data")
        assert_subset(ft_model, {**DEIT3_FT_MODEL, "model": timm_name}, ft_path)
        assert ft_model["model_kwargs"]["drop_path_rate"] == DEIT3_FT_DROP_PATH[key]
        assert ft_model["model_kwargs"]["img_size"] == 224
        assert_subset(ft_data, DEIT3_FT_DATA, ft_path)
        assert ft["trainer"]["max_epochs"] == 20 and global_batch(ft) == 512


@pytest.mark.parametrize("rid", sorted(COSUB_ROW))
def test_cosub_recipe_has_its_deit3_rows_settings(parser, rid):
    timm_name, size, lr, wd, drop_path, gpus, per_gpu = DEIT3[COSUB_ROW[rid]]
    path = f"{rid}.yaml"
    cfg = resolve(parser, path)
    model, data, trainer = init(cfg, "model"), init(cfg, "data"), cfg["trainer"]
    assert_subset(model, {**DEIT3_MODEL, "model": timm_name, "lr": lr, "weight_decay": wd}, path)
    assert_subset(
        model["model_kwargs"], {"img_size": size, "drop_path_rate": drop_path, "init_values": 1e-4}, path
    )
    assert model["drop_path_profile"] == "constant"
    assert_subset(data, {**DEIT3_DATA, "img_size": size, "batch_size": per_gpu}, path)
    assert trainer["max_epochs"] == COSUB_ROW[rid][1] and trainer["devices"] * trainer["num_nodes"] == gpus
    assert global_batch(cfg) == 2048 and not trainer.get("callbacks")


@pytest.mark.parametrize("key", sorted(MAE))
def test_mae_recipes_follow_method_md(parser, key):
    timm_name, epochs, batch, base_lr, layer_decay, drop_path = MAE[key]
    for path in (f"mae/{key}.yaml", f"mae/{key}_baseline.yaml"):
        cfg = resolve(parser, path)
        model, data = init(cfg, "model"), init(cfg, "data")
        expected = {**MAE_MODEL, "model": timm_name, "lr": base_lr, "layer_decay": layer_decay}
        assert_subset(model, expected, path)
        assert_subset(model["model_kwargs"], {"drop_path_rate": drop_path, "global_pool": "avg"}, path)
        assert_subset(data, MAE_DATA, path)
        assert data["auto_augment"].startswith("rand-"), "RandAugment"
        assert cfg["trainer"]["max_epochs"] == epochs and global_batch(cfg) == batch
        assert model["pretrained_weights"], "MAE fine-tuning starts from the MAE encoder"


@pytest.mark.parametrize("path", sorted(LINPROBE))
def test_linprobe_recipes_follow_mae_main_linprobe(parser, path):
    assert {r.path for r in RECIPES if is_linear_probe(r)} == set(LINPROBE)
    cfg, recipe = resolve(parser, path), BY_PATH[path]
    model, data = init(cfg, "model"), init(cfg, "data")
    assert_subset(model, LINPROBE_MODEL, path)
    assert model["model_kwargs"] == {"img_size": 224, "global_pool": "token"}, "the class token"
    assert_subset({**data, "scale": tuple(data["scale"])}, LINPROBE_DATA, path)
    assert cfg["trainer"]["max_epochs"] == 90 and global_batch(cfg) == 16384
    assert cfg["trainer"]["precision"] == "16-mixed"
    assert recipe.top1 == {"masksub": None, "baseline": LINPROBE[path]}
    method = path.split("/")[1].split("_")[0]  # mae / lut: the encoder of that pre-training recipe
    assert recipe.pretrained_from == f"pretrain/{method}_vit_base_400ep.yaml"


@pytest.mark.parametrize("path", [r.path for r in RECIPES if r.path.startswith("resnet_rsb/")])
def test_rsb_recipes_follow_method_md(parser, path):
    cfg = resolve(parser, path)
    model = init(cfg, "model")
    assert_subset(model, RSB_MODEL, path)
    assert model["model_kwargs"]["drop_path_rate"] == 0.05
    assert_subset(init(cfg, "data"), RSB_DATA, path)
    assert cfg["trainer"]["max_epochs"] == 300 and global_batch(cfg) == 2048


@pytest.mark.parametrize("path", [r.path for r in RECIPES if r.path.startswith("swin/")])
def test_swin_recipes_follow_method_md(parser, path):
    cfg = resolve(parser, path)
    model = init(cfg, "model")
    assert_subset(model, {**SWIN_MODEL, "sub_branch": BY_PATH[path].sub_branch}, path)
    assert (
        model["model_kwargs"]["drop_path_rate"] == SWIN_DROP_PATH[Path(path).stem.removesuffix("_baseline")]
    )
    assert_subset(init(cfg, "data"), SWIN_DATA, path)
    assert cfg["trainer"]["max_epochs"] == 300 and global_batch(cfg) == 1024


# ----------------------------------------------------------------------------------------- two steps per recipe
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
TINY_RESNET = dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 32], stem_width=8)
TINY_SWIN = dict(img_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)

# DataModule -> (fake-data writer, per-device batch): every fake set has >= 2 batches' worth of training images.
FAKE_DATA = {
    "ImageNetDataModule": (write_imagenet, 4),
    "CIFAR10DataModule": (write_cifar10, 2),
    "CIFAR100DataModule": (write_cifar100, 2),
    "Flowers102DataModule": (write_flowers102, 2),
    "StanfordCarsDataModule": (write_stanford_cars, 2),
    "INaturalistDataModule": (write_inat_json, 2),
}
CPU_RUN = [
    "--trainer.accelerator=cpu",
    "--trainer.strategy=auto",
    "--trainer.devices=1",
    "--trainer.num_nodes=1",
    "--trainer.precision=32-true",
    "--trainer.max_steps=2",
    "--trainer.limit_train_batches=2",  # the epoch ends after the two steps, so validation runs too
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.num_workers=0",
    "--data.init_args.pin_memory=false",
    "--data.init_args.persistent_workers=false",
]


def shrink(timm_name: str) -> tuple[dict[str, Any], int]:
    """model_kwargs of a tiny member of the recipe's model family, and the matching image size."""
    if timm_name.startswith("resnet"):
        return TINY_RESNET, 64  # 2 x 2 cells of 32 px for the pixel mask
    if timm_name.startswith("swin"):
        return TINY_SWIN, 64  # 16 x 16 tokens at stride 4: 2 x 2 mask-token regions of 32 px, windows of 4
    return TINY_VIT, 32


def randomized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.state_dict().items()}


def write_mae_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """An MAE pre-training checkpoint in facebookresearch/mae's format: {"model": encoder + decoder, "args": ...}."""
    encoder = randomized(timm.create_model("vit_base_patch16_224", num_classes=0, **TINY_VIT))
    dim, num_patches = 16, (TINY_VIT["img_size"] // TINY_VIT["patch_size"]) ** 2
    decoder = {
        "mask_token": torch.zeros(1, 1, dim),
        "decoder_embed.weight": torch.randn(dim, TINY_VIT["embed_dim"]),
        "decoder_embed.bias": torch.zeros(dim),
        "decoder_pos_embed": torch.randn(1, num_patches + 1, dim),
        "decoder_blocks.0.norm1.weight": torch.ones(dim),
        "decoder_norm.weight": torch.ones(dim),
        "decoder_pred.weight": torch.randn(8 * 8 * 3, dim),
    }
    torch.save(
        {"model": {**encoder, **decoder}, "args": argparse.Namespace(model="mae_vit_base_patch16")}, path
    )
    return encoder


def write_clip_checkpoint(path: Path) -> None:
    """A CLIP image tower in timm's layout (pre-norm `norm_pre`, projection head of another width)."""
    tower = timm.create_model("vit_base_patch16_clip_224", num_classes=24, **TINY_VIT)
    torch.save(randomized(tower), path)


def write_beitv2_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A BEiT v2 pre-training checkpoint in microsoft/unilm's layout: {"model": ...} with one shared relative
    position table (no table per block), the final norm, the index buffer and the masked-image-modelling parts."""
    encoder = timm.create_model(
        "beitv2_base_patch16_224",
        num_classes=0,
        global_pool="",
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        **TINY_VIT,
    )
    state = randomized(encoder)
    tokens = (TINY_VIT["img_size"] // TINY_VIT["patch_size"]) ** 2 + 1
    extra = {
        "rel_pos_bias.relative_position_index": torch.zeros(tokens, tokens, dtype=torch.long),
        "mask_token": torch.zeros(1, 1, TINY_VIT["embed_dim"]),
        "lm_head.weight": torch.randn(64, TINY_VIT["embed_dim"]),
        "lm_head.bias": torch.zeros(64),
        "cls_pt_layers.0.mlp.fc1.weight": torch.randn(64, TINY_VIT["embed_dim"]),
    }
    torch.save({"model": {**state, **extra}}, path)
    return state


def write_lightning_checkpoint(path: Path) -> None:
    """A MaskSub Lightning checkpoint of a DeiT-III stage-1 run: `model.`-prefixed keys, lower resolution."""
    net = timm.create_model(
        "deit3_base_patch16_224", num_classes=4, init_values=1e-4, **{**TINY_VIT, "img_size": 24}
    )
    torch.save({"state_dict": {f"model.{k}": v for k, v in randomized(net).items()}, "global_step": 7}, path)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake(tmp_path_factory.mktemp("recipes"))


def make_fake(root: Path) -> argparse.Namespace:
    """Fake datasets (written on first use) and fake pre-trained weights in each recipe family's format."""
    weights = {
        "mae": root / "mae_pretrain_vit_tiny.pth",
        "clip": root / "clip_vit_tiny.pth",
        "lightning": root / "last.ckpt",
        "beitv2": root / "beitv2_base_patch16_224_pt1k_tiny.pth",
    }
    mae_encoder = write_mae_checkpoint(weights["mae"])
    beit_encoder = write_beitv2_checkpoint(weights["beitv2"])
    write_clip_checkpoint(weights["clip"])
    write_lightning_checkpoint(weights["lightning"])
    datasets: dict[tuple[str, str], Path] = {}

    def dataset(module: str, version: str | None) -> Path:
        key = (module, str(version))
        if key not in datasets:
            path = root / f"{module}_{version}"
            writer = FAKE_DATA[module][0]
            writer(path, version) if module == "INaturalistDataModule" else writer(path)
            datasets[key] = path
        return datasets[key]

    return argparse.Namespace(
        weights=weights, mae_encoder=mae_encoder, beit_encoder=beit_encoder, dataset=dataset
    )


def weights_format(recipe: Recipe) -> str:
    if recipe.path.startswith(("lut/", "linprobe/")):
        return "mae"  # an encoder in the released-MAE layout, as the LUT pre-training exports it
    return recipe.path.split("/")[0] if recipe.path.startswith(("mae/", "clip/", "beitv2/")) else "lightning"


@pytest.mark.parametrize("recipe", CLASSIFICATION, ids=recipe_id)
def test_recipe_trains_two_steps_on_cpu(parser, fake, recipe, tmp_path, capsys):
    cfg = resolve(parser, recipe.path)
    model_cfg, data_cfg = init(cfg, "model"), init(cfg, "data")
    module = cfg["data"]["class_path"].rsplit(".", 1)[-1]
    kwargs, size = shrink(model_cfg["model"])
    # Two optimizer steps: with gradient accumulation that is 2 x N micro-batches of a smaller batch.
    accumulation = model_cfg.get("grad_accumulation", 1)
    args = [
        "fit",
        "--config",
        str(CONFIGS / recipe.path),
        *CPU_RUN,
        f"--trainer.limit_train_batches={2 * accumulation}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.root={fake.dataset(module, data_cfg.get('version'))}",
        f"--data.init_args.batch_size={max(2, FAKE_DATA[module][1] // accumulation)}",
        f"--data.init_args.img_size={size}",
        *(f"--model.init_args.model_kwargs.{k}={json.dumps(v)}" for k, v in kwargs.items()),
    ]
    if model_cfg["pretrained_weights"]:
        args.append(f"--model.init_args.pretrained_weights={fake.weights[weights_format(recipe)]}")

    with mock.patch.object(sys, "argv", ["masksub"]):
        cli = build_cli(args)

    trainer, module_, data = cli.trainer, cli.model, cli.datamodule
    assert trainer.global_step == 2
    # The recipe's own hyperparameters reached the module, the optimizer, the loss and the data pipeline.
    hp = module_.hparams
    assert type(module_).__name__ == ("CoSubModule" if recipe.arm == "cosub" else "MaskSubModule")
    sub_branch_keys = ("sub_branch", "sub_ratio", "sub_branch_kwargs")
    if recipe.arm == "cosub":  # neither in the config nor in the module's options
        assert not set(sub_branch_keys) & (set(hp) | set(model_cfg))
    for key in (
        *(sub_branch_keys if recipe.arm != "cosub" else ()),
        "loss",
        "label_smoothing",
        "bce_target_threshold",
        "optimizer",
        "lr",
        "lr_base_batch_size",
        "weight_decay",
        "layer_decay",
        "optimizer_kwargs",
        "scheduler",
        "warmup_epochs",
        "warmup_lr",
        "min_lr",
        "grad_clip_norm",
    ):
        assert hp[key] == model_cfg[key], key
    for key in ("drop_path_rate", "init_values", "global_pool", "drop_rate"):
        if key in model_cfg["model_kwargs"]:
            assert hp["model_kwargs"][key] == model_cfg["model_kwargs"][key], key
    assert module_.criterion.kind == model_cfg["loss"]
    # "mask" resolves to the concrete kind for the model: token drop on ViTs and BEiTs, pixel cells on CNNs.
    is_vit, is_beit = hasattr(module_.model, "patch_drop"), isinstance(module_.model, timm.models.beit.Beit)
    token_kind = "BeitTokenMaskSubBranch" if is_beit else "TokenMaskSubBranch"
    sub_kind = {
        "mask": token_kind if is_vit or is_beit else "PixelMaskSubBranch",
        "mask_token": "MaskTokenSubBranch",
        "none": "NoSubBranch",
        "cosub": "NoSubBranch",  # CoSub's second pass is the same forward, not a sub-branch
    }[recipe.sub_branch]
    assert type(module_.sub_branch).__name__ == sub_kind
    optimizer = module_.optimizers().optimizer
    assert (
        type(optimizer).__name__.lower()
        == {"lamb": "lamb", "adamw": "adamw", "sgd": "sgd", "lars": "lars"}[hp["optimizer"]]
    )
    scales = {group.get("lr_scale", 1.0) for group in optimizer.param_groups}
    assert (min(scales) < 1.0) == (hp["layer_decay"] is not None), "layer-wise lr decay"
    for key in ("auto_augment", "color_jitter", "reprob", "mixup_alpha", "cutmix_alpha", "label_smoothing"):
        assert getattr(data, key) == data_cfg[key], key
    assert (data.repeated_aug, data.eval_crop_pct, data.train_crop) == (
        data_cfg["repeated_aug"],
        data_cfg["eval_crop_pct"],
        data_cfg["train_crop"],
    )
    # Both branches ran (the baseline only the main one), and validation saw the main branch.
    metrics = trainer.callback_metrics
    assert ("train_loss_sub_step" in metrics) == (recipe.arm == "masksub")
    assert ("train_loss_cotrain_step" in metrics) == (recipe.arm == "cosub")
    assert torch.isfinite(metrics["train_loss_step"]) and "val_acc1" in metrics
    ema = [cb for cb in trainer.callbacks if isinstance(cb, EMAWeightAveraging)]
    recipe_ema = [
        cb for cb in cfg["trainer"].get("callbacks") or [] if cb["class_path"].endswith("EMAWeightAveraging")
    ]
    assert len(ema) == len(recipe_ema)
    if ema:  # EMA update of 0 towards 1 moves it by 1 - decay
        moved = ema[0]._kwargs["avg_fn"](torch.zeros(1), torch.ones(1), torch.tensor(1))
        assert moved.item() == pytest.approx(1 - recipe_ema[0]["init_args"]["decay"])
    out = capsys.readouterr().out
    if model_cfg["pretrained_weights"]:
        assert f"loaded pretrained weights from {fake.weights[weights_format(recipe)]}" in out
        assert {
            "mae": "source: mae",
            "clip": "source: clip",
            "lightning": "source: timm",
            "beitv2": "source: beit",
        }[weights_format(recipe)] in out


def test_mae_recipe_end_to_end_from_an_mae_checkpoint(fake, tmp_path, capsys):
    """`masksub fit` on the MAE ViT-B recipe loads an MAE-format file: encoder in, decoder out, fc_norm fresh."""
    path = fake.weights["mae"]
    encoder = fake.mae_encoder  # what the file holds besides the decoder
    args = [
        "fit",
        "--config",
        str(CONFIGS / "mae/vit_base.yaml"),
        *CPU_RUN,
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.root={fake.dataset('ImageNetDataModule', None)}",
        "--data.init_args.batch_size=4",
        "--data.init_args.img_size=32",
        f"--model.init_args.pretrained_weights={path}",
        *(f"--model.init_args.model_kwargs.{k}={json.dumps(v)}" for k, v in TINY_VIT.items()),
    ]
    with mock.patch.object(sys, "argv", ["masksub"]):
        net = build_cli(args).model.model
    out = capsys.readouterr().out
    assert "source: mae" in out and "MAE decoder" in out
    # Two steps of the recipe's lr (5e-4 x 4 / 256, linear warmup from 0, layer decay) barely move the weights:
    # they are the checkpoint's, not a fresh initialisation.
    after = net.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "pos_embed", "cls_token"):
        assert torch.allclose(after[key], encoder[key], atol=1e-3), key
    # MAE fine-tuning builds fc_norm fresh: the encoder's final norm is not copied into it.
    assert torch.allclose(after["fc_norm.weight"], torch.ones_like(after["fc_norm.weight"]), atol=1e-3)
    assert not torch.allclose(after["fc_norm.weight"], encoder["norm.weight"], atol=1e-2)
    assert net.head.weight.shape == (4, TINY_VIT["embed_dim"])  # a fresh head for the 4 fake classes
    assert net.head.weight.abs().max() < 1e-3  # drawn with std 2e-5 (head_init_std)


# ------------------------------------------------------------------------------------------- masksub recipes
def test_recipes_command_lists_every_recipe_with_its_target(capsys):
    cli_main(["recipes"])  # returns: exit status 0 for the console script
    out = capsys.readouterr().out
    lines = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.split()[:1] and line.split()[0].endswith(".yaml")
    }
    assert set(lines) == set(BY_PATH)
    for recipe in RECIPES:
        cells = lines[recipe.path].split()
        assert cells[1:5] == [recipe.model, str(recipe.epochs), recipe.sub_branch, str(recipe.global_batch)]
        target = "-" if recipe.target_top1 is None else f"{recipe.target_top1:.1f}"
        baseline = "-" if recipe.baseline_top1 is None else f"{recipe.baseline_top1:.1f}"
        assert cells[5:7] == [target, baseline], recipe.path
    assert f"{len(RECIPES)} recipe(s)" in out


def test_recipes_command_filter_and_json(capsys):
    recipes_main(["--filter", "DEIT3/VIT_BASE_400EP_FT224"])
    out = capsys.readouterr().out
    assert "deit3/vit_base_400ep_ft224.yaml" in out and "deit3/vit_base_400ep_ft224_baseline.yaml" in out
    assert "84.1" in out and "83.5" in out and "swin" not in out and "2 recipe(s)" in out

    recipes_main(["--filter", "swin_tiny", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == ["swin/swin_tiny.yaml", "swin/swin_tiny_baseline.yaml"]
    assert [r["target_top1"] for r in rows] == [81.4, 81.3] and rows[0]["sub_branch"] == "mask_token"

    recipes_main(["--filter", "no-such-recipe"])
    assert "no recipe" in capsys.readouterr().out


def test_headers_are_checked(tmp_path):
    good = (CONFIGS / "swin/swin_tiny.yaml").read_text()
    (tmp_path / "a").mkdir()
    (tmp_path / "_blocks").mkdir()
    (tmp_path / "_blocks" / "shared.yaml").write_text("trainer:\n  max_epochs: 1\n")  # skipped: `_` folder
    (tmp_path / "a" / "plain.yaml").write_text("trainer:\n  max_epochs: 1\n")  # skipped: no header
    (tmp_path / "a" / "ok.yaml").write_text(good)
    assert [r.path for r in find_recipes(tmp_path)] == ["a/ok.yaml"]
    assert "a/ok.yaml" in format_table(find_recipes(tmp_path))

    bad = tmp_path / "a" / "bad.yaml"
    bad.write_text(good.replace("#   top1: {masksub: 81.4, baseline: 81.3}", "#   top1: {masksub: 81.4}"))
    with pytest.raises(RecipeHeaderError, match=r"a/bad\.yaml: top1 must be null or"):
        load_recipe(bad, tmp_path)
    bad.write_text(
        good.replace("#   sub_branch: mask_token", "#   sub_branch: cosub")
    )  # a CoSub arm's number
    with pytest.raises(
        RecipeHeaderError, match=r"top1 must be null or \{cosub: <top-1>, baseline: <top-1>\}"
    ):
        load_recipe(bad, tmp_path)
    bad.write_text(good.replace("#   epochs: 300\n", ""))
    with pytest.raises(RecipeHeaderError, match=r"a/bad\.yaml: header lacks epochs"):
        find_recipes(tmp_path)
    bad.write_text(good.replace("#   epochs: 300", "#   epochs: 300\n#   epoch: 3"))
    with pytest.raises(RecipeHeaderError, match="unknown header key"):
        load_recipe(bad, tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # the command names the file and exits 2
        recipes_main(["--configs", str(tmp_path)])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_masksub_recipes_console_command_exits_0():
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from masksub_lightning.commands import main; main()",
            "recipes",
            "--filter",
            "mae/",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "mae/vit_huge.yaml" in run.stdout and "87.2" in run.stdout
