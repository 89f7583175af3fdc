"""Lightning callbacks: analysis of a MaskSub run, checkpointing, and a k-NN monitor of a pre-trained encoder.

Usable from Python (``Trainer(callbacks=[...])``) and from YAML (``class_path: masksub_lightning.callbacks.X``).
"""

from masksub_lightning.callbacks.analysis import BranchGradients, MaskedInputLoss, SubBranchPictures
from masksub_lightning.callbacks.checkpoints import AlwaysLastCheckpoint, ResumeCheckpoint
from masksub_lightning.callbacks.knn import KNNMonitor

__all__ = [
    "AlwaysLastCheckpoint",
    "BranchGradients",
    "KNNMonitor",
    "MaskedInputLoss",
    "ResumeCheckpoint",
    "SubBranchPictures",
]
