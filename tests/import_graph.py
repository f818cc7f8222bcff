"""Check parmap's module structure: ``python tests/import_graph.py`` (exit 1 on a problem).

* every import of a parmap module, top-level or inside a function, is an edge; so are
  the modules imported on first use, named by module path in a literal ``LAZY`` dict
  (the backend registry's, and the public names' in ``parmap/__init__.py``);
  imports under ``if TYPE_CHECKING:`` are for annotations only and never run;
* no cycle among parmap's modules, and no import of a parmap module inside a function;
* ``parmap.process`` imports nothing from the front end (only the leaf modules);
* no module over ``MAX_MODULE_LINES`` lines, no class over ``MAX_CLASS_LINES``.

Implicit imports of parent packages (``parmap/__init__.py`` runs before any submodule)
are Python's mechanics, not design, and are not counted.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "parmap"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250
#: what parmap.process may import from outside itself
PROCESS_MAY_IMPORT = {"parmap._delayed", "parmap._errors", "parmap._cpu", "parmap._context",
                      "parmap._record", "parmap._worker_state", "parmap._shm_files"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom, known: set[str]) -> list[str]:
    if node.level:
        base = current.split(".")
        base = base if is_package else base[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.append(sub if sub in known else target)
    return found


class _Imports(ast.NodeVisitor):
    def __init__(self, name: str, is_package: bool, known: set[str]):
        self.name, self.is_package, self.known = name, is_package, known
        self.edges: list[tuple[str, int, bool]] = []  # (target, line, in a function)
        self.depth = 0

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _scope(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for target in _resolve(self.name, self.is_package, node, self.known):
            self._add(target, node.lineno)

    def _add(self, target: str, line: int) -> None:
        if target == "parmap" or target.startswith("parmap."):
            self.edges.append((target, line, self.depth > 0))


def _lazy_edges(known: set[str]) -> dict[str, set[str]]:
    """The module paths of the literal ``LAZY`` dicts (``_LAZY`` in the package): the backend registry's, and the
    package's public names (``parmap/__init__.py``, imported on first use)."""
    found: dict[str, set[str]] = {}
    for name in ("parmap", "parmap.backends"):
        source = modules().get(name)
        if source is None:
            continue
        edges: set[str] = set()
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and \
                    isinstance(node.value, ast.Dict):
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                if isinstance(target, ast.Name) and target.id in ("LAZY", "_LAZY"):
                    for value in node.value.values:
                        if isinstance(value, ast.Constant):
                            edges.add(str(value.value).partition(":")[0])
        found[name] = edges & known
    return found


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> parmap modules it imports, problems with in-function imports)."""
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {name: set() for name in mods}
    problems = []
    for name, path in mods.items():
        visitor = _Imports(name, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text()))
        for target, line, in_function in visitor.edges:
            if target not in known:
                problems.append(f"{name}:{line} imports {target}, which does not exist")
                continue
            if in_function:
                problems.append(f"{name}:{line} imports {target} inside a function")
            edges[name].add(target)
    for name, targets in _lazy_edges(known).items():
        edges[name] |= targets
    for name in edges:  # a package's own submodules are not a cycle through its __init__
        edges[name] = {t for t in edges[name] if t != name}
    return edges, problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def size_problems() -> list[str]:
    problems = []
    for name, path in modules().items():
        source = path.read_text()
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            problems.append(f"{name} has {lines} lines (> {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    problems.append(f"{name}.{node.name} has {size} lines (> {MAX_CLASS_LINES})")
    return problems


def boundary_problems(edges: dict[str, set[str]]) -> list[str]:
    problems = []
    for name, targets in edges.items():
        if name == "parmap.process" or name.startswith("parmap.process."):
            for target in sorted(targets):
                inside = target == "parmap.process" or target.startswith("parmap.process.")
                if not inside and target not in PROCESS_MAY_IMPORT:
                    problems.append(f"{name} imports {target}: the pool must not depend on "
                                    f"the front end")
    return problems


def check() -> list[str]:
    edges, problems = graph()
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    problems += boundary_problems(edges)
    problems += size_problems()
    return problems


def main() -> int:
    edges, _ = graph()
    for name in sorted(edges):
        print(f"{name:32} -> {', '.join(sorted(edges[name])) or '-'}")
    problems = check()
    print("\n".join(problems) if problems else "\nno cycle, no in-function import, sizes ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
