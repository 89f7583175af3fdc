"""Load a local MAE / CLIP / DeiT-III / BEiT / timm weights file into a timm model, on top of timm's own loader.

Steps (each a small function)::

    _read                   timm's load_state_dict (.safetensors, or a pickle read with weights_only=True;
                            "state_dict" / "model" unwrapped; DDP / torch.compile prefixes removed) + DeepSpeed's
                            "module" and the "model." prefix of a MaskSubModule Lightning checkpoint
    _convert_format         mae: decoder dropped; clip: OpenAI text tower dropped; deit3: gamma_1/2 -> ls1/ls2.gamma;
                            beit: the pre-training's shared relative position table copied into every block,
                            relative_position_index, mask_token, lm_head and cls_pt_* dropped
    _fix_pos_embed_layout   class-token slot of pos_embed added / folded into cls_token (exact)
    _apply_timm_filter      the model module's checkpoint_filter_fn: resampling, OpenAI CLIP names, ...
    _select                 norm dropped when the model pools before a fresh fc_norm (MAE fine-tuning), ``exclude``,
                            a classifier of another shape, tensors that do not fit
    model.load_state_dict(strict=False) -> LoadReport

Example::

    model = timm.create_model("vit_base_patch16_224", num_classes=100, global_pool="avg", drop_path_rate=0.1)
    print(load_pretrained(model, "mae_pretrain_vit_base.pth"))
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from timm.models import clean_state_dict, load_state_dict
from torch import Tensor, nn

from masksub_lightning.models import network

__all__ = ["SUPPORTED_SUFFIXES", "LoadReport", "Source", "detect_source", "load_pretrained"]

_logger = logging.getLogger(__name__)

Source = Literal["auto", "timm", "mae", "clip", "deit3", "beit"]
SUPPORTED_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")

_LIGHTNING_PREFIX = "model."  # MaskSubModule stores its network as attribute `model`
_MIN_COVERAGE = 0.5  # a checkpoint must cover this fraction of the model's non-classifier tensors
_SHOW = 8  # key names listed before "... and N more"
_GAMMA_RE = re.compile(r"^(.*)\.gamma_([12])$")
_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"  # BEiT pre-training: one table for every block
_BEIT_PRETRAINING = ("mask_token", "lm_head.", "cls_pt_")  # masked image modelling only (unilm beit2)
_BLOCK_TABLE_RE = re.compile(r"blocks\.(\d+)\.attn\.relative_position_bias_table")
_FRESH_FC_NORM = (
    "the model pools before its norm (norm is Identity): fc_norm is built fresh, as MAE fine-tuning does"
)
_EXCLUDED = "excluded: kept at its fresh initialisation"


def _listed(keys: Iterable[str], n: int = _SHOW) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n]) or "none"
    return shown if len(keys) <= n else f"{shown}, ... and {len(keys) - n} more"


def _is_under(key: str, prefixes: Iterable[str]) -> bool:
    """``key`` is one of the module / tensor names in ``prefixes`` or inside one ("norm" matches "norm.weight")."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with each tensor.

    Attributes:
        path: The file read.
        source: The format the checkpoint was read as (``"auto"`` resolved by :func:`detect_source`).
        loaded_keys: Model keys that received a checkpoint tensor.
        missing_keys: Model keys left at their initial values (includes a replaced classifier and ``kept_fresh``).
        unexpected_keys: Checkpoint keys (after conversion) with no counterpart in the model and no known reason.
        dropped_keys: Checkpoint keys deliberately not loaded, mapped to the reason.
        resized_keys: Model keys whose checkpoint tensor was resampled, mapped to ``(checkpoint_shape, new_shape)``.
        renamed_keys: Checkpoint key -> model key for renames done here (DeiT-III LayerScale gamma).
        head_keys: The model's classifier keys (never required by ``strict_encoder``).
        kept_fresh: Model keys deliberately left at their initialisation (``exclude``; ``fc_norm`` built fresh).
        notes: Conversions worth knowing about, in plain words.
    """

    path: str
    source: str
    loaded_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    dropped_keys: dict[str, str] = field(default_factory=dict)
    resized_keys: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    renamed_keys: dict[str, str] = field(default_factory=dict)
    head_keys: list[str] = field(default_factory=list)
    kept_fresh: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def missing_encoder_keys(self) -> list[str]:
        """Missing keys outside the classifier and not deliberately fresh: the ones that deserve attention."""
        expected = set(self.head_keys) | set(self.kept_fresh)
        return [k for k in self.missing_keys if k not in expected]

    @property
    def head_replaced(self) -> bool:
        """True when the model kept (some of) its own freshly initialised classifier."""
        return any(k in self.missing_keys for k in self.head_keys)

    def __str__(self) -> str:
        total = len(self.loaded_keys) + len(self.missing_keys)
        lines = [
            f"Loaded {len(self.loaded_keys)}/{total} model tensors from {self.path} (source: {self.source})"
        ]
        if self.resized_keys:
            items = [f"{k} {list(a)} -> {list(b)}" for k, (a, b) in self.resized_keys.items()]
            lines.append(f"  resized ({len(items)}): {_listed(items)}")
        if self.renamed_keys:
            items = [f"{a} -> {b}" for a, b in self.renamed_keys.items()]
            lines.append(f"  renamed ({len(items)}): {_listed(items)}")
        if self.dropped_keys:
            by_reason: dict[str, list[str]] = {}
            for key, reason in self.dropped_keys.items():
                by_reason.setdefault(reason, []).append(key)
            lines.append(f"  dropped ({len(self.dropped_keys)}):")
            lines.extend(f"    {reason}: {_listed(keys)}" for reason, keys in by_reason.items())
        head_missing = [k for k in self.missing_keys if k in self.head_keys]
        if head_missing:
            lines.append(f"  classifier kept from the model (freshly initialised): {_listed(head_missing)}")
        if self.kept_fresh:
            lines.append(f"  kept at their fresh initialisation: {_listed(self.kept_fresh)}")
        lines.append(f"  missing ({len(self.missing_encoder_keys)}): {_listed(self.missing_encoder_keys)}")
        lines.append(f"  unexpected ({len(self.unexpected_keys)}): {_listed(self.unexpected_keys)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _read(path: Path, model_keys: set[str], report: LoadReport) -> dict[str, Tensor]:
    """timm's ``load_state_dict`` plus the containers it does not know; refuses pickles that are not just data."""
    try:
        # MAE / DeiT training checkpoints keep their argparse args in a Namespace (attributes only, no code).
        with torch.serialization.safe_globals([argparse.Namespace]):
            # use_ema=False: DeiT-III fine-tunes from the raw weights, not its EMA (docs/method.md).
            sd = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) or isinstance(err.__cause__, pickle.UnpicklingError):
            raise pickle.UnpicklingError(
                f"Refused to load {path}: it holds objects other than tensors and plain containers, and a pickle "
                "can run arbitrary code, so it is read with torch.load(weights_only=True). If you trust the file, "
                "re-save just its state dict (torch.save(obj['model'], ...)) or convert it to .safetensors. "
                f"({str(err).splitlines()[0]})"
            ) from err
        raise ValueError(f"Could not read {path} as a state dict (names -> tensors): {err}") from err
    if isinstance(sd.get("module"), Mapping):  # DeepSpeed
        sd = clean_state_dict(dict(sd["module"]))
    inside = [k for k in sd if k.startswith(_LIGHTNING_PREFIX)]
    if 2 * len(inside) >= len(sd) > 0 and not any(k.startswith(_LIGHTNING_PREFIX) for k in model_keys):
        outside = [k for k in sd if not k.startswith(_LIGHTNING_PREFIX)]
        report.dropped_keys.update(dict.fromkeys(outside, "outside the LightningModule's `model` attribute"))
        sd = clean_state_dict({k[len(_LIGHTNING_PREFIX) :]: sd[k] for k in inside})
    for k in [k for k, v in sd.items() if not isinstance(v, Tensor)]:
        report.dropped_keys[k] = f"not a tensor ({type(sd.pop(k)).__name__})"
    return sd


