"""Training: config schema, the Accelerate training loop, checkpoints and run logging."""
