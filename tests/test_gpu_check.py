"""benchmarks/gpu_check: the smoke mode runs end to end on CPU (tiny models, tiny batches) in a
subprocess whose interpreter cannot import what a typical GPU image lacks. Checked against the run's
own records and independent computations: every (model, method) is timed at its sizes, by a timing
worker that loads the compile worker's executables from the run's cache; the workers compiled
concurrently and no timing overlaps another worker's timing or any compile; a memory limit between
two sizes' predicted bytes skips the bigger size (``oom_predicted``) and puts the estimated largest
microbatch between them, and a size whose extrapolated bytes pass the limit is not even compiled; a
compile deadline that passes leaves ``compile_time_budget`` rows, and the sizes compiled before it
are still timed; the ratios and the summary follow from the rows."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from dpft.testing import cpu as cpu_env

from benchmarks import gpu_check
from benchmarks.gpu_check import estimate_max_batch

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Not on a typical GPU image (jax, flax, optax, chex, orbax only): importing any of them fails.
ABSENT = ("dp_accounting", "ml_collections", "grain", "opacus", "torch", "haiku", "tensorflow", "sklearn")
BLOCKER = f"""
import importlib.util
import sys
_ABSENT = {ABSENT!r}
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _ABSENT:
            raise ModuleNotFoundError(f"{{name}} is not installed on this (simulated) GPU image", name=name)
        return None
sys.meta_path.insert(0, _Absent())
# A probe for an optional package (etils, under jax's compilation cache, probes for tensorflow) sees
# it missing, as where it is not installed.
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] in _ABSENT else _find_spec(name, package))
"""
#: The smoke run of the shared fixture: one model, every method (vit_micro's workers run in
#: test_the_all_ghost_bookkeeping_variant_runs_when_asked_for and test_a_failing_worker_...).
MODELS_METHODS = [("nfnet_nano", meth) for meth in ("nonprivate", "bookkeeping", "vmap")]


def _run(env: dict, out, *extra: str) -> tuple[dict, str]:
    """Run the check (float32, one timed call per size) with `extra` arguments; (JSON, Markdown)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out), "--iters", "1",
           "--dtype", "float32", *extra]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with open(out / "gpu_check.json") as f:
        return json.load(f), (out / "gpu_check.md").read_text()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    # no persistent compilation cache (tests/conftest.py): the check measures compiling
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=cpu_env.xla_flags(1), PYTHONPATH=os.pathsep.join([str(site), REPO]))
    return env


@pytest.fixture(scope="module")
def smoke(env, tmp_path_factory):
    """The smoke run of nfnet_nano: 3 methods (3 workers compiling at once) at batch sizes 2 and 4, no memory limit."""
    return _run(env, tmp_path_factory.mktemp("smoke"), "--models", "nfnet_nano", "--budget-s", "1500",
                "--compile-s", "1200")


def _rows(doc: dict, model: str, method: str) -> list[dict]:
    return [r for r in doc["rows"] if r["model"] == model and r["method"] == method]


