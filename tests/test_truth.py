"""The run's truth, over real sshd boxes: nothing marked done that did not finish, nothing run
twice at once, no crash hidden, no plans mixed, no damaged state taken silently.

Steps record what really happened on the box's own disk: a ledger of `start PID` / `end PID`
lines, and a `flock` held by every process of an execution, so a second copy starting beside
the first writes `overlap` (however the first one's processes are ended, the lock goes with
them).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
from boxes import Box
from project import Project, count, wait_for

pytestmark = pytest.mark.slow


def runner_pids(box: Box, run: str) -> list[int]:
    return [pid for pid, cmd in box.processes() if f" run --run {run}" in cmd]


def exec_pids(box: Box, step: str) -> list[int]:
    return [pid for pid, cmd in box.processes() if cmd.endswith(f" exec --run test {step}")]


def run_dir(box: Box, run: str = "test") -> Path:
    return box.home / ".bootstrap" / "runs" / run


def box_state(box: Box, run: str = "test") -> dict[str, Any]:
    return json.loads((run_dir(box, run) / "state.json").read_text())


def ledger(box: Box, name: str = "ledger") -> list[str]:
    path = box.home / name
    return path.read_text().split() if path.exists() else []


#: One execution of a step: takes the step's lock (held by all its processes), notes a second
#: copy running beside it, and writes `start` ... `end` with its shell's pid.
GUARDED = (
    "exec 9>>~/lock-$BOOTSTRAP_STEP; flock -n 9 || echo overlap >> ~/ledger; "
    "echo start-$BOOTSTRAP_STEP >> ~/ledger; "
)
END = "echo end-$BOOTSTRAP_STEP >> ~/ledger"


# ------------------------------------------------------------ 1. unfinished is never done

DOWNLOAD = f"""
name: test
steps:
  - id: download
    kind: shell
    creates: ~/model.bin
    run: |
      {GUARDED}
      head -c 1000 /dev/zero > ~/model.bin
      test -e ~/fast || sleep 30
      head -c 9000 /dev/zero >> ~/model.bin
      {END}
  - id: train
    kind: shell
    needs: [download]
    run: test "$(stat -c %s ~/model.bin)" = 10000 && echo trained >> ~/ledger
"""


def test_step_killed_mid_write_with_creates_runs_again_not_already_satisfied(
    project: Project, box: Box
) -> None:
    project.playbook(DOWNLOAD)
    assert project.up("box1", extra=["--detach"]).returncode == 0
    wait_for(lambda: (box.home / "model.bin").exists(), what="the first 1000 bytes")
    # The box's OOM killer or a reboot: the runner and the step's processes die together.
    for pid in runner_pids(box, "test") + [p for p, c in box.processes() if "sleep 30" in c]:
        os.kill(pid, signal.SIGKILL)
    for pid in exec_pids(box, "download"):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not exec_pids(box, "download"), what="the step to die")
    (box.home / "fast").touch()
    wide = dict(project.env, COLUMNS="300")
    plan = project.cli("plan", "box1", "-p", "playbooks/test.yaml", env=wide)
    assert "last attempt interrupted" in plan.stdout, plan.stdout
    result = project.up("box1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already satisfied" not in result.stdout
    assert (box.home / "model.bin").stat().st_size == 10000
    assert ledger(box) == ["start-download", "start-download", "end-download", "trained"]


FLAKY = """
name: test
steps:
  - id: marker
    kind: shell
    creates: ~/marker.ok
    run: echo x >> ~/count-marker; touch ~/marker.ok; test -e ~/disk-ok
  - id: probe
    kind: shell
    done_when: test -e ~/probe.ok
    run: echo x >> ~/count-probe; touch ~/probe.ok; test -e ~/disk-ok
"""


def test_step_whose_last_attempt_failed_runs_again_although_its_check_holds(
    project: Project, box: Box
) -> None:
    project.playbook(FLAKY)
    first = project.up("box1")
    assert first.returncode == 1, first.stdout + first.stderr
    steps = project.steps("box1")
    assert [steps[s]["status"] for s in ("marker", "probe")] == ["failed", "failed"]
    (box.home / "disk-ok").touch()  # the transient cause is gone; the markers stayed
    again = project.up("box1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert [count(box, "marker"), count(box, "probe")] == [2, 2]
    # Then, and only then, the checks alone may say done: a third `up` runs nothing.
    assert project.up("box1").returncode == 0
    assert [count(box, "marker"), count(box, "probe")] == [2, 2]


def test_step_set_up_by_hand_is_still_already_satisfied(project: Project, box: Box) -> None:
    project.playbook(FLAKY)
    (box.home / "marker.ok").touch()
    (box.home / "probe.ok").touch()
    result = project.up("box1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [count(box, "marker"), count(box, "probe")] == [0, 0]
    assert all("already satisfied" in s["reason"] for s in project.steps("box1").values())


# ------------------------------------------------------------ 2. never two copies at once

QUIET_TAIL = f"""
name: test
steps:
  - id: sync
    kind: shell
    run: |
      {GUARDED}
      echo begun
      sleep 1.5
      echo "a line through the pipe of a dead runner"
      test -e ~/fast || sleep 30 > /dev/null
      {END}
