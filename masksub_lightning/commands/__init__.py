"""The ``masksub`` command: one dispatcher for every sub-command.

    masksub fit|validate|test|predict ...   LightningCLI over the package's modules and data (commands/cli.py)
    masksub recipes                         the training recipes and the paper's top-1 each targets (recipes.py)
    masksub data optimize ...               a dataset as streaming shards (data/streaming.py)
    masksub plot RUN_DIR...                 figures from runs' metrics.csv (plot.py)
    masksub export CKPT OUT_DIR             a checkpoint as a timm model folder, or a pre-training encoder (export.py)

Each sub-command's module is imported only when it runs: ``masksub --help`` and ``masksub recipes`` answer without
importing torch or Lightning.
"""

from __future__ import annotations

import importlib
import sys

#: The sub-commands and what they do (the short ``masksub --help``).
SUBCOMMANDS = {
    "fit": "train a model (validating after each epoch); --ckpt_path resumes a run",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "predict": "class probabilities of a checkpoint on the prediction split",
    "recipes": "list the training recipes under configs/ and the paper's top-1 each one targets",
    "data": "prepare data: 'masksub data optimize' writes a dataset as streaming shards (litdata)",
    "plot": "PNG figures from the metrics.csv of one or more runs, overlaid (needs matplotlib)",
    "export": "a checkpoint's network as a timm model folder, or a pre-training checkpoint's encoder",
}

#: The sub-commands LightningCLI runs.
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: The other sub-commands: the module whose ``main(argv)`` runs each.
_OWN_PARSERS = {
    "recipes": "masksub_lightning.commands.recipes",
    "data": "masksub_lightning.data.streaming",
    "plot": "masksub_lightning.commands.plot",
    "export": "masksub_lightning.commands.export",
}

HELP = """usage: masksub <command> [options]

MaskSub ("Masking meets Supervision", CVPR 2025) training for timm models with PyTorch Lightning.

commands:
{commands}

examples:
  masksub fit --config configs/quickstart.yaml
  masksub fit --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
  masksub validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
  masksub recipes --filter deit3

'masksub <command> --help' lists a command's options (for fit / validate / test / predict: every model, data and
trainer option; --print_config shows the fully resolved config).
"""


def help_text() -> str:
    """The short help of ``masksub``, ``masksub -h`` and ``masksub --help``."""
    width = max(map(len, SUBCOMMANDS))
    return HELP.format(commands="\n".join(f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()))


def main(args: list[str] | None = None) -> None:
    """Console-script entry point (returns None: returning the CLI object would make the process exit 1)."""
    argv = sys.argv[1:] if args is None else list(args)
    first = argv[0] if argv else None
    if first in (None, "-h", "--help"):
        print(help_text(), end="")
        if first is None:
            raise SystemExit(2)  # a command is required
        return
    if first == "--version":
        from masksub_lightning import __version__

        print(f"masksub {__version__}")
        return
    if first in _OWN_PARSERS:
        importlib.import_module(_OWN_PARSERS[first]).main(argv[1:])
        return
    if not first.startswith("-") and first not in SUBCOMMANDS:
        print(
            f"masksub: error: unknown command {first!r}; commands: {', '.join(SUBCOMMANDS)} (masksub --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from masksub_lightning.commands.cli import run_lightning

    run_lightning(argv, from_sys_argv=args is None)
