"""MaskSub ("Masking meets Supervision", CVPR 2025) for any timm model, as PyTorch Lightning modules.

Public API::

    from masksub_lightning import MaskSubModule, SubBranch, register_sub_branch, build_sub_branch, MaskSubLoss
"""

from masksub_lightning.losses import MaskSubLoss
from masksub_lightning.module import MaskSubModule
from masksub_lightning.subbranch import (
    SUB_BRANCHES,
    SubBranch,
    UnsupportedModelError,
    build_sub_branch,
    register_sub_branch,
)

__version__ = "0.1.0"

__all__ = [
    "SUB_BRANCHES",
    "MaskSubLoss",
    "MaskSubModule",
    "SubBranch",
    "UnsupportedModelError",
    "build_sub_branch",
    "register_sub_branch",
]
