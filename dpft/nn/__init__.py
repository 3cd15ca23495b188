"""Neutral layer ops and taps, imported by both the models and the DP engine."""
