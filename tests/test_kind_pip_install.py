"""`pip_install` against real uv, offline: wheels built at test time, a venv made by uv."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import uv as uv_package
from pywheels import build_wheel, uv_env, write_project

from provision.errors import StepFailed
from provision.steps import pip_install
from provision.steps.base import ParamError, StepContext, validate_params

UV = uv_package.find_uv_bin()
KIND = pip_install.KIND


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    """tinypkg 1.0/2.0; `needsdep` wants dep>=2 as jax's deps drag ml-dtypes up, dep 1.0/2.0."""
    dest = tmp_path / "wheels"
    for version in ("1.0", "2.0"):
        build_wheel(dest, "tinypkg", version)
        build_wheel(dest, "dep", version)
    build_wheel(dest, "needsdep", "1.0", requires=("dep>=2",))
    build_wheel(dest, "Odd_Name", "3.0")
    return dest


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return uv_env(tmp_path)


@pytest.fixture
def project(tmp_path: Path, wheels: Path, env: dict[str, str]) -> Path:
    """A project overriding dep to 1.0 (as openpi pins ml-dtypes==0.4.1), with an empty venv."""
    path = write_project(
        tmp_path / "proj", [], wheels, tool_uv='override-dependencies = ["dep==1.0"]\n'
    )
    subprocess.run([UV, "venv", "-q", str(path / ".venv")], env=env, check=True)
    return path


def context(tmp_path: Path, env: dict[str, str], wheels: Path, **raw: Any) -> StepContext:
    params = validate_params(KIND, {"uv": UV, "offline": True, "find_links": [str(wheels)], **raw})
    return StepContext(
        step_id="pip", params=params, run_dir=tmp_path / "run", env=env, out=io.StringIO()
    )


def run_and_verify(ctx: StepContext) -> str:
    KIND.run(ctx)
    KIND.verify(ctx)
    return ctx.out.getvalue()


@pytest.mark.slow
def test_install_verifies_versions_and_expressions_then_is_done(
    tmp_path: Path, wheels: Path, env: dict[str, str], project: Path
) -> None:
    ctx = context(
        tmp_path,
        env,
        wheels,
        cwd=str(project),
        packages=["tinypkg==1.0", "odd.name==3.0"],
        verify=['tinypkg.__version__ == "1.0"', "Odd_Name.__version__.startswith('3')"],
    )
    assert KIND.check(ctx).reason == "not installed and verified by this step yet"
    log = run_and_verify(ctx)
    assert "+ tinypkg==1.0" in log
    assert 'verified: tinypkg.__version__ == "1.0"' in log
    progress = json.loads((ctx.workdir / "_progress.json").read_text())
    assert progress["message"] == "installed 2 packages" and progress["received"] is True
    check = KIND.check(ctx)
    assert check.done, check.reason
    assert check.reason == "installed: tinypkg==1.0, odd.name==3.0"

    # Another version in the venv: not done, and the reason says which.
    subprocess.run(
        [
            UV,
            "pip",
            "install",
            "-q",
            "--python",
            str(project / ".venv/bin/python"),
            "--offline",
            "--find-links",
            str(wheels),
            "tinypkg==2.0",
        ],
        env=env,
        check=True,
    )
    assert KIND.check(ctx).reason == "tinypkg is 2.0, wanted 1.0"
    run_and_verify(ctx)
    assert KIND.check(ctx).done


@pytest.mark.slow
def test_overrides_apply_from_the_project_root_only(
    tmp_path: Path, wheels: Path, env: dict[str, str], project: Path
) -> None:
    """RUNBOOK D, the ml_dtypes row: from the project root the override holds dep at 1.0; from
    elsewhere dep floats up to 2.0 and the `verify` expression catches it, with the value."""
    check_dep = 'dep.__version__ == "1.0"'
    ctx = context(
        tmp_path, env, wheels, cwd=str(project), packages=["needsdep==1.0"], verify=[check_dep]
    )
    assert f"verified: {check_dep}" in run_and_verify(ctx)

    other = tmp_path / "other"
    subprocess.run([UV, "venv", "-q", str(other / ".venv")], env=env, check=True)
    elsewhere = context(
        tmp_path, env, wheels, cwd=str(other), packages=["needsdep==1.0"], verify=[check_dep]
    )
    KIND.run(elsewhere)
    with pytest.raises(StepFailed) as failed:
        KIND.verify(elsewhere)
    assert failed.value.reason == f"`{check_dep}` failed: dep.__version__ = '2.0'"
    assert "project root" in (failed.value.hint or "")


