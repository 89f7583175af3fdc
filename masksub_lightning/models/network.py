"""Building the network and the few one-off changes recipes make to it after it is built.

Everything here runs once, when the module is constructed, and acts on a plain timm model (or any ``nn.Module``
classifier); nothing here is involved in a training step.

* :func:`create_network`: a timm model by name (or a given module), checked against ``num_classes``.
* :func:`classifier_modules` / :func:`classifier_names`: which modules are the classifier head (the one helper the
  package uses for that question); :func:`head_width`: how many outputs it has.
* :func:`set_drop_path_profile`: per-block stochastic-depth rates, "linear" (timm's ramp from 0) or "constant"
  (every block at the full rate, as the DeiT-III code builds its models).
* :func:`init_classifier`: re-initialise the head with a small normal std (MAE and FT-CLIP fine-tuning).
* :func:`freeze`: stop training the parameters under some module names (FT-CLIP freezes the patch embedding).
* :func:`linear_probe_head`: MAE's linear probe: a BatchNorm before the classifier, everything else frozen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import timm
from timm.layers import DropPath
from torch import nn

#: Per-block drop-path profiles: "linear" keeps timm's ramp, "constant" gives every block the full rate.
DROP_PATH_PROFILES = ("linear", "constant")


def create_network(model: str | nn.Module, num_classes: int, model_kwargs: dict[str, Any]) -> nn.Module:
    """Build a timm model by name, or check a given module; either way its head must have ``num_classes``."""
    if isinstance(model, str):
        if "num_classes" in model_kwargs and model_kwargs["num_classes"] != num_classes:
            raise ValueError(
                f"model_kwargs num_classes={model_kwargs['num_classes']} differs from num_classes={num_classes}"
            )
        if not timm.is_model(model):
            close = timm.list_models(f"*{model.split('.')[0][:12]}*")[:8]
            hint = f"; similar names: {', '.join(close)}" if close else "; see timm.list_models()"
            raise ValueError(f"unknown timm model {model!r}{hint}")
        model = timm.create_model(model, **{**model_kwargs, "num_classes": num_classes})
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be a timm model name or an nn.Module, got {type(model).__name__}")
    elif model_kwargs:
        raise ValueError("model_kwargs only apply when model is a timm model name")
    width = head_width(model)
    if width is None:  # e.g. a timm model built with num_classes=0: its own count is all there is to check
        size = getattr(model, "num_classes", None)
        width = size if isinstance(size, int) and not isinstance(size, bool) else None
    if width is not None and width != num_classes:
        raise ValueError(
            f"the model's classifier head has {width} outputs but num_classes={num_classes}: give num_classes="
            f"{width} or a model whose head has {num_classes} outputs"
        )
    return model


# ------------------------------------------------------------------------------------------------- classifier
def classifier_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The classifier head's modules by qualified name, from ``get_classifier()`` and ``pretrained_cfg``.

    timm names the head in ``pretrained_cfg["classifier"]`` (``head``, ``fc``, ``head.fc``, a list for
    distilled models) and returns it from ``get_classifier()``; either source is enough. A head timm replaced by
    ``nn.Identity`` (``num_classes=0``) is still listed. Models from elsewhere: a top-level ``head``, ``fc`` or
    ``classifier``.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    named = cfg.get("classifier") if isinstance(cfg, dict) else None
    names = {named} if isinstance(named, str) else {n for n in (named or ()) if isinstance(n, str)}
    heads = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else ()
    head_ids = {
        id(h) for h in (heads if isinstance(heads, (list, tuple)) else (heads,)) if isinstance(h, nn.Module)
    }
    found = {name: m for name, m in model.named_modules() if name and (name in names or id(m) in head_ids)}
    if not found:
        found = {name: m for name, m in model.named_children() if name in ("head", "fc", "classifier")}
    return found


def classifier_names(model: nn.Module) -> list[str]:
    """Qualified module names of the classifier head (see :func:`classifier_modules`)."""
    return sorted(classifier_modules(model))


def head_width(model: nn.Module) -> int | None:
    """Number of outputs of the classifier head (:func:`classifier_modules`), or None when it cannot be told.

    A head's width is that of its last linear / convolution layer (a bare ``nn.Linear`` or ``nn.Conv2d``, or the
    last one inside a ``Sequential`` or timm head block). None for a head without one (``nn.Identity``: timm's
    ``num_classes=0``, an encoder) and for a model without a head this finds.
    """
    for module in classifier_modules(model).values():
        width = _last_layer_width(module)
        if width is not None:
            return width
    return None


def _last_layer_width(module: nn.Module) -> int | None:
    width = None
    for layer in module.modules():  # definition order: the last layer defined is taken as the output layer
        if isinstance(layer, nn.Linear):
            width = layer.out_features
        elif isinstance(layer, nn.modules.conv._ConvNd):
            width = layer.out_channels
    return width


def init_classifier(model: nn.Module, std: float) -> list[str]:
    """Re-initialise every linear classifier: weight ~ trunc_normal(std), bias 0. Returns the names changed.

    The truncation bounds stay at timm's / torch's absolute default (+-2), as in the MAE fine-tuning code, so for
    a small std this is a plain normal draw. FT-CLIP's "timm init (std 0.02) scaled by 0.001" is the same
    distribution as std 2e-5.
    """
    changed = []
    for name, module in classifier_modules(model).items():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            changed.append(name)
    if not changed:
        raise ValueError(
            f"head_init_std needs a linear classifier head; {type(model).__name__} has "
            f"{classifier_names(model) or 'none found by get_classifier()'}"
        )
    return changed


# ------------------------------------------------------------------------------------------------- drop-path
def drop_path_slots(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module | None]]:
    """(owner, attribute, value) for every ``drop_path*`` slot of every block: a DropPath, an Identity or None.

    timm builds ``nn.Identity`` (or leaves ``None``) where a block's stochastic-depth rate is 0.
    """
    for module in model.modules():
        names = set(module._modules) | {k for k, v in vars(module).items() if v is None}
        for attr in sorted(names):
            if attr.startswith("drop_path"):
                value = getattr(module, attr)
                if value is None or isinstance(value, (DropPath, nn.Identity)):
                    yield module, attr, value


def drop_path_rates(model: nn.Module) -> list[float]:
    """Per-slot stochastic-depth rates in module order (0 for Identity / None slots)."""
    return [float(v.drop_prob) if isinstance(v, DropPath) else 0.0 for _, _, v in drop_path_slots(model)]


def set_drop_path_profile(model: nn.Module, profile: str, rate: float | None = None) -> None:
    """Give the blocks the ``profile`` of stochastic-depth rates.

    Args:
        model: the built network.
        profile: ``linear`` leaves timm's ramp (0 at the first block to ``rate`` at the last) untouched;
            ``constant`` sets every block to ``rate``, replacing identity slots by ``DropPath`` (same state dict).
        rate: the full rate; default the largest rate timm built (its ramp ends at ``drop_path_rate``).
    """
    if profile not in DROP_PATH_PROFILES:
        raise ValueError(f"drop_path_profile must be one of {', '.join(DROP_PATH_PROFILES)}, got {profile!r}")
    if profile == "linear":
        return
    slots = list(drop_path_slots(model))
    if not slots:
        raise ValueError(
            f"drop_path_profile='constant' needs a model with per-block drop-path slots; {type(model).__name__} "
            "has none"
        )
    full = max(drop_path_rates(model)) if rate is None else float(rate)
    for owner, attr, _ in slots:
        setattr(owner, attr, DropPath(full) if full > 0 else nn.Identity())


# ------------------------------------------------------------------------------------------------- freezing
def freeze(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Set ``requires_grad=False`` on every parameter at or under the module names ``prefixes``.

    Returns the frozen parameter names. Each prefix must match at least one parameter, so a typo is an error.
    """
    names = [name for name, _ in model.named_parameters()]
    frozen: list[str] = []
    for prefix in prefixes:
        matched = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"freeze: {prefix!r} matches no parameter; top-level modules: {', '.join(tops)}")
        frozen += matched
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


def linear_probe_head(model: nn.Module) -> str:
    """Turn ``model`` into MAE's linear probe; returns the qualified name of the (new) head.

    The linear classifier becomes ``Sequential(BatchNorm1d(in_features, affine=False, eps=1e-6), classifier)``
    (facebookresearch/mae ``main_linprobe.py``: the normalisation that lets one learning rate suit any encoder's
    feature scale), and every parameter outside it gets ``requires_grad=False``.
    """
    linear = {name: m for name, m in classifier_modules(model).items() if isinstance(m, nn.Linear)}
    if len(linear) != 1:
        raise ValueError(
            f"linear_probe needs one linear classifier head; {type(model).__name__} has "
            f"{classifier_names(model) or 'none found by get_classifier()'}"
        )
    name, classifier = next(iter(linear.items()))
    head = nn.Sequential(nn.BatchNorm1d(classifier.in_features, affine=False, eps=1e-6), classifier)
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, head)
    for key, param in model.named_parameters():
        if not key.startswith(name + "."):
            param.requires_grad_(False)
    return name


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars (for logs and tests)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
