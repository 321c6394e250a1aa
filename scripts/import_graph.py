"""The package's import graph in numbers: circles, floors, largest modules, lines per subpackage.

    python scripts/import_graph.py [ROOT]

Reads the source (nothing is imported or run): every ``import`` / ``from ... import`` of ``sdtm_compile`` modules,
at module level and inside functions (imports under ``if TYPE_CHECKING:`` are left out: they never run). The
top-level ``passes/`` folder is read as ``sdtm_compile.passes``, as it is installed.

* circles: groups of modules that import each other, directly or through others (strongly connected components);
* package circles: the same between subpackages (``sdtm_compile.core``, ``sdtm_compile.methods``, ...);
* floors: subpackages layered so that every import points to a lower floor (only without package circles);
* deferred imports: imports made inside a function body (often a sign of a dodged circle).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def module_files(root: Path) -> dict[str, Path]:
    files = {}
    for path in sorted((root / "sdtm_compile").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((root / "passes").glob("*.py")):
        name = path.stem
        files["sdtm_compile.passes" + ("" if name == "__init__" else f".{name}")] = path
    return files


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, known: set[str]) -> tuple[set[str], int]:
    """The sdtm_compile modules ``name`` imports, and how many of its imports are inside functions."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    deferred = 0
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        hits = set()
        for target in targets:
            while target and target not in known:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name:
                hits.add(target)
        # "from pkg import module": keep the module, not also the package it came through
        if len(hits) > 1:
            hits = {h for h in hits if not any(other.startswith(h + ".") for other in hits)}
        found |= hits
        if hits and id(node) in inside:
            deferred += 1
    return found, deferred


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def subpackage(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    files = module_files(root)
    known = set(files)
    graph: dict[str, set[str]] = {}
    deferred: dict[str, int] = {}
    lines = {name: len(path.read_text().splitlines()) for name, path in files.items()}
    for name, path in files.items():
        graph[name], deferred[name] = imports_of(name, path, known)

    circles = strongly_connected(graph)
    print(f"modules: {len(files)}, lines: {sum(lines.values())}, import arrows: {sum(map(len, graph.values()))}")
    print(f"module circles: {len(circles)}")
    for circle in circles:
        print("  " + " <-> ".join(circle))
    packages: dict[str, set[str]] = defaultdict(set)
    for name, targets in graph.items():
        for target in targets:
            a, b = subpackage(name), subpackage(target)
            if a != b and a != "sdtm_compile" and b != "sdtm_compile":
                packages[a].add(b)
    for name in files:
        packages.setdefault(subpackage(name), set())
    package_circles = strongly_connected(packages)
    print(f"package circles (between subpackages and top-level modules): {len(package_circles)}")
    for circle in package_circles:
        print("  " + " <-> ".join(circle))
    if not package_circles:
        floor: dict[str, int] = {}

        def height(p: str) -> int:
            if p not in floor:
                floor[p] = 1 + max((height(q) for q in packages[p]), default=0)
            return floor[p]

        for p in packages:
            height(p)
        print("floors (each imports only from lower floors; sdtm_compile/__init__ re-exports from all):")
        for level in sorted(set(floor.values()), reverse=True):
            members = sorted(p for p, f in floor.items() if f == level and p != "sdtm_compile")
            if members:
                print(f"  {level}: " + ", ".join(members))
    print(f"deferred imports (inside functions): {sum(deferred.values())}")
    for name, count in sorted(deferred.items(), key=lambda kv: -kv[1]):
        if count:
            print(f"  {name}: {count}")
    print("largest modules:")
    for name, count in sorted(lines.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {count:5d}  {name}")
    per_package: dict[str, int] = defaultdict(int)
    for name, count in lines.items():
        per_package[subpackage(name)] += count
    print("lines per subpackage:")
    for name, count in sorted(per_package.items(), key=lambda kv: -kv[1]):
        print(f"  {count:6d}  {name}")


if __name__ == "__main__":
    main()
