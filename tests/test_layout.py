"""The package's shape: imports at the top of every library file, no import cycles, modules import alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gtransformer"
# Optional third-party packages a library file may import inside a function, where they are used
# (heavy or often absent: importing them at the top would slow every command or fail without them).
LAZY_OPTIONAL = {"wandb", "torch.utils.tensorboard"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(node: ast.AST, module: str) -> list[str]:
    """gtransformer modules (and third-party roots) named by one import statement."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = node.module or ""
    if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
    names = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        names.append(candidate if candidate in MODULES else base)
    return names


def top_level_imports(module: str) -> set[str]:
    """gtransformer modules this module imports when it is imported (statements outside functions)."""
    found = set()
    for node in ast.parse(MODULES[module].read_text(encoding="utf-8")).body:
        statements = [node] if isinstance(node, (ast.Import, ast.ImportFrom)) else [
            child for child in ast.walk(node) if isinstance(child, (ast.Import, ast.ImportFrom))
        ] if isinstance(node, (ast.Try, ast.If)) else []
        for statement in statements:
            found.update(name for name in imported_names(statement, module) if name in MODULES and name != module)
    return found


def test_imports_sit_at_the_top_of_every_library_file():
    misplaced = []
    for module, path in MODULES.items():
        for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = imported_names(node, module)
                    if not all(name in LAZY_OPTIONAL for name in names):
                        misplaced.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {', '.join(names)}")
    assert not misplaced, "imports inside functions:\n" + "\n".join(misplaced)


def test_the_package_has_no_import_cycles():
    graph = {module: top_level_imports(module) for module in MODULES}
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            if state.get(dependency) == "open":
                cycles.append(" -> ".join(trail[trail.index(dependency):] + [dependency]))
            elif dependency not in state:
                visit(dependency, trail + [dependency])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
    # The layers of the pipeline depend downwards only: the library never imports the CLI or a command.
    for module, dependencies in graph.items():
        if not module.startswith(("gtransformer.commands", "gtransformer.cli", "gtransformer.__main__")):
            assert not any(d.startswith(("gtransformer.commands", "gtransformer.cli")) for d in dependencies), module


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    """The two tests above can fail: a function-local import and a cycle are both seen."""
    source = "import os\n\ndef f():\n    from gtransformer.errors import UserError\n"
    tree = ast.parse(source)
    local = [n for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) for n in ast.walk(fn)
             if isinstance(n, ast.ImportFrom)]
    assert imported_names(local[0], "gtransformer.files") == ["gtransformer.errors"]
    monkeypatch.setattr(sys.modules[__name__], "top_level_imports", lambda m: {
        "gtransformer.errors": {"gtransformer.files"}, "gtransformer.files": {"gtransformer.errors"},
    }.get(m, set()))
    with pytest.raises(AssertionError, match="import cycles"):
        test_the_package_has_no_import_cycles()


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module first, alone: an import order that only works after another module would fail here."""
    names = [m for m in MODULES if m != "gtransformer.__main__"]

    def import_alone(name: str) -> str | None:
        result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
        return None if result.returncode == 0 else f"{name}: {(result.stderr.strip().splitlines() or ['?'])[-1]}"

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [message for message in pool.map(import_alone, names) if message]
    assert not failures, "\n".join(failures)
