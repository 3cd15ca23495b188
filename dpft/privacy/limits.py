"""Numeric limits every command shares (`dpft train`'s config schema, `dpft accountant`, `dpft audit`).

Beyond them the arithmetic overflows or the memory explodes before any useful work: 10^12 updates
made the accountant allocate 99.8 TiB, a seed of 10^20 overflowed inside jax. No import: the config
schema reads them at start-up. (`dpft audit`'s canaries are bounded by their images:
`dpft.data.canaries.MAX_CANARIES`.)
"""
from __future__ import annotations

#: Updates one run (or one accountant query) may have.
MAX_STEPS = 10**7
#: Seeds are uint32 (jax PRNG keys, numpy generators).
MAX_SEED = 2**32 - 1
__all__ = ["MAX_STEPS", "MAX_SEED"]
