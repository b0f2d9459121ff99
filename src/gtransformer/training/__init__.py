"""Training: the `Trainer`, checkpoints in a `RunDir`, evaluation (bits per byte), samples, logs and reports."""