def detect_source(state_dict: Mapping[str, Any]) -> str:
    """Guess which format a (container-free, prefix-free) state dict is in.

    Returns:
        ``"mae"`` when it holds an MAE decoder (``decoder_*`` keys), ``"beit"`` for relative position bias tables
        or BEiT pre-training heads (``lm_head``, ``cls_pt_*``; BEiT keeps LayerScale as ``gamma_1`` too),
        ``"deit3"`` when it holds LayerScale ``gamma_1`` / ``gamma_2``, ``"clip"`` for ``visual.*`` (OpenAI /
        OpenCLIP) keys or a ``norm_pre`` layer, otherwise ``"timm"``.
    """
    if any(k.startswith("decoder_") for k in state_dict):
        return "mae"
    if _is_beit_layout(state_dict):
        return "beit"
    if any(_GAMMA_RE.match(k) for k in state_dict):
        return "deit3"
    if any(k.startswith(("visual.", "norm_pre.")) for k in state_dict):
        return "clip"
    return "timm"


def _is_beit_layout(state_dict: Mapping[str, Any]) -> bool:
    """A BEiT pre-training file (shared table, masked-image-modelling heads) or a BEiT classifier in timm's names
    (a table per block next to LayerScale ``gamma_1``, which the DeiT-III rule below would otherwise rename)."""
    if _SHARED_TABLE in state_dict or any(k.startswith(("lm_head.", "cls_pt_")) for k in state_dict):
        return True
    return any(_BLOCK_TABLE_RE.fullmatch(k) for k in state_dict) and any(
        _GAMMA_RE.match(k) for k in state_dict
    )


