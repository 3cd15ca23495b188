"""benchmarks/profile_step: every piece of the DP step is timed, and the book-keeping per-example
norms it times agree with the vmap engine's per-example gradient norms (its built-in correctness
check, which a GPU run reports for the native bf16 route)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import profile_step


@pytest.mark.slow
def test_every_piece_is_timed_and_bookkeeping_norms_match_vmap():
    rows = profile_step.bench("nfnet_nano", 4, 1, resolution=16, dtype="float32")
    assert [r["piece"] for r in rows] == list(profile_step.PIECES)
    assert all(r["seconds"] > 0 and r["resolution"] == 16 and r["dtype"] == "float32" for r in rows)
    base = next(r for r in rows if r["piece"] == "batched_backward")
    assert base["ratio_vs_batched_backward"] == 1.0
    # book-keeping norms (from layer inputs and output gradients) vs vmap per-example gradients
    assert rows[0]["bk_norms_max_rel_diff"] < 1e-4


@pytest.mark.slow
def test_only_the_pieces_asked_for_are_built():
    rows = profile_step.bench("nfnet_nano", 2, 1, resolution=16, dtype="float32", names=("bk_norms", "bk_full_dp"))
    assert [r["piece"] for r in rows] == ["bk_norms", "bk_full_dp"]
    assert all(r["bk_norms_max_rel_diff"] is None and r["ratio_vs_batched_backward"] is None for r in rows)


def test_the_norm_check_flags_a_wrong_norm():
    ref = jnp.asarray([1.0, 2.0, 4.0])
    right = {"bk_norms": (lambda: jnp.square(ref), ()), "norms": (lambda: ref, ())}
    wrong = {"bk_norms": (lambda: jnp.square(ref.at[1].multiply(1.01)), ()), "norms": (lambda: ref, ())}
    assert profile_step.norms_rel_diff(right) == 0.0
    assert np.isclose(profile_step.norms_rel_diff(wrong), 0.01, rtol=1e-4)
    zero = {"bk_norms": (lambda: jnp.asarray([0.0, 0.25]), ()), "norms": (lambda: jnp.asarray([0.0, 0.0]), ())}
    assert profile_step.norms_rel_diff(zero) == 0.5  # defined (absolute) where the reference norm is 0
