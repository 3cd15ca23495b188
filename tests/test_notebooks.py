"""Executes every notebook in notebooks/ with nbclient on the current venv's Python (< 60 s each)."""
import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
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
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, kernel_manager):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # the repository keeps notebooks without outputs
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs not stripped"
    workdir = tmp_path / "cwd"
    workdir.mkdir()  # empty cwd: the notebook's default WORKDIR does not exist -> synthetic workdir
    client = NotebookClient(nb, km=kernel_manager, timeout=60, resources={"metadata": {"path": str(workdir)}})
    start = time.time()
    client.execute()
    assert time.time() - start < 60
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 2, "expected the per-group and gap plots"
