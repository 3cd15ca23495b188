"""benchmarks/gpu_check: the smoke mode runs end to end on CPU (tiny models, tiny batches) in a
subprocess whose interpreter cannot import what a typical GPU image lacks, and writes JSON whose
ratios agree with its own rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Not on a typical GPU image (jax, flax, optax, chex, orbax only): importing any of them fails.
ABSENT = ("dp_accounting", "ml_collections", "grain", "opacus", "torch", "haiku", "tensorflow", "sklearn")
BLOCKER = f"""
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ImportError(f"{{name}} is not installed on this (simulated) GPU image")
        return None
sys.meta_path.insert(0, _Absent())
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(site), REPO]))
    out = tmp / "out"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out), "--budget-s", "1500",
           "--max-batch", "4", "--iters", "1", "--dtype", "float32"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with open(out / "gpu_check.json") as f:
        return json.load(f), (out / "gpu_check.md").read_text(), env


def test_the_blocker_really_blocks(smoke):
    _, _, env = smoke
    proc = subprocess.run([sys.executable, "-c", "import dp_accounting"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "not installed" in proc.stderr


def test_every_model_and_method_is_swept_to_the_cap(smoke):
    doc, md, _ = smoke
    rows = doc["rows"]
    for model in ("nfnet_micro", "vit_micro"):
        for method in ("nonprivate", "vmap") + (("bookkeeping",) if model == "nfnet_micro" else ()):
            mine = [r for r in rows if r["model"] == model and r["method"] == method]
            assert [r["batch"] for r in mine if r["status"] == "ok"] == [2, 4], (model, method, mine)
            assert mine[-1]["status"] == "max_batch"
            assert all(r["examples_per_s"] > 0 and r["xla_temp_mib"] is not None
                       for r in mine if r["status"] == "ok")
    # vit_micro is built from standard NNX layers: book-keeping runs, or refuses with a recorded error.
    vit_bk = [r for r in rows if r["model"] == "vit_micro" and r["method"] == "bookkeeping"]
    assert vit_bk and (vit_bk[-1]["status"] == "max_batch" or "tapped" in vit_bk[-1].get("error", ""))
    assert doc["machine"]["backend"] == "cpu"
    assert "| nfnet_micro | vmap |" in md


def test_ratios_follow_from_the_rows(smoke):
    doc, _, _ = smoke
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    for r in ok:
        np_row = next(x for x in ok if x["model"] == r["model"] and x["method"] == "nonprivate"
                      and x["batch"] == r["batch"])
        assert r["ratio_vs_nonprivate_same_batch"] == pytest.approx(np_row["step_s"] / r["step_s"])
        best_np = max(x["examples_per_s"] for x in ok if x["model"] == r["model"] and x["method"] == "nonprivate")
        assert r["ratio_vs_best_nonprivate"] == pytest.approx(r["examples_per_s"] / best_np)
    for s in doc["summary"]:
        mine = [r for r in ok if r["model"] == s["model"] and r["method"] == s["method"]]
        if mine:
            assert s["best_examples_per_s"] == max(r["examples_per_s"] for r in mine)
