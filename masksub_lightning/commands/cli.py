"""The ``masksub`` command: a LightningCLI over MaskSubModule and the package's DataModules.

    masksub fit --config configs/quickstart.yaml
    masksub validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    masksub fit --config configs/quickstart.yaml --model.init_args.sub_branch none --trainer.max_epochs 5
    masksub fit --print_config --config configs/quickstart.yaml
    masksub recipes

Model and data are chosen by ``class_path`` (any LightningModule / LightningDataModule subclass); the data's
``num_classes`` is linked into the model. Runs log to CSV (and TensorBoard when it is installed) under ``runs/``;
the resolved config is saved next to the logs and checkpoints of each run.

Reliability, on top of LightningCLI:

* checkpoints are written atomically (:class:`~masksub_lightning.checkpointing.AtomicCheckpointIO`) and
  ``last.ckpt`` is rewritten at every save point
  (:class:`~masksub_lightning.checkpointing.AlwaysLastCheckpoint`);
* ``--ckpt_path`` files are loaded with ``weights_only=True``; resuming ``fit`` with model options that differ
  from the checkpoint's is an error naming each one (``validate`` / ``test`` / ``predict`` build the model the
  checkpoint describes and print the options they replaced);
* mistakes found before the first batch (bad values, missing or malformed data, an incompatible checkpoint, an
  unwritable output directory, an image size the model cannot take) end with one line ``masksub: error: ...`` and
  exit code 2; errors during training keep their traceback (``MASKSUB_TRACEBACK=1`` shows it for setup errors
  too), except a diverged loss and an unreadable image file, which end with one line and exit code 1.

Lightning, jsonargparse and torch are imported only when a Lightning sub-command runs: ``masksub --help`` and
``masksub recipes`` answer without them.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

#: The sub-commands and what they do (the short ``masksub --help``).
SUBCOMMANDS = {
    "fit": "train a model (validating after each epoch); --ckpt_path resumes a run",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "predict": "class probabilities of a checkpoint on the prediction split",
    "recipes": "list the training recipes under configs/ and the paper's top-1 each one targets",
    "data": "prepare data: 'masksub data optimize' writes a dataset as streaming shards (litdata)",
    "plot": "PNG figures from the metrics.csv of one or more runs, overlaid (needs matplotlib)",
    "export": "a checkpoint's network as a timm model folder (config.json, model.safetensors, README.md)",
}

#: The sub-commands LightningCLI runs (the others are routed to their own modules by :func:`main`).
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

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

#: Model options that may differ from the checkpoint's when resuming: they change how the run executes, not what
#: it trains. The given value is used; for every other option a difference is an error (``fit``).
RESUME_MAY_CHANGE = frozenset({"compile", "channels_last", "pretrained_weights", "nonfinite_loss"})
#: Set from the data at instantiation (``data.num_classes``), so never taken from the checkpoint's options.
_LINKED = frozenset({"num_classes"})
#: Functions whose frames mark an exception as raised while running batches rather than while setting up.
_BATCH_FRAMES = frozenset({"training_step", "validation_step", "test_step", "predict_step", "__next__"})


class ConfigError(Exception):
    """A config value, the data, a checkpoint or an output directory was rejected before training started."""


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
    if first == "recipes":
        from masksub_lightning.recipes import main as recipes_main

        recipes_main(argv[1:])
        return
    if first == "data":
        from masksub_lightning.data.streaming import main as data_main

        data_main(argv[1:])
        return
    if first in (
        "plot",
        "export",
    ):  # no Lightning CLI: masksub_lightning.plot / .export parse their own options
        importlib.import_module(f"masksub_lightning.{first}").main(argv[1:])
        return
    if not first.startswith("-") and first not in SUBCOMMANDS:
        print(
            f"masksub: error: unknown command {first!r}; commands: {', '.join(SUBCOMMANDS)} (masksub --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from masksub_lightning.recipes import resolve_config_args

    try:
        argv = resolve_config_args(argv)  # `--config deit3/vit_base_400ep` works from any directory
    except FileNotFoundError as err:
        print(f"masksub: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (and warns when both are given)
    try:
        build_cli(None if args is None else argv)
    except ConfigError as err:
        print(f"masksub: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (RuntimeError, FileNotFoundError) as err:
        line = run_failure_line(err)
        if line is None:
            raise
        print(f"masksub: error: {line}", file=sys.stderr)
        raise SystemExit(1) from None


#: Bad-sample errors whose message is the whole story (the file and the fix); a failing transform keeps its trace.
_BAD_FILE_ERRORS = frozenset({"CorruptImageError", "ImageTooSmallError", "FileNotFoundError"})


def run_failure_line(err: BaseException) -> str | None:
    """The one line that tells all about a run that failed while training, or None (the traceback is kept).

    Two failures qualify, with exit code 1 (the run failed; the options were fine): the non-finite-loss guard's
    stop (naming the step and the last good checkpoint), and, unless ``MASKSUB_TRACEBACK`` is set, an image file
    the data loader could not use under ``bad_samples: error`` (naming the file and the option that skips it;
    from a loader worker the message is that worker's traceback, whose last line is the error's own).
    """
    if type(err).__name__ == "NonFiniteLossError":
        return str(err)
    lines = str(err).strip().splitlines()
    if type(err).__name__ not in _BAD_FILE_ERRORS or not lines or "bad_samples: skip" not in lines[-1]:
        return None
    if os.environ.get("MASKSUB_TRACEBACK", "").strip() not in ("", "0"):
        return None
    return re.sub(r"^[\w.]+Error: ", "", lines[-1])


def build_cli(args: list[str] | None = None, run: bool = True) -> Any:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (used by tests and notebooks).

    Raises:
        ConfigError: a mistake found before the first batch (see the module docstring); the message is one line.
    """
    from lightning.pytorch import LightningModule

    # Imported so that short class names (`--model MaskSubModule`, `LUTModule`) resolve among the subclasses.
    from masksub_lightning import module, pretraining  # noqa: F401
    from masksub_lightning.data import ImageClassificationDataModule

    try:
        return _cli_class()(
            LightningModule,  # any LightningModule by class_path: MaskSubModule, MAEModule / LUTModule, your own
            ImageClassificationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # the module builds its own param groups (weight-decay exclusions, ...)
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"logger": default_loggers()},
            # Parse errors raise (one line, parse_arguments) instead of printing the whole usage first.
            parser_kwargs={
                "exit_on_error": False,
                **{sub: {"exit_on_error": False} for sub in LIGHTNING_SUBCOMMANDS},
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


# ----------------------------------------------------------------------------------------------- error handling
def is_setup_error(err: BaseException) -> bool:
    """Whether ``err`` is a mistake in the inputs found before any batch ran (then it is shown as one line).

    Value, type, key and path errors, a refused (unsafe) pickle, Lightning's MisconfigurationException and a state
    dict that does not fit the model count, unless a frame of a ``*_step`` method or of batch fetching is on the traceback (a bug or bad
    sample met while training keeps its traceback), or ``MASKSUB_TRACEBACK`` is set.
    """
    if os.environ.get("MASKSUB_TRACEBACK", "").strip() not in ("", "0"):
        return False
    import pickle

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    kinds = (
        pickle.UnpicklingError,  # a weights file refused by weights_only loading (pretrained_weights, at fit set-up)
        ValueError,
        TypeError,
        KeyError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        MisconfigurationException,
    )
    state_dict = isinstance(err, RuntimeError) and str(err).startswith("Error(s) in loading state_dict")
    if not (isinstance(err, kinds) or state_dict):
        return False
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in _BATCH_FRAMES:
            return False
        tb = tb.tb_next
    return True


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a state-dict mismatch as its first problem and a count of the rest)."""
    text = _root_cause(err) if isinstance(err, (ValueError, TypeError)) else str(err)
    if isinstance(err, KeyError):
        text = f"KeyError: {text}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Error(s) in loading state_dict"):
        problems = [p.strip() for line in lines[1:] for p in line.split("\t") if p.strip()]
        first = problems[0] if problems else ""
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"the checkpoint does not fit the model: {first}{more}"
    return "; ".join(lines)


def _root_cause(err: BaseException) -> str:
    """The innermost message: jsonargparse wraps a constructor's ValueError in a long union-type report."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return str(err)


