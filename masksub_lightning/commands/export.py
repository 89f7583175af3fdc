"""The ``masksub export`` command: a trained network as a timm model folder, loadable with timm alone.

    masksub export runs/quickstart/version_0/checkpoints/last.ckpt exported/quickstart
    python -c "import timm; m = timm.create_model('local-dir:exported/quickstart', pretrained=True)"

The folder is what timm writes for its Hugging Face hub models (``timm.models.push_to_hf_hub``'s ``save_for_hf``):
``config.json`` (architecture, ``num_classes``, the constructor arguments in ``model_args`` (the run's
``model_kwargs``: img_size, depth, ...), the preprocessing in ``pretrained_cfg``: input size and the DataModule's
mean / std) and ``model.safetensors`` (the timm model's own state dict, without the sub-branch's extras such as the
``mask_token`` kind's token), plus a short model card ``README.md`` (sub-branch, recipe options, data, validation
top-1, how it was trained and how to load it) and, when the run has one, its resolved ``config.yaml``.

Weights: with Lightning's ``EMAWeightAveraging`` the checkpoint's ``state_dict`` holds the EMA weights and
``current_model_state`` the raw ones; ``--ema`` / ``--raw`` choose, and the default takes the EMA weights when the
checkpoint has them. (A checkpoint written after ``fit`` ended carries the EMA weights in ``state_dict`` without
the raw copy, so it cannot be told apart from a run without EMA.) The checkpoint is read with ``weights_only=True``.

An MAE / LUT pre-training checkpoint has an encoder and no classifier: ``masksub export`` writes that encoder as
``OUT_DIR/encoder.pth`` (the released-MAE layout that ``--model.init_args.pretrained_weights`` loads).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

__all__ = ["ExportError", "export_checkpoint", "main"]

WEIGHTS_FILE = "model.safetensors"
#: Parameters the sub-branch kinds add to the network (they are not part of the timm model).
_SUB_BRANCH_KEYS = ("masksub_mask_token",)


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked (no timm name, no EMA weights, an occupied output folder)."""


