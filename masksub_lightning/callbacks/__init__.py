"""Lightning callbacks: analysis of a MaskSub run, and checkpointing.

Usable from Python (``Trainer(callbacks=[...])``) and from YAML (``class_path: masksub_lightning.callbacks.X``).
"""

from masksub_lightning.callbacks.analysis import BranchGradients, MaskedInputLoss, SubBranchPictures
from masksub_lightning.callbacks.checkpoints import AlwaysLastCheckpoint, ResumeCheckpoint

__all__ = [
    "AlwaysLastCheckpoint",
    "BranchGradients",
    "MaskedInputLoss",
    "ResumeCheckpoint",
    "SubBranchPictures",
]
