"""The ``masksub recipes`` command: the training recipes under ``configs/`` and the paper number each one targets.

    masksub recipes                      # every recipe: path, model, epochs, sub-branch, target and baseline top-1
    masksub recipes --filter deit3/vit_base
    masksub recipes --json               # everything in the headers, for scripts

A recipe is a YAML config for ``masksub fit --config`` that starts with a comment block like this one, which this
module reads (tests/test_recipes.py checks it against the resolved config, so it cannot drift from the YAML)::

    # recipe:
    #   title: DeiT-III ViT-B/16, 400 ep + 20-ep fine-tune at 224 px + MaskSub
    #   model: ViT-B/16                          display name
    #   epochs: 20                               == trainer.max_epochs
    #   sub_branch: mask                         == model.init_args.sub_branch ("none": the baseline arm;
    #                                               "cosub": the CoSub arm, class_path CoSubModule)
    #   global_batch: 512                        == batch_size x devices x num_nodes x grad_accumulation
    #   top1: {masksub: 84.1, baseline: 83.5}    the paper's ImageNet top-1 of both arms (one may be null), or null;
    #                                               a CoSub recipe's: {cosub: ..., baseline: ...}
    #   paper: docs/method.md headline results, ...   where top1 comes from (or why there is none)
    #   source: docs/method.md "DeiT-III fine-tune at 224" ...   where the hyperparameters come from
    #   twin: deit3/vit_base_400ep_ft224_baseline.yaml      the other arm (same run, other sub-branch)
    #   pretrained_from: deit3/vit_base_400ep.yaml          optional: the recipe whose checkpoint this one loads
    #   result_after: deit3/vit_base_400ep_ft224.yaml       optional: the later stage that yields the paper number

(The right-hand column above is explanation, not part of the header.) Paths are relative to ``configs/``. Files
without such a block (``configs/quickstart*.yaml``, the shared blocks in ``configs/_base/``) are not recipes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Recipe",
    "RecipeHeaderError",
    "default_configs_dir",
    "find_recipes",
    "load_recipe",
    "main",
    "read_header",
]

HEADER_START = "# recipe:"
_REQUIRED = ("title", "model", "epochs", "sub_branch", "global_batch", "top1", "paper", "source", "twin")
_OPTIONAL = ("pretrained_from", "result_after")


class RecipeHeaderError(ValueError):
    """A recipe's header block is missing a key or holds a value of the wrong kind."""


@dataclass(frozen=True)
class Recipe:
    """One recipe: its path under ``configs/`` and the fields of its header block."""

    path: str
    title: str
    model: str
    epochs: int
    sub_branch: str
    global_batch: int
    top1: dict[str, float | None] | None
    paper: str
    source: str
    twin: str
    pretrained_from: str | None = None
    result_after: str | None = None

    @property
    def arm(self) -> str:
        """``"baseline"`` for the run without a sub-branch, ``"cosub"`` for CoSub, else ``"masksub"``."""
        return arm_of(self.sub_branch)

    @property
    def target_top1(self) -> float | None:
        """The paper's top-1 for this recipe's arm (None when the paper number is not recorded here)."""
        return None if self.top1 is None else self.top1[self.arm]

    @property
    def baseline_top1(self) -> float | None:
        """The paper's top-1 of the baseline arm of the same row."""
        return None if self.top1 is None else self.top1["baseline"]

    @property
    def note(self) -> str:
        if self.result_after:
            return f"stage 1: top-1 after {self.result_after}"
        if self.top1 is None:
            return "no paper number in docs/method.md"
        return ""


def arm_of(sub_branch: str) -> str:
    """The arm a recipe with this ``sub_branch`` header trains: ``baseline`` (none), ``cosub`` or ``masksub``."""
    if sub_branch == "none":
        return "baseline"
    return "cosub" if sub_branch == "cosub" else "masksub"