def _convert_format(sd: dict[str, Tensor], report: LoadReport, model_keys: set[str]) -> dict[str, Tensor]:
    """What timm's filter does not know about the MAE / CLIP / DeiT-III / BEiT files; the rest is timm's."""
    drop: dict[str, str] = {}
    if report.source == "beit":
        return _convert_beit(sd, report, model_keys)
    if report.source == "mae":  # facebookresearch/mae pre-training: encoder in timm names + decoder
        drop = {
            k: "MAE decoder (pre-training only)" for k in sd if k.startswith("decoder_") or k == "mask_token"
        }
    elif report.source == "clip" and any(k.startswith("visual.") for k in sd):
        # OpenAI / OpenCLIP: timm's filter converts visual.* and silently ignores the rest.
        drop = {k: "CLIP text tower / not part of the image tower" for k in sd if not k.startswith("visual.")}
    elif report.source == "deit3":  # facebookresearch/deit keeps LayerScale as blocks.{i}.gamma_1 / gamma_2
        report.renamed_keys.update({k: _GAMMA_RE.sub(r"\1.ls\2.gamma", k) for k in sd if _GAMMA_RE.match(k)})
    report.dropped_keys.update(drop)
    return {report.renamed_keys.get(k, k): v for k, v in sd.items() if k not in drop}


def _convert_beit(sd: dict[str, Tensor], report: LoadReport, model_keys: set[str]) -> dict[str, Tensor]:
    """microsoft/unilm BEiT / BEiT v2 pre-training file -> the fine-tuning model's keys.

    As unilm's ``run_class_finetuning.py`` does: a model with a table per block (timm's beit*/beitv2* default)
    gets a copy of the shared ``rel_pos_bias`` table in every ``blocks.i.attn.relative_position_bias_table`` (timm's
    filter would try to resize it into a module the model does not have); the index buffers are rebuilt by the
    model; the masked-image-modelling parts are not part of a classifier.
    """
    drop = {k: "index buffer, rebuilt by the model" for k in sd if "relative_position_index" in k}
    drop.update(
        {k: "BEiT pre-training only (masked image modelling)" for k in sd if k.startswith(_BEIT_PRETRAINING)}
    )
    block_tables = sorted(
        (k for k in model_keys if _BLOCK_TABLE_RE.fullmatch(k)), key=lambda k: int(k.split(".")[1])
    )
    out = {k: v for k, v in sd.items() if k not in drop}
    if _SHARED_TABLE in out and _SHARED_TABLE not in model_keys and block_tables:
        shared = out.pop(_SHARED_TABLE)
        for key in block_tables:
            out[key] = shared.clone()
        drop[_SHARED_TABLE] = (
            f"shared table copied into the {len(block_tables)} blocks' attn.relative_position_bias_table"
        )
        report.notes.append(
            f"BEiT: copied the shared {_SHARED_TABLE} {list(shared.shape)} into each of {len(block_tables)} blocks"
        )
    report.dropped_keys.update(drop)
    return out


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _fix_pos_embed_layout(sd: dict[str, Tensor], model: nn.Module, notes: list[str]) -> None:
    """Give the checkpoint's ``pos_embed`` the model's class-token slot layout (exact both ways).

    timm ViTs add ``pos_embed`` to the class token too (one slot for it) or only to the patch tokens
    (``no_embed_class=True``, DeiT-III); timm's filter resamples but never converts between the two. Done for
    single-class-token models when the token count is a square grid only in the other layout.
    """
    pe, cls, model_pe = sd.get("pos_embed"), sd.get("cls_token"), getattr(model, "pos_embed", None)
    if not (
        isinstance(pe, Tensor) and isinstance(cls, Tensor) and isinstance(model_pe, Tensor) and pe.ndim == 3
    ):
        return
    if getattr(model, "num_prefix_tokens", None) != 1 or not getattr(model, "has_class_token", False):
        return
    slots, n = 0 if getattr(model, "no_embed_class", False) else 1, pe.shape[1]
    if n == model_pe.shape[1] or _is_square(n - slots) or not _is_square(n - 1 + slots):
        return
    if slots == 0:  # [cls + p_cls, patches + p] == [cls', patches + p] with cls' = cls + p_cls
        sd["cls_token"], sd["pos_embed"] = cls + pe[:, :1], pe[:, 1:]
        notes.append(
            "pos_embed had a class-token slot and the model has no_embed_class=True: folded it into cls_token"
        )
    else:  # [cls, patches + p] == [cls, patches] + [0, p]
        sd["pos_embed"] = torch.cat([torch.zeros_like(pe[:, :1]), pe], dim=1)
        notes.append(
            "pos_embed had no class-token slot (no_embed_class layout, DeiT-III) and the model has one: added a "
            "zero slot (for an exact DeiT-III architecture use timm's deit3_* models)"
        )


