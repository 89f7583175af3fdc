"""The LightningModules: the shared manual-optimization step (``base.TrainingModule``) and the modules built on it."""