def read_header(path: str | Path) -> dict[str, Any] | None:
    """The ``# recipe:`` comment block of a YAML file as a dict, or None if the file has none.

    The block is the ``# recipe:`` line and the comment lines right after it that are indented by at least two
    spaces after the ``#``; without the leading ``# `` they form a YAML mapping.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip() == HEADER_START)
    except StopIteration:
        return None
    block = []
    for line in lines[start + 1 :]:
        if not line.startswith("#  "):
            break
        block.append(line[2:])
    try:
        header = yaml.safe_load("\n".join(block))
    except yaml.YAMLError as err:
        raise RecipeHeaderError(f"{path}: the '# recipe:' block is not valid YAML: {err}") from err
    if not isinstance(header, dict):
        raise RecipeHeaderError(f"{path}: the '# recipe:' block is empty or not a mapping")
    return header


def load_recipe(path: str | Path, configs_dir: str | Path) -> Recipe:
    """Read and check the header of one recipe file.

    Raises:
        RecipeHeaderError: no header, a missing or unknown key, or a value of the wrong kind; the message names
            the file and the key.
    """
    path = Path(path)
    rel = path.resolve().relative_to(Path(configs_dir).resolve()).as_posix()
    header = read_header(path)
    if header is None:
        raise RecipeHeaderError(f"{rel}: no '{HEADER_START}' header block")

    def fail(message: str) -> RecipeHeaderError:
        return RecipeHeaderError(f"{rel}: {message}")

    missing = [k for k in _REQUIRED if k not in header]
    if missing:
        raise fail(f"header lacks {', '.join(missing)}")
    unknown = sorted(set(header) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise fail(f"unknown header key(s) {', '.join(unknown)}; allowed: {', '.join(_REQUIRED + _OPTIONAL)}")
    for key in ("title", "model", "sub_branch", "paper", "source", "twin"):
        if not isinstance(header[key], str) or not header[key]:
            raise fail(f"{key} must be a non-empty string, got {header[key]!r}")
    for key in ("epochs", "global_batch"):
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(f"{key} must be a positive integer, got {value!r}")
    top1 = header["top1"]
    if top1 is not None:
        method = (
            "cosub" if header["sub_branch"] == "cosub" else "masksub"
        )  # the baseline's row names MaskSub's
        arms = (method, "baseline")
        if not isinstance(top1, dict) or set(top1) != set(arms):
            raise fail(f"top1 must be null or {{{method}: <top-1>, baseline: <top-1>}}, got {top1!r}")
        for arm, value in top1.items():
            if value is None:  # the paper reports only the other arm (e.g. LUT's fine-tune, without MaskSub)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
                raise fail(f"top1.{arm} must be a top-1 accuracy in percent, got {value!r}")
        if all(top1[arm] is None for arm in arms):
            raise fail("top1 with no number: write top1: null")
        top1 = {arm: None if top1[arm] is None else float(top1[arm]) for arm in arms}
    for key in _OPTIONAL:
        if header.get(key) is not None and not isinstance(header[key], str):
            raise fail(f"{key} must be a path under configs/ or null, got {header[key]!r}")
    fields = {k: header.get(k) for k in _REQUIRED + _OPTIONAL}
    return Recipe(path=rel, **{**fields, "top1": top1})


def find_recipes(configs_dir: str | Path) -> list[Recipe]:
    """Every recipe under ``configs_dir``, sorted by path with each baseline right after its MaskSub twin.

    YAML files without a header block are skipped, and so is every folder whose name starts with ``_``
    (``configs/_base/`` holds the shared blocks the recipes include).
    """
    configs_dir = Path(configs_dir)
    recipes = []
    for path in configs_dir.rglob("*.yaml"):
        rel = path.relative_to(configs_dir)
        if any(part.startswith("_") for part in rel.parts[:-1]) or read_header(path) is None:
            continue
        recipes.append(load_recipe(path, configs_dir))
    # x.yaml, x_baseline.yaml, x_ft224.yaml, x_ft224_baseline.yaml, ...
    return sorted(
        recipes, key=lambda r: (r.path.removesuffix(".yaml").removesuffix("_baseline"), r.arm != "masksub")
    )


#: The recipes installed with the package (a source checkout's ``./configs`` links here).
PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: Prefix that names a recipe explicitly: ``masksub fit --config recipe:deit3/vit_base_400ep``.
RECIPE_PREFIX = "recipe:"


def default_configs_dir() -> Path:
    """``./configs`` when the working directory has one (your own or edited copies), else the packaged recipes."""
    here = Path.cwd() / "configs"
    return here if here.is_dir() else PACKAGED_CONFIGS


def resolve_config(value: str) -> str:
    """Turn a ``--config`` value into a file path: a path that exists is kept as given; otherwise the value names a
    recipe (``deit3/vit_base_400ep``, with or without ``.yaml``, ``configs/`` or ``recipe:``) looked up in
    ``./configs`` first, then in the packaged recipes.

    Raises:
        FileNotFoundError: a ``recipe:`` name that matches no recipe (the message lists close names).
    """
    if Path(value).is_file() or value.startswith(("{", "[")):  # a file, or inline YAML / JSON
        return value
    name = value.removeprefix(RECIPE_PREFIX).removeprefix("configs/")
    name = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    for root in (Path.cwd() / "configs", PACKAGED_CONFIGS):
        if (root / name).is_file():
            return str(root / name)
    if value.startswith(RECIPE_PREFIX):
        stem = Path(name).stem.split("_")[0]
        close = sorted(
            p.relative_to(PACKAGED_CONFIGS).as_posix() for p in PACKAGED_CONFIGS.rglob(f"*{stem}*.yaml")
        )
        hint = f"; close: {', '.join(close[:6])}" if close else "; see `masksub recipes`"
        raise FileNotFoundError(f"no recipe {value!r} in ./configs or the packaged recipes{hint}")
    return value


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config`` / ``-c`` value passed through :func:`resolve_config`."""
    out, expect_value = [], False
    for arg in argv:
        if expect_value:
            out.append(resolve_config(arg))
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
        expect_value = arg in ("--config", "-c")
    return out


