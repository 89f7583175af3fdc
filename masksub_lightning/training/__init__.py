"""What the training step and the run rely on: optimizers and schedules, the non-finite-loss guard, gradients under
mixed precision, FSDP2 sharding, checkpoint files, and the per-rank state that makes resume exact."""
