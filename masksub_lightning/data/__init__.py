"""LightningDataModules for MaskSub training (filled in by the data package)."""
