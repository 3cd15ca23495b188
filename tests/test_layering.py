"""The layer order of DESIGN.md, read from the AST by tests/import_graph.py: every dpft module lies in a
layer of `import_graph.LAYERS` (the order docs/interfaces.md writes down), no module imports a higher
layer, the DP engine never imports the model zoo and evaluation never imports training."""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import import_graph  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_package_keeps_its_layers():
    edges, _ = import_graph.graph(ROOT)
    assert import_graph.violations(edges) == []
    assert "dpft.privacy.bookkeeping" in edges and "dpft.nn.taps" in edges["dpft.privacy.bookkeeping"]
    assert all(import_graph.layer_of(m) is not None for m in edges)  # every module has its layer
    # the workdir contract and the Predictor lie below both training and evaluation
    layer = import_graph.layer_of
    assert layer("dpft.workdir.contract") < layer("dpft.inference.predictor") < layer("dpft.train.loop") \
        < layer("dpft.evaluate.evaluate_cli")
    assert "dpft.workdir.contract" in edges["dpft.train.loop"] and "dpft.workdir.contract" in \
        edges["dpft.evaluate.evaluate_cli"]


def test_the_checked_order_is_the_documented_one():
    doc = " ".join((ROOT / "docs" / "interfaces.md").read_text(encoding="utf-8").split())
    assert import_graph.describe() in doc


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_fails_on_upward_unassigned_and_forbidden_imports(tmp_path):
    _write(tmp_path, {f"{pkg}/__init__.py": "" for pkg in (
        "dpft", "dpft/privacy", "dpft/models", "dpft/evaluate", "dpft/train", "dpft/workdir", "dpft/stray")})
    _write(tmp_path, {
        "dpft/errors.py": "",
        "dpft/cli.py": "",
        "dpft/models/zoo.py": "",
        "dpft/train/loop.py": "from dpft.workdir import contract\n",  # downward: fine
        "dpft/train/quick.py": "from dpft.evaluate import ok\n",  # training -> evaluation: upward
        "dpft/workdir/contract.py": "from ..train import loop\n",  # upward, relative
        "dpft/privacy/engine.py": "def f():\n    from ..models import zoo\n",  # same layer, lazy + relative
        "dpft/evaluate/report.py": "import dpft.train.loop\n",  # downward but forbidden
        "dpft/evaluate/ok.py": "from dpft.evaluate import report\nfrom dpft import errors\n",
        "dpft/models/bad.py": "from dpft import cli\n",  # from the second layer to the top
        "dpft/stray/thing.py": "from dpft import errors\n",  # a module in no layer
    })
    layers = (("dpft", "dpft.errors"), ("dpft.models", "dpft.privacy"), ("dpft.workdir",), ("dpft.train",),
              ("dpft.evaluate",), ("dpft.cli", "dpft.demo"))
    edges, sizes = import_graph.graph(tmp_path)
    assert edges["dpft.privacy.engine"] == {"dpft.models.zoo"}
    assert edges["dpft.workdir.contract"] == {"dpft.train.loop"}
    assert sizes["dpft.privacy.engine"] == 2
    assert import_graph.layer_of("dpft.stray.thing", layers) is None
    assert import_graph.layer_of("dpft.privacy.engine", layers) == 1
    assert sorted(import_graph.violations(edges, layers)) == [
        "dpft.demo: a layer entry that names no module",
        "dpft.evaluate.report -> dpft.train.loop: evaluation reads workdirs; it never imports training",
        "dpft.models.bad -> dpft.cli: layer 1 (dpft.models, dpft.privacy) imports the higher layer 5 "
        "(dpft.cli, dpft.demo)",
        "dpft.privacy.engine -> dpft.models.zoo: the DP engine never imports the model zoo",
        "dpft.stray.thing: in no layer of import_graph.LAYERS",
        "dpft.stray: in no layer of import_graph.LAYERS",
        "dpft.train.quick -> dpft.evaluate.ok: layer 3 (dpft.train) imports the higher layer 4 (dpft.evaluate)",
        "dpft.workdir.contract -> dpft.train.loop: layer 2 (dpft.workdir) imports the higher layer 3 "
        "(dpft.train)",
    ]
    # the repository's own order catches the same upward import and the module in no layer
    found = import_graph.violations(edges)
    assert any(v.startswith("dpft.workdir.contract -> dpft.train.loop: layer") for v in found)
    assert "dpft.stray.thing: in no layer of import_graph.LAYERS" in found
