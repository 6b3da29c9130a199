"""tmux_launch with real tmux (an isolated server per test) and the stand-in trainer."""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from project import wait_for

from provision.agent.gpus import GpuLeases, session_members
from provision.errors import StepFailed
from provision.steps import tmux_launch
from provision.steps.base import ParamError, StepContext, validate_params
from provision.steps.tmux_launch import KIND
from provision.steps.wait_log import KIND as WAIT_LOG

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "provision" / "data" / "fake_trainer.py"
FAKE_TORCHRUN = REPO / "tests" / "fakes" / "torchrun"
AE = f"{TRAINER} --mode ae --config configs/ae.yaml --startup-sleep 0"


@pytest.fixture(autouse=True)
def agent_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own agent directory: GPU leases are box-wide, so never the real one."""
    path = tmp_path / "agent"
    monkeypatch.setenv("BOOTSTRAP_AGENT_DIR", str(path))
    return path


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    """The job's working directory, with the config file the trainer insists on."""
    (tmp_path / "job" / "configs").mkdir(parents=True)
    (tmp_path / "job" / "configs" / "ae.yaml").write_text("mode: ae\n")
    return tmp_path / "job"


def make_ctx(
    tmp_path: Path,
    socket: str,
    command: str,
    secret_env: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    **params: object,
) -> StepContext:
    raw = {"session": "train", "socket": socket, "cwd": str(tmp_path / "job"), "command": command}
    raw.update(params)
    return StepContext(
        step_id="launch",
        params=validate_params(KIND, raw),
        run_dir=tmp_path / "run",
        env={**os.environ, **(env or {}), **(secret_env or {})},
        secrets=dict(secret_env or {}),
        out=io.StringIO(),
    )


def tmux(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["tmux", "-S", socket, *args], capture_output=True, text=True, check=False
    )


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: this machine's PID 1 reaps no orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def job_pid(ctx: StepContext) -> int:
    return int((ctx.workdir / "job.pid").read_text().split()[0])


def trainer_environ(ctx: StepContext) -> list[bytes]:
    """The environment of the trainer process the launch script started (a descendant)."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[1])
    script = job_pid(ctx)
    for pid in parents:
        up = pid
        while up in parents and up != script:
            up = parents[up]
        if up != script:
            continue
        try:  # a process may exit while we look
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if len(argv) > 1 and argv[1] == str(TRAINER).encode():
                return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
    raise AssertionError("no trainer process under the launch script")


def wait_markers(tmp_path: Path, log: Path, markers: list, timeout: float = 15) -> StepContext:
    ctx = StepContext(
        step_id="wait",
        params=validate_params(WAIT_LOG, {"log": str(log), "markers": markers}),
        run_dir=tmp_path / "run",
        poll=1,
        deadline=time.time() + timeout,
    )
    WAIT_LOG.run(ctx)
    return ctx


@pytest.mark.slow
def test_session_survives_the_launching_process(tmp_path: Path, socket: str, job_dir: Path) -> None:
    command = f"python3 {AE} --steps 100000 --step-sleep 0.2 --wandb offline"
    launcher = """