#: Lines of a jsonargparse error that describe its union-type search rather than the mistake.
_PARSER_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Expected a <class 'NoneType'>",
)


def parser_error_line(message: str, known_keys: Any = (), class_options: Any = None) -> str:
    """jsonargparse's error report (a tree over every union alternative) as one line, with a close known key.

    Args:
        message: the parser's message, e.g. ``Parser key "model": ... Option 'sub_ratoi' is not accepted``.
        known_keys: the dotted keys the parser accepts (suggestions for an unknown top-level option).
        class_options: class path -> the option names its constructor accepts (suggestions inside ``init_args``).
    """
    path, owner, problems = _read_parser_report(message)
    text = "; ".join(problems) or message.strip().splitlines()[0]
    module, _, name = (owner or "").rpartition(".")
    unknown = re.fullmatch(r"Option '(.+)' is not accepted", text)
    if owner and name not in _module_names(
        module
    ):  # the class path itself is wrong, not one of its init_args
        path.pop()
        text = f"class_path {owner!r} does not name a class"
        close = _close_key(name, _module_names(module))
        close = f"{module}.{close}" if close else None
    elif owner and unknown:
        text = f"option {unknown[1]!r} is not accepted by {owner}"
        close = _close_key(unknown[1], class_options(owner) if class_options else ())
    else:
        unknown = re.search(r"(?:does not accept option '|Option '|unrecognized arguments: --)([\w.]+)", text)
        close = _close_key(unknown[1], known_keys) if unknown else None
    hint = f"; did you mean {close!r}?" if close else ""
    return f"{'.'.join(path)}: {text}{hint}" if path else f"{text}{hint}"


