"""The ``masksub plot`` command: PNG figures from the CSV logs of one or more runs, overlaid.

    masksub plot runs/quickstart/version_0 runs/quickstart_baseline/version_0 --out figures/

Each ``RUN_DIR`` is a ``metrics.csv`` written by Lightning's ``CSVLogger``, the folder holding it, or a folder
above several of them (every ``metrics.csv`` below it is a run). Figures written to ``--out`` (default: the
current directory), each only when some run logged its columns:

=========================== =========================================================================================
``losses.png``              ``train_loss_main`` and ``train_loss_sub`` (CoSub: ``train_loss_label`` and
                           ``train_loss_cotrain``) per epoch (per step when no epoch means)
``val_acc1.png``            validation top-1 per epoch
``branch_gradients.png``    ``branch_grad_norm_main`` / ``_sub`` and their cosine per step
                            (:class:`~masksub_lightning.callbacks.BranchGradients`)
``masked_input.png``        held-out loss on clean and on masked inputs per epoch
                            (:class:`~masksub_lightning.callbacks.MaskedInputLoss`)
``lr.png``                  learning rate per step
=========================== =========================================================================================

Runs are named by their folder (``quickstart/version_0``). Reads CSV only: no torch import; matplotlib is needed
(``pip install matplotlib``, or the package's ``dev`` / ``notebook`` extra).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Run", "find_runs", "main", "plot_runs", "read_run"]

#: A series: (x, value) pairs in the order logged.
Series = list[tuple[float, float]]


@dataclass
class Run:
    """The logged columns of one run: per-step series (x = ``step``) and per-epoch series (x = epoch + 1)."""

    name: str
    path: Path
    steps: dict[str, Series] = field(default_factory=dict)
    epochs: dict[str, Series] = field(default_factory=dict)


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """The ``metrics.csv`` files named by ``paths`` (files, run folders, or folders above runs), in order.

    Raises:
        ValueError: a path that does not exist or holds no ``metrics.csv``.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files = [path]
        elif (path / "metrics.csv").is_file():
            files = [path / "metrics.csv"]
        elif path.is_dir():
            files = sorted(path.rglob("metrics.csv"))
        else:
            raise ValueError(f"RUN_DIR {str(path)!r} does not exist")
        if not files:
            raise ValueError(
                f"RUN_DIR {str(path)!r} holds no metrics.csv (a CSVLogger run folder is expected)"
            )
        found += [f for f in files if f not in found]
    return found


def _run_names(files: list[Path]) -> list[str]:
    """Shortest folder suffixes that tell the runs apart (``quickstart/version_0`` vs ``baseline/version_0``)."""
    parts = [f.resolve().parent.parts for f in files]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) and not any(n.startswith("version_") for n in names):
            return names
    return [str(f.parent) for f in files]


def read_run(metrics_csv: str | Path, name: str | None = None) -> Run:
    """Read a CSVLogger ``metrics.csv``: every non-empty cell becomes a point of its column's series.

    Columns ending in ``_step`` are per-step (the suffix is dropped), ``_epoch`` per-epoch (suffix dropped); others
    are per-epoch when their rows carry no per-step value at another step of the same epoch, which holds for
    validation and the callbacks' epoch metrics; ``lr`` and ``branch_grad_*`` are per-step.
    """
    path = Path(metrics_csv)
    run = Run(name or path.parent.name, path)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = _number(row.get("step"))
            epoch = _number(row.get("epoch"))
            for column, cell in row.items():
                if column in ("step", "epoch") or cell in ("", None):
                    continue
                value = _number(cell)
                if value is None:
                    continue
                if column.endswith("_step") or column == "lr" or column.startswith("branch_grad_"):
                    key = column.removesuffix("_step")
                    if step is not None:
                        run.steps.setdefault(key, []).append((step, value))
                elif epoch is not None:
                    run.epochs.setdefault(column.removesuffix("_epoch"), []).append((epoch + 1, value))
    return run


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _import_figure() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "masksub plot needs matplotlib: pip install matplotlib (or masksub-lightning[notebook])"
        ) from None
    return Figure


