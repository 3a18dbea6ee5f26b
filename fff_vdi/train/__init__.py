"""Training: objective, optimizer, checkpoints, metrics, validation, export and the trainer loop."""
