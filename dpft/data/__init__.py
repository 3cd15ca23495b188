"""dpft.data."""
