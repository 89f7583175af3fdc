"""The method itself: random masks on tensors, sub-branch kinds (how the perturbed branch differs), the losses."""
