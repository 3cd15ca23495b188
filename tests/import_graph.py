"""The import graph of the `dpft` package, read from the AST (no imports executed).

    python tests/import_graph.py [ROOT]          # layers, package edges, module sizes, layering violations

Every `import dpft.x` / `from dpft.x import y` counts, also inside functions (a lazy import
is still a dependency). Used by tests/test_layering.py to pin the layer order of DESIGN.md
(`LAYERS`, written out in docs/interfaces.md) and the rules the order alone does not say (`FORBIDDEN`).
"""
from __future__ import annotations

import ast
import collections
import pathlib
import sys
from typing import Sequence

#: The layers of DESIGN.md and docs/interfaces.md, lowest first. Every dpft module belongs to the layer
#: of its longest listed prefix (the package `dpft` itself only by that name) and may import modules of
#: its own layer and of the layers below, never of a layer above; a module in no layer is an error.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("dpft", "dpft.errors", "dpft.host_memory", "dpft.paths", "dpft.remote_files", "dpft.atomic_io",
     "dpft.registry"),  # errors, file and name helpers
    ("dpft.nn", "dpft.metrics"),  # pure layer ops + book-keeping taps; the metric suite
    ("dpft.models", "dpft.privacy"),  # the model zoo; the DP engine and accounting
    ("dpft.data",),
    ("dpft.config", "dpft.distributed"),  # config schema and build; device mesh and processes
    ("dpft.workdir",),  # the workdir contract: files, checkpoint items, params choice, epsilon; checkpoints; predictions format
    ("dpft.inference",),  # the Predictor: model + params -> predictions (training's quick eval, dpft evaluate)
    ("dpft.train",),
    ("dpft.evaluate",),  # reads workdirs only
    ("dpft.demo", "dpft.cli", "dpft.testing"),  # entry points; test-only helpers
)

#: (importer prefix, forbidden target prefix, why): rules the order alone does not say.
FORBIDDEN = (
    ("dpft.privacy", "dpft.models", "the DP engine never imports the model zoo"),
    ("dpft.models", "dpft.privacy", "the model zoo never imports the DP engine (both build on dpft.nn)"),
    ("dpft.evaluate", "dpft.train", "evaluation reads workdirs; it never imports training"),
    ("dpft.errors", "dpft", "errors import nothing of dpft"),
    ("dpft.host_memory", "dpft", "host_memory imports nothing of dpft"),
)


def within(module: str, prefix: str) -> bool:
    """`module` is `prefix` or lies under it (dpft.privacy.plan within dpft.privacy)."""
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str, layers: Sequence[Sequence[str]] = LAYERS) -> int | None:
    """Index of the layer of `module` (its longest matching prefix; "dpft" only itself), None if none."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for i, prefixes in enumerate(layers):
        for p in prefixes:
            if (module == p or (p != "dpft" and within(module, p))) and (best is None or len(p) > best[0]):
                best = (len(p), i)
    return None if best is None else best[1]


def describe(layers: Sequence[Sequence[str]] = LAYERS) -> str:
    """The order as docs/interfaces.md writes it: `a, b -> c -> ...` (lowest first)."""
    return " -> ".join(", ".join(prefixes) for prefixes in layers)


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


def violations(edges: dict[str, set[str]], layers: Sequence[Sequence[str]] = LAYERS,
               forbidden: Sequence[tuple[str, str, str]] = FORBIDDEN) -> list[str]:
    """One line per module in no layer, per layer entry that names no module, per import of a higher
    layer and per import that breaks a FORBIDDEN rule."""
    names = lambda i: ", ".join(layers[i])  # noqa: E731
    out = [f"{m}: in no layer of import_graph.LAYERS" for m in sorted(edges) if layer_of(m, layers) is None]
    out += [f"{p}: a layer entry that names no module" for prefixes in layers for p in prefixes
            if not any(m == p or within(m, p) for m in edges)]
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            a, b = layer_of(src, layers), layer_of(dst, layers)
            if a is not None and b is not None and b > a:
                out.append(f"{src} -> {dst}: layer {a} ({names(a)}) imports the higher layer {b} ({names(b)})")
            out += [f"{src} -> {dst}: {why}" for x, y, why in forbidden if within(src, x) and within(dst, y)]
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
    print(f"## layers, lowest first\n{describe()}\n")
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
