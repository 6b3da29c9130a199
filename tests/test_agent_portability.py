"""The agent runs on the box's own python3 (>= 3.9) with the standard library only (issue 8 #10).

Every module shipped in the agent zipapp that the box's plain python3 imports — the agent core,
every step kind's top level, the DAG, errors, the monitor — must parse as Python 3.9 and import
nothing outside the standard library at module level (libraries are imported inside the
functions that run in the agent's venv).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from provision.bundle import BOX_DATA, BOX_STDLIB, BOX_VENV, PACKAGE, box_files, build_agent

#: Exactly what ships for the box's plain python3: the bundle's own allow-list.
BOX_SIDE = box_files(BOX_STDLIB)
#: Everything the zipapp holds.
SHIPPED = set(box_files(BOX_STDLIB + BOX_VENV + BOX_DATA))


def _top_level_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """Modules imported when the module loads (not inside functions or TYPE_CHECKING), dotted,
    with `from a import b` giving both `a` and `a.b` (b may be a submodule)."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _module_file(dotted: str) -> Path | None:
    """The file of a `provision.*` module, or None when the name is not a module."""
    parts = dotted.split(".")[1:]
    if not parts:
        return PACKAGE / "__init__.py"
    base = PACKAGE.joinpath(*parts)
    for path in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@pytest.mark.parametrize("path", BOX_SIDE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_box_side_module_is_python39_and_stdlib_only(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    for name, line in _top_level_imports(tree):
        top = name.split(".")[0]
        assert top == "provision" or top in sys.stdlib_module_names, (
            f"{path.name}:{line} imports '{name}' at module level"
        )
        target = _module_file(name) if top == "provision" else None
        # A box-side module imports only what ships for the box's python3 (not bundle.BOX_VENV).
        assert target is None or target in BOX_SIDE, (
            f"{path.name}:{line} imports '{name}', which is not in bundle.BOX_STDLIB"
        )
    # Modules on the box use postponed annotations, so `X | None` hints do not run on 3.9.
    if any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body):
        assert "from __future__ import annotations" in source, path.name


@pytest.mark.slow
def test_agent_zipapp_runs_on_a_bare_interpreter(tmp_path: Path) -> None:
    """The zipapp starts with `-I -S` (no site-packages at all) and answers `status`."""
    agent = build_agent()
    pyz = tmp_path / "agent.pyz"
    pyz.write_bytes(agent.data)
    names = zipfile.ZipFile(pyz).namelist()
    assert "provision/known_issues.json" in names and "provision/cli.py" not in names
    shipped = {f"provision/{p.relative_to(PACKAGE)}" for p in SHIPPED}
    assert {n for n in names if n.endswith(".py") and n != "__main__.py"} == shipped
    assert "provision/model.py" in names, "the agent core reads and writes the run model"
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(pyz), "status"],
        capture_output=True,
        text=True,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2, result.stderr  # it ran, and refused: no run on this box
    assert json.loads(result.stdout)["reason"] == "no_run"
    catalog = subprocess.run(
        [
            sys.executable, "-I", "-S", "-c",
            "import sys; sys.path.insert(0, sys.argv[1]);"
            "from provision.agent import catalog;"
            "print(catalog.hint_for('CUDA out of memory. Tried to allocate 2 GiB') is not None)",
            str(pyz),
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert catalog.stdout.strip() == "True", catalog.stderr
