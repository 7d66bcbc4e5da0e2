"""The training run of `stage: tpo`: data checks, collator, corrupted inputs, image-feature reuse, the trainer,
stopping on signals, and `run_tpo`, the lifecycle that wires them together."""
