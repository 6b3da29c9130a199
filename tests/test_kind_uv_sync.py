"""`uv_sync` against real uv, offline: tiny projects resolving from wheels built at test time."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tomllib
import uv as uv_package
from boxes import Box
from project import Project
from pywheels import build_sdist, build_wheel, uv_env, uv_lock, write_project

from provision.errors import StepFailed
from provision.steps import pip_install, uv_sync
from provision.steps.base import ParamError, StepContext, validate_params

UV = uv_package.find_uv_bin()
AV = "av>=13.1.0,<14.0.0"


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    """A wheel dir: tinypkg 1.0/2.0, extrapkg 1.0, av 13.1.0 as a wheel and av 14.0.0 as an sdist
    only (its build backend does not exist, so a source build fails as it does on a box)."""
    dest = tmp_path / "wheels"
    for version in ("1.0", "2.0"):
        build_wheel(dest, "tinypkg", version)
    build_wheel(dest, "extrapkg", "1.0")
    build_wheel(dest, "av", "13.1.0")
    build_sdist(dest, "av", "14.0.0")
    return dest


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return uv_env(tmp_path)


def context(tmp_path: Path, env: dict[str, str], kind: Any, **raw: Any) -> StepContext:
    params = validate_params(kind, {"uv": UV, "offline": True, **raw})
    return StepContext(
        step_id=kind.name, params=params, run_dir=tmp_path / "run", env=env, out=io.StringIO()
    )


def run_and_verify(ctx: StepContext, kind: Any) -> str:
    kind.run(ctx)
    kind.verify(ctx)
    return ctx.out.getvalue()


@pytest.mark.slow
def test_first_run_syncs_then_done_until_the_lock_changes(
    tmp_path: Path, wheels: Path, env: dict[str, str]
) -> None:
    project = write_project(tmp_path / "proj", ["tinypkg==1.0"], wheels)
    uv_lock(UV, project, env)
    ctx = context(
        tmp_path, env, uv_sync.KIND, project=str(project), verify_imports={"tinypkg": "1"}
    )
    assert uv_sync.KIND.check(ctx).reason == "not synced by bootstrap yet"

    log = run_and_verify(ctx, uv_sync.KIND)
    assert "+ tinypkg==1.0" in log
    assert "import tinypkg: 1.0" in log
    progress = json.loads((ctx.workdir / "_progress.json").read_text())
    assert progress["message"] == "installed 1 packages"
    assert progress["received"] is True, "the runner may give the link to other downloads"
    check = uv_sync.KIND.check(ctx)
    assert check.done, check.reason
    assert check.reason.startswith("synced; uv.lock unchanged")
    assert uv_sync.KIND.check(ctx).done

    (project / "pyproject.toml").write_text(
        (project / "pyproject.toml").read_text().replace("tinypkg==1.0", "tinypkg==2.0")
    )
    assert uv_sync.KIND.check(ctx).reason == "pyproject.toml changed since the last sync"
    uv_lock(UV, project, env)
    assert uv_sync.KIND.check(ctx).reason == "uv.lock changed since the last sync"

    ctx2 = context(tmp_path, env, uv_sync.KIND, project=str(project), verify_imports=["tinypkg"])
    assert "- tinypkg==1.0" in run_and_verify(ctx2, uv_sync.KIND)
    assert uv_sync.KIND.check(ctx2).done
    site = next(project.glob(".venv/lib/python*/site-packages"))
    assert (site / "tinypkg-2.0.dist-info").is_dir()
    # Copies, not hardlinks into uv's cache (UV_LINK_MODE=copy by default).
    assert (site / "tinypkg" / "__init__.py").stat().st_nlink == 1

    shutil.rmtree(site / "tinypkg")
    assert "tinypkg is gone from the venv" in uv_sync.KIND.check(ctx2).reason
    shutil.rmtree(project / ".venv")
    assert uv_sync.KIND.check(ctx2).reason.endswith(".venv/bin/python is missing")


@pytest.mark.slow
def test_verify_imports_names_each_failure(
    tmp_path: Path, wheels: Path, env: dict[str, str]
) -> None:
    project = write_project(tmp_path / "proj", ["tinypkg==1.0"], wheels)
    wanted = {"tinypkg": "1.1", "no_such_module": "", "json": ""}
    ctx = context(tmp_path, env, uv_sync.KIND, project=str(project), verify_imports=wanted)
    uv_sync.KIND.run(ctx)
    with pytest.raises(StepFailed) as failed:
        uv_sync.KIND.verify(ctx)
    reason = failed.value.reason
    assert "tinypkg is 1.0, wanted 1.1.x" in reason
    assert (
        "import no_such_module failed (ModuleNotFoundError: No module named 'no_such_module')"
        in (reason)
    )
    assert "json" not in reason
    assert not uv_sync.KIND.check(ctx).done  # a failed verification records nothing


@pytest.mark.slow
def test_av_pinned_without_wheel_is_overridden_before_sync(
    tmp_path: Path, wheels: Path, env: dict[str, str]
) -> None:
    project = write_project(
        tmp_path / "proj",
        ["av>=13", "tinypkg==1.0"],
        wheels,
        tool_uv='override-dependencies = ["ml-dtypes==0.4.1"]\n',
    )
    uv_lock(UV, project, env)
    assert 'name = "av"\nversion = "14.0.0"' in (project / "uv.lock").read_text()
    # The trap is real: a plain sync tries to build av 14 from source and fails.
    plain = subprocess.run([UV, "sync", "--offline"], cwd=project, env=env, capture_output=True)
    assert plain.returncode != 0
    shutil.rmtree(project / ".venv", ignore_errors=True)

    ctx = context(
        tmp_path,
        env,
        uv_sync.KIND,
        project=str(project),
        overrides=[AV],
        verify_imports={"av": "13.1"},
    )
    log = run_and_verify(ctx, uv_sync.KIND)
    assert f"override-dependencies: added {AV}" in log
    assert "uv.lock pins av 14.0.0 with only an sdist" in log
    overrides = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["uv"]
    assert overrides["override-dependencies"] == ["ml-dtypes==0.4.1", AV]
    assert 'name = "av"\nversion = "13.1.0"' in (project / "uv.lock").read_text()
    assert "import av: 13.1.0" in log
    assert uv_sync.KIND.check(ctx).done

    # Running again changes nothing in pyproject.toml.
    before = (project / "pyproject.toml").read_text()
    assert f"already overrides {AV}" in run_and_verify(ctx, uv_sync.KIND)
    assert (project / "pyproject.toml").read_text() == before


@pytest.mark.slow
def test_av_trap_without_override_fails_at_once(
    tmp_path: Path, wheels: Path, env: dict[str, str]
) -> None:
    project = write_project(tmp_path / "proj", ["av>=13"], wheels)
    uv_lock(UV, project, env)
    ctx = context(tmp_path, env, uv_sync.KIND, project=str(project))
    with pytest.raises(StepFailed) as failed:
        uv_sync.KIND.run(ctx)
    assert failed.value.reason == (
        "uv.lock pins av 14.0.0 with only an sdist (a source build needs newer libraries): "
        "uv sync would build it from source and fail"
    )
    assert AV in (failed.value.hint or "")
    assert not (project / ".venv").exists()  # failed before syncing anything


@pytest.mark.slow
def test_sync_removes_what_pip_install_added(
    tmp_path: Path, wheels: Path, env: dict[str, str]
) -> None:
    """`uv sync` is exact: a package `pip_install` added is gone after a sync, and the
    pip_install step then says it is not done."""
    project = write_project(tmp_path / "proj", ["tinypkg==1.0"], wheels)
    sync = context(tmp_path, env, uv_sync.KIND, project=str(project))
    run_and_verify(sync, uv_sync.KIND)
    pip = context(
        tmp_path,
        env,
        pip_install.KIND,
        cwd=str(project),
        packages=["extrapkg==1.0"],
        find_links=[str(wheels)],
    )
    run_and_verify(pip, pip_install.KIND)
    assert pip_install.KIND.check(pip).done
    assert uv_sync.KIND.check(sync).done  # additions do not undo the sync

    uv_sync.KIND.run(sync)
    check = pip_install.KIND.check(pip)
    assert not check.done
    assert check.reason == f"extrapkg is not installed in {project / '.venv'}"


@pytest.mark.slow
def test_uv_is_installed_into_bootstrap_bin_when_absent(
    tmp_path: Path, wheels: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No uv anywhere (fresh HOME, PATH without it): its PyPI-style wheel (the real binary,
    packaged here so the test stays offline) is fetched with pip and unpacked."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    env = {**env, "HOME": str(home), "PATH": "/usr/bin:/bin"}
    version = subprocess.run([UV, "--version"], capture_output=True, text=True).stdout.split()[1]
    uv_wheels = tmp_path / "uv-wheels"
    build_wheel(
        uv_wheels,
        "uv",
        version,
        files={f"uv-{version}.data/scripts/uv": Path(UV).read_bytes()},
    )
    project = write_project(tmp_path / "proj", ["tinypkg==1.0"], wheels)
    params = {"project": str(project), "offline": True, "find_links": [str(uv_wheels)]}
    ctx = StepContext(
        step_id="sync",
        params=validate_params(uv_sync.KIND, params),
        run_dir=tmp_path / "run",
        env=env,
        out=io.StringIO(),
    )
    run_and_verify(ctx, uv_sync.KIND)
    installed = home / ".bootstrap" / "bin" / "uv"
    assert f"installed uv at {installed}" in ctx.out.getvalue()
    assert (
        subprocess.run([installed, "--version"], capture_output=True, text=True).stdout.split()[1]
        == version
    )
    assert uv_sync.KIND.check(ctx).done


def test_explicit_uv_that_does_not_exist_fails(tmp_path: Path, env: dict[str, str]) -> None:
    project = write_project(tmp_path / "proj", [], tmp_path)
    ctx = context(tmp_path, env, uv_sync.KIND, project=str(project), uv=str(tmp_path / "nope"))
    with pytest.raises(StepFailed, match="uv not found at"):
        uv_sync.KIND.run(ctx)


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        ({"verify_imports": {"transformers": 4.5}}, "verify_imports", "quote the version"),
        ({"verify_imports": "torch"}, "verify_imports", "mapping or a list"),
        ({"verify_imports": {"not a module": ""}}, "verify_imports", "no module name"),
        ({"overrides": [">=1"]}, "overrides", "names no package"),
        ({"find_links": [""]}, "find_links", "empty entry"),
        ({"extra_args": "--frozen"}, "extra_args", "must be list"),
    ],
)
def test_bad_params(raw: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ParamError, match=message) as err:
        validate_params(uv_sync.KIND, {"project": "/p", **raw})
    assert err.value.key == key


def test_describe() -> None:
    params = validate_params(
        uv_sync.KIND,
        {"project": "/workspace/openpi", "overrides": [AV], "verify_imports": {"torch": "2.7"}},
    )
    assert uv_sync.KIND.describe(params) == (
        f"uv sync in /workspace/openpi (overrides: {AV}); verify imports torch 2.7"
    )


E2E = """
name: uvtest
steps:
  - id: sync
    kind: uv_sync
    project: ~/proj
    uv: {uv}
    offline: true
    overrides: ["av>=13.1.0,<14.0.0"]
    verify_imports: {{av: "13.1", tinypkg: "1.0"}}
    env: {{UV_PYTHON_DOWNLOADS: never, UV_CACHE_DIR: {cache}}}
  - id: extra
    kind: pip_install
    needs: [sync]
    cwd: ~/proj
    packages: [extrapkg==1.0]
    find_links: [~/wheels]
    offline: true
    uv: {uv}
    verify: ['extrapkg.__version__ == "1.0"']
    env: {{UV_PYTHON_DOWNLOADS: never, UV_CACHE_DIR: {cache}}}
