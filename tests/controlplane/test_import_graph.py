"""The server package's import graph: no cycle, and the module map in docs/control-plane.md is the code's.

Runtime imports are those at a module's top level or inside its functions; imports under `if TYPE_CHECKING:` never
run (most features name `core.ControlPlane` in their annotations that way). The map lists the runtime imports; the
cycle check counts both, since a type-only cycle still ties the modules together for a reader and a type checker."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from picoiot import paths

SERVER = paths.REPO / "src" / "picoiot" / "server"
PKG = "picoiot.server"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SERVER.rglob("*.py")):
        parts = p.relative_to(SERVER).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "(package)"] = p
    return out


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, modules: dict[str, Path], type_only: bool = False):
        self.module, self.path, self.modules, self.type_only = module, path, modules, type_only
        self.found: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test) and not self.type_only:
            for n in node.orelse:
                self.visit(n)
        else:
            self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            here = [] if self.module == "(package)" else self.module.split(".")
            if self.path.name != "__init__.py":
                here = here[:-1]
            base = here[:len(here) - node.level + 1] + ([node.module] if node.module else [])
        elif node.module and (node.module + ".").startswith(PKG + "."):
            base = node.module[len(PKG) + 1:].split(".") if node.module != PKG else []
        else:
            return
        for alias in node.names:
            for cand in (".".join(base + [alias.name]), ".".join(base) or "(package)"):
                if cand in self.modules and cand != self.module:
                    self.found.add(cand)
                    break

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.startswith(PKG + "."):
                name = alias.name[len(PKG) + 1:]
                if name in self.modules and name != self.module:
                    self.found.add(name)


def import_graph(type_only: bool = False) -> dict[str, set[str]]:
    """module → the package's modules it imports: at run time, or with type_only also under `if TYPE_CHECKING:`."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        v = _Imports(name, path, modules, type_only)
        v.visit(ast.parse(path.read_text()))
        graph[name] = v.found
    return graph


def runtime_graph() -> dict[str, set[str]]:
    return import_graph()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None
    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def documented_graph() -> dict[str, set[str]]:
    text = (paths.REPO / "docs" / "control-plane.md").read_text()
    block = text.split("## Module map", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    graph: dict[str, set[str]] = {}
    last = None
    for line in block.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith(" ") and last is not None:  # a continuation of the previous module's list
            graph[last] |= set(line.split())
            continue
        names, _, deps = line.partition("→")
        deps_set = set() if "nothing" in deps else set(deps.split())
        for name in names.split():
            graph[name] = set(deps_set)
            last = name
    return graph


def test_the_server_package_has_no_import_cycle_not_even_a_type_only_one():
    graph = import_graph(type_only=True)
    assert len(graph) > 30 and graph["app"] and graph["core"]  # the walk found the package and its imports
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_module_map_in_the_docs_is_the_code():
    assert documented_graph() == runtime_graph()


def test_the_cycle_check_sees_type_only_imports(tmp_path):
    (tmp_path / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .high import H\n")
    (tmp_path / "high.py").write_text("from .low import L\n")
    modules = {"low": tmp_path / "low.py", "high": tmp_path / "high.py"}
    found = {}
    for type_only in (False, True):
        v = _Imports("low", modules["low"], modules, type_only)
        v.visit(ast.parse(modules["low"].read_text()))
        found[type_only] = v.found
    assert found == {False: set(), True: {"high"}}
    assert _cycle({"low": found[True], "high": {"low"}}) == ["high", "low", "high"]


def test_type_only_imports_are_not_runtime_imports():
    # every feature names core.ControlPlane under TYPE_CHECKING: none of them reaches core at run time that way
    graph = runtime_graph()
    assert "core" not in graph["alarms"] and "core" not in graph["state"]
    assert re.search(r"if TYPE_CHECKING:\s+from \.core import", (SERVER / "state.py").read_text())