def _load(path: Path, trust_sharded: bool = False) -> dict[str, Any]:
    from masksub_lightning.training.checkpoint_io import load_checkpoint_file

    if path.is_dir():
        if not trust_sharded:
            raise ExportError(
                f"{path} is a sharded checkpoint folder (FSDP2): torch reads its metadata with pickle, which can "
                "run code, so it is opened only with --trust-sharded (for folders you wrote yourself)"
            )
        from masksub_lightning.training.sharding import load_sharded_checkpoint

        ckpt = load_sharded_checkpoint(path)
    else:
        ckpt = load_checkpoint_file(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ExportError(f"{path} is not a MaskSubModule checkpoint (no state_dict / hyper_parameters)")
    return ckpt


#: Pre-training modules whose checkpoints hold an encoder to fine-tune from, not a classifier.
_PRETRAINING_CLASSES = ("MAEModule", "LUTModule")


def _pretraining_class(ckpt: dict[str, Any]) -> str | None:
    """``MAEModule`` / ``LUTModule`` for a pre-training checkpoint (by the CLI's class path or by its decoder /
    teacher weights, for a run trained from Python), else None."""
    class_path = str((ckpt.get("hyper_parameters") or {}).get("_class_path", ""))
    named = [name for name in _PRETRAINING_CLASSES if class_path.endswith(f".{name}")]
    if named:
        return named[0]
    keys = ckpt["state_dict"].keys()
    if any(k.startswith("teacher.") for k in keys):
        return "LUTModule"
    return "MAEModule" if any(k.startswith("decoder.") for k in keys) else None


def _export_encoder(ckpt_path: Path, out: Path, weights: str) -> Path:
    """The encoder of a pre-training checkpoint, in the released-MAE layout, as ``out/encoder.pth``."""
    from masksub_lightning.modules.pretraining import ENCODER_FILE, export_encoder

    if weights != "auto":
        raise ExportError(
            f"--{weights} chooses between a classifier's EMA and raw weights; {ckpt_path} is a pre-training "
            "checkpoint, whose encoder is exported as trained (drop the option)"
        )
    out.mkdir(parents=True, exist_ok=True)
    return export_encoder(ckpt_path, out / ENCODER_FILE)


def _misfit(model_state: dict[str, Any], state: dict[str, Any]) -> str | None:
    """Why ``state`` does not load into a model with ``model_state``: the first key of each kind of problem."""
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    resized = [k for k in model_state if k in state and tuple(state[k].shape) != tuple(model_state[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), the first {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), the first {unexpected[0]!r}")
    if resized:
        k = resized[0]
        problems.append(
            f"{len(resized)} of another shape, the first {k!r}: {list(state[k].shape)} in the checkpoint, "
            f"{list(model_state[k].shape)} in the model"
        )
    return "; ".join(problems) or None


def _select_weights(ckpt: dict[str, Any], weights: str, path: Path) -> tuple[dict[str, Any], str]:
    has_ema = "current_model_state" in ckpt
    if weights == "ema" and not has_ema:
        raise ExportError(
            f"--ema: {path} holds no EMA weights (no 'current_model_state': the run had no EMAWeightAveraging "
            "callback, or the checkpoint was written after fit ended); use --raw or the default"
        )
    if weights == "raw":
        return (ckpt["current_model_state"] if has_ema else ckpt["state_dict"]), "raw"
    return ckpt["state_dict"], ("EMA" if has_ema else "raw")


def _network_state(module_state: dict[str, Any]) -> dict[str, Any]:
    """The timm network's entries of a MaskSubModule state dict (prefix ``model.``), without sub-branch extras."""
    state = {k[len("model.") :]: v for k, v in module_state.items() if k.startswith("model.")}
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in _SUB_BRANCH_KEYS}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _run_dir(ckpt_path: Path) -> Path:
    """The run's log folder: checkpoints live in ``<log_dir>/checkpoints/`` (Lightning's default layout)."""
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def _val_top1(ckpt: dict[str, Any], run_dir: Path) -> float | None:
    """val_acc1 of the checkpoint's epoch from the run's metrics.csv, else a ModelCheckpoint's score."""
    epoch = ckpt.get("epoch")
    for metrics in sorted(run_dir.glob("metrics.csv")):
        found = None
        with metrics.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("val_acc1") and row.get("epoch") not in (None, "") and int(row["epoch"]) <= epoch:
                    found = float(row["val_acc1"])
        if found is not None:
            return found
    for name, state in (ckpt.get("callbacks") or {}).items():
        if "ModelCheckpoint" in name and isinstance(state, dict) and state.get("monitor") == "val_acc1":
            score = state.get("current_score")
            if score is not None:
                return float(score)
    return None


def _read_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    with path.open() as f:
        config = yaml.safe_load(f)
    return config if isinstance(config, dict) else None


def _data_description(ckpt: dict[str, Any], config: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """(DataModule class, its init arguments) from the run's config.yaml, else from the checkpoint."""
    data = (config or {}).get("data")
    if isinstance(data, dict) and "class_path" in data:
        return data["class_path"], dict(data.get("init_args") or {})
    hparams = dict(ckpt.get("datamodule_hyper_parameters") or {})
    names = [k for k in ckpt if isinstance(k, str) and k.endswith("DataModule")]
    return (names[0] if names else "unknown"), hparams


def _card(info: dict[str, Any]) -> str:
    hp = info["hparams"]
    lines = [
        f"# {info['architecture']} trained with MaskSub",
        "",
        f"A timm `{info['architecture']}` ({info['num_classes']} classes, input {info['input']}) trained with "
        "[masksub-lightning](https://arxiv.org/abs/2306.11339) (MaskSub: a sub-branch on masked inputs trained to "
        "match the main branch). Exported by `masksub export` from a Lightning checkpoint.",
        "",
        "## Load",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("local-dir:{info["out_dir"]}", pretrained=True).eval()',
        "```",
        "",
        "## Training",
        "",
        f"- weights: {info['weights']} (checkpoint `{info['checkpoint']}`, epoch {info['epoch']}, "
        f"{info['global_step']} optimizer steps)",
        f"- validation top-1 at that epoch: {info['val_top1']}",
        f"- sub-branch: `{hp.get('sub_branch', 'object')}` at ratio {hp.get('sub_ratio')} "
        f"(`none` = the baseline without a sub-branch)",
        f"- model_kwargs: `{json.dumps(_jsonable(hp.get('model_kwargs') or {}))}`",
        f"- loss `{hp.get('loss')}`, optimizer `{hp.get('optimizer')}` at lr {hp.get('lr')}, weight decay "
        f"{hp.get('weight_decay')}, schedule `{hp.get('scheduler')}`, warmup epochs {hp.get('warmup_epochs')}, "
        f"grad accumulation {hp.get('grad_accumulation', 1)}",
        f"- data: `{info['data_class']}` with `{json.dumps(_jsonable(info['data_args']), default=str)}`",
    ]
    if info["has_config"]:
        lines += [
            "",
            "Trained by `masksub fit` with the resolved configuration in `config.yaml` (next to this card); "
            "the same run again: `masksub fit --config config.yaml`.",
        ]
    else:
        lines += ["", "The run's `config.yaml` was not found next to the checkpoint (trained from Python?)."]
    return "\n".join(lines) + "\n"


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    weights: Literal["auto", "ema", "raw"] = "auto",
    overwrite: bool = False,
    trust_sharded: bool = False,
) -> Path:
    """Write the checkpoint's network as a timm model folder (see the module docstring); returns ``out_dir``.

    An MAE / LUT pre-training checkpoint has no classifier: its encoder is written as ``out_dir/encoder.pth``
    (``masksub_lightning.modules.pretraining.export_encoder``, the file ``pretrained_weights`` loads), and that file is
    returned.

    Args:
        checkpoint: a MaskSubModule (or MAEModule / LUTModule) Lightning checkpoint, read with ``weights_only=True``.
        out_dir: the folder to write; must be empty or absent unless ``overwrite``.
        weights: ``ema`` (error if there are none), ``raw``, or ``auto`` (EMA when the checkpoint has them).
        overwrite: replace the files of an existing export in ``out_dir``.
        trust_sharded: read a sharded (FSDP2) checkpoint folder, whose metadata torch unpickles: only your own.

    Raises:
        ExportError: no timm model name in the hyperparameters, ``ema`` without EMA weights, an occupied
            ``out_dir``, or weights that do not fit the rebuilt model.
        ValueError: a bad ``weights`` value.
    """
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'raw', got {weights!r}")
    from timm.models import save_for_hf

    ckpt_path, out = Path(checkpoint), Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"OUT_DIR {str(out)!r} is not empty; choose another folder or pass --overwrite")
    ckpt = _load(ckpt_path, trust_sharded)
    if _pretraining_class(ckpt) is not None:
        return _export_encoder(ckpt_path, out, weights)
    hp = dict(ckpt["hyper_parameters"])
    model, name, num_classes, model_kwargs = _rebuild(ckpt, hp, ckpt_path)
    state, kind = _select_weights(ckpt, weights, ckpt_path)
    state = _network_state(state)
    problem = _misfit(model.state_dict(), state)
    if problem:
        raise ExportError(
            f"the weights of {ckpt_path} do not fit {name} as the checkpoint describes it: {problem}"
        )
    model.load_state_dict(state, strict=True)
    model.eval()

    run_dir = _run_dir(ckpt_path)
    config = _read_config(run_dir)
    data_class, data_args = _data_description(ckpt, config)
    out.mkdir(parents=True, exist_ok=True)
    save_for_hf(
        model,
        str(out),
        model_args={**model_kwargs, "num_classes": num_classes},
        safe_serialization=True,
        data_config=_eval_preprocessing(data_args) or None,
    )
    cfg = _retag_config(out / "config.json")
    if config is not None:
        shutil.copyfile(run_dir / "config.yaml", out / "config.yaml")
    val_top1 = _val_top1(ckpt, run_dir)
    info = {
        "architecture": name,
        "num_classes": num_classes,
        "input": "x".join(str(v) for v in cfg.get("input_size", [])),
        "out_dir": str(out),
        "weights": kind,
        "checkpoint": ckpt_path.name,
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "val_top1": "not logged" if val_top1 is None else f"{val_top1:.4f}",
        "hparams": hp,
        "data_class": data_class,
        "data_args": data_args,
        "has_config": config is not None,
    }
    (out / "README.md").write_text(_card(info))
    return out


def _rebuild(
    ckpt: dict[str, Any], hp: dict[str, Any], ckpt_path: Path
) -> tuple[Any, str, int, dict[str, Any]]:
    """(the timm network the checkpoint describes, its name, class count, model kwargs), freshly initialised."""
    import timm

    name = hp.get("model")
    if not isinstance(name, str):
        raise ExportError(
            f"{ckpt_path} does not name a timm model (the module was built from an nn.Module object); "
            "export needs a run whose `model` was a timm model name"
        )
    num_classes = int(hp["num_classes"])
    model_kwargs = _jsonable(dict(hp.get("model_kwargs") or {}))
    model_kwargs.pop("num_classes", None)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
    return model, name, num_classes, model_kwargs


def _eval_preprocessing(data_args: dict[str, Any]) -> dict[str, Any]:
    """The evaluation preprocessing the network was trained for, as timm data-config keys."""
    data_config = {}
    for arg, key in (
        ("mean", "mean"),
        ("std", "std"),
        ("eval_crop_pct", "crop_pct"),
        ("interpolation", "interpolation"),
    ):
        value = data_args.get(arg)
        if value is not None:
            data_config[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    if ("mean" in data_args or "std" in data_args) and not {"mean", "std"} <= data_config.keys():
        # mean / std None: the DataModule normalised with ImageNet's (or norm_from_model's), not the timm model's
        # own default (0.5 for many ViTs), so write the values it actually used.
        from masksub_lightning.data.base import ImageClassificationDataModule

        mean, std = ImageClassificationDataModule._resolve_norm(
            data_args.get("mean"), data_args.get("std"), data_args.get("norm_from_model")
        )
        data_config["mean"], data_config["std"] = tuple(mean), tuple(std)
    return data_config


def _retag_config(config_path: Path) -> dict[str, Any]:
    """Drop what timm's pretrained config says about timm's own weights (source, licence); tag ``masksub``."""
    exported = json.loads(config_path.read_text())
    cfg = exported.get("pretrained_cfg", {})
    for key in ("license", "hf_hub_id", "origin_url", "paper_ids", "paper_name", "notes"):
        cfg.pop(key, None)
    cfg["tag"] = "masksub"
    config_path.write_text(json.dumps(exported, indent=2) + "\n")
    return cfg


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``masksub export`` (``masksub_lightning.commands.cli`` routes the sub-command here)."""
    parser = argparse.ArgumentParser(
        prog="masksub export",
        description="Write a MaskSubModule checkpoint's network as a timm model folder (config.json, "
        "model.safetensors, README.md) that timm.create_model('local-dir:OUT_DIR', pretrained=True) loads.",
    )
    parser.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="a Lightning checkpoint of a MaskSubModule (or MAE / LUT pre-training) run",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (empty or absent)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--ema", action="store_const", const="ema", dest="weights", help="the EMA weights")
    which.add_argument("--raw", action="store_const", const="raw", dest="weights", help="the raw weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT_DIR")
    parser.add_argument(
        "--trust-sharded",
        action="store_true",
        help="read a sharded (FSDP2) checkpoint folder; torch unpickles its metadata, so only folders you wrote",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = export_checkpoint(
            args.checkpoint, args.out_dir, args.weights or "auto", args.overwrite, args.trust_sharded
        )
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"masksub export: error: {err}\n")
    if out.is_file():  # a pre-training checkpoint's encoder
        print(
            f"exported the pre-trained encoder of {args.checkpoint} to {out} (timm key names, no decoder or "
            f"classifier): fine-tune from it with --model.init_args.pretrained_weights {out}"
        )
        return
    print(
        f"exported {args.checkpoint} to {out} (load: timm.create_model('local-dir:{out}', pretrained=True))"
    )
