"""Load a local pre-trained weights file into a timm model, whatever recipe produced it.

MaskSub fine-tunes from three kinds of pre-trained networks (see ``docs/method.md``): an MAE encoder, a CLIP image
tower, or a DeiT-III model trained at a lower resolution. :func:`load_pretrained` reads any of them (and any timm
checkpoint) from a local file, converts it to the target model's key names and shapes, loads it, and returns a
:class:`LoadReport` saying what was loaded, renamed, resized, dropped and left missing.

Files (local only, nothing is downloaded):

* ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``: ``torch.load(..., map_location="cpu", weights_only=True)``. An
  untrusted file is data, not code: a pickle that holds anything but tensors and plain containers is refused
  (``argparse.Namespace``, which MAE / DeiT training checkpoints keep under ``"args"``, is the one class allowed).
* ``.safetensors``: ``safetensors.torch.load_file``.

Containers and prefixes unwrapped:

* ``{"model": sd}``: MAE and DeiT-III official checkpoints; ``{"state_dict": sd}``: Lightning checkpoints;
  ``{"module": sd}``: DeepSpeed.
* ``model.``: the MaskSubModule stores its network as attribute ``model``, so a Lightning checkpoint's keys read
  ``model.blocks.0...``; the prefix is stripped and the module's other tensors (loss buffers, ...) are dropped.
* ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``).

Formats (``source``; ``"auto"`` picks one from the keys, see :func:`detect_source`):

========= ==========================================================================================================
``mae``   facebookresearch/mae pre-training checkpoint: encoder keys already in timm names (``cls_token``,
          ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.*``, ``norm``) plus the decoder (``mask_token``,
          ``decoder_embed``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``), which is
          dropped and reported. MAE fine-tuned checkpoints (``fc_norm``, ``head``) load as plain timm checkpoints.
``clip``  a CLIP image tower in timm layout (``norm_pre``, ``head`` = the projection), or an OpenAI / OpenCLIP state
          dict (``visual.*`` keys, the text tower is dropped), converted by timm's own filter.
``deit3`` facebookresearch/deit DeiT-III checkpoint: timm names except LayerScale ``blocks.{i}.gamma_1/2``, which
          become ``blocks.{i}.ls1.gamma`` / ``ls2.gamma``; ``pos_embed`` has no class-token slot (timm's
          ``no_embed_class=True``).
``timm``  any timm state dict, no format-specific conversion.
========= ==========================================================================================================

Adapting to the target model, in order::

    file -> unwrap containers / prefixes -> format conversion (mae | clip | deit3)
         -> final norm: norm.* -> fc_norm.* when the model pools with fc_norm (global_pool="avg", MAE fine-tuning)
         -> pos_embed class-token slot added / folded into cls_token if the layouts differ (exact)
         -> timm's checkpoint_filter_fn of the model's module (pos_embed / patch kernel resampling, OpenAI CLIP, ...)
         -> pos_embed / patch kernel resampled for models whose module has no filter
         -> classifier: the checkpoint's head is dropped when its shape differs (the model keeps its fresh head)
         -> coverage check (>= 50 % of the non-head tensors) -> strict_encoder check -> load_state_dict

Example::

    model = timm.create_model("vit_base_patch16_224", num_classes=100, global_pool="avg", drop_path_rate=0.1)
    report = load_pretrained(model, "mae_pretrain_vit_base.pth")
    print(report)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

__all__ = ["SUPPORTED_SUFFIXES", "LoadReport", "Source", "detect_source", "load_pretrained"]

_logger = logging.getLogger(__name__)

Source = Literal["auto", "timm", "mae", "clip", "deit3"]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_SAFETENSORS_SUFFIXES = (".safetensors",)
SUPPORTED_SUFFIXES: tuple[str, ...] = _TORCH_SUFFIXES + _SAFETENSORS_SUFFIXES

# Containers unwrapped, in order of preference, when the loaded object is not itself a flat tensor dict.
_CONTAINER_KEYS = ("state_dict", "model", "module")
# Key prefixes added by wrappers around the network (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Attribute under which the MaskSubModule (a LightningModule) stores its network.
_LIGHTNING_PREFIX = "model."
# A checkpoint must cover at least this fraction of the model's non-classifier tensors.
_MIN_COVERAGE = 0.5
# How many key names a log line / error message lists before "... and N more".
_SHOW = 8

_GAMMA_RE = re.compile(r"^(.*)\.gamma_([12])$")


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _head_of_list(keys: Iterable[str], n: int = _SHOW) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    shown = ", ".join(keys[:n])
    return shown if len(keys) <= n else f"{shown}, ... and {len(keys) - n} more"


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with each tensor.

    Attributes:
        path: The file read.
        source: The format the checkpoint was read as (``"auto"`` resolved by :func:`detect_source`).
        loaded_keys: Model keys that received a checkpoint tensor.
        missing_keys: Model keys left at their initial values (includes a replaced classifier).
        unexpected_keys: Checkpoint keys (after conversion) with no counterpart in the model and no known reason.
        dropped_keys: Checkpoint keys deliberately not loaded, mapped to the reason (MAE decoder, classifier of
            another shape, text tower, ...).
        resized_keys: Model keys whose checkpoint tensor was resampled, mapped to ``(checkpoint_shape, new_shape)``.
        renamed_keys: Checkpoint key -> model key for renames done here (LayerScale gamma, norm -> fc_norm).
        head_keys: The model's classifier keys (never required by ``strict_encoder``).
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
    notes: list[str] = field(default_factory=list)

    @property
    def missing_encoder_keys(self) -> list[str]:
        """Missing keys outside the classifier: these are the ones that deserve attention."""
        head = set(self.head_keys)
        return [k for k in self.missing_keys if k not in head]

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
            lines.append(f"  resized ({len(items)}): {_head_of_list(items)}")
        if self.renamed_keys:
            items = [f"{a} -> {b}" for a, b in self.renamed_keys.items()]
            lines.append(f"  renamed ({len(items)}): {_head_of_list(items)}")
        if self.dropped_keys:
            by_reason: dict[str, list[str]] = {}
            for key, reason in self.dropped_keys.items():
                by_reason.setdefault(reason, []).append(key)
            lines.append(f"  dropped ({len(self.dropped_keys)}):")
            lines.extend(f"    {reason}: {_head_of_list(keys)}" for reason, keys in by_reason.items())
        head_missing = [k for k in self.missing_keys if k in set(self.head_keys)]
        if head_missing:
            lines.append(
                f"  classifier kept from the model (freshly initialised): {_head_of_list(head_missing)}"
            )
        lines.append(
            f"  missing ({len(self.missing_encoder_keys)}): {_head_of_list(self.missing_encoder_keys)}"
        )
        lines.append(f"  unexpected ({len(self.unexpected_keys)}): {_head_of_list(self.unexpected_keys)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Reading files


def _read_file(path: Path) -> Any:
    """Deserialize ``path`` without running code from it."""
    suffix = path.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        # Namespace only holds attributes; MAE / DeiT training checkpoints store their argparse args in it.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(
            f"Refused to load {path}: it contains objects other than tensors and plain containers, and a "
            "pickle can run arbitrary code, so it is loaded with torch.load(weights_only=True). If you trust the "
            "file, re-save just its state dict (torch.save(obj['model'], ...)) or convert it to .safetensors. "
            f"torch said: {str(err).splitlines()[0]}"
        ) from err


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _unwrap_container(obj: Any, path: Path) -> tuple[dict[str, Any], list[str]]:
    """Descend through ``{"state_dict" | "model" | "module": ...}`` wrappers to the state dict.

    Returns:
        The state dict (values not yet checked) and the container keys followed, outermost first.
    """
    trail: list[str] = []
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                trail.append(key)
                break
        else:
            break
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)."
        )
    return dict(obj), trail


def _strip_prefixes(
    sd: dict[str, Any], model_keys: set[str], dropped: dict[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """Remove wrapper prefixes the target model does not have itself.

    ``model.`` (the LightningModule attribute) is stripped when at least half of the keys carry it; keys without it
    belong to other attributes of the LightningModule and are dropped. ``module.`` / ``_orig_mod.`` are stripped
    wherever they lead a key.
    """
    stripped: list[str] = []
    changed = True
    while changed:
        changed = False
        if not any(k.startswith(_LIGHTNING_PREFIX) for k in model_keys):
            with_prefix = [k for k in sd if k.startswith(_LIGHTNING_PREFIX)]
            if with_prefix and 2 * len(with_prefix) >= len(sd):
                for k in sd:
                    if not k.startswith(_LIGHTNING_PREFIX):
                        dropped[k] = "outside the LightningModule's `model` attribute"
                sd = {
                    k[len(_LIGHTNING_PREFIX) :]: v for k, v in sd.items() if k.startswith(_LIGHTNING_PREFIX)
                }
                stripped.append(_LIGHTNING_PREFIX)
                changed = True
        for prefix in _WRAPPER_PREFIXES:
            if any(k.startswith(prefix) for k in model_keys):
                continue
            if any(k.startswith(prefix) for k in sd):
                sd = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}
                stripped.append(prefix)
                changed = True
    return sd, stripped


# --------------------------------------------------------------------------------------------------------------------
# Formats


def detect_source(state_dict: Mapping[str, Any]) -> str:
    """Guess which format a (container-free, prefix-free) state dict is in.

    Args:
        state_dict: Checkpoint tensors by name.

    Returns:
        ``"mae"`` when it holds an MAE decoder (``decoder_*`` keys), ``"deit3"`` when it holds LayerScale
        ``gamma_1`` / ``gamma_2``, ``"clip"`` for ``visual.*`` (OpenAI / OpenCLIP) keys or a ``norm_pre`` layer,
        otherwise ``"timm"``.
    """
    keys = list(state_dict)
    if any(k.startswith("decoder_") for k in keys):
        return "mae"
    if any(_GAMMA_RE.match(k) for k in keys):
        return "deit3"
    if any(k.startswith("visual.") for k in keys) or any(k.startswith("norm_pre.") for k in keys):
        return "clip"
    return "timm"


def _convert_mae(sd: dict[str, Tensor], dropped: dict[str, str]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        if k.startswith("decoder_") or k == "mask_token":
            dropped[k] = "MAE decoder (pre-training only)"
        else:
            out[k] = v
    return out


def _convert_deit3(sd: dict[str, Tensor], model_keys: set[str], renamed: dict[str, str]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        m = _GAMMA_RE.match(k)
        new = f"{m.group(1)}.ls{m.group(2)}.gamma" if m else k
        if m and new in model_keys:
            renamed[k] = new
            k = new
        out[k] = v
    return out


def _convert_clip(sd: dict[str, Tensor], dropped: dict[str, str]) -> dict[str, Tensor]:
    if not any(k.startswith("visual.") for k in sd):
        return sd  # already the timm image tower layout
    out = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            out[k] = v  # converted by timm's checkpoint_filter_fn
        else:
            dropped[k] = "CLIP text tower / not part of the image tower"
    return out


def _map_final_norm(sd: dict[str, Tensor], model: nn.Module, renamed: dict[str, str]) -> dict[str, Tensor]:
    """``norm.*`` -> ``fc_norm.*`` for models that pool first and normalise after (timm ``global_pool="avg"``)."""
    fc_norm, norm = getattr(model, "fc_norm", None), getattr(model, "norm", None)
    if not (isinstance(fc_norm, nn.LayerNorm) and isinstance(norm, nn.Identity)):
        return sd
    if any(k.startswith("fc_norm.") for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        if k.startswith("norm."):
            new = "fc_" + k
            renamed[k] = new
            k = new
        out[k] = v
    return out


def _perfect_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _fix_pos_embed_layout(sd: dict[str, Tensor], model: nn.Module, notes: list[str]) -> None:
    """Make the checkpoint's class-token slot in ``pos_embed`` match the model's (both conversions are exact).

    timm ViTs add ``pos_embed`` either to the class token too (one slot for it, the usual layout) or only to the
    patch tokens (``no_embed_class=True``: DeiT-III). Only single-class-token models are handled, and only when the
    checkpoint's token count is a square grid in the other layout and not in the model's.
    """
    pe, cls = sd.get("pos_embed"), sd.get("cls_token")
    model_pe = getattr(model, "pos_embed", None)
    if not (
        isinstance(pe, Tensor) and isinstance(cls, Tensor) and isinstance(model_pe, Tensor) and pe.ndim == 3
    ):
        return
    if getattr(model, "num_prefix_tokens", None) != 1 or not getattr(model, "has_class_token", False):
        return
    model_slots = 0 if getattr(model, "no_embed_class", False) else 1
    n = pe.shape[1]
    if _perfect_square(n - model_slots) or n == model_pe.shape[1]:
        return  # consistent with the model's layout
    if model_slots == 0 and _perfect_square(n - 1):
        # x = [cls + p_cls, patches + p] == [cls', patches + p] with cls' = cls + p_cls.
        sd["cls_token"] = cls + pe[:, :1]
        sd["pos_embed"] = pe[:, 1:]
        notes.append(
            "pos_embed had a class-token slot and the model has no_embed_class=True: folded it into cls_token"
        )
    elif model_slots == 1 and _perfect_square(n):
        # x = [cls, patches + p] == [cls, patches] + [0, p].
        sd["pos_embed"] = torch.cat([torch.zeros_like(pe[:, :1]), pe], dim=1)
        notes.append(
            "pos_embed had no class-token slot (no_embed_class layout, DeiT-III) and the model has one: added a "
            "zero slot (for an exact DeiT-III architecture use timm's deit3_* models)"
        )


def _timm_filter_fn(model: nn.Module) -> Callable[..., dict[str, Tensor]] | None:
    """``checkpoint_filter_fn`` of the timm module defining the model's class (or a base class)."""
    for cls in type(model).__mro__:
        module_name = getattr(cls, "__module__", "")
        if not module_name.startswith("timm.models."):
            continue
        fn = getattr(sys.modules.get(module_name), "checkpoint_filter_fn", None)
        if callable(fn):
            return fn
    return None