@pytest.mark.slow
def test_verify_names_every_failing_expression(
    tmp_path: Path, wheels: Path, env: dict[str, str], project: Path
) -> None:
    ctx = context(
        tmp_path,
        env,
        wheels,
        cwd=str(project),
        packages=["tinypkg==1.0"],
        verify=[
            'tinypkg.__version__ == "1.0"',
            "tinypkg.__version__ >= '1.5'",
            "no_such_mod.x == 1",
            "1 / 0",
            "len(tinypkg.__version__) == 7",
        ],
    )
    KIND.run(ctx)
    with pytest.raises(StepFailed) as failed:
        KIND.verify(ctx)
    reasons = failed.value.reason.split("; ")
    assert reasons == [
        "`tinypkg.__version__ >= '1.5'` failed: tinypkg.__version__ = '1.0'",
        "`no_such_mod.x == 1` failed: import no_such_mod failed: "
        "ModuleNotFoundError: No module named 'no_such_mod'",
        "`1 / 0` failed: ZeroDivisionError: division by zero",
        "`len(tinypkg.__version__) == 7` failed: len(tinypkg.__version__) = 3",
    ]
    assert not KIND.check(ctx).done  # installed, but never verified


@pytest.mark.slow
def test_ranges_are_done_at_the_version_the_last_run_installed(
    tmp_path: Path, wheels: Path, env: dict[str, str], project: Path
) -> None:
    ctx = context(
        tmp_path, env, wheels, cwd=str(project), packages=["tinypkg>=1,<2"], allow_ranges=True
    )
    run_and_verify(ctx)
    assert KIND.check(ctx).done
    subprocess.run(
        [
            UV,
            "pip",
            "install",
            "-q",
            "--python",
            str(project / ".venv/bin/python"),
            "--offline",
            "--find-links",
            str(wheels),
            "tinypkg==2.0",
        ],
        env=env,
        check=True,
    )
    assert KIND.check(ctx).reason == "tinypkg is 2.0, wanted 1.0"


def test_missing_venv(tmp_path: Path, wheels: Path, env: dict[str, str]) -> None:
    ctx = context(tmp_path, env, wheels, cwd=str(tmp_path), packages=["tinypkg==1.0"])
    assert KIND.check(ctx).reason == f"no venv at {tmp_path / '.venv'}"
    with pytest.raises(StepFailed, match="no venv interpreter"):
        KIND.run(ctx)


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        ({"packages": ["tensorflow>=2.15"]}, "packages", "not an exact pin"),
        ({"packages": ["tensorflow==2.*"]}, "packages", "not an exact pin"),
        ({"packages": ["tensorflow"]}, "packages", "not an exact pin"),
        ({"packages": []}, "packages", "is empty"),
        ({"packages": [">=1"], "allow_ranges": True}, "packages", "names no package"),
        ({"verify": ["ml_dtypes.__version__ =="]}, "verify", "item 1 is not a python expression"),
        ({"verify": ["import os"]}, "verify", "not a python expression"),
    ],
)
def test_bad_params(raw: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ParamError, match=message) as err:
        validate_params(KIND, {"cwd": "/p", "packages": ["a==1"], **raw})
    assert err.value.key == key


def test_good_params() -> None:
    params = validate_params(
        KIND,
        {"cwd": "/p", "packages": ["tensorflow[and-cuda]==2.15.0", "tensorflow-datasets==4.9.3"]},
    )
    assert KIND.describe(params) == (
        "uv pip install tensorflow[and-cuda]==2.15.0 tensorflow-datasets==4.9.3 into .venv "
        "(from /p)"
    )
    ranges = {"cwd": "/p", "packages": ["tensorflow>=2.15,<2.16"], "allow_ranges": True}
    assert validate_params(KIND, ranges)["allow_ranges"]
