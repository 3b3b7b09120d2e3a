"""Training engine: distributed setup, trainer, checkpoints, metrics, evaluation."""