import io, json, sys
from pathlib import Path
from provision.steps.base import StepContext, validate_params
from provision.steps.tmux_launch import KIND
params = validate_params(KIND, json.loads(sys.argv[1]))
ctx = StepContext(step_id="launch", params=params, run_dir=Path(sys.argv[2]), out=io.StringIO())
KIND.run(ctx)
KIND.verify(ctx)
"""
    raw = {"session": "train", "socket": socket, "cwd": str(job_dir), "command": command}
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", launcher, json.dumps(raw), str(tmp_path / "run")],
        cwd=REPO,
        check=True,
        timeout=60,
    )
    launch_s = time.monotonic() - started
    ctx = make_ctx(tmp_path, socket, command)
    check = KIND.check(ctx)
    assert check.done and "running in tmux session train" in check.reason
    assert alive(job_pid(ctx))
    log = job_dir / "logs" / "train.log"
    wait_markers(tmp_path, log, [r"\[AE\] step=0/", r"\[AE\] step=2/"])
    assert launch_s < 10


@pytest.mark.slow
def test_relaunch_kills_the_old_job_and_resumes(tmp_path: Path, socket: str, job_dir: Path) -> None:
    ctx = make_ctx(
        tmp_path,
        socket,
        f"python3 {AE} --steps 2 --save-interval 1 --hold --wandb offline",
        resume_args="--resume",
    )
    KIND.run(ctx)
    KIND.verify(ctx)
    first = job_pid(ctx)
    first_launch = json.loads((ctx.workdir / "launch.json").read_text())
    assert not first_launch["resumed"] and "--resume" not in first_launch["command"]
    log = job_dir / "logs" / "train.log"
    # Its last checkpoint written (the step line comes before the save it triggers).
    wait_markers(tmp_path, log, [r"\[AE\] step=1/", "Saved checkpoint step 2 "])
    assert KIND.check(ctx).done
    KIND.run(ctx)  # what `rerun` does
    KIND.verify(ctx)
    assert not alive(first)
    second = json.loads((ctx.workdir / "launch.json").read_text())
    assert second["resumed"] and second["command"].endswith(" --resume")
    assert second["launch_id"] != first_launch["launch_id"]
    # The trainer resumes from its latest checkpoint (step 2), as train_waypoint.py does.
    waited = wait_markers(tmp_path, log, ["Resumed from step 2", r"\[AE\] step=2/"])
    assert WAIT_LOG.check(waited).done
    assert tmux(socket, "list-sessions", "-F", "#{session_name}").stdout.split() == ["train"]
    text = log.read_text()
    assert text.count("started in tmux session train") == 2
    assert KIND.check(ctx).done


@pytest.mark.slow
def test_kills_a_stale_session_of_the_same_name(tmp_path: Path, socket: str, job_dir: Path) -> None:
    tmux(socket, "new-session", "-d", "-s", "train", "sleep 300")
    stale = int(tmux(socket, "display-message", "-p", "-t", "=train:", "#{pane_pid}").stdout)
    ctx = make_ctx(tmp_path, socket, "sleep 300")
    assert not KIND.check(ctx).done
    KIND.run(ctx)
    assert not alive(stale)
    assert KIND.check(ctx).done


@pytest.mark.slow
def test_stale_job_control_groups_are_stopped_too(
    tmp_path: Path, socket: str, job_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tmux_launch, "_STOP_GRACE_S", 1.0)
    # A shell with job control, as in a session someone typed into: its background job has a
    # process group of its own and ignores the SIGHUP of the closing terminal.
    tmux(
        socket,
        "new-session",
        "-d",
        "-s",
        "train",
        "bash -c 'set -m; trap \"\" HUP; sleep 300 & wait'",
    )
    wait_for(lambda: len(_sleepers(socket)) == 1, timeout=15)
    (sleeper,) = _sleepers(socket)
    assert os.getpgid(sleeper) != os.getsid(sleeper)
    ctx = make_ctx(tmp_path, socket, "sleep 300")
    KIND.run(ctx)
    assert not alive(sleeper)
    assert "still run" in ctx.out.getvalue()  # it took a SIGTERM


def _sleepers(socket: str) -> list[int]:
    """`sleep 300` processes in the Unix session of the `train` session's pane."""
    sid = int(tmux(socket, "display-message", "-p", "-t", "=train:", "#{pane_pid}").stdout)
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat[3]) == sid and argv[:2] == [b"sleep", b"300"] and stat[0] != "Z":
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_session_of_another_launch_is_not_done(tmp_path: Path, socket: str, job_dir: Path) -> None:
    ctx = make_ctx(tmp_path, socket, "sleep 300")
    KIND.run(ctx)
    # Another session keeps the server up (it exits with its last session).
    tmux(socket, "new-session", "-d", "-s", "keep", "sleep 300")
    tmux(socket, "kill-session", "-t", "=train")
    tmux(socket, "new-session", "-d", "-s", "train", "sleep 300")
    assert "holds another launch" in KIND.check(ctx).reason
    tmux(socket, "kill-session", "-t", "=train")
    assert "is gone" in KIND.check(ctx).reason


