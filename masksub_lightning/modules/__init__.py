"""The LightningModules: the shared training step and the modules built on it."""
