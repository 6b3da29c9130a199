"""Faults injected for real over sshd boxes: nothing lost, nothing done twice, state intact.

- the controller killed (its whole process group, as when a laptop dies) before the agent is
  shipped, in the middle of shipping it, right after the runner started, and while following;
- the runner killed with SIGKILL in every state of a step, repeatedly, and in a tight loop that
  lands kills in the middle of state writes;
- the box unreachable: sshd stopped, and a link silently blackholed (network namespace + veth);
- the disk full under a step, and under the agent's own state;
- a step ignoring SIGTERM at its timeout; two controllers racing on one box.

Steps count their executions by appending to marker files (`count-NAME`), so "exactly once"
is checked on the box's own disk, not on what bootstrap reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from boxes import Box
from conftest import TRANSPORTS
from netlink import Link
from project import Project, away, count, one_line_error, wait_for

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- helpers


def runners(box: Box, run: str) -> list[int]:
    """Pids of the box's runner processes for `run`."""
    return [pid for pid, cmd in box.processes() if f" run --run {run}" in cmd]


def state(box: Box, run: str) -> dict[str, Any]:
    """The run's state file, which must always parse (atomic writes)."""
    path = box.home / ".bootstrap" / "runs" / run / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"steps": {}}


def statuses(box: Box, run: str) -> dict[str, str]:
    return {k: v["status"] for k, v in state(box, run)["steps"].items()}


