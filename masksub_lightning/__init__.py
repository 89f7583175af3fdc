"""MaskSub ("Masking meets Supervision", CVPR 2025) for any timm model, as PyTorch Lightning modules.

Public API::

    from masksub_lightning import MaskSubModule, SubBranch, register_sub_branch, build_sub_branch, MaskSubLoss
    from masksub_lightning import CoSubModule                               # CoSub, the peer method
    from masksub_lightning import MAEModule, LUTModule, export_encoder     # MAE / LUT pre-training

The names are imported on first use (``__getattr__`` below): importing the package, or running ``masksub
recipes`` / ``masksub --help``, does not import torch or Lightning, which takes several seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from masksub_lightning import _moved

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "MaskSubLoss": "masksub_lightning.method.losses",
    "MaskSubModule": "masksub_lightning.modules.masksub",
    "CoSubModule": "masksub_lightning.modules.cosub",
    "TrainingModule": "masksub_lightning.modules.base",
    "SUB_BRANCHES": "masksub_lightning.method.subbranch",
    "SubBranch": "masksub_lightning.method.subbranch",
    "UnsupportedModelError": "masksub_lightning.method.subbranch",
    "build_sub_branch": "masksub_lightning.method.subbranch",
    "register_sub_branch": "masksub_lightning.method.subbranch",
    "AtomicCheckpointIO": "masksub_lightning.training.checkpoint_io",
    "AlwaysLastCheckpoint": "masksub_lightning.callbacks.checkpoints",
    "ResumeCheckpoint": "masksub_lightning.callbacks.checkpoints",
    "FSDP2Strategy": "masksub_lightning.training.sharding",
    "MAEModule": "masksub_lightning.modules.pretraining",
    "LUTModule": "masksub_lightning.modules.pretraining",
    "export_encoder": "masksub_lightning.modules.pretraining",
    "BranchGradients": "masksub_lightning.callbacks.analysis",
    "MaskedInputLoss": "masksub_lightning.callbacks.analysis",
    "SubBranchPictures": "masksub_lightning.callbacks.analysis",
    "export_checkpoint": "masksub_lightning.commands.export",
    "plot_runs": "masksub_lightning.commands.plot",
}

__all__ = [
    "SUB_BRANCHES",
    "AlwaysLastCheckpoint",
    "AtomicCheckpointIO",
    "BranchGradients",
    "CoSubModule",
    "FSDP2Strategy",
    "LUTModule",
    "MAEModule",
    "MaskSubLoss",
    "MaskSubModule",
    "MaskedInputLoss",
    "ResumeCheckpoint",
    "SubBranch",
    "SubBranchPictures",
    "TrainingModule",
    "UnsupportedModelError",
    "build_sub_branch",
    "export_checkpoint",
    "export_encoder",
    "plot_runs",
    "register_sub_branch",
]

if TYPE_CHECKING:  # static analysers and IDEs see ordinary imports
    from masksub_lightning.callbacks import (
        AlwaysLastCheckpoint,
        BranchGradients,
        MaskedInputLoss,
        ResumeCheckpoint,
        SubBranchPictures,
    )
    from masksub_lightning.commands.export import export_checkpoint
    from masksub_lightning.commands.plot import plot_runs
    from masksub_lightning.method.losses import MaskSubLoss
    from masksub_lightning.method.subbranch import (
        SUB_BRANCHES,
        SubBranch,
        UnsupportedModelError,
        build_sub_branch,
        register_sub_branch,
    )
    from masksub_lightning.modules.base import TrainingModule
    from masksub_lightning.modules.cosub import CoSubModule
    from masksub_lightning.modules.masksub import MaskSubModule
    from masksub_lightning.modules.pretraining import LUTModule, MAEModule, export_encoder
    from masksub_lightning.training.checkpoint_io import AtomicCheckpointIO
    from masksub_lightning.training.sharding import FSDP2Strategy

_moved.install()  # 0.1's module paths (masksub_lightning.module, .resume, ...) resolve to the new ones


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
