"""The agent zipapp carries bytecode beside its sources (see provision.bundle).

zipimport never caches what it compiles, so every agent process on a box would recompile each
module it imports; the zip's .pyc files spare that when the box's python has the controller's
bytecode version, and are skipped (the sources compiled, as before) when it has another.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from provision.bundle import build_agent

IMPORT = (
    "import sys; sys.path.insert(0, sys.argv[1]);"
    "import provision.agent.runner as r, provision.steps.shell as s;"
    "print(r.__file__.rsplit('.', 1)[-1], s.__file__.rsplit('.', 1)[-1])"
)


@pytest.fixture
def agent_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BOOTSTRAP_CONFIG_DIR", str(tmp_path / "controller"))
    path = tmp_path / "agent.pyz"
    path.write_bytes(build_agent().data)
    return path


def _imported_from(pyz: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", IMPORT, str(pyz)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.slow
def test_every_module_has_bytecode_for_this_interpreter(agent_zip: Path) -> None:
    with zipfile.ZipFile(agent_zip) as zf:
        names = set(zf.namelist())
        modules = {n for n in names if n.endswith(".py") and n != "__main__.py"}
        assert modules and {n + "c" for n in modules} <= names
        header = zf.read("provision/agent/runner.pyc")[:8]
    assert header[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(header[4:8], "little") == 0b01  # hash-based, unchecked
    assert _imported_from(agent_zip) == "pyc pyc"


@pytest.mark.slow
def test_another_bytecode_version_falls_back_to_the_sources(
    agent_zip: Path, tmp_path: Path
) -> None:
    """What a box whose python differs from the controller's sees: foreign magic numbers."""
    foreign = tmp_path / "foreign.pyz"
    with zipfile.ZipFile(agent_zip) as src, zipfile.ZipFile(foreign, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(".pyc"):
                data = b"\x00\x00\r\n" + data[4:]
            dst.writestr(info, data)
    assert _imported_from(foreign) == "py py"
    status = subprocess.run(
        [sys.executable, "-I", "-S", str(foreign), "status"],
        capture_output=True,
        text=True,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    # It ran (imports from source): it answers that this box has no run (see agent/protocol).
    assert status.returncode == 2 and "no bootstrap run" in status.stdout, status.stderr


@pytest.mark.slow
def test_the_build_is_reproducible(tmp_path: Path) -> None:
    """Two controllers (fresh caches) build the same bytes, so a box is not shipped twice."""
    shas = set()
    for n in range(2):
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "from provision.bundle import build_agent as b; print(b().sha256)",
            ],
            capture_output=True,
            text=True,
            env={"BOOTSTRAP_CONFIG_DIR": str(tmp_path / f"c{n}"), "PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 0, result.stderr
        shas.add(result.stdout.strip())
    assert len(shas) == 1
