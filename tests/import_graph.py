"""The repository's import graph, checked: no circle, and imports only from a layer to the layers below it.

    python -m tests.import_graph      # the facts and any violation (`make lint` runs it; so does `make test`)

Every import of the project's own modules counts: at module level, inside functions, and under
`TYPE_CHECKING`. Importing `a.b.c` also runs the `__init__` of packages `a` and `a.b`, so it counts
as importing those too. The layer order is written out in docs/architecture.md; `LAYERS` is the same
order for this check, highest first.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("marl", "pipelines", "bench", "tests")

# Highest layer first. A layer's entries never import one another; an entry is a module or a package (all of
# it, unless a longer entry claims part of it), or an exact module name ending in "$" (a package's __init__).
# Inside an entry imports run freely, as long as they make no circle.
LAYERS: list[list[str]] = [
    ["tests"],  # a test may check the bench's harness (tests/test_bench_separate.py)
    ["bench"],
    ["tests$", "tests.conftest", "tests.tiny_models", "tests.memory", "tests.import_graph"],
    ["pipelines"],
    ["marl$"],
    ["marl.cli"],
    ["marl.commands"],
    ["marl.stages"],
    ["marl.hub", "marl.report"],
    ["marl.run"],
    ["marl.agent_warmup"],
    ["marl.agent", "marl.core"],
    ["marl.compat"],
    ["marl.evaluate"],
    ["marl.ppo"],
    ["marl.build", "marl.merge"],
    ["marl.model"],
    ["marl.model_io"],
    ["marl.hub_download", "marl.adapters", "marl.heads"],
    ["marl.multilora"],
    ["marl.config", "marl.data", "marl.rewards"],
    ["marl.embedded"],
    ["marl.default_chat"],
    ["marl.default"],
    ["marl.io", "marl.dist", "marl.textstats", "marl.stats", "marl.chat", "marl.hub_kernels", "marl.sweep",
     "marl.quant4", "marl.sampling"],
    ["marl.names"],
    ["marl.errors"],
]

# Imports that break the rules, each with what removes it (empty: none).
KNOWN: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    in_function: bool
    implied: bool = False  # a package's __init__, run by importing a module inside it


def modules(root: Path = REPO) -> dict[str, Path]:
    """Every project module: dotted name -> file (hidden folders left out: bench/.venv-trl011 holds another
    Python's packages, bench/.cache the bench's outputs)."""
    out = {}
    for top in ROOTS:
        for f in sorted((root / top).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            if any(part.startswith(".") for part in parts):
                continue
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _targets(node: ast.AST, importer: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """The project modules an import statement imports (the deepest module each name resolves to)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = importer.split(".") if is_package else importer.split(".")[:-1]
            base = base[:len(base) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        names = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
    out = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def _import_statements(node: ast.AST, in_function: bool = False):
    """(import statement, whether it sits inside a function) for every import under `node`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        yield from _import_statements(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                                ast.Lambda)))


def imports(known: dict[str, Path] | None = None) -> list[Import]:
    """Every import of a project module by a project module: each name an import statement resolves to, and
    the packages above it whose __init__ imports project modules (see above)."""
    known = modules() if known is None else known
    direct: list[Import] = []
    for importer, path in known.items():
        for node, in_function in _import_statements(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, importer, path.name == "__init__.py", known):
                if target != importer:
                    direct.append(Import(importer, target, node.lineno, in_function))
    busy = {i.importer for i in direct if known[i.importer].name == "__init__.py"}  # packages that import
    implied = []
    for imp in direct:
        parts = imp.imported.split(".")
        for package in (".".join(parts[:n]) for n in range(1, len(parts))):
            if package in busy and not (imp.importer + ".").startswith(package + "."):
                implied.append(Import(imp.importer, package, imp.line, imp.in_function, implied=True))
    return direct + implied


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer index, entry) of `module`: the longest entry that claims it; None if no entry does."""
    best = None
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            exact = entry.endswith("$")
            name = entry.rstrip("$")
            if module == name or (not exact and module.startswith(name + ".")):
                if best is None or len(name) > len(best[1].rstrip("$")):
                    best = (i, entry)
    return best


def layer_violations(found: list[Import]) -> list[tuple[Import, str]]:
    """Imports to a higher layer, or to a sibling entry of the same layer (with why)."""
    out = []
    for imp in found:
        a, b = layer_of(imp.importer), layer_of(imp.imported)
        if a is None or b is None or a[1] == b[1]:
            continue
        if b[0] < a[0]:
            out.append((imp, f"{a[1]} (layer {a[0]}) imports the higher {b[1]} (layer {b[0]})"))
        elif b[0] == a[0]:
            out.append((imp, f"{a[1]} imports its sibling {b[1]} (layer {a[0]})"))
    return out


def cycles(found: list[Import], skip: set[tuple[str, str]] = frozenset()) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module), edges in `skip` left out."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in found:
        if (imp.importer, imp.imported) not in skip:
            graph[imp.importer].add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(list(graph)):
        if v not in index:
            connect(v)
    return out


def check() -> tuple[list[str], list[str]]:
    """(facts, problems) of the repository's import graph."""
    known = modules()
    found = imports(known)
    problems = [f"{m} is in no layer of tests/import_graph.py LAYERS: add it where it belongs"
                for m in known if layer_of(m) is None]
    violations = layer_violations(found)
    edges = {(i.importer, i.imported) for i in found}
    for imp, why in violations:
        if (imp.importer, imp.imported) not in KNOWN:
            problems.append(f"{imp.importer}:{imp.line} imports {imp.imported}: {why}")
    for circle in cycles(found, skip=set(KNOWN)):
        problems.append("import circle: " + " -> ".join(circle))
    for edge in KNOWN:
        if edge not in edges:
            problems.append(f"known exception {edge[0]} -> {edge[1]} no longer occurs: remove it from KNOWN")
    in_functions = {(i.importer, i.line) for i in found
                    if i.in_function and not i.implied and i.importer.startswith("marl") and i.imported.startswith("marl")}
    facts = [
        f"{len(known)} modules, {len(edges)} imports between them",
        f"import statements inside marl's functions that import marl's own modules: {len(in_functions)}",
        f"import circles: {len(cycles(found))} ({len(cycles(found, skip=set(KNOWN)))} without the known exceptions)",
        f"imports against the layer order: {len({(i.importer, i.imported) for i, _ in violations})} "
        f"({len(KNOWN)} known exceptions listed)",
    ]
    facts += [f"  known: {a} -> {b}: until {why}" for (a, b), why in KNOWN.items()]
    return facts, problems


def main() -> int:
    facts, problems = check()
    print("\n".join(["import graph:", *("  " + f for f in facts)]))
    for p in problems:
        print(f"import graph: error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
