"""``masksub fit | validate | test | predict``: a LightningCLI over the package's modules and DataModules.

    masksub fit --config configs/quickstart.yaml
    masksub validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    masksub fit --config configs/quickstart.yaml --model.init_args.sub_branch none --trainer.max_epochs 5
    masksub fit --print_config --config configs/quickstart.yaml

Model and data are chosen by ``class_path`` (any LightningModule / LightningDataModule subclass); the data's
``num_classes`` is linked into the model. Runs log to CSV (and TensorBoard when it is installed) under ``runs/``;
the resolved config is saved next to the logs and checkpoints of each run.

Reliability, on top of LightningCLI:

* checkpoints are written atomically (:class:`~masksub_lightning.training.checkpoint_io.AtomicCheckpointIO`) and
  ``last.ckpt`` is rewritten at every save point (:class:`~masksub_lightning.callbacks.AlwaysLastCheckpoint`);
* ``--ckpt_path`` files are loaded with ``weights_only=True``; resuming ``fit`` with model options that differ
  from the checkpoint's is an error naming each one (``validate`` / ``test`` / ``predict`` build the model the
  checkpoint describes and print the options they replaced);
* mistakes found before the first batch (bad values, missing or malformed data, an incompatible checkpoint, an
  unwritable output directory, an image size the model cannot take, Trainer options manual optimization cannot
  take) end with one line ``masksub: error: ...`` and exit code 2 (:mod:`masksub_lightning.commands.errors`).

The dispatcher (:func:`masksub_lightning.commands.main`) imports this module only when one of these sub-commands
runs, so ``masksub --help`` and ``masksub recipes`` never import Lightning.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from masksub_lightning import _moved
from masksub_lightning.callbacks.checkpoints import AlwaysLastCheckpoint
from masksub_lightning.commands import LIGHTNING_SUBCOMMANDS
from masksub_lightning.commands.errors import (
    ConfigError,
    _root_cause,
    class_options,
    is_setup_error,
    one_line,
    parser_error_line,
    run_failure_line,
)
from masksub_lightning.commands.recipes import resolve_config_args
from masksub_lightning.data import ImageClassificationDataModule
from masksub_lightning.modules import cosub, masksub, pretraining  # noqa: F401 (short class names resolve among these)
from masksub_lightning.training import sharding  # noqa: F401 (registers --trainer.strategy fsdp2)
from masksub_lightning.training.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointLoadError,
    OutputDirError,
    check_output_dir,
    checkpoint_size_estimate,
    load_checkpoint_file,
    remove_stale_temp_files,
)

#: Model options that may differ from the checkpoint's when resuming: they change how the run executes, not what
#: it trains (``grad_accumulation`` keeps the global batch on another number of processes; a value that changes the
#: global batch is refused by the resume itself, naming the one that keeps it). The given value is used; for every
#: other option a difference is an error (``fit``).
RESUME_MAY_CHANGE = frozenset(
    {"compile", "channels_last", "pretrained_weights", "nonfinite_loss", "grad_accumulation"}
)
#: Set from the data at instantiation (``data.num_classes``), so never taken from the checkpoint's options.
_LINKED = frozenset({"num_classes"})


def run_lightning(argv: list[str], from_sys_argv: bool) -> None:
    """Run a Lightning sub-command; mistakes become one line (exit 2), a failed run one line where it can (exit 1)."""
    try:
        argv = resolve_config_args(argv)  # `--config deit3/vit_base_400ep` works from any directory
    except FileNotFoundError as err:
        print(f"masksub: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if from_sys_argv:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (and warns when both are given)
    try:
        build_cli(None if from_sys_argv else argv)
    except ConfigError as err:
        print(f"masksub: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (RuntimeError, FileNotFoundError) as err:
        line = run_failure_line(err)
        if line is None:
            raise
        print(f"masksub: error: {line}", file=sys.stderr)
        raise SystemExit(1) from None


#: Parser options of every (sub)command parser.
STRICT_PARSER = {"exit_on_error": False, "allow_abbrev": False}


def build_cli(args: list[str] | None = None, run: bool = True) -> MaskSubCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (used by tests and notebooks).

    Raises:
        ConfigError: a mistake found before the first batch (see the module docstring); the message is one line.
    """
    try:
        return MaskSubCLI(
            LightningModule,  # any LightningModule by class_path: MaskSubModule, MAEModule / LUTModule, your own
            ImageClassificationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # the module builds its own param groups (weight-decay exclusions, ...)
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"logger": default_loggers()},
            # Parse errors raise (one line, parse_arguments) instead of printing the whole usage first; no
            # abbreviated options: a typo such as --trainer.max_step must not silently set max_steps.
            parser_kwargs={
                **STRICT_PARSER,
                **{sub: dict(STRICT_PARSER) for sub in LIGHTNING_SUBCOMMANDS},
            },
            args=args,
            run=run,
        )
    except ConfigError:
        raise
    except Exception as err:
        if not is_setup_error(err):
            raise
        raise ConfigError(one_line(err)) from err