def _read_parser_report(message: str) -> tuple[list[str], str | None, list[str]]:
    """(key path to the innermost problem, the class whose init_args it is in, the problems) of a report."""
    path, owner, problems, expected, given = [], None, [], [], None
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or line.startswith(_PARSER_NOISE):
            continue
        if key := re.fullmatch(r'Parser key "(.+)":', line):
            path.append(key[1])
        elif cls := re.fullmatch(r"Problem with given class_path '(.+)':", line):
            owner = cls[1]
            path.append("init_args")
        elif line.startswith("Given value:"):
            given = given or line.removeprefix("Given value:").strip()  # the innermost comes first
        elif typed := re.fullmatch(r"Expected a <class '([\w.]+)'>(?:\. Got value: (.*))?", line):
            expected.append(typed[1])
            given = typed[2] if typed[2] is not None else given
        else:
            problems.append(line)
    if expected:
        problems.append(f"expected {' or '.join(expected)}, got {given!r}")
    return path, owner, problems


def _module_names(module: str) -> list[str]:
    try:
        return dir(importlib.import_module(module))
    except (ImportError, ValueError):
        return []


def _close_key(bad: str, known: Any) -> str | None:
    """The known dotted key that differs from ``bad`` in its first unknown part only, and there by about an edit."""
    parts, known_parts = bad.split("."), [k.split(".") for k in known]
    for i, part in enumerate(parts):
        level = {k[i] for k in known_parts if len(k) > i and k[:i] == parts[:i]}
        if part not in level:
            close = difflib.get_close_matches(part, level, n=1, cutoff=0.75)
            return ".".join([*parts[:i], close[0]]) if close else None
    return None


def class_options(class_path: str) -> list[str]:
    """Constructor argument names of ``class_path`` and of the bases its ``**kwargs`` reach (as jsonargparse)."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else ():
        try:
            params = list(inspect.signature(klass.__init__).parameters.values())
        except (TypeError, ValueError):
            break
        names += [
            p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


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

    from masksub_lightning.network import head_width

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


# ------------------------------------------------------------------------------------------------- the CLI
@functools.cache
def _cli_class() -> type:
    """The LightningCLI subclass, built on first use so that importing this module does not import Lightning."""
    from argparse import ArgumentError

    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from masksub_lightning.checkpointing import (
        AlwaysLastCheckpoint,
        AtomicCheckpointIO,
        CheckpointLoadError,
        OutputDirError,
        check_output_dir,
        checkpoint_size_estimate,
        load_checkpoint_file,
        remove_stale_temp_files,
    )

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

        def _parse_ckpt_path(self) -> None:
            """Lightning's merge of the checkpoint's hyperparameters, with conflicts reported (see module doc)."""
            sub = self.config.get("subcommand")
            if not sub:
                return
            ckpt_path = self.config[sub].get("ckpt_path")
            if not ckpt_path:
                return
            text = str(ckpt_path)
            if not Path(text).is_file():
                if text in ("last", "best", "hpc") or "://" in text or text.startswith("registry"):
                    return  # resolved by the Trainer
                raise ConfigError(f"--ckpt_path {text}: no such file")
            try:
                ckpt = load_checkpoint_file(text)
            except (CheckpointLoadError, OSError) as err:
                raise ConfigError(str(err)) from err
            if not isinstance(ckpt, dict) or not {"state_dict", "pytorch-lightning_version"} <= ckpt.keys():
                raise ConfigError(_not_a_lightning_checkpoint(text, sub))
            hparams = dict(ckpt.get("hyper_parameters") or {})
            hparams.pop("_instantiator", None)
            self._ckpt_hparams = dict(hparams)
            if not hparams:
                return
            model_cfg = self.config[sub].get("model")
            given_root = self._given.get(sub) if self._given is not None else None
            given_model = _subset(given_root, "model") if given_root is not None else _plain(model_cfg)
            given_args = given_model.get("init_args", given_model)
            current = _plain(model_cfg) or {}
            current_args = current.get("init_args", current)

            conflicts = []
            ckpt_class = hparams.get("_class_path")
            given_class = given_model.get("class_path")
            if ckpt_class and given_class and not _same_class(ckpt_class, given_class):
                conflicts.append(("class_path", ckpt_class, given_class))
            for key, value in list(hparams.items()):
                if key.startswith("_") or key in _LINKED:
                    continue
                if key in RESUME_MAY_CHANGE and key in current_args:
                    hparams.pop(key)  # the given (or default) value is used
                    continue
                if key in given_args and _plain(given_args[key]) != _plain(value):
                    conflicts.append((key, value, given_args[key]))
            if conflicts:
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
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            try:
                self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
            except ArgumentError as err:
                raise ConfigError(
                    f"the model options saved in --ckpt_path {text} do not parse: {self._parser_error(err)}"
                ) from err

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

    MaskSubCLI.__qualname__ = "MaskSubCLI"
    return MaskSubCLI


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
        module, _, attr = path.rpartition(".")
        return getattr(importlib.import_module(module), attr)

    try:
        return resolve(a) is resolve(b)
    except (ImportError, AttributeError, ValueError):
        return False


def __getattr__(name: str) -> Any:
    if name == "MaskSubCLI":  # `from masksub_lightning.cli import MaskSubCLI` keeps working
        return _cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