"""


def test_runner_killed_alone_never_leaves_a_second_copy_beside_the_first(
    project: Project, box: Box
) -> None:
    project.playbook(QUIET_TAIL)
    assert project.up("box1", extra=["--detach"]).returncode == 0
    wait_for(lambda: ledger(box) == ["start-sync"], what="the first execution")
    [runner] = runner_pids(box, "test")
    os.kill(runner, signal.SIGKILL)
    # The step's `agent exec` dies on its next line (broken pipe); its shell lives on.
    wait_for(lambda: not exec_pids(box, "sync"), what="agent exec to die on the pipe")
    assert [c for _, c in box.processes() if c == "sleep 30"], "the step's shell lives on"
    (box.home / "fast").touch()  # the next copy need not wait
    assert project.status("box1")["runner"] == "dead"
    result = project.up("box1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ledger(box) == ["start-sync", "start-sync", "end-sync"], ledger(box)
    assert not [c for _, c in box.processes() if c == "sleep 30"]


# ------------------------------------------------------------ 5. rerun --only under a dependent

UNDER = f"""
name: test
steps:
  - id: x
    kind: shell
    run: |
      echo x >> ~/count-x
      if [ "$(wc -l < ~/count-x)" -gt 1 ]; then touch ~/b-may-end; sleep 2; fi
  - id: b
    kind: shell
    needs: [x]
    run: |
      {GUARDED}
      while [ ! -e ~/b-may-end ]; do sleep 0.1; done
      {END}
  - id: c
    kind: shell
    needs: [b]
    run: echo x >> ~/count-c
"""


def test_rerun_only_while_a_dependent_runs_completes_without_crashing_the_runner(
    project: Project, box: Box
) -> None:
    project.playbook(UNDER)
    assert project.up("box1", extra=["--detach"]).returncode == 0
    wait_for(lambda: ledger(box) == ["start-b"], what="b to run")
    rerun = project.cli("rerun", "box1", "x", "--only", "-p", "playbooks/test.yaml")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert count(box, "x") == 2 and count(box, "c") == 1
    # b ended while x ran again, before the restarted pass had reached b; --only: b ran once.
    assert ledger(box) == ["start-b", "end-b"]
    snap = project.status("box1")
    assert snap["runner"] == "idle" and "runner_error" not in snap
    assert all(s["status"] == "done" for s in snap["steps"])
    assert "Traceback" not in (run_dir(box) / "runner.log").read_text()


# ------------------------------------------------------------ 8. a damaged state.json

TWO = """
name: test
steps:
  - id: made
    kind: shell
    creates: ~/made
    run: echo x >> ~/count-made; touch ~/made
  - id: plain
    kind: shell
    needs: [made]
    run: echo x >> ~/count-plain
"""
DAMAGED = {
    "steps-null": '{"version": 1, "steps": null}',
    "a-list": '[{"steps": {}}]',
    "string-per-step": '{"steps": {"made": "done", "plain": "done"}}',
    "bad-field": '{"steps": {"made": {"status": "done", "attempts": "one"}}}',
    "empty": "",
    "truncated": '{"version": 1, "steps": {"made": {"status": "do',
}


@pytest.mark.parametrize("shape", list(DAMAGED))
def test_damaged_state_is_kept_aside_said_in_one_line_and_steps_are_checked(
    project: Project, box: Box, shape: str
) -> None:
    project.playbook(TWO)
    assert project.up("box1").returncode == 0
    assert [count(box, "made"), count(box, "plain")] == [1, 1]
    (run_dir(box) / "state.json").write_text(DAMAGED[shape])

    status = project.cli("status", "box1", "-p", "playbooks/test.yaml")
    assert status.returncode == 1, status.stdout + status.stderr  # steps not known done
    out = status.stdout + status.stderr
    assert "Traceback" not in out
    [warning] = [ln for ln in status.stderr.splitlines() if "state.json" in ln]
    assert "damaged" in warning and "next `up` keeps it aside" in warning, warning

    result = project.cli(
        *(["rerun", "box1", "plain"] if shape == "empty" else ["up", "box1"]),
        "-p",
        "playbooks/test.yaml",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    [kept] = list(run_dir(box).glob("state.json.damaged-*"))
    assert kept.read_text() == DAMAGED[shape]
    [notice] = [ln for ln in result.stderr.splitlines() if "state.json" in ln]
    assert f"kept it as {kept.name}" in notice, notice
    # `made` is decided by its check (creates holds); `plain` has none, so it runs again.
    assert [count(box, "made"), count(box, "plain")] == [1, 2]
    assert box_state(box)["steps"]["made"]["reason"].startswith("already satisfied")
    again = project.up("box1")
    assert again.returncode == 0 and "state.json" not in again.stderr, again.stderr
    assert [count(box, "made"), count(box, "plain")] == [1, 2]


# ------------------------------------------------------------ 6. a changed playbook mid-run

OLD_PLAN = f"""
name: test
steps:
  - id: a
    kind: shell
    run: |
      {GUARDED}
      while [ ! -e ~/a-may-end ]; do sleep 0.1; done
      {END}
  - id: dropped
    kind: shell
    needs: [a]
    run: echo old >> ~/ledger
