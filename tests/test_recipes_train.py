"""Every recipe `masksub recipes` lists trains, checkpoints and resumes through `masksub fit` (issue 18, item 2).

Each recipe runs three times on the CPU, in process (`build_cli(["fit", "--config", <recipe>, ...])`):

1. a few optimizer steps, stopped by a callback (``StopAfterSteps``: ``--trainer.max_steps`` would shorten the LR
   schedule), with the package's ``ResumeCheckpoint`` writing ``resume.ckpt`` after step 2;
2. the same config with ``--ckpt_path resume.ckpt``, for three more steps;
3. the same config for all five steps without stopping, the reference the resumed run must match exactly.

Only what cannot run on a CPU in seconds is shrunk: the model's depth / width and image size (tests/test_recipes.py
``shrink``), one CPU process instead of the GPU layout, the per-device batch and the dataset. ImageNet recipes read
a 16-image ImageNet folder (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``), the pre-training recipes their
pre-training DataModule on it, and the transfer recipes their own dataset's fake files (tests/data/fake_data.py).
Pre-trained weights are the fake MAE / CLIP / DeiT-III / BEiT v2 files of tests/test_recipes.py. Everything else is the
recipe's: max_epochs (so the whole schedule), optimizer, LR, warmup, min LR, per-step or per-epoch LR, loss, Mixup /
CutMix, repeated augmentation, sub-branch, EMA callback, grad_accumulation, freezing, clipping and precision. A
``16-mixed`` recipe runs with a real CPU GradScaler (Lightning builds none for the CPU), passed as
``--trainer.plugins`` with ``--trainer.precision null``; ``bf16-mixed`` runs as given.

Checked for both runs, with values computed here: the global step where each starts and ends, the LR of every param
group at every step against timm's warmup + cosine formula for the recipe's schedule (the resumed run's LRs are
those of the uninterrupted schedule), finite losses, one loss per micro-batch, trained weights moved, frozen weights
not, the restored weights (and EMA average) equal the checkpoint's, the GradScaler continues from its saved state,
clipping applies the recipe's norm, an exported encoder for the pre-training recipes, and the resumed run ends
bit for bit where the uninterrupted run does (losses, weights, buffers, EMA average).

One recipe per family (configs/ folder) runs in the default suite; every other recipe is ``slow``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.plugins import MixedPrecision
from test_recipes import FAKE_DATA, make_fake, make_parser, resolve, shrink, weights_format

from masksub_lightning.commands.cli import build_cli
from masksub_lightning.commands.recipes import PACKAGED_CONFIGS, Recipe, find_recipes
from masksub_lightning.commands.recipes import main as recipes_main

sys.path.insert(0, str(Path(__file__).parent))  # recipe_train_callbacks, named by class_path below
sys.path.insert(0, str(Path(__file__).parent / "data"))
from fake_data import write_image

RECIPES = find_recipes(PACKAGED_CONFIGS)

# The default suite's recipe of each family: the one with the most of the family's features (accumulation, EMA and
# freezing for CLIP, accumulation for MAE, the LUT module for pre-training, ...); the rest are slow-marked.
DEFAULT = {
    "clip": "clip/vit_large14.yaml",  # grad_accumulation 4, EMA, frozen patch embedding, layer decay
    "deit3": "deit3/vit_small_400ep.yaml",  # LAMB, BCE, 3-Augment, repeated aug, per-epoch LR, 16-mixed
    "linprobe": "linprobe/mae_vit_base_400ep.yaml",  # LARS on a BatchNorm + head, the encoder frozen in eval mode
    "lut": "lut/vit_small.yaml",  # an encoder in the released-MAE layout, layer decay, per-step LR
    "mae": "mae/vit_large.yaml",  # grad_accumulation 4, LR scaled by the global batch
    "pretrain": "pretrain/lut_vit_small_400ep.yaml",  # LUTModule, two views, bf16-mixed, grad_accumulation 4
    "resnet_rsb": "resnet_rsb/resnet50.yaml",  # pixel-mask sub-branch on a CNN, soft BCE, random interpolation
    "swin": "swin/swin_tiny.yaml",  # mask-token sub-branch, clipping at 5.0, LR scaled by batch / 512
    "beitv2": "beitv2/vit_base.yaml",  # beit_token_mask, rel-pos tables decayed, layer decay 0.6, 16-mixed
    "transfer": "transfer/cifar10.yaml",  # CIFAR-10 pickles, SGD, a mid-epoch resume (5 steps per epoch)
}

# Recipes of a module no family default trains: in the default suite too.
DEFAULT_EXTRA = {"deit3/vit_base_800ep_cosub.yaml"}  # CoSubModule (one forward of the duplicated batch)

SAVE_AT = 2  # optimizer steps of the first run; ResumeCheckpoint writes resume.ckpt every SAVE_AT steps
TOTAL = 5  # global_step at which the resumed run stops: it trains steps 2, 3, 4
# ImageNet-layout folder: STEPS_PER_EPOCH optimizer steps per epoch (the batch is chosen to fit the recipe's
# grad_accumulation), so step 2 ends epoch 0 and the resumed run crosses the epoch 1 -> 2 boundary at step 4. With
# grad_accumulation 8 (the ViT-L pre-training recipes) the batch stays at 2 (BatchNorm in LUT's projector needs
# two samples; Mixup an even batch) and an epoch is one step.
STEPS_PER_EPOCH = 2
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")
TRAIN_PER_CLASS = 4
TRAIN_IMAGES = len(WNIDS) * TRAIN_PER_CLASS
# MAE / LUT decoder and LUT projector shrunk as tests/test_pretraining_recipes.py does.
PRETRAIN_SHRINK = {"decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
LUT_SHRINK = {"proj_hidden_dim": 32}

# Lightning builds no GradScaler on the CPU ("16-mixed" there is autocast without loss scaling): give it one.
REAL_SCALER_16_MIXED = {
    "class_path": "lightning.pytorch.plugins.MixedPrecision",
    "init_args": {
        "precision": "16-mixed",
        "device": "cpu",
        "scaler": {"class_path": "torch.amp.GradScaler", "init_args": {"device": "cpu"}},
    },
}


# What the network's layers compute in under each precision a recipe sets.
COMPUTE_DTYPE = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16, "32-true": torch.float32}


def family(recipe: Recipe) -> str:
    return recipe.path.split("/")[0]


def params() -> list:
    return [
        pytest.param(r, id=r.path.removesuffix(".yaml"))
        if DEFAULT.get(family(r)) == r.path or r.path in DEFAULT_EXTRA
        else pytest.param(r, id=r.path.removesuffix(".yaml"), marks=pytest.mark.slow)
        for r in RECIPES
    ]


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread is faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parser():
    return make_parser()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake(tmp_path_factory.mktemp("recipes_train"))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """ImageNet's layout with TRAIN_IMAGES training images (tests/data/fake_data.py's has 8: too few for
    STEPS_PER_EPOCH steps of 4 micro-batches of 2) and one val image per class. Noise gives the crops something
    to change."""
    root = tmp_path_factory.mktemp("imagenet")
    for label, wnid in enumerate(WNIDS):
        for i in range(TRAIN_PER_CLASS):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", label, noise=40)
        write_image(root / "val" / wnid / f"ILSVRC2012_val_{label:08d}.JPEG", label, noise=40)
    return root


# ------------------------------------------------------------------------------------------------------ helpers
def callback_arg(class_path: str, **init_args: Any) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def recipe_args(
    cfg: dict[str, Any], recipe: Recipe, fake, imagenet: Path, out: Path
) -> tuple[list[str], int]:
    """`masksub fit` arguments of the shrunken run of ``recipe``, and its per-device batch size."""
    model, trainer = cfg["model"]["init_args"], cfg["trainer"]
    data_class = cfg["data"]["class_path"].rsplit(".", 1)[-1]
    accumulation = model.get("grad_accumulation", 1)
    kwargs, size = shrink(model["model"])
    if data_class in ("ImageNetDataModule", "PretrainImageNetDataModule"):
        root = imagenet
        batch = max(2, TRAIN_IMAGES // (STEPS_PER_EPOCH * accumulation))
    else:  # a transfer dataset in its own format; each fake set has >= 2 batches of 2 (test_recipes.FAKE_DATA)
        root = fake.dataset(data_class, cfg["data"]["init_args"].get("version"))
        batch = max(2, FAKE_DATA[data_class][1] // accumulation)
    args = [
        "fit",
        "--config",
        str(PACKAGED_CONFIGS / recipe.path),
        # One CPU process instead of the recipe's GPUs (and nodes).
        "--trainer.accelerator=cpu",
        "--trainer.strategy=auto",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",  # the recipe's CSVLogger, under tmp instead of ./runs
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--data.init_args.root={root}",
        f"--data.init_args.batch_size={batch}",
        f"--data.init_args.img_size={size}",
        "--data.init_args.num_workers=0",  # worker processes cost more than these images
        "--data.init_args.pin_memory=false",
        "--data.init_args.persistent_workers=false",
        *(f"--model.init_args.model_kwargs.{k}={json.dumps(v)}" for k, v in kwargs.items()),
        callback_arg(
            "masksub_lightning.callbacks.ResumeCheckpoint", every_n_train_steps=SAVE_AT, dirpath=str(out)
        ),
        callback_arg("recipe_train_callbacks.StepRecorder"),
    ]
    if trainer["precision"] == "16-mixed":
        args += ["--trainer.precision=null", "--trainer.plugins=" + json.dumps(REAL_SCALER_16_MIXED)]
    if model.get("pretrained_weights"):
        args.append(f"--model.init_args.pretrained_weights={fake.weights[weights_format(recipe)]}")
    if cfg["model"]["class_path"].endswith(("MAEModule", "LUTModule")):
        shrunk = {**PRETRAIN_SHRINK, **(LUT_SHRINK if "proj_hidden_dim" in model else {})}
        args += [f"--model.init_args.{k}={v}" for k, v in shrunk.items()]
    return args, batch


def fit(args: list[str], stop_at: int):
    with mock.patch.object(sys, "argv", ["masksub"]):  # LightningCLI warns when pytest's argv is set too
        cli = build_cli([*args, callback_arg("recipe_train_callbacks.StopAfterSteps", steps=stop_at)])
    recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "StepRecorder")
    return cli, recorder


def cosine_schedule(model: dict[str, Any], max_epochs: int, steps_per_epoch: int, global_batch: int):
    """The LR at optimizer step t of the recipe's whole run, as timm's CosineLRScheduler computes it (linear
    warmup from warmup_lr, then a cosine from t = 0 to min_lr at the end; no warmup prefix, no restarts), per
    step or per epoch. Written out here, not read back from the module, so that a wrong length, warmup or scaling
    in the run shows up."""
    assert model["scheduler"] == "cosine", "every recipe uses a cosine schedule; add the formula of another"
    peak = model["lr"]
    if model.get("lr_base_batch_size"):
        peak *= global_batch / model["lr_base_batch_size"]
    per_epoch = model.get("lr_interval", "step") == "epoch"
    total = max_epochs if per_epoch else max_epochs * steps_per_epoch
    warmup = min(round(model["warmup_epochs"] * (1 if per_epoch else steps_per_epoch)), total)
    start, floor = model["warmup_lr"], model["min_lr"]

    def lr(t: int) -> float:
        t = t // steps_per_epoch if per_epoch else t
        if t < warmup:
            return start + t * (peak - start) / warmup
        if t >= total:
            return floor
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t / total))

    return lr, total


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


def check_run(rec, cli, first: int, last: int, lr_at, accumulation: int, recipe: Recipe) -> None:
    """What both runs must show: steps first..last-1 taken at the schedule's LRs, finite losses, moved weights."""
    assert rec.start_step == first and cli.trainer.global_step == last
    assert sorted(rec.lrs) == list(range(first, last))
    for t, lrs in rec.lrs.items():
        # Every param group (layer-decay scale divided out) at the uninterrupted schedule's value for step t.
        assert lrs == pytest.approx([lr_at(t)] * len(lrs), rel=1e-9, abs=1e-15), f"{recipe.path}: step {t}"
    assert len(rec.losses) == (last - first) * accumulation, "one loss per micro-batch"
    assert all(math.isfinite(loss) for loss in rec.losses), rec.losses
    # Every trained tensor moved (each gets a gradient from the recipe's losses, and the LR of these steps is > 0
    # after the first): a step the optimizer or a GradScaler did not apply, or a network left out of the
    # optimizer, shows up here.
    trained = [k for k in rec.start if k not in rec.frozen]
    unmoved = sorted(set(trained) - set(changed({k: rec.start[k] for k in trained}, rec.end)))
    assert not unmoved, (
        f"{recipe.path}: {len(unmoved)} of {len(trained)} trained tensors did not move: {unmoved}"
    )


