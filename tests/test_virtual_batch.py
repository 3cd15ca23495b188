"""benchmarks/virtual_batch at a small size: the production step accumulates a Poisson batch over many
physical batches, and the noise of the update is sigma * C / B (the check the benchmark makes at
B = 262,144); the check can tell a 10% wrong sigma apart."""
from __future__ import annotations

import math

from benchmarks import virtual_batch


def test_the_update_accumulates_physical_batches_and_its_noise_is_sigma_c_over_b():
    row = virtual_batch.one(2048, 256)
    assert row["physical_batches"] == math.ceil(row["selected"] / 256) >= 8
    assert abs(row["selected"] - 2048) < 5 * math.sqrt(2048 * 0.5)  # Poisson(q = 0.5) over N = 4096
    assert row["noise_std_expected"] == virtual_batch.SIGMA * virtual_batch.CLIP / 2048
    assert abs(row["noise_std_rel_error"]) <= row["noise_std_tolerance"] < 0.05
    # A sigma 10% off would be seen: its expected std is outside the tolerance of the measured one.
    assert abs(row["noise_std"] / (1.1 * row["noise_std_expected"]) - 1) > row["noise_std_tolerance"]
