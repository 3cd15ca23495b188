"""Executes every notebook in notebooks/ with nbclient on the current venv's Python (< 60 s each):
on a synthetic workdir, against a real tiny trained workdir (slow), and with a mistyped WORKDIR."""
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from dpft.testing import cpu as cpu_env

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FAIRNESS = ROOT / "notebooks" / "fairness_report.ipynb"
KERNEL = "dpft-test-python3"


@pytest.fixture()
def kernel_manager(tmp_path):
    """A kernelspec in a temp dir whose argv is this interpreter (so the venv's packages are used)."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "dpft test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)
    yield km
    if km.has_kernel:  # nbclient leaves a kernel it did not create running
        km.shutdown_kernel(now=True)


def _with_parameters(path, **params):
    """The notebook with a cell assigning `params` right after its 'parameters' cell (papermill style)."""
    nb = nbformat.read(path, as_version=4)
    idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if params:
        assert idx is not None, f"{path.name}: no cell tagged 'parameters'"
        src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
        nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(src))
    return nb


def _execute(nb, km, cwd, timeout=60):
    client = NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(cwd)}})
    start = time.time()
    client.execute()
    return time.time() - start


def _images(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "display_data" and "image/png" in o.get("data", {})]


def _parameters(path):
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    scope: dict = {}
    exec(cell.source, scope)  # noqa: S102  (the notebook's own assignments)
    return scope


def test_notebooks_exist_and_are_stripped():
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:  # the repository keeps notebooks without outputs
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs not stripped"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_on_synthetic_data(path, tmp_path, kernel_manager):
    params = {"WORKDIR": None, "N_RESAMPLES": 100, "OUT_DIR": str(tmp_path / "out")} if path == FAIRNESS else {}
    nb = _with_parameters(path, **params)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    assert _execute(nb, kernel_manager, cwd) < 60
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert len(_images(nb)) >= 3, "expected the per-group, gap and sweep plots"
    if path == FAIRNESS:
        assert (tmp_path / "out" / "eval" / "report.md").is_file()
        assert (tmp_path / "out" / "compare" / "compare.png").is_file()


def test_default_workdir_is_the_run_make_demo_writes():
    from dpft.demo import cli as demo_cli

    makefile = (ROOT / "Makefile").read_text()
    demo_dir = re.search(r"dpft demo --workdir (\S+)", makefile).group(1)
    import argparse
    parser = argparse.ArgumentParser()
    demo_cli.add_arguments(parser)
    eps = [float(e) for e in parser.get_default("epsilons").split(",")]
    params = _parameters(FAIRNESS)
    wd = (FAIRNESS.parent / params["WORKDIR"]).resolve()
    expected = {(ROOT / demo_dir / "finetune" / f"eps_{e:g}").resolve() for e in eps}  # dpft.demo.steps.fine_tune_sweep's names
    assert wd in expected
    assert (FAIRNESS.parent / params["COMPARE"]).resolve().parent == (ROOT / demo_dir / "finetune").resolve()
    assert params["OUT_DIR"] is None and params["N_RESAMPLES"] >= 1000


def test_mistyped_workdir_is_an_error(tmp_path, kernel_manager):
    nb = _with_parameters(FAIRNESS, WORKDIR="no/such/run", OUT_DIR=str(tmp_path / "out"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with pytest.raises(CellExecutionError, match="does not exist"):
        _execute(nb, kernel_manager, cwd)
    assert not (tmp_path / "out" / "synthetic_run").exists()


def test_mistyped_compare_glob_is_an_error_not_synthetic_runs(tmp_path, kernel_manager):
    """A real WORKDIR with a COMPARE glob that matches nothing stops at the comparison cell, naming the glob;
    the notebook never switches to synthetic runs beside a real run."""
    from dpft.testing.predictions import write_synthetic_workdir
    write_synthetic_workdir(tmp_path / "run", task="multilabel", n_test=200, n_val=150)
    nb = _with_parameters(FAIRNESS, WORKDIR=str(tmp_path / "run"), COMPARE=str(tmp_path / "no_such" / "*"),
                          N_RESAMPLES=20, OUT_DIR=str(tmp_path / "out"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with pytest.raises(CellExecutionError, match="matches no run directory"):
        _execute(nb, kernel_manager, cwd)
    assert not (tmp_path / "out" / "sweep").exists() and (tmp_path / "out" / "eval" / "report.md").is_file()


def _tree_digest(path):
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_notebook_on_a_real_tiny_trained_workdir(tmp_path, kernel_manager):
    """Two tiny digits runs (DP and non-private) trained and evaluated by the CLI, then the notebook
    on them: it reads their predictions, writes only to OUT_DIR, and compares the two runs."""
    env = dict(os.environ, XLA_FLAGS=cpu_env.xla_flags(1))  # one CPU device
    runs = tmp_path / "runs"
    for name, extra in (("eps_8", []), ("non_private", ["--config.privacy.enabled=False",
                                                         "--config.train.optimizer.name=adam",
                                                         "--config.train.optimizer.learning_rate=0.001"])):
        wd = runs / name
        cmd = [sys.executable, "-m", "dpft.cli", "train", "--config", str(ROOT / "configs" / "digits_demo.py"),
               "--workdir", str(wd), "--config.train.num_updates=3", "--config.train.eval_every=0",
               "--config.train.checkpoint_every=3", "--config.train.lr_schedule.name=constant",
               "--config.train.lr_schedule.warmup_steps=0", "--config.individual.enabled=False",
               # small: the notebook reads the predictions, the model does not matter
               "--config.model.name=nfnet_nano", "--config.data.image_size=16", "--config.data.augmult=1",
               "--config.train.batch_size=32", "--config.train.physical_batch_size=32", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        r = subprocess.run([sys.executable, "-m", "dpft.cli", "evaluate", "--workdir", str(wd), "--reuse-predictions",
                            "--bootstrap", "20", "--no-plots"], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    before = {d: _tree_digest(d / "eval") for d in runs.iterdir()}
    out = tmp_path / "nb_out"
    nb = _with_parameters(FAIRNESS, WORKDIR=str(runs / "eps_8"), COMPARE=str(runs / "*"), N_RESAMPLES=100,
                          OUT_DIR=str(out))
    _execute(nb, kernel_manager, tmp_path, timeout=120)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert {d: _tree_digest(d / "eval") for d in runs.iterdir()} == before  # the workdirs' eval/ untouched
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert m["meta"]["predictions"].startswith(str(runs / "eps_8"))
    cmp = json.loads((out / "compare" / "compare.json").read_text())
    assert sorted(r["run"] for r in cmp["runs"]) == ["eps_8", "non_private"]
    assert len(glob.glob(str(out / "compare" / "compare.png"))) == 1
