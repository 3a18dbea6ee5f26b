"""Training: objective, the training step, optimizer, checkpoints, metrics, profiling, validation, export and the trainer loop."""