@pytest.mark.slow
def test_venv_torchrun_is_used(tmp_path: Path, socket: str, job_dir: Path) -> None:
    venv = job_dir / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    torchrun = venv / "bin" / "torchrun"  # installed as pip installs console scripts
    torchrun.write_text(
        f"#!{venv}/bin/python\n" + FAKE_TORCHRUN.read_text().split("\n", 1)[1], encoding="utf-8"
    )
    torchrun.chmod(0o755)
    command = (
        "torchrun --standalone --nnodes=1 --nproc_per_node=2 "
        f"{AE} --steps 2 --hold --wandb offline --require-venv"
    )
    ctx = make_ctx(tmp_path, socket, command, venv=".venv", gpus=[0, 1])
    KIND.run(ctx)
    KIND.verify(ctx)
    record = json.loads((ctx.workdir / "launch.json").read_text())
    assert record["command"].startswith(f"{venv}/bin/torchrun --standalone")
    log = job_dir / "logs" / "train.log"
    wait_markers(tmp_path, log, ["Setting OMP_NUM_THREADS", r"\[AE\] step=0/"])
    assert "ModuleNotFoundError" not in log.read_text()
    environ = trainer_environ(ctx)
    assert b"CUDA_VISIBLE_DEVICES=0,1" in environ
    assert b"RANK=0" in environ  # started by the fake torchrun
    assert f"VIRTUAL_ENV={venv}".encode() in environ


def test_venv_without_torchrun_fails_before_launching(
    tmp_path: Path, socket: str, job_dir: Path
) -> None:
    venv = job_dir / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    ctx = make_ctx(tmp_path, socket, f"torchrun {AE}", venv=".venv")
    with pytest.raises(StepFailed) as err:
        KIND.run(ctx)
    assert f"venv {venv} has no torchrun" in err.value.reason
    assert "safetensors" in (err.value.hint or "")
    assert tmux(socket, "has-session", "-t", "=train").returncode != 0
    ctx = make_ctx(tmp_path, socket, f"python {AE}", venv="missing-venv")
    with pytest.raises(StepFailed) as err:
        KIND.run(ctx)
    assert "does not exist" in err.value.reason


@pytest.mark.slow
def test_system_torchrun_trap_is_diagnosed(tmp_path: Path, socket: str, job_dir: Path) -> None:
    system = tmp_path / "system-bin"  # python3 here is no venv's, whatever runs pytest
    system.mkdir()
    (system / "python3").symlink_to(Path(sys.base_prefix) / "bin" / "python3")
    path = f"{system}:{FAKE_TORCHRUN.parent}:{os.environ['PATH']}"
    ctx = make_ctx(
        tmp_path, socket, f"torchrun --nproc_per_node=2 {AE} --require-venv", env={"PATH": path}
    )
    KIND.run(ctx)
    log = job_dir / "logs" / "train.log"
    with pytest.raises(StepFailed) as err:
        wait_markers(tmp_path, log, ["WaypointAEDataset"])
    assert "No module named 'safetensors'" in err.value.reason
    assert ".venv/bin/torchrun" in (err.value.hint or "")
    wait_for(lambda: (ctx.workdir / "job.status").exists(), timeout=15)
    assert KIND.check(ctx).reason.startswith("job exited with status 1")


