"""The layer rules hold: import-linter's contracts (pyproject `[tool.importlinter]`) are kept, they
name every third-party package and every top-level module, and only the entry points exit.

Run `lint-imports` in the repository root for the contracts alone; this test runs it on the
checkout itself (PYTHONPATH), not on an installed copy.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib

grimp = pytest.importorskip("grimp", reason="import-linter is in the test extras")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "provision"
#: Where a program may end its process: the two command lines (the controller's and the box's
#: agent) and standalone programs shipped as data. Elsewhere an error is raised and the command
#: line maps it to an exit code, so no library call ever ends the caller's process.
EXIT_ALLOWED = {"cli.py", "agent/__main__.py", "data/fake_trainer.py"}


def _contracts() -> dict[str, dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {c["name"]: c for c in config["tool"]["importlinter"]["contracts"]}


def _contract(startswith: str) -> dict[str, Any]:
    (found,) = [c for name, c in _contracts().items() if name.startswith(startswith)]
    return found


@pytest.mark.slow
def test_the_import_contracts_are_kept() -> None:
    code = (
        "import sys\n"
        "from importlinter.cli import lint_imports\n"
        "sys.exit(lint_imports(no_cache=True, no_logo=True))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout, result.stdout


def test_the_agent_core_contract_names_every_third_party_package() -> None:
    """A new dependency cannot slip into the agent core unnoticed: it must be listed."""
    # No cache: it would be written into the checkout (a clean clone stays clean).
    graph = grimp.build_graph("provision", include_external_packages=True, cache_dir=None)
    third_party = {m for m in graph.modules if "." not in m and m != "provision"} - set(
        sys.stdlib_module_names
    )
    listed = set(_contract("the agent core imports only").get("forbidden_modules", []))
    assert third_party - listed == set(), "add them to the agent core contract in pyproject"


def test_every_top_level_module_is_on_one_side() -> None:
    """Each top-level module or package is either box side or controller side, never both:
    a new one has to be placed (and, when box side, shipped: bundle.BOX_STDLIB)."""
    contract = _contract("the box side never imports the controller side")
    box, controller = set(contract["source_modules"]), set(contract["forbidden_modules"])
    assert box & controller == set()
    children = {
        f"provision.{p.stem if p.suffix == '.py' else p.name}"
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    }
    assert children - box - controller == set(), "place them in the contract in pyproject"


def _exits(tree: ast.Module) -> list[int]:
    """Lines ending the process: sys.exit/os._exit/exit/quit calls, `raise SystemExit`, typer.Exit
    and typer.Abort; code under `if __name__ == "__main__":` (a module run as a program) aside."""
    for guard in [n for n in ast.walk(tree) if isinstance(n, ast.If) and _is_main_guard(n.test)]:
        guard.body = []
    lines = []
    for node in ast.walk(tree):
        target = node.exc if isinstance(node, ast.Raise) else node
        if isinstance(target, ast.Call):
            target = target.func
        name = ast.unparse(target) if isinstance(target, (ast.Name, ast.Attribute)) else ""
        if (
            isinstance(node, ast.Raise) and name in ("SystemExit", "typer.Exit", "typer.Abort")
        ) or (isinstance(node, ast.Call) and name in ("sys.exit", "os._exit", "exit", "quit")):
            lines.append(node.lineno)
    return sorted(lines)


def _is_main_guard(test: ast.expr) -> bool:
    return ast.unparse(test) in ('__name__ == "__main__"', "__name__ == '__main__'")


@pytest.mark.slow
def test_only_the_command_lines_exit() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in EXIT_ALLOWED:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [f"provision/{rel}:{line}" for line in _exits(tree)]
    assert found == [], "raise an error instead; the command line maps it to an exit code"


def test_the_exit_check_sees_each_way_out() -> None:
    """The check above can fail: each way of ending the process is found, a main guard not."""
    source = (
        "import sys, os, typer\n"
        "def a():\n    sys.exit(1)\n"
        "def b():\n    raise SystemExit(2)\n"
        "def c():\n    raise typer.Exit(code=3)\n"
        "def d():\n    os._exit(4)\n"
        "def e():\n    raise SystemExit\n"
        "if __name__ == '__main__':\n    sys.exit(a())\n"
    )
    assert _exits(ast.parse(source)) == [3, 5, 7, 9, 11]
