"""Module paths from before the package was split into subpackages (0.1) resolve to where the names live now.

A user's YAML ``class_path: masksub_lightning.resume.ResumeCheckpoint``, an ``import masksub_lightning.module`` in
their code, and the ``_class_path`` of a checkpoint saved by 0.1 keep working; the first two print one line naming
the new path (checkpoints are translated silently by :func:`current_path`). Nothing here imports torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

#: old module -> the module its names live in now
MOVED_MODULES = {
    "masksub_lightning.module": "masksub_lightning.modules.masksub",
    "masksub_lightning.pretraining": "masksub_lightning.modules.pretraining",
    "masksub_lightning.masking": "masksub_lightning.method.masking",
    "masksub_lightning.subbranch": "masksub_lightning.method.subbranch",
    "masksub_lightning.losses": "masksub_lightning.method.losses",
    "masksub_lightning.network": "masksub_lightning.models.network",
    "masksub_lightning.pretrained": "masksub_lightning.models.weights",
    "masksub_lightning.analysis_vit": "masksub_lightning.models.vit_analysis",
    "masksub_lightning.optim": "masksub_lightning.training.optim",
    "masksub_lightning.guards": "masksub_lightning.training.guards",
    "masksub_lightning.checkpointing": "masksub_lightning.training.checkpoint_io",
    "masksub_lightning.resume": "masksub_lightning.training.resume",
    "masksub_lightning.cli": "masksub_lightning.commands.cli",
    "masksub_lightning.recipes": "masksub_lightning.commands.recipes",
    "masksub_lightning.plot": "masksub_lightning.commands.plot",
    "masksub_lightning.export": "masksub_lightning.commands.export",
}
#: (old module, name) -> the module of a name that did not follow its module
MOVED_NAMES = {
    ("masksub_lightning.cli", "main"): "masksub_lightning.commands",
    ("masksub_lightning.cli", "SUBCOMMANDS"): "masksub_lightning.commands",
    ("masksub_lightning.cli", "help_text"): "masksub_lightning.commands",
    ("masksub_lightning.cli", "ConfigError"): "masksub_lightning.commands.errors",
    ("masksub_lightning.cli", "is_setup_error"): "masksub_lightning.commands.errors",
    ("masksub_lightning.cli", "one_line"): "masksub_lightning.commands.errors",
    ("masksub_lightning.checkpointing", "AlwaysLastCheckpoint"): "masksub_lightning.callbacks.checkpoints",
    ("masksub_lightning.resume", "ResumeCheckpoint"): "masksub_lightning.callbacks.checkpoints",
}
#: Old paths that installed console scripts call (``masksub = masksub_lightning.cli:main``): no warning.
_SILENT = {("masksub_lightning.cli", "main")}


def silence(dotted: str) -> None:
    """No warning for ``dotted`` (a checkpoint's own ``_class_path``: the user did not write it)."""
    module, _, name = dotted.rpartition(".")
    _SILENT.add((module, name))


def current_path(dotted: str) -> str:
    """``old.module.Name`` -> ``new.module.Name`` (unchanged when it did not move)."""
    module, _, name = dotted.rpartition(".")
    if module in MOVED_MODULES:
        return f"{MOVED_NAMES.get((module, name), MOVED_MODULES[module])}.{name}"
    return dotted


class _MovedModule(types.ModuleType):
    """Stands in for an old module: each name is looked up where it lives now, with one line saying where."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target = MOVED_NAMES.get((self.__name__, name), MOVED_MODULES[self.__name__])
        value = getattr(importlib.import_module(target), name)
        if (self.__name__, name) not in _SILENT:
            # warn_explicit with no source line: the warning prints as a single line.
            warnings.warn_explicit(
                f"{self.__name__}.{name} moved to {target}.{name}; use the new path (the old one will go)",
                FutureWarning,
                filename="masksub_lightning",
                lineno=0,
            )
        setattr(self, name, value)  # once per name
        return value


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname in MOVED_MODULES:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        return _MovedModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: names resolve on first access."""


def install() -> None:
    """Add the finder once (``masksub_lightning/__init__.py`` calls this)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