"""


@pytest.mark.slow
def test_up_over_ssh_then_a_second_up_is_a_noop(project: Project, box: Box, tmp_path: Path) -> None:
    """Through `bootstrap up` on a test sshd box: the av trap fixed, the venv synced, a package
    added from the project root; then nothing runs again, and `plan` says why."""
    wheels = box.home / "wheels"
    build_wheel(wheels, "tinypkg", "1.0")
    build_wheel(wheels, "extrapkg", "1.0")
    build_wheel(wheels, "av", "13.1.0")
    build_sdist(wheels, "av", "14.0.0")
    proj = write_project(box.home / "proj", ["av>=13", "tinypkg==1.0"], wheels)
    uv_lock(UV, proj, uv_env(tmp_path))
    project.playbook(E2E.format(uv=UV, cache=box.home / "uv-cache"))

    first = project.up("box1")
    assert first.returncode == 0, first.stdout + first.stderr
    steps = project.steps("box1")
    assert [steps[s]["status"] for s in ("sync", "extra")] == ["done", "done"]
    site = next(proj.glob(".venv/lib/python*/site-packages"))
    assert {p.name for p in site.glob("*.dist-info")} == {
        "av-13.1.0.dist-info",
        "tinypkg-1.0.dist-info",
        "extrapkg-1.0.dist-info",
    }

    second = project.up("box1")
    assert second.returncode == 0, second.stdout + second.stderr
    assert [project.steps("box1")[s]["attempts"] for s in ("sync", "extra")] == [1, 1]
    plan = project.cli("plan", "box1", "-p", "playbooks/test.yaml", "--json")
    assert plan.returncode == 0, plan.stderr
    reasons = {s["id"]: s for s in json.loads(plan.stdout)["steps"]}
    assert not any(s["run"] for s in reasons.values())
    assert "synced; uv.lock unchanged" in reasons["sync"]["reason"]
    assert "installed: extrapkg==1.0" in reasons["extra"]["reason"]