def _resample_pos_embed(v: Tensor, model: nn.Module) -> Tensor | None:
    """Resample an absolute ``pos_embed`` to the model's patch grid, or None when it cannot be done."""
    from timm.layers import resample_abs_pos_embed

    model_pe = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not isinstance(model_pe, Tensor) or grid is None or v.ndim != 3 or v.shape[-1] != model_pe.shape[-1]:
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    if model_pe.shape[1] != grid[0] * grid[1] + prefix or not _perfect_square(v.shape[1] - prefix):
        return None
    return resample_abs_pos_embed(v, new_size=list(grid), num_prefix_tokens=prefix, verbose=True)


def _resample_patch_kernel(v: Tensor, target: Tensor) -> Tensor | None:
    from timm.layers import resample_patch_embed

    if v.ndim != 4 or target.ndim != 4 or v.shape[:2] != target.shape[:2]:
        return None
    return resample_patch_embed(v, list(target.shape[-2:]), verbose=True)


# --------------------------------------------------------------------------------------------------------------------
# Classifier


def _classifier_prefixes(model: nn.Module) -> list[str]:
    """Module names of the model's classifier(s), from ``pretrained_cfg`` and ``get_classifier()``."""
    names: set[str] = set()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    clf = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(clf, str):
        names.add(clf)
    elif isinstance(clf, (list, tuple)):
        names.update(c for c in clf if isinstance(c, str))
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        heads = get_classifier()
        heads = heads if isinstance(heads, (list, tuple)) else (heads,)
        ids = {id(h) for h in heads if isinstance(h, nn.Module)}
        names.update(name for name, mod in model.named_modules() if name and id(mod) in ids)
    return sorted(names)


