"""MaskSub for any timm model, as PyTorch Lightning modules."""

__version__ = "0.1.0"
