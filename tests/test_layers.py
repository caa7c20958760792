"""The layers import one way: workers/ and the engine core meet only in streamvlm.contract,
the engine core reaches workers/ only through the process entry points it spawns, and no
modules import each other in a circle. Checked on the source (ast): imports inside functions
and under `if TYPE_CHECKING:` count."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("streamvlm", "workers")
CONTRACT = "streamvlm.contract"

# (importing module, imported module): the worker processes the engine core starts, and the
# CLI's `streamvlm worker` command.
WORKER_ENTRY_POINTS = frozenset({
    ("streamvlm.engine.worker_client", "workers.main"),
    ("streamvlm.engine.worker_client", "workers.distributed"),
    ("streamvlm.engine.worker_client", "workers.launch"),
    ("streamvlm.engine.worker_process", "workers.launch"),
    ("streamvlm.cli", "workers.remote"),
})


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str          # the project module it names, or the dotted name outside the project
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_files() -> dict[str, Path]:
    return {_module_name(path): path
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


MODULES = _source_files()


def _resolve(name: str) -> str:
    """The longest prefix of a dotted name that is a project module (the name as given for
    modules outside the project)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in MODULES:
            return prefix
    return name


def _imports_of(module: str, path: Path) -> list[Import]:
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, _resolve(alias.name), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                # `from pkg import name`: the submodule pkg.name where there is one.
                found.append(Import(module, _resolve(f"{prefix}.{alias.name}"), node.lineno))
    return found


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports_of(module, path)]


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _describe(imports: list[Import]) -> str:
    return "\n".join(f"  {MODULES[i.importer].relative_to(ROOT)}:{i.line} imports {i.imported}"
                     for i in imports)


def test_workers_import_only_the_contract_of_streamvlm() -> None:
    leaks = [i for i in IMPORTS if _in(i.importer, "workers")
             and _in(i.imported, "streamvlm") and not _in(i.imported, CONTRACT)]
    assert not leaks, "workers/ imports streamvlm outside the contract:\n" + _describe(leaks)


def test_engine_core_reaches_workers_only_through_the_entry_points() -> None:
    leaks = [i for i in IMPORTS if _in(i.importer, "streamvlm") and _in(i.imported, "workers")
             and (i.importer, i.imported) not in WORKER_ENTRY_POINTS]
    assert not leaks, "streamvlm/ imports workers outside the spawn entry points:\n" + _describe(leaks)


def test_contract_imports_neither_side_nor_torch() -> None:
    leaks = [i for i in IMPORTS if _in(i.importer, CONTRACT)
             and ((_in(i.imported, "streamvlm") and not _in(i.imported, CONTRACT))
                  or _in(i.imported, "workers") or _in(i.imported, "torch"))]
    assert not leaks, "the contract imports outside itself:\n" + _describe(leaks)


def _import_graph() -> dict[str, set[str]]:
    """Every import counts, those under `if TYPE_CHECKING:` too: a circle of type hints is
    still two modules that cannot be understood, or moved, one without the other."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for i in IMPORTS:
        if i.imported in MODULES and i.imported != i.importer:
            graph[i.importer].add(i.imported)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[tuple[frozenset[str], list[str]]]:
    """Each strongly connected group of modules with one circle through it (Tarjan's algorithm
    finds the groups; a walk inside a group closes the circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)

    circles = []
    for group in groups:
        start = min(group)
        path, seen = [start], {start}
        # Depth-first inside the group until an edge leads back to the start.
        def walk(node: str) -> bool:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    path.append(nxt)
                    if walk(nxt):
                        return True
                    path.pop()
            return False
        walk(start)
        circles.append((frozenset(group), path + [start]))
    return circles


def test_no_import_circles() -> None:
    circles = [path for _, path in _circles(_import_graph())]
    assert not circles, "import circles:\n" + "\n".join("  " + " -> ".join(c) for c in circles)


def test_circle_finder_reports_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [(frozenset("abc"), ["a", "b", "c", "a"])]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_importing_the_engine_core_loads_no_workers_module() -> None:
    code = ("import json, sys\n"
            "import streamvlm\n"
            "from streamvlm import AsyncEngine, LLM\n"
            "import streamvlm.gateway.app\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'workers')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert json.loads(out) == []
