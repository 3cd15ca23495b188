"""dpft.train."""
