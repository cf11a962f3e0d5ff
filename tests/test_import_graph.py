"""The import rules of samnorm, read from the source (AST), not from what a test run happens to load.

- no import cycles between samnorm's modules, imports inside functions included (a lazy import
  still couples the two modules);
- no private name (``_x``) imported from another module: a helper used by two modules is public in
  the lower one;
- the core modules import neither timm nor torchvision (checked in a fresh interpreter);
- the tests: no test module imports another test module (``test_*.py``), conftest.py, or a private
  name from a helper module: what two test modules share lives in conftest.py (fixtures) or a helper
  module (helpers.py, reference_sam.py, ...), under a public name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import samnorm

ROOT = Path(samnorm.__file__).parent

# Violations that a change in progress still has to remove. An entry that no longer occurs fails the
# test, so this list only shrinks.
KNOWN_CYCLES: set[frozenset[str]] = set()
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()  # (importer, imported module, name)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (imports for type checkers only)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(module: str) -> list[tuple[str, str | None]]:
    """``(imported samnorm module, name or None)`` for every import statement of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Constant) and node.value in MODULES:  # imported by name (importlib)
            found.append((node.value, None))
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "samnorm"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "samnorm":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (base, alias.name))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _ in _imports(module):
            while target not in MODULES and "." in target:  # `import samnorm.x.y` names a module
                target = target.rpartition(".")[0]
            if target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_cycles_and_relative_imports():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
    assert _cycles({"a": {"b"}, "b": set()}) == set()
    graph = _graph()
    assert "samnorm.ood.detectors.base" in graph["samnorm.ood.detectors.logits"]
    assert "samnorm.utils.nn" in graph["samnorm.ood.harness"]
    assert "samnorm.ood.detectors.registry" in graph["samnorm.viz.plots"]  # an import inside a function
    assert "samnorm.diagnostics.cli" in graph["samnorm.cli"]  # a plugin imported by its name


def test_no_import_cycles():
    cycles = _cycles(_graph())
    new = [sorted(c) for c in cycles - KNOWN_CYCLES]
    assert not new, f"import cycles: {new}; move the shared piece into a module both can import"
    stale = [sorted(c) for c in KNOWN_CYCLES - cycles]
    assert not stale, f"fixed, remove from KNOWN_CYCLES: {stale}"


def test_no_private_names_imported_across_modules():
    found = {
        (module, target, name)
        for module in MODULES
        for target, name in _imports(module)
        if name is not None and name.startswith("_") and not name.startswith("__") and target != module
    }
    new = sorted(found - KNOWN_PRIVATE_IMPORTS)
    assert not new, f"private names imported from another module: {new}; make them public there"
    stale = sorted(KNOWN_PRIVATE_IMPORTS - found)
    assert not stale, f"fixed, remove from KNOWN_PRIVATE_IMPORTS: {stale}"


TESTS = Path(__file__).resolve().parent


def _test_import_violations(source: str) -> list[str]:
    """The imports in a module under tests/ that break the tests' rule, as source text."""
    local = {p.stem for p in TESTS.glob("*.py")}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            pairs = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            pairs = [("." * node.level + (node.module or ""), alias.name) for alias in node.names]
        else:
            continue
        for module, name in pairs:
            parts = [part for part in module.lstrip(".").split(".") if part]
            if parts[:1] == ["tests"] or module.startswith("."):  # tests.x / .x: a module under tests/
                parts = [p for p in parts if p != "tests"] or [name or ""]
            target = parts[0] if parts and parts[0] in local else None
            if target is None:
                continue
            private = name is not None and name.startswith("_") and name != target
            if target.startswith("test_") or target == "conftest" or private:
                found.append(ast.unparse(node))
    return found


def test_the_test_import_checker_sees_each_kind():
    for bad in (
        "from test_optim import reference_problem",
        "import test_optim",
        "from tests.test_optim import x",
        "from tests import test_optim",
        "from .test_optim import x",
        "from helpers import _private",
        "from conftest import image_folder",
    ):
        assert _test_import_violations(bad) == [bad]
    ok = "from helpers import mlp\nimport reference_sam\nfrom samnorm.sam import functional\nfrom torch import _C"
    assert _test_import_violations(ok) == []


def test_no_test_module_imports_another_or_a_private_helper():
    found = {p.name: v for p in sorted(TESTS.glob("*.py")) if (v := _test_import_violations(p.read_text("utf-8")))}
    assert not found, f"{found}: move what two test modules share into conftest.py or tests/helpers.py, public"


def _deprecated_paths() -> set[str]:
    """Old module paths, read from the source: shim files (``moved_module_getattr``) and ``alias_module`` calls."""
    found: set[str] = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id == "moved_module_getattr" and module != "samnorm.utils.deprecation":
                    found.add(module)
                elif node.func.id == "alias_module" and isinstance(node.args[0], ast.Constant):
                    found.add(node.args[0].value)
    return found


def test_the_package_imports_no_deprecated_path():
    deprecated = _deprecated_paths()
    assert {
        "samnorm.plots",
        "samnorm.ood.rankfeat",
        "samnorm.ood.evaluate",
        "samnorm.optim",
        "samnorm.variants",
        "samnorm.recipe",
        "samnorm.losses",
        "samnorm.io",
        "samnorm.nn_utils",
        "samnorm.cli_common",
        "samnorm.demo.select",
    } <= deprecated
    found = sorted(
        (module, target)
        for module in MODULES
        if module not in deprecated
        for target, _ in _imports(module)
        if any(target == old or target.startswith(old + ".") for old in deprecated)
    )
    assert not found, f"samnorm imports its own deprecated paths (importer, old path): {found}; import the new one"


def test_core_modules_import_without_timm_or_torchvision():
    core = [
        "samnorm",
        "samnorm.sam.optimizer",
        "samnorm.sam.variants",
        "samnorm.select",
        "samnorm.utils.nn",
        "samnorm.train.losses",
        "samnorm.viz.histograms",
        "samnorm.ood",
        "samnorm.ood.detectors",
        "samnorm.diagnostics.quantities",
    ]
    code = f"import sys; import {', '.join(core)}; print([m for m in ('timm', 'torchvision') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
