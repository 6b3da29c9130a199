"""`apt` against the real dpkg/apt of this machine (installs and removes the tiny `sl`)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.errors import StepFailed
from provision.steps import apt
from provision.steps.apt import KIND
from provision.steps.base import ParamError, StepContext, validate_params

pytestmark = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian box")


def _ctx(run_dir: Path, **raw: object) -> StepContext:
    return StepContext(
        step_id="base-packages",
        params=validate_params(KIND, raw),
        run_dir=run_dir,
        out=io.StringIO(),
    )


def _installed(package: str) -> bool:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    ).stdout
    return out.endswith(" installed")


@pytest.fixture
def sl_absent() -> Iterator[None]:
    """`sl` is not installed during the test and is removed again after it."""
    policy = subprocess.run(["apt-cache", "policy", "sl"], capture_output=True, text=True).stdout
    if _installed("sl") or "Candidate: (none)" in policy:
        pytest.skip("sl already installed or not installable here")
    yield
    subprocess.run(
        ["apt-get", "remove", "-y", "-q", "sl"],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        capture_output=True,
        check=True,
    )


def test_installed_packages_are_done_and_run_does_nothing(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, packages=["tmux", "git"])
    result = KIND.check(ctx)
    assert result.done and result.reason == "installed: tmux git"
    KIND.run(ctx)
    KIND.verify(ctx)
    assert ctx.out.getvalue() == "all packages already installed\n"
    assert not (tmp_path / "apt.lock").exists()


def test_missing_package_is_named_by_the_check(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, packages=["git", "bootstrap-no-such-package", "tmux"])
    result = KIND.check(ctx)
    assert not result.done
    assert result.reason == "not installed: bootstrap-no-such-package"


@pytest.mark.box  # installs a package: root
@pytest.mark.usefixtures("sl_absent")
def test_installs_only_what_is_missing(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, packages=["git", "sl"])
    assert KIND.check(ctx).reason == "not installed: sl"
    KIND.run(ctx)
    KIND.verify(ctx)
    assert _installed("sl")
    assert KIND.check(ctx).done
    log = ctx.out.getvalue()
    assert "Setting up sl" in log
    assert "Setting up git" not in log
    again = _ctx(tmp_path, packages=["git", "sl"])
    KIND.run(again)
    assert again.out.getvalue() == "all packages already installed\n"


@pytest.mark.box  # apt-get update: root
def test_unknown_package_updates_once_then_fails(tmp_path: Path) -> None:
    stamp = tmp_path / "apt-update.stamp"
    stamp.touch()
    os.utime(stamp, (time.time() - 600, time.time() - 600))
    ctx = _ctx(tmp_path, packages=["bootstrap-no-such-package"])
    with pytest.raises(StepFailed, match="Unable to locate package"):
        KIND.run(ctx)
    log = ctx.out.getvalue()
    assert re.search(r"lists are \d+ min old; skipping apt-get update", log)
    assert "not refreshed in this run; updating" in log
    assert log.count("Unable to locate package") == 2
    assert time.time() - stamp.stat().st_mtime < 60


def test_an_update_in_this_run_counts_as_fresh(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, packages=["sl"], max_list_age=600)
    (tmp_path / "apt-update.stamp").touch()
    assert apt._update_if_stale(ctx) is False
    assert "skipping apt-get update" in ctx.out.getvalue()


def test_lists_age(tmp_path: Path) -> None:
    assert apt.lists_age(tmp_path / "absent") is None
    assert apt.lists_age(tmp_path) is None
    (tmp_path / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4").touch()
    os.utime(tmp_path, (time.time() - 7200, time.time() - 7200))
    age = apt.lists_age(tmp_path)
    assert age is not None and 7100 < age < 7300


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"packages": []}, "packages"),
        ({"packages": ["ffmpeg; rm -rf /"]}, "packages"),
        ({"packages": ["FFmpeg"]}, "packages"),
        ({"packages": [3]}, "packages"),
        ({"packages": ["git"], "max_list_age": -1}, "max_list_age"),
        ({"package": ["git"]}, "package"),
    ],
)
def test_bad_params_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ParamError) as info:
        validate_params(KIND, raw)
    assert info.value.key == key


def test_describe() -> None:
    params = validate_params(KIND, {"packages": ["ffmpeg", "git-lfs", "libc6:amd64"]})
    assert KIND.describe(params) == "apt-get install ffmpeg git-lfs libc6:amd64 (those missing)"