def test_the_blocker_really_blocks(env):
    proc = subprocess.run([sys.executable, "-c", "import dp_accounting"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "not installed" in proc.stderr


def test_every_model_and_method_is_timed_at_its_sizes(smoke):
    doc, md = smoke
    for model, method in MODELS_METHODS:
        mine = _rows(doc, model, method)
        assert [(r["batch"], r["status"]) for r in mine] == [(2, "ok"), (4, "ok")], (model, method, mine)
        for r in mine:
            assert r["examples_per_s"] == pytest.approx(r["batch"] / r["step_s"])
            assert r["compile_s"] > 0 and r["predicted_mib"] > 0
            # the timing worker loaded what the compile worker compiled from the run's cache
            assert r["cache_hit"] is True and 0 < r["load_s"], r
            # predicted = arguments + outputs + temp + generated code - aliased (all recorded in the row)
            assert r["predicted_mib"] == pytest.approx(r["xla_argument_mib"] + r["xla_output_mib"] + r["xla_temp_mib"]
                                                       + r["xla_code_mib"] - r["xla_alias_mib"])
        assert mine[0]["predicted_mib"] < mine[1]["predicted_mib"]  # twice the batch needs more memory
        assert f"| {model} | {method} |" in md
    assert doc["machine"]["backend"] == "cpu"


def test_compiles_overlap_and_no_timing_overlaps_a_compile_or_another_worker(smoke):
    doc, _ = smoke
    rows = doc["rows"]
    last_compile = max(r["compile_end"] for r in rows)
    assert all(r["timed_start"] >= last_compile for r in rows)
    # Compile phase: each worker's compile interval overlaps another worker's, and the phase took less
    # wall time than the workers' compile intervals one after another.
    spans = {}
    for model, method in MODELS_METHODS:
        mine = _rows(doc, model, method)
        spans[model, method] = (min(r["compile_start"] for r in mine), max(r["compile_end"] for r in mine))
    for k, (s, e) in spans.items():
        assert any(s < e2 and s2 < e for k2, (s2, e2) in spans.items() if k2 != k), k
    wall = max(e for _, e in spans.values()) - min(s for s, _ in spans.values())
    assert wall < 0.8 * sum(e - s for s, e in spans.values())
    # Timing phase: the rows' timed intervals (worker clocks) of different workers are disjoint ...
    timed = sorted((r["timed_start"], r["timed_end"], r["model"], r["method"]) for r in rows)
    for (_, end, *w1), (start, _, *w2) in zip(timed, timed[1:]):
        assert end <= start, (w1, w2)
    # ... and so are the workers' timing intervals (go -> exit, driver clock), which hold their rows' intervals.
    timing = sorted({(r["worker_timing_start"], r["worker_timing_end"], r["model"], r["method"]) for r in rows})
    assert len(timing) == len(MODELS_METHODS)
    for (_, end, *_), (start, *_) in zip(timing, timing[1:]):
        assert end <= start
    for r in rows:
        assert r["worker_timing_start"] <= r["timed_start"] < r["timed_end"] <= r["worker_timing_end"]
    # Non-private first (the denominators), then book-keeping, then vmap.
    assert [m for *_, m in timing] == ["nonprivate", "bookkeeping", "vmap"]


def test_ratios_and_summary_follow_from_the_rows(smoke):
    doc, _ = smoke
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    for r in ok:
        np_row = next(x for x in ok if x["model"] == r["model"] and x["method"] == "nonprivate"
                      and x["batch"] == r["batch"])
        assert r["ratio_vs_nonprivate_same_batch"] == pytest.approx(np_row["step_s"] / r["step_s"])
        best_np = max(x["examples_per_s"] for x in ok if x["model"] == r["model"] and x["method"] == "nonprivate")
        assert r["ratio_vs_best_nonprivate"] == pytest.approx(r["examples_per_s"] / best_np)
    assert len(doc["summary"]) == len(MODELS_METHODS)
    for s in doc["summary"]:
        mine = [r for r in ok if r["model"] == s["model"] and r["method"] == s["method"]]
        best = max(mine, key=lambda r: r["examples_per_s"])
        assert (s["best_examples_per_s"], s["at_batch"]) == (best["examples_per_s"], best["batch"])
        assert s["ratio_vs_best_nonprivate"] == pytest.approx(best["ratio_vs_best_nonprivate"])
        assert s["compile_s_max"] == max(r["compile_s"] for r in mine)
        # No memory limit on CPU: no estimate, and nothing was skipped.
        assert s["memory_limit_mib"] is None and s["est_max_microbatch"] is None and s["not_timed"] is None


def test_a_memory_limit_between_two_sizes_skips_the_bigger_and_estimates_between(smoke, env, tmp_path):
    doc0, _ = smoke
    p2, p4 = (r["predicted_mib"] for r in _rows(doc0, "nfnet_nano", "nonprivate"))
    limit = p2 + 0.3 * (p4 - p2)
    doc, md = _run(env, tmp_path, "--models", "nfnet_nano", "--methods", "nonprivate", "--budget-s", "600",
                   "--compile-s", "500", "--memory-limit-mib", repr(limit))
    small, big = _rows(doc, "nfnet_nano", "nonprivate")
    assert small["predicted_mib"] == pytest.approx(p2) and big["predicted_mib"] == pytest.approx(p4)
    assert small["status"] == "ok" and small["examples_per_s"] > 0
    assert big["status"] == "oom_predicted" and "examples_per_s" not in big and "> memory limit" in big["cause"]
    (s,) = doc["summary"]
    # bytes = a + c b through (2, p2) and (4, p4): the limit is reached at b = 2 + 0.3 * 2 = 2.6.
    assert s["est_max_microbatch"] == math.floor(2 + 0.3 * 2) == 2
    assert s["est_fit_mib_per_example"] == pytest.approx((p4 - p2) / 2)
    assert s["memory_limit_mib"] == pytest.approx(limit, abs=2 ** -20) and s["not_timed"] == "4: oom_predicted"
    assert "oom_predicted" in md


def test_a_size_extrapolated_past_the_memory_limit_is_not_compiled(smoke, env, tmp_path):
    doc0, _ = smoke
    p2, p4 = (r["predicted_mib"] for r in _rows(doc0, "nfnet_nano", "nonprivate"))
    p8 = p4 + (p4 - p2) / 2 * 4  # the line through (2, p2) and (4, p4) at b = 8
    limit = p4 + 0.5 * (p8 - p4)
    doc, _ = _run(env, tmp_path, "--models", "nfnet_nano", "--methods", "nonprivate", "--batches", "2", "4", "8",
                  "16", "--budget-s", "600", "--compile-s", "500", "--memory-limit-mib", repr(limit))
    rows = _rows(doc, "nfnet_nano", "nonprivate")
    assert [(r["batch"], r["status"]) for r in rows] == [(2, "ok"), (4, "ok"), (8, "oom_predicted"),
                                                         (16, "oom_predicted")]
    for r in rows[2:]:
        assert "compile_s" not in r and "predicted_mib" not in r  # never compiled
    assert "extrapolated" in rows[2]["cause"] and "> memory limit" in rows[2]["cause"]
    (s,) = doc["summary"]
    # bytes = a + c b through (2, p2) and (4, p4) reaches the limit between 4 and 8
    assert 4 <= s["est_max_microbatch"] < 8


def test_the_route_rule_variants_run_when_asked_for(env, tmp_path):
    """bookkeeping_ghost (every layer ghost) and bookkeeping_bytes (routes by bytes) are timed beside the
    non-private step, each with the rule `GHOST_RULE` names."""
    assert gpu_check.GHOST_RULE == {"bookkeeping": "auto", "bookkeeping_ghost": "always", "bookkeeping_bytes": "bytes"}
    doc, md = _run(env, tmp_path, "--models", "vit_micro", "--methods", "nonprivate", "bookkeeping_ghost",
                   "bookkeeping_bytes", "--batches", "2", "--budget-s", "600", "--compile-s", "500")
    assert [(r["method"], r["status"]) for r in doc["rows"]] == [("nonprivate", "ok"), ("bookkeeping_ghost", "ok"),
                                                                 ("bookkeeping_bytes", "ok")]
    for row in doc["rows"][1:]:
        assert row["ratio_vs_best_nonprivate"] == pytest.approx(row["examples_per_s"] / doc["rows"][0]["examples_per_s"])
        assert f"| vit_micro | {row['method']} |" in md


def test_a_passed_compile_deadline_leaves_rows_with_the_cause(env, tmp_path):
    doc, _ = _run(env, tmp_path, "--models", "nfnet_nano", "--methods", "nonprivate", "vmap", "--budget-s", "30",
                  "--compile-s", "0.5")
    assert [(r["method"], r["batch"], r["status"]) for r in doc["rows"]] == [
        (m, b, "compile_time_budget") for m in ("nonprivate", "vmap") for b in (2, 4)]
    assert all("compile deadline" in r["cause"] for r in doc["rows"])
    assert all(s["best_examples_per_s"] is None for s in doc["summary"])


def test_sizes_compiled_before_the_deadline_are_timed_and_the_others_say_why(env, tmp_path, monkeypatch):
    """A compile worker stopped at the deadline after its first size: the driver's timing phase
    times that size in a fresh worker (the 2026-11-30 H200 run lost NFNet-F0's compiled sizes so)."""
    import argparse
    import time

    from benchmarks import gpu_check
    for k in list(os.environ):
        if k not in env:
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = argparse.Namespace(out=str(tmp_path), iters=1, dtype="float32", memory_limit_mib=None, batches=[2, 4])
    w = gpu_check.Worker(args, "nfnet_nano", "nonprivate", REPO)
    # what compile_wait leaves: size 2 compiled, the worker stopped while compiling size 4
    gpu_check._append(os.path.join(w.ctl, "compiled.jsonl"),
                      {"batch": 2, "status": "compiled", "compile_start": 0.0, "compile_end": 1.0})
    w.compile_fate = ("compile_time_budget", "not compiled before the compile deadline; compile worker stopped")
    gpu_check.time_workers(args, [w], time.monotonic() + 600, lambda: None)
    small, big = gpu_check.worker_rows(w, [2, 4], "float32")
    assert small["status"] == "ok" and small["examples_per_s"] > 0 and small["cache_hit"] is False, small
    assert big["status"] == "compile_time_budget" and "compile deadline" in big["cause"]


def test_a_failing_worker_leaves_error_rows_with_the_cause(env, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.replace(repr(ABSENT), repr(ABSENT + ("dpft",))))
    env = {**env, "PYTHONPATH": os.pathsep.join([str(site), REPO])}
    doc, _ = _run(env, tmp_path / "out", "--models", "vit_micro", "--methods", "vmap", "--budget-s", "60",
                  "--compile-s", "50")
    assert [(r["batch"], r["status"]) for r in doc["rows"]] == [(2, "error"), (4, "error")]
    assert all(r["cause"].startswith("worker failed: ") and "dpft is not installed" in r["cause"]
               for r in doc["rows"])


@pytest.mark.parametrize("limit, expected", [(1250.0, 150), (700.0, 40), (4000.0, 450), (3500.0, 400)])
def test_estimate_max_batch_interpolates_between_the_sizes_around_the_limit(limit, expected):
    # bytes 1000, 1500, 3500 at b = 100, 200, 400: 500 + 5 b up to 200, -500 + 10 b from 200 to 400.
    est, a, c = estimate_max_batch({100: 1000.0, 200: 1500.0, 400: 3500.0}, limit)
    assert est == expected
    assert a + c * est <= limit < a + c * (est + 1)


def test_estimate_max_batch_needs_two_growing_sizes():
    assert estimate_max_batch({128: 1000.0}, 5000.0) == (None, None, None)
    assert estimate_max_batch({128: 1000.0, 512: 900.0}, 5000.0) == (None, None, None)