def default_loggers(save_dir: str = "runs", name: str = "masksub") -> list[Any]:
    """CSV always; TensorBoard too when installed (the first logger decides where config and checkpoints go)."""
    from jsonargparse import lazy_instance
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [lazy_instance(CSVLogger, save_dir=save_dir, name=name)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(lazy_instance(TensorBoardLogger, save_dir=save_dir, name=name, version=""))
    return loggers


class MaskSubCLI(LightningCLI):
    """LightningCLI with the data's class count linked into the model, safe checkpoints and one-line errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._new_run_dirs: list[Path] = []  # log / checkpoint folders this process created (at set-up)
        try:
            super().__init__(*args, **kwargs)
        except Exception as err:
            if isinstance(err, ConfigError) or is_setup_error(err):
                remove_unused_run_dirs(self._new_run_dirs)
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # Checkpointing is configurable under `checkpoint:`; by default the best val_acc1 and the last are kept.
        parser.add_lightning_class_args(AlwaysLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_acc1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{val_acc1:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:  # raised instead of a usage dump: exit_on_error=False (build_cli)
            raise ConfigError(self._parser_error(err)) from err
        # The options given in config files or on the command line, without defaults: only these can
        # conflict with a checkpoint's (defaults are filled in from the checkpoint, as Lightning does).
        self._given = None
        if args is None or isinstance(args, (list, tuple)):
            try:
                self._given = parser.parse_args(args, defaults=False)
            except (SystemExit, Exception):  # pragma: no cover - then every option counts as given
                self._given = None
        self._check_checkpoint()  # before Lightning merges the checkpoint's options into the config

    def _check_checkpoint(self) -> None:
        """``--ckpt_path``: a loadable Lightning checkpoint whose model options agree with the given ones.

        Lightning then merges the checkpoint's hyperparameters into the config (its ``_parse_ckpt_path``);
        :meth:`before_instantiate_classes` puts back the given values of :data:`RESUME_MAY_CHANGE`.
        """
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path:
            return
        text = str(ckpt_path)
        if not Path(text).is_file():
            if (
                text in ("last", "best", "hpc")
                or "://" in text
                or text.startswith("registry")
                or Path(text).is_dir()
            ):
                return  # resolved by the Trainer (a folder: a sharded FSDP2 checkpoint)
            raise ConfigError(f"--ckpt_path {text}: no such file")
        try:
            ckpt = load_checkpoint_file(text, mmap=True)  # mmap: only the hyperparameters are read here
        except (CheckpointLoadError, OSError) as err:
            raise ConfigError(str(err)) from err
        if not isinstance(ckpt, dict) or not {"state_dict", "pytorch-lightning_version"} <= ckpt.keys():
            raise ConfigError(_not_a_lightning_checkpoint(text, sub))
        hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k != "_instantiator"}
        self._ckpt_hparams = hparams
        if hparams.get("_class_path"):  # a 0.1 checkpoint's old module path resolves without a warning
            _moved.silence(hparams["_class_path"])
        model_cfg = _plain(self.config[sub].get("model")) or {}
        current_args = model_cfg.get("init_args", model_cfg)
        given_root = self._given.get(sub) if self._given is not None else None
        given_model = _subset(given_root, "model") if given_root is not None else model_cfg
        self._keep_given = {
            k: current_args[k] for k in RESUME_MAY_CHANGE & hparams.keys() if k in current_args
        }
        conflicts = _conflicts(hparams, given_model, ignore=RESUME_MAY_CHANGE | _LINKED)
        if not conflicts:
            return
        listing = "; ".join(f"{k}: checkpoint {c!r}, given {g!r}" for k, c, g in conflicts)
        if sub == "fit":
            raise ConfigError(
                f"--ckpt_path {text} was trained with other model options than given ({listing}). "
                "Resuming continues that run, so drop these options or give the checkpoint's values "
                "(the run's config.yaml has them); to train with new options from these weights instead, "
                f"use --model.init_args.pretrained_weights {text} without --ckpt_path"
            )
        print(
            f"masksub: note: {sub} builds the model {text} describes; replaced the given {listing}",
            file=sys.stderr,
        )

    def before_instantiate_classes(self) -> None:
        """After Lightning merged the checkpoint's options: the given values of RESUME_MAY_CHANGE win, and the
        Trainer options that cannot work with manual optimization are refused before the Trainer is built."""
        prefix = f"{self.subcommand}." if self.subcommand else ""  # run=False: a config without sub-commands
        for key, value in getattr(self, "_keep_given", {}).items():
            self.config[f"{prefix}model.init_args.{key}"] = value
        check_trainer_options(_plain(self.config.get(f"{prefix}trainer")) or {})

    def _parser_error(self, err: ArgumentError) -> str:
        parsers = [self.parser, *getattr(self, "_subcommand_parsers", {}).values()]
        keys = {a.dest for p in parsers for a in p._actions if not a.dest.endswith("help")}
        return parser_error_line(str(err), keys, class_options)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
            raise ConfigError(_root_cause(err)) from err

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # Atomic checkpoint writes and weights_only loading by default, unless a CheckpointIO is configured.
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        plugins = (
            [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        )
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        """Checks that need the built objects, before anything runs: data vs model, output dirs, checkpoint."""
        super().after_instantiate_classes()
        if self.subcommand is None:
            return
        self._check_class_counts()
        check_data_fits_model(self.model, self.datamodule)
        if not self.trainer.is_global_zero or getattr(self.trainer, "fast_dev_run", False):
            return
        self._check_output_dirs()
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if self.subcommand == "fit" and ckpt_path and Path(str(ckpt_path)).is_file():
            # A killed run's temporary file lies next to the checkpoint it was replacing; the resumed run
            # writes into a new version folder, whose own clean-up never looks there.
            remove_stale_temp_files(Path(str(ckpt_path)).parent)

    def _check_class_counts(self) -> None:
        """The data's class count against a num_classes the user gave and against the checkpoint's head."""
        n_data = getattr(self.datamodule, "num_classes", None)
        if not isinstance(n_data, int):
            return
        given = _subset(self._given.get(self.subcommand), "model") if self._given is not None else {}
        given = given.get("init_args", given).get("num_classes")
        if isinstance(given, int) and given != n_data:
            # The link data.num_classes -> model.init_args.num_classes would replace it without a word.
            raise ConfigError(
                f"model.init_args.num_classes={given} but the data has {n_data} classes "
                f"(data.num_classes, which sets the model's): drop num_classes, or use data with {given} classes"
            )
        ckpt_classes = getattr(self, "_ckpt_hparams", {}).get("num_classes")
        if isinstance(ckpt_classes, int) and ckpt_classes != n_data:
            raise ConfigError(
                f"the checkpoint {self.config[self.subcommand].get('ckpt_path')} has a {ckpt_classes}-class "
                f"head but data.num_classes={n_data}"
            )

    def _check_output_dirs(self) -> None:
        """Log and checkpoint folders writable, with room for a checkpoint; remembers the ones it creates."""
        folders = []  # (path, what it is, bytes it needs free)
        for logger in self.trainer.loggers:
            path = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            if path:
                folders.append((path, f"log directory ({type(logger).__name__})", 0))
        ckpt = self.trainer.checkpoint_callback
        if self.subcommand == "fit" and ckpt is not None and ckpt.dirpath is not None:
            need = checkpoint_size_estimate(self.model, self.trainer.callbacks)
            folders.append((ckpt.dirpath, "checkpoint directory (checkpoint.dirpath)", need))
        try:
            for path, what, need in folders:
                if not Path(path).exists():
                    self._new_run_dirs.append(Path(path))
                check_output_dir(path, what, need)
        except OutputDirError as err:
            raise ConfigError(str(err)) from err

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


# ---------------------------------------------------------------------------------------------------- checks
def check_data_fits_model(model: Any, datamodule: Any) -> None:
    """The data's image size and class count against the network (before any batch is drawn).

    * timm ViT-style models (``patch_embed.img_size`` with a strict size) take exactly their ``img_size``, and any
      patch-embedding model needs a multiple of its patch size (unless it pads dynamically);
    * the model's ``num_classes`` and head width must equal ``data.num_classes``, which also sizes the Mixup /
      CutMix / label-smoothing targets;
    * the sub-branch must be able to mask images of that size (``SubBranch.check_image_size``: pixel cells tile it).

    Raises:
        ConfigError: naming both values and the option to change.
    """
    from torch import nn

    from masksub_lightning.models.network import head_width

    net = getattr(model, "model", None)
    n_data = getattr(datamodule, "num_classes", None)
    if isinstance(n_data, int):
        soft = (
            " (it also sizes the Mixup / CutMix targets)"
            if getattr(datamodule, "soft_targets", False)
            else ""
        )
        n_model = getattr(model, "num_classes", None)
        if isinstance(n_model, int) and n_model != n_data:
            raise ConfigError(f"model num_classes={n_model} but data.num_classes={n_data}{soft}")
        head = head_width(net) if isinstance(net, nn.Module) else None
        if head is not None and head != n_data:
            raise ConfigError(
                f"the model's classifier has {head} outputs but data.num_classes={n_data}{soft}"
            )
    img = getattr(datamodule, "img_size", None)
    check_image_size = getattr(getattr(model, "sub_branch", None), "check_image_size", None)
    if isinstance(img, int) and callable(check_image_size):
        try:
            check_image_size(img, net)  # the pixel-mask kinds' cells must tile the image
        except ValueError as err:
            raise ConfigError(str(err)) from err
    embed = getattr(net, "patch_embed", None)
    if not isinstance(img, int) or getattr(embed, "img_size", None) is None:
        return
    expected = tuple(embed.img_size)
    given = (getattr(model, "hparams", None) or {}).get("model")
    name = given if isinstance(given, str) else type(net).__name__
    if getattr(embed, "strict_img_size", False) and expected != (img, img):
        raise ConfigError(
            f"data img_size={img} but the model {name} takes {expected[0]}x{expected[1]} images: set "
            f"model.init_args.model_kwargs.img_size={img} or data.init_args.img_size={expected[0]}"
        )
    patch = tuple(getattr(embed, "patch_size", (1, 1)))
    if not getattr(embed, "dynamic_img_pad", False) and any(img % p for p in patch):
        raise ConfigError(
            f"data img_size={img} is not a multiple of the model {name}'s patch size {patch[0]}x{patch[1]}"
        )


def _plain(value: Any) -> Any:
    """Config values in a comparable form (tuples and lists alike, Namespaces as dicts)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _subset(ns: Any, key: str) -> dict[str, Any]:
    """``ns[key]`` as a plain dict (empty when absent)."""
    try:
        value = ns.get(key) if hasattr(ns, "get") else None
    except (KeyError, AttributeError):
        value = None
    return _plain(value) if value is not None else {}


def check_trainer_options(trainer: dict[str, Any]) -> None:
    """Trainer options the package's modules cannot take (they step the optimizer themselves), with the one to use.

    Raises:
        ConfigError: naming the given option and the module option that does it.
    """
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if accumulate not in (None, 1):
        raise ConfigError(
            f"--trainer.accumulate_grad_batches {accumulate}: the modules step the optimizer themselves (manual "
            f"optimization); use --model.init_args.grad_accumulation {accumulate}"
        )
    clip = trainer.get("gradient_clip_val")
    if clip not in (None, 0, 0.0):
        raise ConfigError(
            f"--trainer.gradient_clip_val {clip}: the modules clip the gradients themselves (manual "
            f"optimization, unscaled once under 16-mixed); use --model.init_args.grad_clip_norm {clip}"
        )
    strategy = trainer.get("strategy")
    name = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy or "")
    if name.lower() in ("fsdp", "fsdp_cpu_offload") or name.endswith(".FSDPStrategy"):
        raise ConfigError(
            f"--trainer.strategy {name}: FSDP1 cannot run a backward inside training_step under manual "
            "optimization; use --trainer.strategy fsdp2 (FSDP2, the same sharding) or ddp"
        )