@pytest.mark.slow
def test_secrets_stay_out_of_argv_logs_and_files(
    tmp_path: Path, socket: str, job_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "wandb_v1_" + secrets.token_hex(38)
    # The runner's step process has the step's secrets in its own environment.
    monkeypatch.setenv("WANDB_API_KEY", secret)
    ctx = make_ctx(
        tmp_path,
        socket,
        f"python3 {AE} --steps 1000 --step-sleep 0.1",  # wandb online: needs the key
        secret_env={"WANDB_API_KEY": secret},
        env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    )
    KIND.run(ctx)
    KIND.verify(ctx)
    log = job_dir / "logs" / "train.log"
    wait_markers(tmp_path, log, [r"wandb: .*View run at https://", r"\[AE\] step=3/"])
    needle = secret.encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            assert needle not in cmdline, f"secret in argv of pid {entry.name}"
    server = int(tmux(socket, "display-message", "-p", "#{pid}").stdout)
    assert needle not in Path(f"/proc/{server}/environ").read_bytes()
    job_environ = trainer_environ(ctx)
    assert b"WANDB_API_KEY=" + needle in job_environ
    assert b"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in job_environ
    assert not (ctx.workdir / "job.env").exists()
    for path in [*ctx.workdir.rglob("*"), log]:
        if path.is_file():
            assert needle not in path.read_bytes(), f"secret in {path}"
    assert secret not in ctx.out.getvalue()


def test_env_file_is_private_while_it_exists(tmp_path: Path) -> None:
    path = tmux_launch._write_env_file(tmp_path / "job.env", {"K": "it's $x\nline"})
    assert path.stat().st_mode & 0o777 == 0o600
    shown = subprocess.run(
        ["bash", "-c", f'set -a; . {path}; set +a; printf %s "$K"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout == "it's $x\nline"


@pytest.mark.slow
def test_quick_job_finishing_with_zero_is_done(tmp_path: Path, socket: str, job_dir: Path) -> None:
    ctx = make_ctx(tmp_path, socket, "echo all good")
    KIND.run(ctx)
    wait_for(lambda: (ctx.workdir / "job.status").exists(), timeout=15)
    KIND.verify(ctx)
    check = KIND.check(ctx)
    assert check.done and "finished with status 0" in check.reason
    lines = (job_dir / "logs" / "train.log").read_text().splitlines()
    assert lines[1] == "all good" and lines[2].endswith("exited with status 0")


@pytest.mark.slow
def test_failed_job_keeps_its_pane_and_is_not_done(
    tmp_path: Path, socket: str, job_dir: Path
) -> None:
    ctx = make_ctx(tmp_path, socket, "echo boom; exit 3", remain_on_exit=True)
    KIND.run(ctx)
    wait_for(lambda: (ctx.workdir / "job.status").exists(), timeout=15)
    with pytest.raises(StepFailed) as err:
        KIND.verify(ctx)
    assert err.value.reason == "job exited with status 3: boom"
    assert "exited with status 3" in KIND.check(ctx).reason
    # The pane stays, dead (tmux does not always know its exit status: the status file does).
    pane = ["display-message", "-p", "-t", "=train:", "#{session_name} #{pane_dead}"]
    wait_for(lambda: tmux(socket, *pane).stdout.split() == ["train", "1"], timeout=15)
    KIND.run(ctx)  # a dead pane is no process to wait for
    wait_for(lambda: (ctx.workdir / "job.status").exists(), timeout=15)
    assert "exited with status 3" in KIND.check(ctx).reason


@pytest.mark.slow
def test_oom_failure_carries_the_catalog_hint(tmp_path: Path, socket: str, job_dir: Path) -> None:
    command = f"{FAKE_TORCHRUN} --nproc_per_node=2 {AE} --fail oom --wandb offline"
    ctx = make_ctx(tmp_path, socket, command)
    KIND.run(ctx)
    wait_for(lambda: (ctx.workdir / "job.status").exists(), timeout=15)
    with pytest.raises(StepFailed) as err:
        KIND.verify(ctx)
    assert err.value.reason.startswith("job exited with status 1: torch.OutOfMemoryError")
    assert "expandable_segments:True" in (err.value.hint or "")
    assert "CUDA out of memory" in ctx.out.getvalue()  # the log tail, for the step's log
    assert "ChildFailedError" in ctx.out.getvalue()


def test_missing_cwd_fails_clearly(tmp_path: Path, socket: str) -> None:
    ctx = make_ctx(tmp_path, socket, "true")
    with pytest.raises(StepFailed) as err:
        KIND.run(ctx)
    assert "is not a directory" in err.value.reason


def test_never_launched_is_not_done(tmp_path: Path, socket: str) -> None:
    assert KIND.check(make_ctx(tmp_path, socket, "true")).reason == "never launched"


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"session": "a.b"}, "session"),
        ({"session": "a:b"}, "session"),
        ({"command": "  "}, "command"),
        ({"gpus": "0, x y"}, "gpus"),
        ({"gpus": [0, "1"]}, "gpus"),
        ({"gpus": True}, "gpus"),
        ({"gpus": -1}, "gpus"),
        ({"remain_on_exit": "yes"}, "remain_on_exit"),
    ],
)
def test_bad_params_are_rejected(params: dict, key: str) -> None:
    with pytest.raises(ParamError) as err:
        validate_params(KIND, {"session": "s", "command": "x", **params})
    assert err.value.key == key


@pytest.mark.parametrize(
    ("gpus", "value"), [(1, "1"), ([0, 1], "0,1"), ("0, 1", "0,1"), ("GPU-3f2a", "GPU-3f2a")]
)
def test_gpus_value(gpus: object, value: str) -> None:
    assert tmux_launch.gpus_value(gpus) == value


