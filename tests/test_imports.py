"""Import hygiene: one import name (``flexkv``), every module imports, layers import downward only.

``scheduler/`` and ``workers/`` are installed as ``flexkv.scheduler`` and ``flexkv.workers``; a bare
``import scheduler`` works only from the repository root by accident and breaks once installed.
Imports are read with ``ast`` (every import anywhere in a file, lazy ones included) and, where the
question is what actually loads, checked in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED_DIRS = ("flexkv", "scheduler", "workers", "tests", "examples", "benchmarks")
BARE_NAMES = ("scheduler", "workers")
# The lowest layer: these must never depend on the server, the workers or the engine-facing manager.
CORE_MODULES = ("flexkv.common.config", "flexkv.types", "flexkv.layout", "flexkv.protocol", "flexkv.shm",
                "flexkv.native", "flexkv.security", "flexkv.layerwise", "flexkv.hoptrace")
HIGHER_LAYERS = ("flexkv.scheduler", "flexkv.workers", "flexkv.kvmanager")


def python_files() -> Iterator[Path]:
    for top in SCANNED_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            if not any(part.startswith(".") or part in ("build", "__pycache__") for part in path.parts):
                yield path


def module_name(path: Path) -> str:
    """The import name of a file in the package (scheduler/x.py -> flexkv.scheduler.x)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in BARE_NAMES:
        parts.insert(0, "flexkv")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def file_imports(path: Path) -> Iterator[tuple[int, str]]:
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return imported_names(path.read_text(), package)


def imported_names(source: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, relative ones resolved against ``package``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
            elif node.module:
                yield node.lineno, node.module
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            yield node.lineno, node.args[0].value


def is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_scanner_sees_every_kind_of_import() -> None:
    source = (
        "import scheduler.pool\n"
        "from workers import base\n"
        "from . import planner\n"
        "from ..types import Medium\n"
        "def lazy():\n"
        "    import flexkv.kvmanager\n"
        "    importlib.import_module('workers.ssd_worker')\n"
        "    __import__('scheduler')\n"
    )
    assert list(imported_names(source, "flexkv.scheduler")) == [
        (1, "scheduler.pool"), (2, "workers"), (3, "flexkv.scheduler"), (4, "flexkv.types"),
        (6, "flexkv.kvmanager"), (7, "workers.ssd_worker"), (8, "scheduler"),
    ]


def test_there_are_files_to_scan() -> None:
    names = {module_name(p) for p in python_files()}
    assert {"flexkv.common.config", "flexkv.scheduler", "flexkv.workers", "tests.test_imports"} <= names


def test_nothing_imports_a_bare_scheduler_or_workers() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line}: imports {name!r} (use flexkv.{name})"
                 for path in python_files() for line, name in file_imports(path)
                 if any(is_under(name, bare) for bare in BARE_NAMES)]
    assert not offenders, "\n".join(offenders)


def test_core_modules_do_not_import_higher_layers() -> None:
    offenders = []
    for path in python_files():
        if not any(is_under(module_name(path), core) for core in CORE_MODULES):
            continue
        offenders += [f"{path.relative_to(ROOT)}:{line}: core module imports {name}"
                      for line, name in file_imports(path) if any(is_under(name, hi) for hi in HIGHER_LAYERS)]
    assert not offenders, "\n".join(offenders)


def test_server_and_workers_do_not_import_the_engine_facing_manager() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line}: imports {name}"
                 for path in python_files()
                 if any(is_under(module_name(path), p) for p in ("flexkv.scheduler", "flexkv.workers"))
                 for line, name in file_imports(path) if is_under(name, "flexkv.kvmanager")]
    assert not offenders, "\n".join(offenders)


def test_nothing_imports_the_engine_integrations() -> None:
    """flexkv/integration/* sit above the engine API (DESIGN.md §7b); only they and tests import them."""
    offenders = [f"{path.relative_to(ROOT)}:{line}: imports {name}"
                 for path in python_files()
                 if not is_under(module_name(path), "flexkv.integration") and path.parts[len(ROOT.parts)] in
                 ("flexkv", "scheduler", "workers")
                 for line, name in file_imports(path) if is_under(name, "flexkv.integration")]
    assert not offenders, "\n".join(offenders)


_IMPORT_ALL = r"""
import importlib, json, pkgutil, sys, traceback
import flexkv, flexkv.scheduler, flexkv.workers
names = []
for pkg in (flexkv, flexkv.scheduler, flexkv.workers):
    names.append(pkg.__name__)
    names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
              if (not m.name.startswith(("flexkv.scheduler", "flexkv.workers")) or pkg is not flexkv)
              and not m.name.startswith("flexkv.integration.")]  # engine adapters import their engine
failures = {}
# Engine integrations (flexkv.integration.*) need their engine's packages (torch, transformers, vllm...):
# imported last, after checking that nothing else dragged torch in; a missing engine package is no failure.
core = [n for n in sorted(set(names)) if not n.startswith("flexkv.integration.")]
for name in core:
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=3)
torch_loaded = "torch" in sys.modules
for name in sorted(set(names) - set(core)):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("flexkv"):
            failures[name] = traceback.format_exc(limit=3)
    except BaseException:
        failures[name] = traceback.format_exc(limit=3)
print(json.dumps({"modules": sorted(set(names)), "failures": failures, "torch": torch_loaded}))
"""


def run_fresh(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter without a usable GPU; return its last stdout line as JSON."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_every_module_imports_cleanly_without_cuda() -> None:
    result = run_fresh(_IMPORT_ALL)
    modules = result["modules"]
    assert isinstance(modules, list)
    assert {"flexkv.common.config", "flexkv.shm", "flexkv.native.hasher", "flexkv.scheduler", "flexkv.workers"} <= set(
        modules)
    failures = result["failures"]
    assert isinstance(failures, dict)
    assert not failures, "\n".join(f"{name}:\n{trace}" for name, trace in failures.items())
    # torch is the engine's: importing flexkv must not drag it in
    assert result["torch"] is False


@pytest.mark.parametrize("core", CORE_MODULES)
def test_importing_a_core_module_loads_no_higher_layer(core: str) -> None:
    result = run_fresh(f"import json, sys, {core}; print(json.dumps({{'loaded': sorted(sys.modules)}}))")
    loaded = result["loaded"]
    assert isinstance(loaded, list)
    assert not [m for m in loaded if any(is_under(m, hi) for hi in HIGHER_LAYERS)]