def _conflicts(hparams: dict[str, Any], given_model: dict[str, Any], ignore: frozenset) -> list[tuple]:
    """(option, checkpoint value, given value) for each model option given otherwise than the checkpoint has."""
    given_args = given_model.get("init_args", given_model)
    conflicts = []
    ckpt_class, given_class = hparams.get("_class_path"), given_model.get("class_path")
    if ckpt_class and given_class and not _same_class(ckpt_class, given_class):
        conflicts.append(("class_path", ckpt_class, given_class))
    for key, value in hparams.items():
        if key.startswith("_") or key in ignore:
            continue
        if key in given_args and _plain(given_args[key]) != _plain(value):
            conflicts.append((key, value, given_args[key]))
    return conflicts


#: What a run writes into its folder while it sets up (the resolved config, a logger's hyperparameters).
_SETUP_FILES = frozenset({"config.yaml", "hparams.yaml"})


def remove_unused_run_dirs(folders: list[Path]) -> None:
    """Delete run folders a failed set-up created and left holding nothing but its own config (deepest first).

    Only folders given here (ones this process created) and only when no file other than :data:`_SETUP_FILES`
    is in them, directly: empty sub-folders (``checkpoints/``) go too.
    """
    import shutil

    for folder in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
        if not folder.is_dir():
            continue
        files = [p for p in folder.rglob("*") if not p.is_dir()]
        if all(p.parent == folder and p.name in _SETUP_FILES for p in files):
            shutil.rmtree(folder, ignore_errors=True)


def _not_a_lightning_checkpoint(path: str, subcommand: str) -> str:
    """--ckpt_path was given a file of weights only (a timm / MAE / torchvision .pth), not a Lightning run's state."""
    weights = f"--model.init_args.pretrained_weights {path}"
    use = (
        f"to start training from these weights, use {weights} instead of --ckpt_path"
        if subcommand == "fit"
        else f"{subcommand} needs a checkpoint written by masksub fit (weights alone load with {weights} in fit)"
    )
    return (
        f"--ckpt_path {path} is not a Lightning checkpoint (no 'state_dict' / 'pytorch-lightning_version': "
        f"a plain state dict of weights?); {use}"
    )


def _same_class(a: str, b: str) -> bool:
    """Class paths name the same class (``masksub_lightning.MaskSubModule`` is ``...module.MaskSubModule``)."""
    if a == b:
        return True

    def resolve(path: str) -> Any:
        module, _, attr = _moved.current_path(path).rpartition(".")
        return getattr(importlib.import_module(module), attr)

    try:
        return resolve(a) is resolve(b)
    except (ImportError, AttributeError, ValueError):
        return False