def test_venv_resolution_keeps_leading_assignments(tmp_path: Path) -> None:
    venv = tmp_path / "v"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "python3", "torchrun"):
        (venv / "bin" / name).write_text("#!/bin/sh\n")
        (venv / "bin" / name).chmod(0o755)
    resolve = tmux_launch.resolve_venv_command
    assert resolve("A=1 B=x:y torchrun a.py", venv) == f"A=1 B=x:y {venv}/bin/torchrun a.py"
    assert resolve("python3 -m x", venv) == f"{venv}/bin/python3 -m x"
    assert resolve("pythonic", venv) == "pythonic"
    assert resolve("uv run x", venv) == "uv run x"


def test_attach_command() -> None:
    assert (
        tmux_launch.tmux_attach_command("waypoint_ae") == "tmux -u attach-session -t =waypoint_ae"
    )
    assert tmux_launch.tmux_attach_command() == "tmux -u attach-session"
    assert tmux_launch.tmux_attach_command("s", "/tmp/x y/sock") == (
        "tmux -u -S '/tmp/x y/sock' attach-session -t =s"
    )
    assert tmux_launch.tmux_attach_command("s", "work") == "tmux -u -L work attach-session -t =s"


E2E_PLAYBOOK = """
name: train-test
steps:
  - id: job-dir
    kind: shell
    run: mkdir -p ~/job/configs && echo mode=ae > ~/job/configs/ae.yaml
    creates: ~/job/configs/ae.yaml
  - id: train-ae
    kind: tmux_launch
    needs: [job-dir]
    session: waypoint_ae
    cwd: ~/job
    command: {python} {trainer} --mode ae --config configs/ae.yaml --steps 100000 --step-sleep 0.3 --save-interval 2
    log: logs/waypoint_ae_libero.log
    resume_args: --resume
    env: {{PYTORCH_CUDA_ALLOC_CONF: "expandable_segments:True"}}
    secrets: [WANDB_API_KEY]
  - id: train-ae-started
    kind: wait_log
    needs: [train-ae]
    log: ~/job/logs/waypoint_ae_libero.log
    timeout: 60
    poll: 2
    markers:
      - 'WaypointAEDataset: 454 episodes, 8409 valid pairs'
      - 'Loaded 811 weight tensors, skipped 1'
      - 'Constructing tf.data.Dataset libero_object'
      - 'wandb: .*View run at https://'
      - 'Model: 3617\\.8M total'
      - regex: '\\[AE\\] step=\\d+/10000 loss=(?P<loss>[\\d.]+)'
        ranges: {{loss: [0.2, 1.0]}}
"""