def plot_runs(paths: Sequence[str | Path], out_dir: str | Path = ".") -> list[Path]:
    """Write the figures of the runs under ``paths`` into ``out_dir``; returns the files written.

    Raises:
        ValueError: a bad path, or runs that logged none of the plotted columns.
        ImportError: matplotlib is not installed.
    """
    figure_class = _import_figure()
    files = find_runs(paths)
    runs = [read_run(f, n) for f, n in zip(files, _run_names(files))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for filename, draw in _FIGURES:
        fig = draw(figure_class, runs)
        if fig is None:  # none of the runs logged what this figure shows
            continue
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        written.append(out / filename)
    if not written:
        names = ", ".join(str(f) for f in files)
        raise ValueError(
            f"nothing to plot in {names}: none of train_loss_main, val_acc1, branch_grad_*, lr logged"
        )
    return written


def _lines(ax: Any, runs: list[Any], source: str, columns: Sequence[tuple[str, str, str]]) -> None:
    """One line per run and column (``(column, line style, label suffix)``; no suffix: the run's name alone)."""
    for i, run in enumerate(runs):
        series = getattr(run, source)
        for column, style, suffix in columns:
            if column in series:
                label = f"{run.name}: {suffix}" if suffix else run.name
                ax.plot(*zip(*series[column]), style, color=f"C{i % 10}", ms=2.5, label=label)


def _finish(ax: Any, **settings: Any) -> None:
    ax.set(**settings)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _one_axes_figure(figure_class: Any, runs, source, columns, size=(7, 4.2), **settings) -> Any:
    """A figure of ``columns`` from each run's ``source`` table (epochs / steps), or None if no run has them."""
    if not any(column in getattr(r, source) for r in runs for column, _, _ in columns):
        return None
    fig = figure_class(figsize=size)
    ax = fig.add_subplot()
    _lines(ax, runs, source, columns)
    _finish(ax, **settings)
    return fig


def _loss_figure(figure_class: Any, runs: list[Any]) -> Any:
    """Training losses per branch: per epoch when the module logged epoch means."""
    columns = (
        ("train_loss_main", "-o", "main"),
        ("train_loss_sub", "--o", "sub"),
        ("train_loss_label", "-s", "label"),  # CoSubModule: both submodels against the labels
        ("train_loss_cotrain", "--s", "co-training"),  # ... and against each other
    )
    source = "epochs" if any(c in r.epochs for r in runs for c, _, _ in columns) else "steps"
    return _one_axes_figure(
        figure_class, runs, source, columns, xlabel=source[:-1], ylabel="training loss", yscale="log",
        title="training loss per branch",
    )  # fmt: skip


def _val_figure(figure_class: Any, runs: list[Any]) -> Any:
    return _one_axes_figure(
        figure_class, runs, "epochs", (("val_acc1", "-o", ""),), xlabel="epoch", ylabel="val top-1",
        title="validation top-1 (main branch)",
    )  # fmt: skip


def _gradient_figure(figure_class: Any, runs: list[Any]) -> Any:
    """Per-branch gradient norms (BranchGradients) and the cosine between the two gradients."""
    if not any("branch_grad_norm_main" in r.steps for r in runs):
        return None
    fig = figure_class(figsize=(12, 4.2))
    ax_norm, ax_cos = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    _lines(
        ax_norm,
        runs,
        "steps",
        (("branch_grad_norm_main", "-", "main"), ("branch_grad_norm_sub", "--", "sub")),
    )
    _lines(ax_cos, runs, "steps", (("branch_grad_cosine", "-", ""),))
    ax_cos.axhline(0.0, color="0.6", lw=0.8)
    _finish(ax_norm, xlabel="step", ylabel="gradient L2 norm", yscale="log", title="gradient norm per branch")
    _finish(ax_cos, xlabel="step", ylabel="cosine", title="cosine(main gradient, sub gradient)")
    return fig


def _masked_input_figure(figure_class: Any, runs: list[Any]) -> Any:
    columns = (("clean_input_loss", "-o", "clean"), ("masked_input_loss", "--o", "masked"))
    return _one_axes_figure(
        figure_class, runs, "epochs", columns, xlabel="epoch", ylabel="held-out loss (true labels)",
        yscale="log", title="clean vs masked inputs",
    )  # fmt: skip


def _lr_figure(figure_class: Any, runs: list[Any]) -> Any:
    return _one_axes_figure(
        figure_class, runs, "steps", (("lr", "-", ""),), size=(7, 3.5), xlabel="step", ylabel="learning rate",
        title="learning rate",
    )  # fmt: skip


#: The figures, in the order they are written: file name and what draws it.
_FIGURES = (
    ("losses.png", _loss_figure),
    ("val_acc1.png", _val_figure),
    ("branch_gradients.png", _gradient_figure),
    ("masked_input.png", _masked_input_figure),
    ("lr.png", _lr_figure),
)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``masksub plot`` (``masksub_lightning.commands.cli`` routes the sub-command here)."""
    parser = argparse.ArgumentParser(
        prog="masksub plot",
        description="PNG figures (losses per branch, val top-1, branch gradient norms and cosine, held-out "
        "masked-input loss, LR) from the metrics.csv of one or more CSVLogger runs, overlaid.",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="metrics.csv, its folder, or a folder above runs"
    )
    parser.add_argument("--out", default=".", metavar="DIR", help="folder for the PNG files (default: .)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        written = plot_runs(args.runs, args.out)
    except (ValueError, ImportError) as err:
        parser.exit(2, f"masksub plot: error: {err}\n")
    for path in written:
        print(path)
