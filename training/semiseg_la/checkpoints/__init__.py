"""checkpoints layer."""