@pytest.mark.slow
def test_up_launches_then_noop_then_rerun_restarts(project, box) -> None:  # type: ignore[no-untyped-def]
    secret = "wandb_v1_" + secrets.token_hex(38)
    project.env["WANDB_API_KEY"] = secret
    project.secrets = {"WANDB_API_KEY": {"env": "WANDB_API_KEY"}}
    project.host_vars = {"agent_python": sys.executable}
    project.playbook(E2E_PLAYBOOK.format(python=sys.executable, trainer=TRAINER))

    def session_pids() -> list[str]:
        listed = box.ssh("tmux list-panes -a -F '#{session_name} #{pane_pid}'", check=False)
        return listed.stdout.split()

    project.write_inventory()
    controller = subprocess.Popen(
        [sys.executable, "-m", "provision.cli", "up", "box1", "-p", "playbooks/test.yaml"],
        cwd=project.root,
        env=project.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:  # the laptop goes away as soon as the job runs
        wait_for(lambda: len(session_pids()) == 2, timeout=60)
    finally:
        controller.kill()
        controller.wait()
    wait_for(lambda: project.status("box1")["runner"] == "idle", timeout=60)
    steps = project.steps("box1")
    assert {s["status"] for s in steps.values()} == {"done"}, steps
    name, pid = session_pids()
    assert name == "waypoint_ae"
    log = box.home / "job" / "logs" / "waypoint_ae_libero.log"
    lines = len(log.read_text().splitlines())
    time.sleep(1)
    assert len(log.read_text().splitlines()) > lines  # still training

    second = project.up("box1")
    assert second.returncode == 0, second.stdout + second.stderr
    again = project.steps("box1")
    assert {k: s["attempts"] for k, s in again.items()} == {
        k: s["attempts"] for k, s in steps.items()
    }
    assert session_pids() == [name, pid]
    plan = project.cli("plan", "box1", "-p", "playbooks/test.yaml", "--json")
    assert plan.returncode == 0, plan.stderr
    reasons = {s["id"]: s for s in json.loads(plan.stdout)["steps"]}
    assert not reasons["train-ae"]["run"]
    assert "running in tmux session waypoint_ae" in reasons["train-ae"]["reason"]
    assert "all 6 markers seen" in reasons["train-ae-started"]["reason"]

    rerun = project.cli("rerun", "box1", "train-ae", "-p", "playbooks/test.yaml")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    name, new_pid = session_pids()
    assert new_pid != pid
    text = log.read_text()
    assert "Resumed from step " in text  # from its latest checkpoint, as train_waypoint.py
    assert text.count("started in tmux session waypoint_ae") == 2
    after = project.steps("box1")
    assert after["train-ae-started"]["status"] == "done"
    assert after["train-ae-started"]["started"] > again["train-ae-started"]["ended"]
    for path in [log, *(box.home / ".bootstrap").rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


# --- one training per GPU set (provision/agent/gpus.py) -------------------------------------


def launch_in(
    agent_dir: Path, socket: str, job_dir: Path, playbook: str, session: str, command: str, **params
) -> StepContext:
    """A tmux_launch context in run `playbook` of the agent dir (its plan names the playbook)."""
    run_dir = agent_dir / "runs" / playbook
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps({"playbook": playbook, "steps": []}))
    raw = {"session": session, "socket": socket, "cwd": str(job_dir), "command": command, **params}
    return StepContext(
        step_id=f"train-{session}",
        params=validate_params(KIND, raw),
        run_dir=run_dir,
        out=io.StringIO(),
    )


def sessions(socket: str) -> set[str]:
    return set(tmux(socket, "list-sessions", "-F", "#{session_name}").stdout.split())


@pytest.mark.slow
def test_a_held_gpu_refuses_the_second_job_naming_the_first(
    agent_dir: Path, socket: str, job_dir: Path
) -> None:
    first = launch_in(agent_dir, socket, job_dir, "waypoint", "ae", "sleep 300", gpus="0,1")
    KIND.run(first)
    second = launch_in(agent_dir, socket, job_dir, "lerobot", "lora", "sleep 300", gpus=1)
    started = time.monotonic()
    with pytest.raises(StepFailed) as err:
        KIND.run(second)
    assert time.monotonic() - started < 5  # at once, not after a timeout
    reason, hint = err.value.reason, err.value.hint or ""
    assert reason.startswith("GPU 1 is held by tmux session ae (playbook waypoint, step train-ae, ")
    assert f"pid {job_pid(first)}" in reason and " UTC" in reason
    assert "kill-session -t =ae" in hint and f"-S {socket}" in hint and "gpus:" in hint
    assert sessions(socket) == {"ae"}  # nothing of the second job started
    assert not (second.workdir / "launch.json").exists()
    assert alive(job_pid(first))  # and the first job was not touched


@pytest.mark.slow
def test_disjoint_gpus_run_side_by_side_each_seeing_its_own(
    agent_dir: Path, socket: str, job_dir: Path
) -> None:
    command = f"python3 {AE} --steps 100000 --step-sleep 0.5 --wandb offline"
    jobs = [
        launch_in(agent_dir, socket, job_dir, book, name, command, gpus=gpus, log=f"{name}.log")
        for book, name, gpus in (("waypoint", "ae", 0), ("lerobot", "lora", [1]))
    ]
    for ctx in jobs:
        KIND.run(ctx)
        KIND.verify(ctx)
    assert sessions(socket) == {"ae", "lora"}
    assert b"CUDA_VISIBLE_DEVICES=0" in trainer_environ(jobs[0])
    assert b"CUDA_VISIBLE_DEVICES=1" in trainer_environ(jobs[1])
    held = {lease.session: lease.gpus for lease in GpuLeases(agent_dir).live()}
    assert held == {"ae": ("0",), "lora": ("1",)}
    assert "it holds GPU 0 while it runs" in jobs[0].out.getvalue()


@pytest.mark.slow
def test_a_job_that_ended_frees_its_gpus(agent_dir: Path, socket: str, job_dir: Path) -> None:
    quick = launch_in(agent_dir, socket, job_dir, "waypoint", "ae", "echo done", gpus="0")
    KIND.run(quick)
    wait_for(lambda: (quick.workdir / "job.status").exists(), timeout=15)
    held = launch_in(agent_dir, socket, job_dir, "lerobot", "lora", "sleep 300", gpus="0")
    KIND.run(held)  # the first job exited: GPU 0 is free
    killed = job_pid(held)
    tmux(socket, "new-session", "-d", "-s", "keep", "sleep 300")  # keeps the server up
    tmux(socket, "kill-session", "-t", "=lora")  # stopped by hand, as the hint says
    # Its leader first, then (under load, a moment later) the rest of its session: until the
    # last member is gone the GPU is rightly held.
    wait_for(lambda: not alive(killed) and not session_members([killed]), timeout=15)
    again = launch_in(agent_dir, socket, job_dir, "waypoint", "ae", "sleep 300", gpus="0,1")
    KIND.run(again)
    assert [lease.session for lease in GpuLeases(agent_dir).live()] == ["ae"]
    stored = json.loads((agent_dir / "gpu-leases.json").read_text())["leases"]
    assert [lease["session"] for lease in stored] == ["ae"]  # the stale ones are gone


@pytest.mark.slow
def test_children_outliving_the_script_keep_the_gpus(
    agent_dir: Path, socket: str, job_dir: Path
) -> None:
    """A trainer's orphaned workers still hold GPU memory: the lease follows the session."""
    orphan = "nohup sleep 300 >/dev/null 2>&1 &"  # survives the script and its pane's SIGHUP
    first = launch_in(agent_dir, socket, job_dir, "waypoint", "ae", orphan, gpus=0)
    KIND.run(first)
    script = job_pid(first)
    wait_for(lambda: not alive(script), timeout=15)  # the script is gone, its sleep is not
    second = launch_in(agent_dir, socket, job_dir, "lerobot", "lora", "true", gpus=0)
    try:
        with pytest.raises(StepFailed, match="GPU 0 is held by tmux session ae") as err:
            KIND.run(second)
        (orphan_pid,) = session_members([script])
        assert f"these processes still run: `kill {orphan_pid}`" in (err.value.hint or "")
    finally:
        for pid in session_members([script]):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not session_members([script]), timeout=15)
    KIND.run(second)  # the last member gone, so is the lease


