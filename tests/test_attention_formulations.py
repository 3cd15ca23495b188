"""benchmarks.attention_formulations on vit_micro: every formulation's plain and book-keeping steps
agree with flax's default attention (the benchmark checks), and a wrong core is caught."""
from __future__ import annotations

import pytest

from benchmarks import attention_formulations as af


@pytest.mark.slow  # quick tier: see docs/running.md
def test_rows_and_equal_formulations():
    rows = af.run("vit_micro", batch=4, iters=1)
    assert {(r["formulation"], r["method"]) for r in rows} == {
        (f, m) for f in ("flax_default", "einsum", "self_attention") for m in af.METHODS}
    for r in rows:
        assert r["max_rel_diff_vs_flax_default"] <= 1e-4 and r["step_s"] > 0
        if r["formulation"] == "flax_default":
            assert r["time_vs_flax_default"] == 1.0 and r["max_rel_diff_vs_flax_default"] == 0.0


def test_a_wrong_core_is_refused(monkeypatch):
    def unscaled(query, key, value, bias=None, mask=None, **options):  # forgets D^-1/2
        import jax
        import jax.numpy as jnp
        probs = jax.nn.softmax(jnp.einsum("...qhd,...khd->...hqk", query, key), axis=-1)
        return jnp.einsum("...hqk,...khd->...qhd", probs, value)

    real = af.formulations
    # the reference and the wrong core only, one method: two programs (the full set is the test above)
    monkeypatch.setattr(af, "formulations", lambda: {"flax_default": real()["flax_default"], "einsum": unscaled})
    monkeypatch.setattr(af, "METHODS", ("nonprivate_plain",))
    with pytest.raises(AssertionError, match="einsum nonprivate_plain differs from flax_default"):
        af.run("vit_micro", batch=4, iters=1)