def _timm_filter_fn(model: nn.Module) -> Callable[..., dict[str, Tensor]] | None:
    """``checkpoint_filter_fn`` of the timm module defining the model's class (or a base class)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("timm.models."):
            fn = getattr(sys.modules.get(cls.__module__), "checkpoint_filter_fn", None)
            if callable(fn):
                return fn
    return None


def _apply_timm_filter(sd: dict[str, Tensor], model: nn.Module, report: LoadReport) -> dict[str, Tensor]:
    """Run the model module's own ``checkpoint_filter_fn`` (resampling, OpenAI CLIP names, ...), if it has one."""
    if report.source == "mae" and not isinstance(getattr(model, "norm", None), nn.Identity):
        report.notes.append("MAE fine-tuning pools with global average pooling: consider global_pool='avg'")
    filter_fn = _timm_filter_fn(model)
    if filter_fn is None:
        return sd
    name = f"{filter_fn.__module__}.{filter_fn.__name__}"
    try:
        filtered = dict(filter_fn(dict(sd), model))
    except Exception as err:
        raise ValueError(
            f"timm's {name} could not convert {report.path} for {type(model).__name__}: {err}"
        ) from err
    removed, added = sorted(sd.keys() - filtered.keys()), filtered.keys() - sd.keys()
    if added:  # renamed (OpenAI CLIP): one note rather than every old name
        report.notes.append(f"{name} converted {len(removed)} tensors to {len(added)} timm names")
    else:
        report.dropped_keys.update(dict.fromkeys(removed, f"removed by {name}"))
    return filtered