def check_clipping(rec, clip: float | None) -> None:
    """The gradient a step applied has norm min(norm before clipping, the recipe's clip); no clip: no norm logged.

    Steps a GradScaler skipped (an fp16 overflow) applied nothing; every other step is compared.
    """
    if clip is None:
        assert rec.grad_norms_logged == {}
        return
    assert sorted(rec.grad_norms_logged) == sorted(rec.lrs)
    assert rec.grad_norms_applied and set(rec.grad_norms_applied) <= set(rec.grad_norms_logged)
    for step, applied in rec.grad_norms_applied.items():
        assert applied == pytest.approx(min(rec.grad_norms_logged[step], clip), rel=1e-3), step


# -------------------------------------------------------------------------------------------------------- tests
def test_every_listed_recipe_is_covered_and_each_family_has_one_in_the_default_suite(capsys):
    recipes_main(["--json", "--configs", str(PACKAGED_CONFIGS)])
    listed = {row["path"] for row in json.loads(capsys.readouterr().out)}
    assert listed == {r.path for r in RECIPES} and len(listed) >= 60
    # A new family folder needs a default-suite recipe here (else it would run only with -m slow).
    assert set(DEFAULT) == {family(r) for r in RECIPES}
    assert set(DEFAULT.values()) | DEFAULT_EXTRA <= listed