"""
NEW_PLAN = """
name: test
steps:
  - id: a
    kind: shell
    run: echo new-a >> ~/ledger
  - id: added
    kind: shell
    needs: [a]
    run: echo new-added >> ~/ledger
"""


def test_up_with_a_changed_playbook_mid_run_waits_for_the_old_run_never_mixing(
    project: Project, box: Box
) -> None:
    project.playbook(OLD_PLAN)
    assert project.up("box1", extra=["--detach"]).returncode == 0
    wait_for(lambda: ledger(box) == ["start-a"], what="the old plan's a")
    project.playbook(NEW_PLAN)
    refused = project.up("box1", extra=["--detach"])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "from another plan is in progress (running: a)" in refused.stderr, refused.stderr
    project.write_inventory()
    follower = subprocess.Popen(
        [sys.executable, "-m", "provision.cli", "up", "box1", "-p", "playbooks/test.yaml"],
        cwd=project.root, env=project.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(follower.stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("waiting for it to end" in ln for ln in said), what="the notice")
        assert ledger(box) == ["start-a"], "the old run goes on"
        (box.home / "a-may-end").touch()
        follower.wait(timeout=120)  # its few lines of stdout fit in the pipe meanwhile
    finally:
        follower.kill()
    reader.join(timeout=10)
    out = follower.stdout.read() if follower.stdout else ""
    assert follower.returncode == 0, out + "".join(said)
    # The old run ended as the old plan; then the new plan ran, whole.
    assert ledger(box) == ["start-a", "end-a", "old", "new-a", "new-added"], ledger(box)
    snap = project.status("box1")
    assert [(s["id"], s["status"]) for s in snap["steps"]] == [("a", "done"), ("added", "done")]
    recorded = box_state(box)["steps"]
    assert not [k for k, r in recorded.items() if r["status"] in ("error", "failed")], recorded


# ------------------------------------------------------------ 4. a newer agent under a run

LAZY = """
name: test
steps:
  - id: first
    kind: shell
    run: echo ready > ~/job.log; while [ ! -e ~/go ]; do sleep 0.1; done
  - id: watch
    kind: wait_log
    needs: [first]
    log: ~/job.log
    markers: [ready]
    timeout: 30
