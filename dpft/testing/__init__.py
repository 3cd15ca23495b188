"""Testing-only helpers (tiny models, synthetic predictions); never imported by the training or evaluation path."""
