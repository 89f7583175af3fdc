"""MaskSub ("Masking meets Supervision", CVPR 2025) for any timm model, as PyTorch Lightning modules.

Public API::

    from masksub_lightning import MaskSubModule, SubBranch, register_sub_branch, build_sub_branch, MaskSubLoss
    from masksub_lightning import MAEModule, LUTModule, export_encoder     # MAE / LUT pre-training

The names are imported on first use (``__getattr__`` below): importing the package, or running ``masksub
recipes`` / ``masksub --help``, does not import torch or Lightning, which takes several seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "MaskSubLoss": "masksub_lightning.losses",
    "MaskSubModule": "masksub_lightning.module",
    "SUB_BRANCHES": "masksub_lightning.subbranch",
    "SubBranch": "masksub_lightning.subbranch",
    "UnsupportedModelError": "masksub_lightning.subbranch",
    "build_sub_branch": "masksub_lightning.subbranch",
    "register_sub_branch": "masksub_lightning.subbranch",
    "AtomicCheckpointIO": "masksub_lightning.checkpointing",
    "AlwaysLastCheckpoint": "masksub_lightning.checkpointing",
    "MAEModule": "masksub_lightning.pretraining",
    "LUTModule": "masksub_lightning.pretraining",
    "export_encoder": "masksub_lightning.pretraining",
    "BranchGradients": "masksub_lightning.callbacks",
    "MaskedInputLoss": "masksub_lightning.callbacks",
    "SubBranchPictures": "masksub_lightning.callbacks",
    "export_checkpoint": "masksub_lightning.export",
    "plot_runs": "masksub_lightning.plot",
}

__all__ = [
    "SUB_BRANCHES",
    "AlwaysLastCheckpoint",
    "AtomicCheckpointIO",
    "BranchGradients",
    "LUTModule",
    "MAEModule",
    "MaskSubLoss",
    "MaskSubModule",
    "MaskedInputLoss",
    "SubBranch",
    "SubBranchPictures",
    "UnsupportedModelError",
    "build_sub_branch",
    "export_checkpoint",
    "export_encoder",
    "plot_runs",
    "register_sub_branch",
]

if TYPE_CHECKING:  # static analysers and IDEs see ordinary imports
    from masksub_lightning.callbacks import BranchGradients, MaskedInputLoss, SubBranchPictures
    from masksub_lightning.checkpointing import AlwaysLastCheckpoint, AtomicCheckpointIO
    from masksub_lightning.export import export_checkpoint
    from masksub_lightning.losses import MaskSubLoss
    from masksub_lightning.module import MaskSubModule
    from masksub_lightning.plot import plot_runs
    from masksub_lightning.pretraining import LUTModule, MAEModule, export_encoder
    from masksub_lightning.subbranch import (
        SUB_BRANCHES,
        SubBranch,
        UnsupportedModelError,
        build_sub_branch,
        register_sub_branch,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        # AttributeError (not ImportError) lets `from masksub_lightning import <submodule>` fall back to importing it.
        raise AttributeError(f"module 'masksub_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
