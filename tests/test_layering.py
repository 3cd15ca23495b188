"""The layering of DESIGN.md, read from the AST by tests/import_graph.py: lower layers never import
higher ones; evaluation never imports training; the DP engine never imports the model zoo."""
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


def test_the_checker_sees_lazy_relative_and_from_imports(tmp_path):
    def write(rel: str, text: str) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    for pkg in ("dpft", "dpft/privacy", "dpft/models", "dpft/evaluate", "dpft/train"):
        write(f"{pkg}/__init__.py", "")
    write("dpft/cli.py", "")
    write("dpft/models/zoo.py", "")
    write("dpft/train/loop.py", "")
    write("dpft/privacy/engine.py", "def f():\n    from ..models import zoo\n")  # lazy + relative
    write("dpft/evaluate/report.py", "import dpft.train.loop\n")
    write("dpft/evaluate/ok.py", "from dpft.evaluate import report\n")
    write("dpft/models/bad.py", "from dpft import cli\n")
    edges, sizes = import_graph.graph(tmp_path)
    assert edges["dpft.privacy.engine"] == {"dpft.models.zoo"}
    assert sorted(import_graph.violations(edges)) == [
        "dpft.evaluate.report -> dpft.train.loop: evaluation reads workdirs; it never imports training",
        "dpft.models.bad -> dpft.cli: models never import the CLI",
        "dpft.privacy.engine -> dpft.models.zoo: the DP engine never imports the model zoo",
    ]
    assert sizes["dpft.privacy.engine"] == 2
