"""benchmarks.peers_same_net's logical-batch table (gradient accumulation) from timed rows: each
method's (N - 1) accumulate steps + one full step, the best DP and non-private method per
framework, and dpft's speedup over Opacus, checked against values computed here by hand."""
from __future__ import annotations

import pytest

from benchmarks import dp_overhead, peers_same_net


def _row(fw, method, step_s, private, mb=None, batch=8):
    return {"network": "net", "framework": fw, "method": method, "microbatch": mb, "batch": batch,
            "step_s": step_s, "private": private}


def test_logical_batches_from_accumulate_and_full_steps():
    rows = [
        _row("dpft x", "nonprivate_plain", 0.30, False), _row("dpft x", "nonprivate_plain+accumulate", 0.25, False),
        _row("dpft x", "bookkeeping", 0.40, True, 8), _row("dpft x", "bookkeeping+accumulate", 0.28, True, 8),
        _row("dpft x", "bookkeeping", 0.38, True, 4), _row("dpft x", "bookkeeping+accumulate", 0.33, True, 4),
        _row("dpft x", "nonprivate", 0.35, False, 8),  # no accumulate step: not a candidate
        _row("opacus y", "nonprivate", 0.31, False), _row("opacus y", "nonprivate+accumulate", 0.29, False),
        _row("opacus y", "hooks", 0.55, True), _row("opacus y", "hooks+accumulate", 0.50, True),
        {"network": "net", "framework": "opacus y", "method": "ghost", "error": "x", "private": True},
    ]
    out = {(r["framework"], r["physical_batches"]): r for r in peers_same_net.logical_summary(rows, (1, 10))}
    # N = 1: the full steps alone; bookkeeping at mb 4 (0.38) beats mb 8 (0.40)
    d1 = out[("dpft x", 1)]
    assert d1["best_dp"] == "bookkeeping mb 4" and d1["logical_batch"] == 8
    assert d1["dp_examples_per_s"] == pytest.approx(8 / 0.38)
    assert d1["ratio_vs_best_nonprivate"] == pytest.approx(0.38 / 0.30)
    assert d1["dp_speedup_vs_opacus_best"] == pytest.approx(0.55 / 0.38)
    # N = 10: mb 8 wins (9 x 0.28 + 0.40 = 2.92 < 9 x 0.33 + 0.38 = 3.35)
    d10, o10 = out[("dpft x", 10)], out[("opacus y", 10)]
    assert d10["best_dp"] == "bookkeeping mb 8" and d10["logical_batch"] == 80
    assert d10["dp_examples_per_s"] == pytest.approx(80 / (9 * 0.28 + 0.40))
    assert d10["best_nonprivate_examples_per_s"] == pytest.approx(80 / (9 * 0.25 + 0.30))
    assert o10["dp_examples_per_s"] == pytest.approx(80 / (9 * 0.50 + 0.55))
    assert o10["ratio_vs_best_nonprivate"] == pytest.approx((9 * 0.50 + 0.55) / (9 * 0.29 + 0.31))
    assert d10["dp_speedup_vs_opacus_best"] == pytest.approx((9 * 0.50 + 0.55) / (9 * 0.28 + 0.40))


def test_logical_batch_seconds_refuses_no_batches():
    assert dp_overhead.logical_batch_seconds(1.0, 0.5, 3) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="physical_batches=0"):
        dp_overhead.logical_batch_seconds(1.0, 0.5, 0)


def test_a_framework_without_a_dp_accumulate_step_is_reported_not_left_out():
    rows = [
        _row("dpft x", "bookkeeping", 0.40, True, 8), _row("dpft x", "bookkeeping+accumulate", 0.28, True, 8),
        _row("opacus y", "hooks", 0.55, True),  # its accumulate step failed: an error row, no time
        {"network": "net", "framework": "opacus y", "method": "hooks+accumulate", "error": "boom", "private": True},
    ]
    out = peers_same_net.logical_summary(rows, (4,))
    by_fw = {r["framework"]: r for r in out}
    assert set(by_fw) == {"dpft x", "opacus y"}
    assert "no DP method timed both" in by_fw["opacus y"]["error"]
    assert "dp_speedup_vs_opacus_best" not in by_fw["dpft x"]  # nothing to divide by
    assert by_fw["dpft x"]["dp_examples_per_s"] == pytest.approx(32 / (3 * 0.28 + 0.40))
