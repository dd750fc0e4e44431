"""The code's shape: modules talk through public names, and no import hides a cycle.

Read from the source with ``ast``, so no model is needed:

* no module of ``edgesink/`` or ``benchmarks/`` reads or calls another's private attribute
  (``session.cache``): a private name belongs to the module that defines it;
* nothing outside the package imports its private modules or names (``edgesink._native``);
* no function imports an edgesink module: an import inside a function is how a cycle hides (a
  script that must start where ``import edgesink`` fails says so on the line: ``# lazy: why``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edgesink"
SOURCES = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])
# Underscored names that others document as public (os._exit, ctypes' CDLL._name, namedtuple's
# _asdict...), and llama-cpp-python's module attribute holding the CDLL it loaded (no other name).
FOREIGN_PUBLIC = {"_exit", "_fields_", "_pack_", "_anonymous_", "_name", "_handle", "_asdict", "_replace",
                  "_fields", "_make", "_lib"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name not in FOREIGN_PUBLIC


def own_private_names(tree: ast.AST) -> set[str]:
    """Private names this module defines: its functions, classes, class attributes and ``self._x``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[0])
    return {n for n in names if _private(n)}


def private_reaches(path: Path) -> list[str]:
    """``x._name`` where ``_name`` is no private name of this module (``self``/``cls`` aside)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = own_private_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    return found


def private_imports(path: Path) -> list[str]:
    """From outside the package: imports of edgesink's private modules or names. Inside it: of private names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    inside = PACKAGE in path.parents
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").split(".")[0] == "edgesink"
            module_parts = (node.module or "").split(".")
            if ours and not inside and any(_private(part) for part in module_parts):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module}")
            if ours and any(_private(alias.name) and alias.name != "_native" or (not inside and _private(alias.name))
                            for alias in node.names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports a private name from {node.module}")
        elif isinstance(node, ast.Import) and not inside:
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "edgesink" and any(_private(part) for part in parts):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {alias.name}")
    return found


def imports_in_functions(path: Path) -> list[str]:
    """Imports of edgesink modules inside a function body, unless the line says why (``# lazy: <reason>``)."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source, filename=str(path))
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and "# lazy: " in lines[node.lineno - 1]:
                continue
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("edgesink")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: in {function.name}()")
            elif isinstance(node, ast.Import) and any(a.name.startswith("edgesink") for a in node.names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: in {function.name}()")
    return found


@pytest.mark.parametrize("check", [private_reaches, private_imports, imports_in_functions])
def test_modules_use_only_each_others_public_names(check):
    problems = [problem for path in SOURCES for problem in check(path)]
    assert not problems, "\n".join(problems)


BROKEN = '''
from typing import TYPE_CHECKING
from ._native import _silent_log
if TYPE_CHECKING:
    from .model import Model
def helper(session):
    from .persistence import save_session
    return session._cache.ctx
'''


def test_the_checks_catch_what_they_look_for(tmp_path):
    """Each check finds its kind of problem in a module written to have all three."""
    module = PACKAGE / "_structure_probe_tmp.py"
    try:
        module.write_text(BROKEN)
        assert [p.split(": ", 1)[1] for p in private_reaches(module)] == ["._cache"]
        assert len(private_imports(module)) == 1
        assert len(imports_in_functions(module)) == 1
        assert module_imports(module) == {"edgesink._native", "edgesink.model", "edgesink.persistence"}
    finally:
        module.unlink()


def module_imports(path: Path) -> set[str]:
    """The edgesink modules ``path`` imports anywhere, in functions and ``TYPE_CHECKING`` blocks too (an
    import made only for annotations still ties the two modules together for a reader)."""
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # "from . import x" imports the module x when there is one
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _is_module(candidate) else target)
        else:
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] == "edgesink" and m != name}


def _imports(node: ast.AST):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        else:
            yield from _imports(child)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_no_import_cycles_between_modules():
    """Following the imports of any module never leads back to it (the package's ``__init__``,
    which gathers the public names, aside): each module depends on the ones below it only."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = module_imports(path) - {"edgesink"}
    for start in graph:
        seen, stack = set(), [(start, [start])]
        while stack:
            module, trail = stack.pop()
            for nxt in graph.get(module, ()):
                assert nxt != start, "import cycle: " + " -> ".join(trail + [nxt])
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))


ENGINE = ("edgesink.model", "edgesink.session", "edgesink.kvcache", "edgesink.layout", "edgesink.policies",
          "edgesink.config", "edgesink.persistence", "edgesink.chat", "edgesink.contexts", "edgesink.sampling",
          "edgesink.seqstate", "edgesink.session_chat", "edgesink.session_state", "edgesink.session_lock")
ABOVE_THE_ENGINE = ("edgesink.fetch", "edgesink.loading", "edgesink.cli", "edgesink.bench", "edgesink.serve")


def test_the_layers_named_here_are_the_packages_modules():
    """A module renamed or added under a layer's name stays known to the check below."""
    for name in ENGINE + ABOVE_THE_ENGINE:
        assert _is_module(name), name
    assert {p.stem for p in (PACKAGE / "serve").glob("*.py")} >= {"app", "pool", "turns", "requests", "guard", "access"}


def test_the_engine_depends_on_no_downloader_and_no_command_line():
    """Loading weights and running a session never pull in huggingface-hub, the CLI, the benchmark or
    the HTTP server:
    ``edgesink.load`` joins fetching to the Model, the Model knows only a local file."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = module_imports(path) - {"edgesink"}
    for start in ENGINE:
        reached, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in reached:
                    reached.add(nxt)
                    stack.append(nxt)
        above = sorted(m for m in reached if m.startswith(ABOVE_THE_ENGINE))
        assert not above, f"{start} imports {above}"
