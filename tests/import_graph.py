"""The import graph of the `dpft` package, read from the AST (no imports executed).

    python tests/import_graph.py [ROOT]          # package edges, module sizes, layering violations

Every `import dpft.x` / `from dpft.x import y` counts, also inside functions (a lazy import
is still a dependency). Used by tests/test_layering.py to pin the layering of DESIGN.md.
"""
from __future__ import annotations

import ast
import collections
import pathlib
import sys

#: (importer prefix, forbidden target prefix, why) -- the "Done when" rules of the layering.
FORBIDDEN = (
    ("dpft.models", "dpft.cli", "models never import the CLI"),
    ("dpft.data", "dpft.cli", "data never imports the CLI"),
    ("dpft.privacy", "dpft.cli", "privacy never imports the CLI"),
    ("dpft.privacy", "dpft.models", "the DP engine never imports the model zoo"),
    ("dpft.nn", "dpft.models", "dpft.nn is below the models"),
    ("dpft.nn", "dpft.privacy", "dpft.nn is below the DP engine"),
    ("dpft.evaluate", "dpft.train", "evaluation reads workdirs; it never imports training"),
    ("dpft.models", "dpft.train", "models are below training"),
    ("dpft.data", "dpft.train", "data is below training"),
    ("dpft.privacy", "dpft.train", "privacy is below training"),
    ("dpft.errors", "dpft.", "errors import nothing of dpft"),
    ("dpft.host_memory", "dpft.", "host_memory imports nothing of dpft"),
)


def module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    """dpft/privacy/plan.py -> dpft.privacy.plan; dpft/nn/__init__.py -> dpft.nn."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
    """The dpft modules that module `name` (file `path`) imports, resolved to modules in `modules`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:  # "dpft.models.layers.Linear" -> "dpft.models.layers"
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dpft"):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("dpft"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in modules else base)
    return found


def graph(root: pathlib.Path) -> tuple[dict[str, set[str]], dict[str, int]]:
    """({module: imported dpft modules}, {module: line count}) for every module under root/dpft."""
    files = {module_name(root, p): p for p in sorted((root / "dpft").rglob("*.py"))}
    modules = set(files)
    edges = {m: imports_of(p, m, modules) for m, p in files.items()}
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in files.items()}
    return edges, sizes


def violations(edges: dict[str, set[str]]) -> list[str]:
    """One line per import that breaks a FORBIDDEN rule."""
    out = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            for a, b, why in FORBIDDEN:
                if (src == a or src.startswith(a + ".")) and (dst == b.rstrip(".") or dst.startswith(b.rstrip(".") + ".")
                                                              or (b.endswith(".") and dst.startswith(b))):
                    out.append(f"{src} -> {dst}: {why}")
    return out


def package_edges(edges: dict[str, set[str]]) -> dict[tuple[str, str], int]:
    """{(package, package): number of module-level imports} with packages = dpft.<first part>."""
    def pkg(m: str) -> str:
        return ".".join(m.split(".")[:2])

    counts: collections.Counter = collections.Counter()
    for src, targets in edges.items():
        for dst in targets:
            if pkg(src) != pkg(dst):
                counts[pkg(src), pkg(dst)] += 1
    return dict(counts)


def main(argv: list[str]) -> int:
    root = pathlib.Path(argv[1] if len(argv) > 1 else ".").resolve()
    edges, sizes = graph(root)
    print("## package imports (importer -> imported: modules)")
    for (a, b), n in sorted(package_edges(edges).items()):
        print(f"{a} -> {b}: {n}")
    print(f"\n## module sizes (lines): {len(sizes)} modules, {sum(sizes.values())} lines; largest")
    for m, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{n:5d} {m}")
    bad = violations(edges)
    print(f"\n## layering violations: {len(bad)}")
    for line in bad:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