def start_cli(project: Project, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `bootstrap ARGS` in its own process group (so it can be killed like a laptop)."""
    project.write_inventory()
    return subprocess.Popen(
        [sys.executable, "-m", "provision.cli", *args],
        cwd=project.root,
        env=env or project.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


CHAIN = """
name: chain
steps:
  - id: a
    kind: shell
    run: echo x >> ~/count-a; sleep 1
  - id: b
    kind: shell
    needs: [a]
    run: echo x >> ~/count-b; sleep 2
  - id: c
    kind: shell
    needs: [b]
    run: echo x >> ~/count-c
"""

# ------------------------------------------------------------------ the controller killed

#: An `ssh` first on the controller's PATH: logs each call, may wait before connecting, and
#: passes stdin to the real ssh in 8 KiB chunks with a pause after each (a slow uplink), logging
#: how many bytes went through, so a test can kill the controller mid-ship.
SLOW_SSH = """\
#!{python}
import os, subprocess, sys, time
log = os.environ["BT_SSH_LOG"]
def note(text):
    with open(log, "a") as fh:
        fh.write(text + "\\n")
note("call")
time.sleep(float(os.environ.get("BT_SSH_DELAY", "0")))
proc = subprocess.Popen(["{ssh}", *sys.argv[1:]], stdin=subprocess.PIPE)
sent = 0
try:
    while True:
        chunk = os.read(0, 8192)
        if not chunk:
            break
        proc.stdin.write(chunk)
        proc.stdin.flush()
        sent += len(chunk)
        note(f"sent {{sent}}")
        time.sleep(float(os.environ.get("BT_SSH_TRICKLE", "0")))
    proc.stdin.close()
except BrokenPipeError:
    pass
sys.exit(proc.wait())
"""


def _slow_ssh_env(project: Project, tmp_path: Path, delay: float, trickle: float) -> dict:
    bindir = tmp_path / "slowbin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "ssh"
    wrapper.write_text(SLOW_SSH.format(python=sys.executable, ssh=shutil.which("ssh")))
    wrapper.chmod(0o755)
    log = tmp_path / "ssh.log"
    log.write_text("")
    return dict(
        project.env,
        PATH=f"{bindir}{os.pathsep}{project.env['PATH']}",
        BT_SSH_LOG=str(log),
        BT_SSH_DELAY=str(delay),
        BT_SSH_TRICKLE=str(trickle),
    )


def _bytes_sent(tmp_path: Path) -> int:
    sent = [
        int(ln.split()[1])
        for ln in (tmp_path / "ssh.log").read_text().split("\n")
        if ln.startswith("sent")
    ]
    return max(sent, default=0)


KILL_POINTS: dict[str, Callable[[Box, Path], bool]] = {
    # The wrapper was called but holds the connection back: nothing reached the box.
    "before-ship": lambda box, tmp: "call" in (tmp / "ssh.log").read_text(),
    # A third of the agent zipapp has gone through.
    "mid-ship": lambda box, tmp: _bytes_sent(tmp) >= 64 * 1024,
    "after-start": lambda box, tmp: bool(runners(box, "chain")),
    "while-following": lambda box, tmp: count(box, "b") == 1,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_controller_killed_at_any_point_runs_each_step_exactly_once(
    project: Project, box: Box, tmp_path: Path, point: str
) -> None:
    project.playbook(CHAIN)
    slow = point in ("before-ship", "mid-ship")
    env = _slow_ssh_env(project, tmp_path, delay=3 if point == "before-ship" else 0,
                        trickle=0.15 if slow else 0)  # fmt: skip
    proc = start_cli(project, "up", "box1", "-p", "playbooks/test.yaml", env=env)
    try:
        wait_for(lambda: KILL_POINTS[point](box, tmp_path), what=point)
    finally:
        kill_group(proc)
    if point == "mid-ship":
        assert _bytes_sent(tmp_path) < 150 * 1024, "the kill came after the agent was shipped"
    # Whatever was started finishes on its own; nothing is started twice.
    wait_for(lambda: not runners(box, "chain"), what="the runner to finish")
    again = project.up("box1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert [count(box, n) for n in "abc"] == [1, 1, 1]
    snap = project.status("box1")
    assert snap["runner"] == "idle"
    assert {s["id"]: s["status"] for s in snap["steps"]} == {"a": "done", "b": "done", "c": "done"}
    assert {s["id"]: s["attempts"] for s in snap["steps"]} == {"a": 1, "b": 1, "c": 1}


# ------------------------------------------------------------------ the runner killed

#: One execution of a stage: holds the stage's flock in all its processes (a second copy
#: beside it logs `overlap`), counts itself, prints through the runner's pipe (so a runner
#: killed alone breaks it mid-step), and marks its end. `s2` builds a file the way a download
#: does, 1000 bytes then the rest, under `creates:`.
STAGE = (
    "exec 9>>{d}/lock-{s}; flock -n 9 || echo {s} >> {d}/overlap; echo x >> {d}/count-{s}; "
    "echo working; sleep 0.6; echo still working; {body}sleep 0.6; echo x >> {d}/end-{s}"
)
STAGES = """
name: {name}
steps:
  - id: s1
    kind: shell
    run: {s1}
  - id: s2
    kind: shell
    needs: [s1]
    creates: {d}/model.bin
    run: {s2}
  - id: s3
    kind: shell
    needs: [s1]
    run: {s3}
  - id: s4
    kind: shell
    needs: [s2, s3]
    run: {s4}
"""
STAGE_IDS = ("s1", "s2", "s3", "s4")
PARTIAL = (
    "head -c 1000 /dev/zero > {d}/model.bin; sleep 0.6; head -c 9000 /dev/zero >> {d}/model.bin; "
)


def _stages(name: str, d: str) -> str:
    bodies = {s: "" for s in STAGE_IDS} | {"s2": PARTIAL.format(d=d)}
    runs = {s: json.dumps(STAGE.format(d=d, s=s, body=bodies[s])) for s in STAGE_IDS}
    return STAGES.format(name=name, d=d, **runs)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@dataclass
class KillFigures:
    """What the kill loop saw, over every round."""

    kills: int = 0
    executions: int = 0
    overlaps: int = 0
    #: (round, step) pairs seen recorded done, or ending the round, without having finished.
    done_without_finishing: set[tuple[int, str]] = field(default_factory=set)
    redone_after_done: int = 0


def test_runner_sigkill_in_every_step_state_never_loses_or_fakes_work(
    project: Project, box: Box
) -> None:
    """Rounds of one run each, killed at random points until it ends: the runner alone (its
    steps' `agent exec` then die on the broken pipe, their shells live on), or the runner with
    every process of its steps (an OOM kill, a reboot). Whatever is killed, a step recorded done
    had finished (its end marker, its whole `creates:` file), no step ran twice at once, and
    none ran again once done."""
    rng = random.Random(5)
    figures = KillFigures()
    for round_no in range(3):
        name, d = f"stages{round_no}", box.home / f"r{round_no}"
        d.mkdir()
        project.playbook(_stages(name, str(d)))
        done_at: dict[str, int] = {}
        for _ in range(6):
            recorded = statuses(box, name)
            if recorded and all(v == "done" for v in recorded.values()):
                break
            assert project.up("box1", extra=["--detach"]).returncode == 0
            pids = runners(box, name)
            if not pids:
                continue  # all found done without a runner
            time.sleep(rng.uniform(0.0, 2.0))
            group = rng.random() < 0.4
            steps = [p for p, c in box.processes() if f"exec --run {name} " in c]
            victims = [pids[0], *(steps if group else [])]
            if group:  # every process of the steps: the shells under agent exec too
                victims += [p for p, c in box.processes() if f"{d}/lock-" in c or "sleep 0.6" in c]
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            figures.kills += 1
            wait_for(
                lambda pid=pids[0], name=name: pid not in runners(box, name),
                what="the runner to die",
            )
            for step, status in statuses(box, name).items():  # parses: never half-written
                if status != "done":
                    continue
                finished = _lines(d / f"end-{step}") >= 1
                whole = step != "s2" or (d / "model.bin").stat().st_size == 10000
                if not (finished and whole):
                    figures.done_without_finishing.add((round_no, step))
                done_at.setdefault(step, _lines(d / f"count-{step}"))
        final = project.up("box1", playbook="test.yaml")
        assert final.returncode == 0, final.stdout + final.stderr
        assert all(s["status"] == "done" for s in project.status("box1")["steps"])
        if (d / "model.bin").stat().st_size != 10000:
            figures.done_without_finishing.add((round_no, "s2"))
        for step in STAGE_IDS:
            runs = _lines(d / f"count-{step}")
            figures.executions += runs
            figures.redone_after_done += runs - done_at.get(step, runs)
            if _lines(d / f"end-{step}") == 0:
                figures.done_without_finishing.add((round_no, step))
        figures.overlaps += _lines(d / "overlap")
        assert not runners(box, name)
    print(f"\nkill loop: {figures}")
    assert figures.kills >= 10, figures
    assert (figures.overlaps, len(figures.done_without_finishing), figures.redone_after_done) == (
        0,
        0,
        0,
    ), figures


def _many_steps(n: int) -> str:
    steps = "".join(
        f"  - {{id: t{i:02d}, kind: shell, run: 'echo x >> ~/hammer-t{i:02d}'"
        + (f", needs: [t{i - 8:02d}]" if i >= 8 else "")
        + "}\n"
        for i in range(n)
    )
    return f"name: hammer\nmax_parallel: 8\nsteps:\n{steps}"


def test_kills_during_state_writes_never_leave_a_half_written_state(
    project: Project, box: Box
) -> None:
    n = 32
    project.playbook(_many_steps(n))
    assert project.up("box1", extra=["--detach"]).returncode == 0
    wait_for(lambda: runners(box, "hammer"), what="the first runner")
    rng = random.Random(7)
    run_dir = box.home / ".bootstrap" / "runs" / "hammer"
    start = "cd; setsid python3 $(readlink -f ~/.bootstrap/current.pyz) run --run hammer </dev/null >/dev/null 2>&1 & echo $!"
    parsed = 0
    for _ in range(40):
        for pid in runners(box, "hammer"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        text = (run_dir / "state.json").read_text()
        data = json.loads(text)  # a torn write would fail here
        parsed += 1
        for step, rec in data["steps"].items():
            if rec["status"] == "done":
                assert (box.home / f"hammer-{step}").exists(), step
        pid = int(box.ssh(start).stdout)
        time.sleep(rng.uniform(0.0, 0.25))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert parsed == 40
    wait_for(lambda: not runners(box, "hammer"), what="the last runner to die")
    result = project.up("box1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(s["status"] == "done" for s in project.status("box1", "test.yaml")["steps"])
    assert not list(run_dir.glob(".state.json.*.tmp")), "torn writes leave no temp files behind"


def test_prelude_installs_no_agent_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from provision.bundle import build_agent
    from provision.controller import _PRELUDE

    monkeypatch.setenv("BOOTSTRAP_CONFIG_DIR", str(tmp_path / "controller"))
    agent = build_agent()
    header = {"sha": agent.sha256, "len": len(agent.data), "argv": ["status"], "ephemeral": False}
    cut = json.dumps(header).encode() + b"\n" + agent.data[:50000]
    env = dict(os.environ, BOOTSTRAP_AGENT_DIR=str(tmp_path / "box"))
    result = subprocess.run(
        [sys.executable, "-c", _PRELUDE], input=cut, capture_output=True, env=env, timeout=30
    )
    assert result.returncode == 5 and result.stdout.startswith(b"BOOTSTRAP_CUT_AGENT 50000")
    assert not (tmp_path / "box").exists()


# ------------------------------------------------------------------ the disk full


@contextlib.contextmanager
def small_disk(path: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (its former content copied in), unmounted after."""
    keep = path.with_name(path.name + ".before")
    shutil.copytree(path, keep, symlinks=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        shutil.copytree(keep, path, symlinks=True, dirs_exist_ok=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
        shutil.rmtree(keep)


FILL = """
name: full
steps:
  - id: fill
    kind: shell
    run: echo x >> {counts}/count-fill; sleep 1; dd if=/dev/zero of={target} bs=64k
  - id: after-fill
    kind: shell
    needs: [fill]
    run: echo x >> {counts}/count-after
  - id: other
    kind: shell
    run: echo x >> {counts}/count-other
"""


def test_disk_full_in_a_data_dir_fails_the_step_with_a_hint(project: Project, box: Box) -> None:
    (box.home / "data").mkdir()
    project.playbook(FILL.format(counts=box.home, target="~/data/big"))
    with small_disk(box.home / "data"):
        result = project.up("box1")
        assert result.returncode == 1, result.stdout + result.stderr
        steps = project.steps("box1")
    assert steps["fill"]["status"] == "failed"
    assert "disk is full" in steps["fill"]["hint"], steps["fill"]
    assert any("No space left on device" in ln for ln in steps["fill"]["log_tail"])
    assert steps["after-fill"]["status"] == "blocked" and steps["other"]["status"] == "done"
    assert "hint: " in result.stdout and "disk is full" in result.stdout


def test_disk_full_under_the_agent_state_keeps_state_and_logs_readable(
    project: Project, box: Box, tmp_path: Path
) -> None:
    counts = tmp_path / "counts"  # not on the disk that fills up
    counts.mkdir()
    project.playbook(FILL.format(counts=counts, target="~/fill"))
    # The whole HOME (agent, state, logs) is a 2 MB disk that the step fills up.
    with small_disk(box.home, "2m"):
        result = project.up("box1")
        assert result.returncode == 1, result.stdout + result.stderr
        assert not runners(box, "full")
        steps = project.steps("box1")
        assert steps["fill"]["status"] == "failed", steps["fill"]
        assert "disk is full" in (steps["fill"]["hint"] or ""), steps["fill"]
        assert steps["other"]["status"] == "done", steps["other"]
        assert steps["after-fill"]["status"] == "blocked", steps["after-fill"]
        logs = project.cli("logs", "box1", "fill", "-p", "playbooks/test.yaml")
        assert logs.returncode == 0 and "=== fill: attempt 1" in logs.stdout
        # Space freed: the next up reruns what failed and nothing else.
        (box.home / "fill").unlink()
        project.playbook(FILL.format(counts=counts, target="~/fill count=1"))
        again = project.up("box1")
        assert again.returncode == 0, again.stdout + again.stderr
    runs = [(counts / f"count-{n}").read_text().count("x") for n in ("fill", "after", "other")]
    assert runs == [2, 1, 1]


# ------------------------------------------------------------------ the box unreachable


def _timed(fn: Callable[[], subprocess.CompletedProcess]) -> tuple[str, float]:
    start = time.monotonic()
    line = one_line_error(fn())
    return line, time.monotonic() - start


def _all_done_on_box(box: Box, run: str) -> bool:
    recorded = state(box, run)
    return (
        bool(recorded["steps"])
        and recorded.get("runner", {}).get("status") == "idle"
        and all(rec["status"] == "done" for rec in recorded["steps"].values())
    )


def test_stopped_sshd_is_unreachable_fast_and_status_catches_up_after(
    project: Project, box: Box
) -> None:
    project.playbook(away(4))
    assert project.up("box1", extra=["--detach"]).returncode == 0
    wait_for(lambda: count(box, "long") == 1, what="the long step")
    box.stop()
    args = ("-p", "playbooks/test.yaml")
    line, took = _timed(lambda: project.cli("status", "box1", *args))
    assert "unreachable" in line and "box1" in line and took < 10, (line, took)
    line, took = _timed(lambda: project.cli("up", "box1", *args))
    assert "unreachable" in line and took < 10, (line, took)
    cut_at = time.time()
    wait_for(lambda: _all_done_on_box(box, "away"), what="the run to end meanwhile")
    box.start()
    snap = project.status("box1")
    assert snap["runner"] == "idle"
    steps = {s["id"]: s for s in snap["steps"]}
    assert [steps[s]["status"] for s in ("first", "long", "last")] == ["done"] * 3
    assert steps["last"]["ended"] > cut_at, "status shows what ran while the box was away"
    assert [count(box, n) for n in ("first", "long", "last")] == [1, 1, 1]


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
def test_blackholed_link_is_unreachable_within_10s_and_nothing_is_lost(
    project: Project, box: Box, tmp_path: Path
) -> None:
    project.playbook(away(8))
    with Link(box) as link:
        inventory = link.inventory(tmp_path / "linked.yaml", project.connection)
        args = ("-p", "playbooks/test.yaml", "-i", str(inventory))

        def cli(*words: str, timeout: float = 60) -> subprocess.CompletedProcess:
            return subprocess.run(
                link.cli_argv(*words, *args), cwd=project.root, env=project.env,
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip

        # OpenSSH: a ControlMaster from `up --detach` still rides the link when it goes silent.
        assert cli("up", "box1", "--detach").returncode == 0
        wait_for(lambda: count(box, "first") == 1, what="the first step")
        link.cut()
        line, took = _timed(lambda: cli("status", "box1"))
        assert "unreachable" in line and took < 10, ("status over a live master", line, took)
        link.restore()

        # `up` attached, following the run, when the link goes silent.
        follower = subprocess.Popen(
            link.cli_argv("up", "box1", *args), cwd=project.root, env=project.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_for(lambda: count(box, "long") == 1, what="the long step")
            link.cut()
            cut_at = time.monotonic()
            out, err = follower.communicate(timeout=30)
        finally:
            follower.kill()
        took = time.monotonic() - cut_at
        assert follower.returncode == 2 and "unreachable" in err, (out, err)
        assert took < 12, took

        for command in ("status", "up"):
            line, took = _timed(lambda command=command: cli(command, "box1"))
            assert "unreachable" in line and took < 10, (command, line, took)

        wait_for(lambda: _all_done_on_box(box, "away"), what="the run to end meanwhile")
        link.restore()
        status = cli("status", "box1", "--json")
        assert status.returncode == 0, status.stderr
        steps = {s["id"]: s for s in json.loads(status.stdout)["steps"]}
        assert [steps[s]["status"] for s in ("first", "long", "last")] == ["done"] * 3
    assert [count(box, n) for n in ("first", "long", "last")] == [1, 1, 1]


# ------------------------------------------------------------------ stubborn steps, races

STUBBORN = """
name: stubborn
steps:
  - id: deaf
    kind: shell
    timeout: 2
    run: |
      trap '' TERM
      (trap '' TERM; exec -a bt-deaf-child sleep 300) &
      (trap '' TERM; exec -a bt-deaf-orphan sleep 300) & disown
      exec -a bt-deaf-main sleep 300
  - id: after
    kind: shell
    needs: [deaf]
    run: echo x >> ~/count-after
  - id: beside
    kind: shell
    run: echo x >> ~/count-beside
  - id: graceful
    kind: shell
    timeout: 2
    run: |
      trap 'sleep 1; echo cleaned up > ~/graceful.out; exit 0' TERM
      sleep 300 & wait
"""


def test_step_ignoring_sigterm_is_killed_with_its_group_and_leaves_no_orphans(
    project: Project, box: Box
) -> None:
    project.playbook(STUBBORN)
    result = project.up("box1")
    assert result.returncode == 1, result.stdout + result.stderr
    steps = project.steps("box1")
    # Timeout 2 s, then SIGTERM, ignored, then SIGKILL after the runner's grace period (5 s).
    assert 2 + 5 <= steps["deaf"]["duration_s"] < 2 + 5 + 3, steps["deaf"]
    # A step that stops on SIGTERM gets the grace period to clean up, and no more.
    assert steps["graceful"]["status"] == "failed", steps["graceful"]
    assert (box.home / "graceful.out").read_text() == "cleaned up\n"
    assert steps["graceful"]["duration_s"] < 2 + 5, steps["graceful"]
    assert steps["deaf"]["status"] == "failed" and "timed out after 2s" in steps["deaf"]["reason"]
    assert steps["after"]["status"] == "blocked" and steps["beside"]["status"] == "done"
    left = [cmd for _, cmd in box.processes() if "bt-deaf" in cmd]
    assert left == [], left
    assert not runners(box, "stubborn")


RACE = """
name: race
steps:
  - id: a
    kind: shell
    run: {guard}
  - id: b
    kind: shell
    needs: [a]
    run: {guard}
  - id: c
    kind: shell
    needs: [b]
    run: {guard}
"""
#: Counts each run, and records a violation when the step is already running elsewhere: the
#: flock is held by the step's processes and released however they end (even by SIGKILL).
GUARD = (
    "exec 9>~/lock-$BOOTSTRAP_STEP; flock -n 9 || echo $BOOTSTRAP_STEP >> ~/overlap; "
    "echo x >> ~/count-$BOOTSTRAP_STEP; sleep 1"
)


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[1])


class RunnerSampler:
    """Samples the box's runner processes while two controllers race."""

    def __init__(self, box: Box) -> None:
        self.box = box
        self.most = 0
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop:
            found = runners(self.box, "race")
            # A runner forking a step shows up twice until the child execs: count the parent.
            found = [pid for pid in found if _parent(pid) not in found]
            self.most = max(self.most, len(found))
            time.sleep(0.01)

    def __enter__(self) -> RunnerSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.thread.join()


def _race(project: Project, *commands: list[str]) -> list[subprocess.CompletedProcess]:
    procs = [start_cli(project, *cmd, "-p", "playbooks/test.yaml") for cmd in commands]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_two_controllers_racing_up_run_one_runner_and_each_step_once(
    project: Project, box: Box
) -> None:
    project.playbook(RACE.format(guard=GUARD))
    with RunnerSampler(box) as sampler:
        results = _race(project, ["up", "box1"], ["up", "box1"])
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert sampler.most == 1
    assert [count(box, s) for s in "abc"] == [1, 1, 1]
    assert not (box.home / "overlap").exists()


def test_up_racing_rerun_never_runs_a_step_twice_at_once_and_loses_no_request(
    project: Project, box: Box
) -> None:
    project.playbook(RACE.format(guard=GUARD))
    assert project.up("box1").returncode == 0
    for _ in range(3):
        before = [count(box, s) for s in "abc"]
        with RunnerSampler(box) as sampler:
            results = _race(project, ["up", "box1"], ["rerun", "box1", "b"])
        assert [r.returncode for r in results] == [0, 0], results
        assert sampler.most <= 1
        # The rerun happened exactly once, whatever the order: a and its runs are untouched.
        assert [count(box, s) for s in "abc"] == [before[0], before[1] + 1, before[2] + 1]
    assert not (box.home / "overlap").exists()
    assert all(s["status"] == "done" for s in project.status("box1")["steps"])


def test_rerun_arriving_as_the_runner_ends_is_not_lost(project: Project, box: Box) -> None:
    # c needs a secret: a runner started for the late rerun must still be given it.
    project.secrets = {"TOKEN": {"value": "late-rerun-secret"}}
    racing = RACE.format(guard=GUARD).replace(
        "    needs: [b]\n    run: ",
        '    needs: [b]\n    secrets: [TOKEN]\n    run: test -n "$TOKEN"; ',
    )
    assert "secrets: [TOKEN]" in racing
    project.playbook(racing)
    assert project.up("box1").returncode == 0
    for delay in (0.0, 0.3, 0.6, 0.9, 1.2):
        before = count(box, "c")
        first = start_cli(project, "rerun", "box1", "c", "-p", "playbooks/test.yaml")
        # The second rerun lands while the first one's runner is running c or finishing.
        wait_for(lambda before=before: count(box, "c") > before, what="the first rerun")
        time.sleep(delay)
        second = project.cli("rerun", "box1", "c", "-p", "playbooks/test.yaml")
        first.communicate(timeout=60)
        assert first.returncode == 0 and second.returncode == 0, second.stdout + second.stderr
        wait_for(lambda: not runners(box, "race"), what="the runner to end")
        assert count(box, "c") == before + 2, delay
        assert statuses(box, "race")["c"] == "done"
        assert not (box.home / ".bootstrap/runs/race/secrets.json").exists()
    assert not (box.home / "overlap").exists()


def test_temp_files_of_killed_writers_are_removed(tmp_path: Path) -> None:
    from provision.agent.state import RunDir, remove_stale_temps

    run = RunDir("r", root=tmp_path)
    run.make()
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is free now
    dead = [run.path / f".state.json.{gone.pid}.tmp", run.requests / f".1.json.{gone.pid}.tmp"]
    live = run.path / f".plan.json.{os.getpid()}.tmp"
    for path in [*dead, live, run.path / "state.json"]:
        path.write_text("{")
    remove_stale_temps(run)
    assert [p.exists() for p in dead] == [False, False]
    assert live.exists() and (run.path / "state.json").exists()