def _is_under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


# --------------------------------------------------------------------------------------------------------------------
# Public entry point


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    source: Source = "auto",
    strict_encoder: bool = False,
) -> LoadReport:
    """Load a local MAE / CLIP / DeiT-III / timm checkpoint into ``model`` (in place).

    Args:
        model: The target network (normally a timm model built with the fine-tuning recipe's arguments: its own
            ``num_classes``, ``img_size``, ``global_pool``, ...).
        path: A ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` / ``.safetensors`` file.
        source: The checkpoint's format, or ``"auto"`` to detect it from the key names (:func:`detect_source`).
        strict_encoder: Raise when any model tensor outside the classifier gets no checkpoint tensor.

    Returns:
        A :class:`LoadReport`; ``str(report)`` is a readable summary.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Unknown suffix or source, a file that is not a state dict, or a checkpoint that covers less than
            half of the model's non-classifier tensors (probably the wrong model name or source).
        pickle.UnpicklingError: The pickle holds objects other than tensors and plain containers.
        RuntimeError: ``strict_encoder=True`` and some non-classifier tensors are missing.
    """
    path = Path(path)
    if source not in get_args(Source):
        raise ValueError(f"Unknown source {source!r}; expected one of {', '.join(get_args(Source))}.")
    if not path.is_file():
        raise FileNotFoundError(f"Pre-trained weights file not found: {path}")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"Unsupported weights file suffix {path.suffix!r} ({path}); expected one of "
            f"{', '.join(SUPPORTED_SUFFIXES)}."
        )

    model_sd = model.state_dict()
    model_keys = set(model_sd)
    dropped: dict[str, str] = {}
    renamed: dict[str, str] = {}
    notes: list[str] = []

    sd, trail = _unwrap_container(_read_file(path), path)
    if trail:
        notes.append(f"unwrapped container {' -> '.join(repr(t) for t in trail)}")
    for k in [k for k, v in sd.items() if not isinstance(v, Tensor)]:
        dropped[k] = f"not a tensor ({type(sd.pop(k)).__name__})"
    sd, stripped = _strip_prefixes(sd, model_keys, dropped)
    if stripped:
        notes.append(f"stripped key prefix(es) {', '.join(repr(p) for p in stripped)}")

    resolved = detect_source(sd) if source == "auto" else source
    if resolved == "mae":
        sd = _convert_mae(sd, dropped)
    elif resolved == "deit3":
        sd = _convert_deit3(sd, model_keys, renamed)
    elif resolved == "clip":
        sd = _convert_clip(sd, dropped)
    sd = _map_final_norm(sd, model, renamed)
    original_shapes = {k: _shape(v) for k, v in sd.items()}
    _fix_pos_embed_layout(sd, model, notes)

    # timm's own conversions for the model's family (resampling, OpenAI CLIP names, ...); idempotent on timm keys.
    filter_fn = _timm_filter_fn(model)
    if filter_fn is not None:
        before = set(sd)
        fn_name = f"{filter_fn.__module__}.{filter_fn.__name__}"
        try:
            sd = dict(filter_fn(dict(sd), model))
        except Exception as err:
            raise ValueError(
                f"timm's {fn_name} could not convert {path} for {type(model).__name__} (source {resolved!r}): "
                f"{err}. Is the model name / size right for this checkpoint?"
            ) from err
        for k in sorted(before - set(sd)):
            dropped[k] = f"converted or removed by {fn_name}"

    # Generic resampling for what is still mismatched (models without a timm filter).
    for k, v in list(sd.items()):
        target = model_sd.get(k)
        if target is None or _shape(v) == _shape(target):
            continue
        new = None
        if k == "pos_embed":
            new = _resample_pos_embed(v, model)
        elif k.endswith("patch_embed.proj.weight"):
            new = _resample_patch_kernel(v, target)
        if new is not None:
            sd[k] = new

    # Classifier: keep the checkpoint's only when it fits; the model's fresh head otherwise.
    head_prefixes = _classifier_prefixes(model)
    head_keys = [k for k in model_sd if _is_under(k, head_prefixes)]
    for k in [k for k in sd if _is_under(k, head_prefixes)]:
        v = sd[k]
        if k not in model_keys:
            dropped[k] = "classifier the model does not have (e.g. num_classes=0)"
            del sd[k]
        elif _shape(v) != _shape(model_sd[k]):
            dropped[k] = (
                f"classifier of another shape ({list(v.shape)} vs the model's {list(model_sd[k].shape)}, "
                "different num_classes): the model keeps its own freshly initialised head"
            )
            del sd[k]

    # Anything else that still does not fit cannot be loaded.
    mismatched: dict[str, str] = {}
    for k in [k for k in sd if k in model_keys and _shape(sd[k]) != _shape(model_sd[k])]:
        mismatched[k] = f"shape {list(sd[k].shape)} does not match the model's {list(model_sd[k].shape)}"
        del sd[k]
    dropped.update(mismatched)

    resized = {
        k: (original_shapes[k], _shape(v))
        for k, v in sd.items()
        if k in model_keys and k in original_shapes and original_shapes[k] != _shape(v)
    }
    # Model keys in the model's own order (reads like the architecture), checkpoint keys in the file's order.
    loaded = [k for k in model_sd if k in sd]
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_keys]
    report = LoadReport(
        path=str(path),
        source=resolved,
        loaded_keys=loaded,
        missing_keys=missing,
        unexpected_keys=unexpected,
        dropped_keys=dropped,
        resized_keys=resized,
        renamed_keys=renamed,
        head_keys=head_keys,
        notes=notes,
    )
    _add_hints(report, model)

    encoder_keys = [k for k in model_sd if k not in set(head_keys)]
    covered = [k for k in encoder_keys if k in sd]
    if encoder_keys and len(covered) < _MIN_COVERAGE * len(encoder_keys):
        not_in_model = unexpected + [f"{k} ({r})" for k, r in mismatched.items()]
        raise ValueError(
            f"{path} matches only {len(covered)} of the model's {len(encoder_keys)} non-classifier tensors "
            f"(source {resolved!r}, model {type(model).__name__}): probably the wrong model name / size or the "
            f"wrong source. Model keys not in the checkpoint: {_head_of_list(report.missing_encoder_keys, 5)}. "
            f"Checkpoint keys not in the model: {_head_of_list(not_in_model, 5)}."
        )
    if strict_encoder and report.missing_encoder_keys:
        raise RuntimeError(
            f"strict_encoder=True: {len(report.missing_encoder_keys)} non-classifier tensor(s) of the model are "
            f"missing from {path}: {', '.join(report.missing_encoder_keys)}"
        )

    model.load_state_dict({k: sd[k] for k in loaded}, strict=False)

    if report.missing_encoder_keys or report.unexpected_keys:
        _logger.warning(
            "Pre-trained weights %s: %d missing key(s): %s; %d unexpected key(s): %s",
            path,
            len(report.missing_keys),
            _head_of_list(report.missing_keys),
            len(report.unexpected_keys),
            _head_of_list(report.unexpected_keys),
        )
    _logger.info("%s", report)
    return report


def _add_hints(report: LoadReport, model: nn.Module) -> None:
    """Notes for the common mismatches between a recipe's checkpoint and the model built for it."""
    missing = set(report.missing_keys)
    if any(_GAMMA_RE.match(k) or k.endswith((".ls1.gamma", ".ls2.gamma")) for k in report.unexpected_keys):
        report.notes.append(
            "the checkpoint has LayerScale but the model does not: build it with init_values (timm deit3_* models)"
        )
    if any(k.endswith((".ls1.gamma", ".ls2.gamma")) for k in missing):
        report.notes.append("the model has LayerScale (init_values) but the checkpoint does not")
    if any(k.startswith("norm_pre.") for k in report.unexpected_keys):
        report.notes.append(
            "the checkpoint has a pre-norm (CLIP): build the model with pre_norm=True (*_clip_* models)"
        )
    if report.source == "mae" and not isinstance(getattr(model, "fc_norm", None), nn.LayerNorm):
        report.notes.append("MAE fine-tuning pools with global average pooling: consider global_pool='avg'")
