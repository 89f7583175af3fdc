"""The ``masksub`` command: a LightningCLI over MaskSubModule and the package's DataModules.

    masksub fit --config configs/quickstart.yaml
    masksub validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    masksub fit --config configs/quickstart.yaml --model.init_args.sub_branch none --trainer.max_epochs 5
    masksub fit --print_config --config configs/quickstart.yaml

Model and data are chosen by ``class_path`` (any LightningModule / LightningDataModule subclass); the data's
``num_classes`` is linked into the model. Runs log to CSV (and TensorBoard when it is installed) under ``runs/``;
the resolved config is saved next to the logs and checkpoints of each run.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from masksub_lightning.module import MaskSubModule


class ConfigError(Exception):
    """A config value was rejected while building the model, the data or the trainer."""


class MaskSubCLI(LightningCLI):
    """LightningCLI with the data's class count linked into the model and config errors turned into messages."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # Checkpointing is configurable under `checkpoint:`; by default the best val_acc1 and the last are kept.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_acc1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{val_acc1:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def after_fit(self) -> None:
        """Print the run's outcome: last and best validation top-1 and where the checkpoints are."""
        metrics = self.trainer.callback_metrics
        ckpt = self.trainer.checkpoint_callback
        if "val_acc1" in metrics and self.trainer.is_global_zero:
            best = getattr(ckpt, "best_model_score", None)
            line = f"final val_acc1={float(metrics['val_acc1']):.4f}"
            if best is not None:
                line += f"  best val_acc1={float(best):.4f}  best checkpoint: {ckpt.best_model_path}"
            print(line, flush=True)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
            raise ConfigError(_root_cause(err)) from err


def _root_cause(err: BaseException) -> str:
    """The innermost message: jsonargparse wraps a constructor's ValueError in a long union-type report."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return str(err)


def default_loggers(save_dir: str = "runs", name: str = "masksub") -> list[Any]:
    """CSV always; TensorBoard too when installed (the first logger decides where config and checkpoints go)."""
    loggers = [lazy_instance(CSVLogger, save_dir=save_dir, name=name)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(lazy_instance(TensorBoardLogger, save_dir=save_dir, name=name, version=""))
    return loggers


def build_cli(args: list[str] | None = None, run: bool = True) -> MaskSubCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (used by tests and notebooks)."""
    from masksub_lightning.data import ImageClassificationDataModule

    return MaskSubCLI(
        MaskSubModule,
        ImageClassificationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # the module builds its own param groups (weight-decay exclusions, layer decay)
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": default_loggers()},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console-script entry point (returns None: returning the CLI object would make the process exit 1)."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "recipes":
        from masksub_lightning.recipes import main as recipes_main

        recipes_main(argv[1:])
        return
    try:
        build_cli(args)  # None: LightningCLI reads sys.argv itself
    except ConfigError as err:
        print(f"masksub: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
