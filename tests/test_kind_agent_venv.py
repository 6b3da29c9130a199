"""`agent_venv` with real venvs and uv, offline from a local wheel directory: its done-check
imports each requirement in the venv's interpreter (no marker file), and a venv made over a
base that is itself a venv sees that venv's packages (`pip install -e ".[box]"` in a fresh
venv, then `bootstrap up local`), which `--system-site-packages` alone does not give."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import uv as uv_package
from pywheels import build_wheel, uv_env

from provision.agent.paths import venv_dir
from provision.steps.agent_venv import KIND
from provision.steps.base import StepContext, validate_params

UV = uv_package.find_uv_bin()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """HOME of its own (the venv goes to ~/.bootstrap/venv); uv offline from tmp/wheels."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    build_wheel(tmp_path / "wheels", "tinyreq", "1.0")
    env = uv_env(tmp_path)
    env.pop("UV_PYTHON")
    return {**env, "HOME": str(tmp_path / "home"), "PATH": str(Path(UV).parent) + ":/usr/bin:/bin",
            "UV_NO_INDEX": "1", "UV_FIND_LINKS": str(tmp_path / "wheels")}  # fmt: skip


def _context(tmp_path: Path, env: dict[str, str], **params: object) -> StepContext:
    return StepContext(
        step_id="agent-venv",
        params=validate_params(KIND, {"requirements": ["tinyreq>=1"], **params}),
        run_dir=tmp_path / "run",
        env=env,
        out=io.StringIO(),
    )


def _venv_python() -> Path:
    return venv_dir() / "bin" / "python"


@pytest.mark.slow
def test_installs_with_uv_and_is_done_only_while_it_imports(
    tmp_path: Path, env: dict[str, str]
) -> None:
    ctx = _context(tmp_path, env, python=sys.executable)
    assert KIND.check(ctx).reason == f"no venv at {venv_dir()}"
    KIND.run(ctx)
    KIND.verify(ctx)
    python = _venv_python()
    assert KIND.check(ctx).done
    assert "imports tinyreq>=1" in KIND.check(ctx).reason
    subprocess.run(
        [UV, "pip", "uninstall", "--python", str(python), "tinyreq"], env=env, check=True
    )
    result = KIND.check(ctx)  # the venv is still there; what it claims is not
    assert not result.done
    assert result.reason.startswith("cannot import tinyreq (PackageNotFoundError")


@pytest.mark.slow
def test_a_venv_over_a_venv_sees_the_parent_venvs_packages(
    tmp_path: Path, env: dict[str, str]
) -> None:
    parent = tmp_path / "user-venv"
    subprocess.run([UV, "venv", "-q", "--python", sys.executable, str(parent)], env=env, check=True)
    subprocess.run(
        [UV, "pip", "install", "-q", "--python", str(parent / "bin" / "python"), "tinyreq"],
        env=env,
        check=True,
    )
    offline = {**env, "UV_FIND_LINKS": str(tmp_path / "empty")}  # nothing may be installed
    ctx = _context(
        tmp_path, offline, python=str(parent / "bin" / "python"), system_site_packages=True
    )
    KIND.run(ctx)
    KIND.verify(ctx)
    assert "has every requirement" in ctx.out.getvalue()
    assert KIND.check(ctx).done
    probe = "import tinyreq, sys; print(tinyreq.__file__)"
    where = subprocess.run(
        [str(_venv_python()), "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert where.startswith(str(parent))  # seen from the parent venv, not copied