@pytest.mark.parametrize("recipe", params())
def test_recipe_trains_checkpoints_and_resumes(parser, fake, imagenet, tmp_path, recipe):
    cfg = resolve(parser, recipe.path)
    model, trainer_cfg = cfg["model"]["init_args"], cfg["trainer"]
    accumulation = model.get("grad_accumulation", 1)
    args, batch = recipe_args(cfg, recipe, fake, imagenet, tmp_path)

    # ---------------------------------------------------------------- run 1: SAVE_AT steps, then resume.ckpt
    cli, rec = fit(args, stop_at=SAVE_AT)
    trainer, module = cli.trainer, cli.model
    steps_per_epoch = math.ceil(int(trainer.num_training_batches) / accumulation)
    if cfg["data"]["class_path"].endswith("ImageNetDataModule"):  # the epoch the fake folder was sized for
        assert steps_per_epoch == TRAIN_IMAGES // (batch * accumulation) >= 1
    lr_at, total = cosine_schedule(model, trainer_cfg["max_epochs"], steps_per_epoch, batch * accumulation)
    # The recipe's settings reached the run: its whole schedule, its precision, its accumulation, its callbacks.
    assert trainer.max_epochs == trainer_cfg["max_epochs"] == recipe.epochs and trainer.max_steps == -1
    assert module.lr_schedulers().t_initial == total
    assert module.hparams.get("grad_accumulation", 1) == accumulation
    for key in ("optimizer", "lr", "weight_decay", "layer_decay", "loss", "sub_branch", "grad_clip_norm"):
        if key in model:
            assert module.hparams[key] == model[key], key
    if trainer_cfg["precision"] == "16-mixed":
        assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision == "16-mixed"
        assert trainer.precision_plugin.scaler is not None and trainer.precision_plugin.scaler.is_enabled()
        assert len(rec.scales) == SAVE_AT and all(s > 1 for s in rec.scales)  # the losses were scaled
    else:
        assert trainer.precision == trainer_cfg["precision"] and rec.scales == []
    assert rec.compute_dtypes == {COMPUTE_DTYPE[trainer_cfg["precision"]]}, "autocast"
    recipe_ema = [c for c in trainer_cfg.get("callbacks") or [] if "WeightAveraging" in c["class_path"]]
    ema = [c for c in trainer.callbacks if isinstance(c, WeightAveraging)]
    assert len(ema) == len(recipe_ema)
    # Freezing: exactly the recipe's modules are frozen (MAE / LUT also fix their sin-cos position embedding).
    prefixes = tuple(f"model.{name}." for name in model.get("freeze") or [])
    frozen_by_recipe = [n for n in rec.frozen if prefixes and n.startswith(prefixes)]
    assert bool(frozen_by_recipe) == bool(prefixes)
    assert all(n.startswith(prefixes) or n.endswith("pos_embed") for n in rec.frozen), rec.frozen
    check_run(rec, cli, 0, SAVE_AT, lr_at, accumulation, recipe)
    check_clipping(rec, model.get("grad_clip_norm"))
    first = rec

    ckpt_path = tmp_path / "resume.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["global_step"] == SAVE_AT
    # The raw weights at the save (an EMA callback stores its average as state_dict and the raw ones aside).
    saved = ckpt["current_model_state"] if ema else ckpt["state_dict"]
    assert all(torch.equal(saved[k].float(), first.end[k]) for k in first.end)
    scaler_state = ckpt.get("MixedPrecision")

    # ------------------------------------------------------ run 2: the same config, --ckpt_path resume.ckpt
    cli, rec = fit([*args, f"--ckpt_path={ckpt_path}"], stop_at=TOTAL)
    trainer, module = cli.trainer, cli.model
    assert module.lr_schedulers().t_initial == total  # the same schedule (a different one is refused)
    # It starts where the first run saved: its weights, then the uninterrupted schedule's LRs from step SAVE_AT.
    assert all(torch.equal(rec.start[k], first.end[k]) for k in first.end)
    check_run(rec, cli, SAVE_AT, TOTAL, lr_at, accumulation, recipe)
    check_clipping(rec, model.get("grad_clip_norm"))
    # Frozen weights stayed what the first run started with (the pre-trained ones) through both runs.
    assert rec.frozen == first.frozen
    for name in rec.frozen:
        assert torch.equal(rec.end[name], first.start[name]), name
    if ema:
        # The EMA average continued from the checkpoint's (not from the raw weights).
        assert rec.average_start is not None
        assert all(
            torch.equal(rec.average_start[k], ckpt["state_dict"][k].float()) for k in rec.average_start
        )
    if scaler_state is not None:
        # The GradScaler continued from its saved state: its growth tracker counts on from the saved value.
        scaler = trainer.precision_plugin.scaler
        assert rec.scales[0] == scaler_state["scale"]
        if len(set([*first.scales, *rec.scales, scaler.get_scale()])) == 1:  # no overflow: no reset
            assert scaler.state_dict()["_growth_tracker"] == scaler_state["_growth_tracker"] + TOTAL - SAVE_AT
            assert scaler_state["_growth_tracker"] == SAVE_AT
    if cfg["model"]["class_path"].endswith(("MAEModule", "LUTModule")):
        # Pre-training writes the encoder next to the checkpoints when fitting ends: this run's final weights.
        exported = torch.load(Path(trainer.checkpoint_callback.dirpath) / "encoder.pth", weights_only=True)
        weight = module.model.blocks[0].attn.qkv.weight
        assert torch.equal(exported["model"]["blocks.0.attn.qkv.weight"], weight.detach().float())
    resumed, resumed_state = rec, module.state_dict()

    # ------------------------------------- run 3: the same TOTAL steps without the interruption, for reference
    cli, rec = fit(args, stop_at=TOTAL)
    # The resume is exact: the same losses from step SAVE_AT on, and the same weights, buffers (BatchNorm
    # statistics, LUT's teacher) and, for EMA recipes, the same average (which the module holds after fit).
    assert rec.losses[SAVE_AT * accumulation :] == resumed.losses
    straight_state = cli.model.state_dict()
    assert straight_state.keys() == resumed_state.keys()
    differ = [k for k in straight_state if not torch.equal(straight_state[k], resumed_state[k])]
    assert not differ, (
        f"{recipe.path}: the resumed run ends with other values than the uninterrupted run: {differ}"
    )
