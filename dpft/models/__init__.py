"""dpft.models."""
