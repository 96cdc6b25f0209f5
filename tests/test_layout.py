"""The package's layering, checked from the source: no import cycles, no private names across modules, no
format tests outside the formats, and every module says what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vdisk"
FORMAT_CLASSES = {"Qcow2Image", "RawImage"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Every vdisk module ``name`` imports, at any depth of the file (lazy imports count)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m in MODULES and m != name and not name.startswith(m + ".")}


def test_the_package_has_no_import_cycles():
    graph = {name: _imports(name, tree) for name, tree in MODULES.items()}
    graph = {name: {m for m in deps if m != "vdisk"} for name, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [name, dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def _private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def _defined_here(tree: ast.Module) -> set[str]:
    """The private names a module defines: functions, classes, attributes it assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if _private(n)}


def test_no_private_name_is_used_outside_its_module():
    offenders = []
    for name, tree in MODULES.items():
        own = _defined_here(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vdisk"):
                offenders += [f"{name}: from {node.module} import {a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                offenders.append(f"{name}:{node.lineno}: .{node.attr}")
    assert not offenders, offenders


def test_only_the_formats_ask_which_format_a_node_is():
    offenders = []
    for name, tree in MODULES.items():
        if name.startswith("vdisk.formats"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                if names & FORMAT_CLASSES:
                    offenders.append(f"{name}:{node.lineno}")
    assert not offenders, offenders


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_opens_with_what_it_owns(name):
    assert ast.get_docstring(MODULES[name]), f"{name} has no module docstring"
