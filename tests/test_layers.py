"""The package's shape: imports point down the layers of pyproject.toml, no import circle, imports at the top of files."""

import ast
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "mnist_vae"
# In-package imports inside functions: the command line's lazy dispatch (so that --help answers before
# torch loads) and the package's lazy names (so that `import mnist_vae` stays quick).
LAZY_IMPORTS_ALLOWED = {("cli.py", "_run"), ("__init__.py", "__getattr__")}


def test_imports_follow_the_layers_contract():
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        if os.environ.get("CI"):
            pytest.fail("lint-imports is not installed; make test installs it with the test extra")
        pytest.skip("lint-imports is not installed (pip install import-linter)")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_no_module_imports_itself_through_others():
    grimp = pytest.importorskip("grimp") if not os.environ.get("CI") else __import__("grimp")
    graph = grimp.build_graph("mnist_vae")
    modules = sorted(graph.modules)
    circles = [(a, b) for a, b in itertools.combinations(modules, 2)
               if graph.find_shortest_chain(importer=a, imported=b) and graph.find_shortest_chain(importer=b, imported=a)
               and not (a.startswith(b + ".") or b.startswith(a + "."))]  # a package and its own modules
    assert circles == []


def in_package_imports_inside_functions():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "tests" in path.relative_to(PACKAGE).parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                relative = isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith(
                    "mnist_vae"))
                absolute = isinstance(node, ast.Import) and any(a.name.startswith("mnist_vae") for a in node.names)
                if relative or absolute:
                    found.append((str(path.relative_to(PACKAGE)), function.name))
    return found


def test_in_package_imports_stand_at_the_top_of_files():
    assert set(in_package_imports_inside_functions()) <= LAZY_IMPORTS_ALLOWED


def test_help_answers_without_loading_torch():
    code = "import sys; from mnist_vae import cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
