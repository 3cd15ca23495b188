"""dpft.privacy."""
