"""dpft.evaluate."""
