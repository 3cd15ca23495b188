"""Experiment configs: one file per experiment, each with `get_config(arg=None)` (ml_collections style).

Shared recipes (`_medical.py`, `_large_scale.py`) are imported as a package (`from configs import _medical`);
`dpft.config.base.load_config` puts the directory above `configs/` on the import path while it loads a file.
"""