def _select(
    sd: dict[str, Tensor],
    model: nn.Module,
    model_sd: dict[str, Tensor],
    exclude: Sequence[str],
    report: LoadReport,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop what must not be loaded (with the reason) and record which model keys stay fresh on purpose.

    Returns:
        The tensors to load and, separately, the ones dropped because their shape does not fit the model.
    """
    drop = {k: _EXCLUDED for k in sd if _is_under(k, exclude)}
    report.kept_fresh = [k for k in model_sd if _is_under(k, exclude)]
    if isinstance(getattr(model, "norm", None), nn.Identity):  # global_pool="avg" with fc_norm
        drop.update({k: _FRESH_FC_NORM for k in sd if _is_under(k, ["norm"])})
        report.kept_fresh += [k for k in model_sd if _is_under(k, ["fc_norm"]) and k not in sd]
    heads = network.classifier_names(model)
    report.head_keys = [k for k in model_sd if _is_under(k, heads)]
    mismatched = {}
    for k, v in sd.items():
        target = model_sd.get(k)
        if k in drop or (target is not None and v.shape == target.shape):
            continue
        if _is_under(k, heads) and target is None:
            drop[k] = "classifier the model does not have (e.g. num_classes=0)"
        elif _is_under(k, heads):
            drop[k] = "classifier of another shape (different num_classes): the model keeps its fresh head"
        elif target is not None:
            mismatched[k] = f"shape {list(v.shape)} does not match the model's {list(target.shape)}"
    report.dropped_keys.update({**drop, **mismatched})
    return {k: v for k, v in sd.items() if k not in drop and k not in mismatched}, mismatched


def _check_coverage(
    sd: dict, model_sd: dict, mismatched: dict[str, str], report: LoadReport, strict: bool
) -> None:
    """Refuse, before anything is loaded, a checkpoint of another architecture (or any gap with ``strict``)."""
    expected = set(report.head_keys) | set(report.kept_fresh)
    encoder = [k for k in model_sd if k not in expected]
    missing = [k for k in encoder if k not in sd]
    if encoder and len(encoder) - len(missing) < _MIN_COVERAGE * len(encoder):
        foreign = [k for k in sd if k not in model_sd] + [f"{k} ({r})" for k, r in mismatched.items()]
        raise ValueError(
            f"{report.path} matches only {len(encoder) - len(missing)} of the model's {len(encoder)} "
            f"non-classifier tensors (source {report.source!r}): probably the wrong model name / size or the wrong "
            f"source. Model keys not in the checkpoint: {_listed(missing, 5)}. Checkpoint keys not in the model: "
            f"{_listed(foreign, 5)}."
        )
    if strict and missing:
        raise RuntimeError(
            f"strict_encoder=True: {len(missing)} non-classifier tensor(s) of the model are missing from "
            f"{report.path}: {', '.join(missing)}"
        )


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    source: Source = "auto",
    exclude: Sequence[str] = (),
    strict_encoder: bool = False,
) -> LoadReport:
    """Load a local MAE / CLIP / DeiT-III / BEiT / timm checkpoint into ``model`` (in place).

    Args:
        model: The target network (normally a timm model built with the fine-tuning recipe's arguments: its own
            ``num_classes``, ``img_size``, ``global_pool``, ...).
        path: A ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` / ``.safetensors`` file.
        source: The checkpoint's format, or ``"auto"`` to detect it from the key names (:func:`detect_source`).
        exclude: Module / tensor names (model names, after conversion) whose checkpoint tensors are not loaded:
            ``["norm"]`` keeps the final norm fresh (``"norm"`` matches ``norm.weight``, not ``norm_pre.weight``).
        strict_encoder: Raise when a model tensor outside the classifier and ``exclude`` gets no checkpoint tensor.

    Returns:
        A :class:`LoadReport`; ``str(report)`` is a readable summary.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Unknown suffix, source or ``exclude`` name, an unreadable file, or a checkpoint that covers less
            than half of the model's non-classifier tensors (probably the wrong model name or source).
        pickle.UnpicklingError: The pickle holds objects other than tensors and plain containers.
        RuntimeError: ``strict_encoder=True`` and some non-classifier tensors are missing.
    """
    path, model_sd = Path(path), model.state_dict()
    _check_arguments(path, source, exclude, model_sd)
    report = LoadReport(path=str(path), source=source)
    sd = _read(path, set(model_sd), report)
    report.source = detect_source(sd) if source == "auto" else source
    sd = _convert_format(sd, report, set(model_sd))
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    _fix_pos_embed_layout(sd, model, report.notes)
    sd = _apply_timm_filter(sd, model, report)
    sd, mismatched = _select(sd, model, model_sd, exclude, report)
    _check_coverage(sd, model_sd, mismatched, report, strict_encoder)

    result = model.load_state_dict(sd, strict=False)
    missing = set(result.missing_keys)
    report.missing_keys = [k for k in model_sd if k in missing]
    report.loaded_keys = [k for k in model_sd if k not in missing]
    report.unexpected_keys = list(result.unexpected_keys)
    resized = {k: (shapes[k], tuple(sd[k].shape)) for k in report.loaded_keys if k in shapes}
    report.resized_keys = {k: (a, b) for k, (a, b) in resized.items() if a != b}
    if report.missing_encoder_keys or report.unexpected_keys:
        _logger.warning(
            "Pre-trained weights %s: %d missing key(s): %s; %d unexpected key(s): %s", path,
            len(report.missing_encoder_keys), _listed(report.missing_encoder_keys),
            len(report.unexpected_keys), _listed(report.unexpected_keys),
        )  # fmt: skip
    _logger.info("%s", report)
    return report


def _check_arguments(path: Path, source: str, exclude: Sequence[str], model_sd: Mapping[str, Tensor]) -> None:
    if source not in get_args(Source):
        raise ValueError(f"Unknown source {source!r}; expected one of {', '.join(get_args(Source))}.")
    if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
        raise ValueError(f"exclude must be a list of module names such as ['norm'], got {exclude!r}")
    if unknown := [e for e in exclude if not any(_is_under(k, [e]) for k in model_sd)]:
        raise ValueError(
            f"exclude names {unknown} match no tensor of the model; its top-level modules are "
            f"{sorted({k.split('.')[0] for k in model_sd})}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"Pre-trained weights file not found: {path}")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"Unsupported weights file suffix {path.suffix!r} ({path}); expected one of "
            f"{', '.join(SUPPORTED_SUFFIXES)}."
        )