@pytest.mark.slow
def test_no_gpus_param_holds_every_gpu(agent_dir: Path, socket: str, job_dir: Path) -> None:
    first = launch_in(agent_dir, socket, job_dir, "waypoint", "ae", "sleep 300")
    KIND.run(first)
    second = launch_in(agent_dir, socket, job_dir, "lerobot", "lora", "sleep 300", gpus=3)
    with pytest.raises(StepFailed, match=r"^GPU 3 is held by tmux session ae"):
        KIND.run(second)
    third = launch_in(agent_dir, socket, job_dir, "lerobot", "lora", "sleep 300")
    with pytest.raises(StepFailed, match=r"^all GPUs are held by tmux session ae"):
        KIND.run(third)
    # The step's own CUDA_VISIBLE_DEVICES is the set when `gpus:` is not given.
    tmux(socket, "kill-session", "-t", "=ae")
    wait_for(lambda: not GpuLeases(agent_dir).live(), timeout=15)
    own = launch_in(agent_dir, socket, job_dir, "waypoint", "ae", "sleep 300")
    own.env = {**os.environ, "CUDA_VISIBLE_DEVICES": "2"}
    KIND.run(own)
    assert [lease.gpus for lease in GpuLeases(agent_dir).live()] == [("2",)]


@pytest.mark.slow
def test_relaunching_the_same_step_takes_its_own_gpus_back(
    agent_dir: Path, socket: str, job_dir: Path
) -> None:
    ctx = launch_in(agent_dir, socket, job_dir, "waypoint", "ae", "sleep 300", gpus="0,1")
    KIND.run(ctx)
    old = job_pid(ctx)
    KIND.run(ctx)  # a rerun of the step: its old job is stopped, not in the way
    assert not alive(old)
    (lease,) = GpuLeases(agent_dir).live()
    assert lease.pid == job_pid(ctx) and lease.gpus == ("0", "1")