def _top1(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(recipes: Sequence[Recipe]) -> str:
    """A plain-text table: recipe, model, epochs, sub-branch, global batch, target / baseline top-1, note."""
    header = ("recipe", "model", "epochs", "sub-branch", "batch", "target", "baseline", "note")
    rows = [
        (
            r.path,
            r.model,
            str(r.epochs),
            r.sub_branch,
            str(r.global_batch),
            _top1(r.target_top1),
            _top1(r.baseline_top1),
            r.note,
        )
        for r in recipes
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {2, 4, 5, 6}  # numbers

    def line(row: Sequence[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``masksub recipes`` (``masksub_lightning.commands.cli`` routes the sub-command here)."""
    parser = argparse.ArgumentParser(
        prog="masksub recipes",
        description="List the training recipes (configs/**/*.yaml with a '# recipe:' header) and the paper's "
        "ImageNet-1k top-1 each targets: 'target' is the paper's number for the recipe's arm (MaskSub, CoSub or "
        "baseline), 'baseline' the paper's baseline of the same row.",
    )
    parser.add_argument(
        "--filter", default="", help="only recipes whose path, title or model contain this text"
    )
    parser.add_argument("--configs", type=Path, default=None, help="configs folder (default: ./configs)")
    parser.add_argument("--json", action="store_true", help="print the headers as JSON instead of a table")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    configs_dir = args.configs or default_configs_dir()
    if not configs_dir.is_dir():
        parser.error(f"no configs folder at {configs_dir}; pass --configs DIR")
    try:
        recipes = find_recipes(configs_dir)
    except RecipeHeaderError as err:
        parser.error(str(err))
    needle = args.filter.lower()
    recipes = [r for r in recipes if needle in f"{r.path}\n{r.title}\n{r.model}".lower()]

    if args.json:
        out = [{**asdict(r), "target_top1": r.target_top1, "baseline_top1": r.baseline_top1} for r in recipes]
        print(json.dumps(out, indent=2))
        return
    if not recipes:
        print(f"no recipe under {configs_dir} matches {args.filter!r}")
        return
    print(format_table(recipes))
    print(
        f"\n{len(recipes)} recipe(s) under {configs_dir}. target / baseline: the paper's ImageNet-1k top-1 (%) for "
        "this recipe's arm / for the baseline arm of the same row (docs/method.md).\n"
        "Run one: masksub fit --config <recipe> --data.init_args.root /path/to/data  (e.g. --config "
        "deit3/vit_base_400ep; from any directory)"
    )