"""


def _newer_agent() -> Any:
    """The agent with one more entry stored first: another sha, and every other entry at
    another offset (what a real upgrade does to a zipapp's layout)."""
    from provision.bundle import Agent, build_agent

    old = zipfile.ZipFile(io.BytesIO(build_agent().data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as new:
        new.writestr("provision/_upgrade_marker.txt", "x" * 4096)
        for info in old.infolist():
            new.writestr(info, old.read(info))
    data = buf.getvalue()
    return Agent(data, hashlib.sha256(data).hexdigest())


def _install(box: Box, agent: Any) -> None:
    """What a newer controller does: the prelude ships the agent and runs `status`."""
    from provision.controller import _PRELUDE, _stdin

    result = subprocess.run(
        [*box.ssh_argv(), "python3 -c " + shlex.quote(_PRELUDE)],
        input=_stdin(agent, ["status"], b"", ship=True, ephemeral=False),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_newer_agent_installed_under_a_running_run_leaves_the_runner_its_own(
    project: Project, box: Box
) -> None:
    project.playbook(LAZY)
    assert project.up("box1", extra=["--detach"]).returncode == 0
    wait_for(lambda: exec_pids(box, "first"), what="the first step")
    assert len(runner_pids(box, "test")) == 1
    newer = _newer_agent()
    _install(box, newer)
    current = (box.home / ".bootstrap/current.pyz").resolve()
    assert current.name == f"{newer.sha256}.pyz"
    (box.home / "go").touch()  # the runner now imports wait_log, lazily, from its own zipapp
    wait_for(lambda: not runner_pids(box, "test"), what="the run to end")
    snap = project.status("box1")
    assert snap["runner"] == "idle" and "runner_error" not in snap, snap
    assert [s["status"] for s in snap["steps"]] == ["done", "done"], snap["steps"]
    assert "Traceback" not in (run_dir(box) / "runner.log").read_text()
    assert len(list((box.home / ".bootstrap/agents").glob("*.pyz"))) == 2


def test_runner_crash_shows_as_dead_with_its_error_and_up_recovers_it(
    project: Project, box: Box
) -> None:
    project.playbook(LAZY)
    (box.home / "go").touch()
    assert project.up("box1").returncode == 0
    # A plan.json edited on the box into a cycle: the runner started on it crashes in its loop.
    plan = json.loads((run_dir(box) / "plan.json").read_text())
    plan["steps"][0]["needs"] = ["watch"]
    (run_dir(box) / "plan.json").write_text(json.dumps(plan))
    log = run_dir(box) / "runner.log"
    box.ssh(
        f"cd; python3 $(readlink -f ~/.bootstrap/current.pyz) run --run test >> {log} 2>&1",
        check=False,
    )
    status = project.cli("status", "box1", "-p", "playbooks/test.yaml")
    assert status.returncode == 3, status.stdout + status.stderr
    assert "runner dead" in status.stdout
    [line] = [ln for ln in status.stderr.splitlines() if ln.strip()]
    assert "the runner crashed: CycleFound: first -> watch" in line and "runner.log" in line, line
    assert "Traceback" in log.read_text()
    result = project.up("box1")  # the controller's plan again
    assert result.returncode == 0, result.stdout + result.stderr
    snap = project.status("box1")
    assert snap["runner"] == "idle" and "runner_error" not in snap
    assert [s["status"] for s in snap["steps"]] == ["done", "done"]


# ------------------------------------------------------------ a full disk before `up`


@pytest.mark.parametrize("agent", ["installed", "not-yet"])
def test_disk_full_before_up_is_one_line_and_leaves_no_temp_file(
    project: Project, box: Box, agent: str
) -> None:
    from test_faults import small_disk

    project.playbook(TWO)
    if agent == "installed":
        assert project.up("box1").returncode == 0
        project.playbook(TWO.replace("echo x >> ~/count-plain", "echo y >> ~/count-plain"))
    with small_disk(box.home, "2m"):
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={box.home}/filler", "bs=64k"], capture_output=True
        )
        result = project.up("box1")
        leftovers = [p.name for p in box.home.rglob("*.tmp")]
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in out, out
    [line] = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "No space left on device" in line, line
    assert leftovers == [], leftovers


def test_prune_keeps_the_newest_agents_and_every_one_a_process_runs_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from provision.agent.versions import prune_agents

    monkeypatch.setenv("BOOTSTRAP_AGENT_DIR", str(tmp_path))
    agents = tmp_path / "agents"
    agents.mkdir()
    files = []
    for age in range(6):  # a0 newest ... a5 oldest
        path = agents / f"a{age}.pyz"
        path.write_bytes(b"zip")
        os.utime(path, (1e9 - age * 100, 1e9 - age * 100))
        files.append(path)
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(files[4])])
    guard = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env=dict(os.environ, PYTHONPATH=f"/elsewhere:{files[5]}"),
    )
    try:
        wait_for(lambda: str(files[4]).encode() in Path(f"/proc/{runner.pid}/cmdline").read_bytes())
        wait_for(lambda: b"/elsewhere" in Path(f"/proc/{guard.pid}/environ").read_bytes())
        removed = prune_agents()
    finally:
        for proc in (runner, guard):
            proc.kill()
            proc.wait()
    assert removed == [files[3]]
    assert [p.exists() for p in files] == [True, True, True, False, True, True]


# ------------------------------------------------------------ secrets.json does not linger

NEEDS_TOKEN = """
name: test
steps:
  - id: uses
    kind: shell
    secrets: [TOKEN]
    run: test -n "$TOKEN"; echo x >> ~/count-uses; while [ ! -e ~/go ]; do sleep 0.1; done
"""


def test_secrets_file_is_gone_once_the_runner_started_and_after_it_died(
    project: Project, box: Box
) -> None:
    project.secrets = {"TOKEN": {"value": "tok-1234567890"}}
    project.playbook(NEEDS_TOKEN)
    assert project.up("box1", extra=["--detach"]).returncode == 0
    wait_for(lambda: count(box, "uses") == 1, what="the step that needs it")
    assert not (run_dir(box) / "secrets.json").exists(), "the running step has its values"
    os.kill(runner_pids(box, "test")[0], signal.SIGKILL)
    wait_for(lambda: project.status("box1")["runner"] == "dead", what="the runner to die")
    assert not (run_dir(box) / "secrets.json").exists()
    (box.home / "go").touch()
    result = project.up("box1")  # ships the values again; the interrupted step gets them
    assert result.returncode == 0, result.stdout + result.stderr
    assert count(box, "uses") == 2
    assert not (run_dir(box) / "secrets.json").exists()