LAUNCHER = """
import io, json, sys
from pathlib import Path
from provision.steps.base import StepContext, validate_params
from provision.steps.tmux_launch import KIND
from provision.errors import StepFailed
params = validate_params(KIND, json.loads(sys.argv[1]))
run_dir = Path(sys.argv[2])
ctx = StepContext(step_id="train", params=params, run_dir=run_dir, out=io.StringIO())
sys.stdin.read()  # both start together
try:
    KIND.run(ctx)
except StepFailed as exc:
    print("refused:", exc.reason)
else:
    print("launched")
"""


@pytest.mark.slow
def test_two_launches_racing_for_one_gpu_start_one_job(
    agent_dir: Path, socket: str, job_dir: Path
) -> None:
    procs = []
    for name in ("a", "b"):
        raw = {"session": name, "socket": socket, "cwd": str(job_dir), "command": "sleep 300"}
        raw["gpus"] = "0"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, json.dumps(raw), str(agent_dir / "runs" / name)],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    outs = [proc.communicate("go", timeout=60)[0].strip() for proc in procs]
    assert sorted(out.split()[0] for out in outs) == ["launched", "refused:"], outs
    assert len(sessions(socket)) == 1 and len(GpuLeases(agent_dir).live()) == 1


GPU_PLAYBOOK = """\
name: {name}
vars: {{gpus: "{gpus}"}}
steps:
  - id: train
    kind: tmux_launch
    session: {session}
    command: echo "sees $CUDA_VISIBLE_DEVICES"; sleep 300
    log: ~/{session}.log
    gpus: "{{{{ gpus }}}}"
"""


@pytest.mark.slow
def test_two_playbooks_on_one_box_share_no_gpu(project, box) -> None:  # type: ignore[no-untyped-def]
    project.host_vars = {"agent_python": sys.executable}
    project.playbook(GPU_PLAYBOOK.format(name="waypoint", session="ae", gpus="0,1"), "a.yaml")
    project.playbook(GPU_PLAYBOOK.format(name="lerobot", session="lora", gpus="1"), "b.yaml")
    first = project.up("box1", playbook="a.yaml")
    assert first.returncode == 0, first.stdout + first.stderr
    # `check` (the preflight) sees it before any download: the box is busy for b, not for a.
    busy = project.cli("check", "box1", "-p", "playbooks/b.yaml", "--json")
    assert busy.returncode == 1 and "gpus free" in json.loads(busy.stdout)["failed"]
    mine = project.cli("check", "box1", "-p", "playbooks/a.yaml", "--json")
    assert "gpus free" not in json.loads(mine.stdout)["failed"], mine.stdout

    refused = project.up("box1", playbook="b.yaml")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    step = project.steps("box1", "b.yaml")["train"]
    assert step["status"] == "failed" and step["attempts"] == 1
    held_by = "tmux session ae (playbook playbooks/a.yaml, run waypoint, step train, since"
    assert step["reason"].startswith(f"GPU 1 is held by {held_by}")
    assert "kill-session -t =ae" in step["hint"]
    snap = project.status("box1", "b.yaml")
    assert [(x["session"], x["gpus"]) for x in snap["gpu_leases"]] == [("ae", ["0", "1"])]
    shown = project.cli("status", "box1", "-p", "playbooks/b.yaml")
    assert f"GPUs 0,1: {held_by}" in shown.stdout

    beside = project.up("box1", playbook="b.yaml", extra=["-e", "gpus=2"])
    assert beside.returncode == 0, beside.stdout + beside.stderr
    assert "sees 2" in (box.home / "lora.log").read_text()
    leases = project.status("box1", "a.yaml")["gpu_leases"]
    assert sorted((x["session"], x["gpus"]) for x in leases) == [
        ("ae", ["0", "1"]),
        ("lora", ["2"]),
    ]

    box.ssh("tmux kill-session -t =ae")  # the holder stopped as the hint says: GPU 1 is free
    moved = project.up("box1", playbook="b.yaml", extra=["-e", "gpus=1"])
    assert moved.returncode == 0, moved.stdout + moved.stderr
    leases = project.status("box1", "a.yaml")["gpu_leases"]
    assert [(x["session"], x["gpus"]) for x in leases] == [("lora", ["1"])]
