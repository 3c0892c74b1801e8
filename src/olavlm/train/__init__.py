"""Training: stage policy, the Accelerate loop, checkpoints, metrics."""
