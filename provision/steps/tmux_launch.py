"""`tmux_launch`: start a long job (training) in its own tmux session, and prove it started.

Example:

```yaml
- id: train-ae
  kind: tmux_launch
  needs: [convert, stats-ae]
  session: waypoint_ae
  cwd: /workspace/openpi
  venv: .venv
  gpus: "0,1"
  command: >-
    torchrun --standalone --nnodes=1 --nproc_per_node=2 scripts/train_waypoint.py
    --mode ae --config configs/waypoint_ae_libero.yaml
  log: logs/waypoint_ae_libero.log
  resume_args: --resume
  env: {PYTORCH_CUDA_ALLOC_CONF: "expandable_segments:True"}
  secrets: [WANDB_API_KEY]
  checkpoints:
    dir: checkpoints/waypoint_ae_libero
    step: '(\\d+)'
    complete: metadata.pt
    keep: 2
    remote: "gg1:runs/waypoint_ae"
    carry: [checkpoints/waypoint_ae_libero/wandb_run_id.txt]
```

Nothing is ever typed into tmux (seed 003 §14.5: `send-keys` glued an `export` to the training
command). `run` writes a launch script into the step's directory and the session runs it:

- the step's environment (the runner's, its `env`, its `secrets`) goes into a 0600 env file that
  the script sources and deletes at once, so secrets never reach argv, the script or the log;
- `cd CWD`, then `COMMAND 2>&1 | tee -a LOG`; the job's exit status (PIPESTATUS) goes to a
  status file, and the log gets a `[bootstrap] job ID started` / `exited with status N` line
  around each launch (`wait_log` uses them);
- `venv:` turns a leading `torchrun`/`python`/`python3` into that venv's binary and puts its
  `bin/` first on PATH; a venv without that binary fails the step before anything starts (the
  system torchrun runs the wrong interpreter: `ModuleNotFoundError: No module named
  'safetensors'`);
- `gpus:` sets CUDA_VISIBLE_DEVICES; `resume_args` are appended when the step launches again
  after an earlier launch (a `rerun`, a changed param), e.g. openpi's `--resume`, and when
  `checkpoints: {restore: true}` brought the remote's newest verified checkpoint onto a box
  that had none (provision/checkpoints/restore.py).

One training per GPU set: the job holds its GPUs (`gpus:`; without it the step's
CUDA_VISIBLE_DEVICES, else all GPUs of the box) for as long as any of its processes lives,
across every run and playbook on the box (provision/agent/gpus.py keeps the leases). Launching
onto a GPU that another step's live job holds fails at once, before anything is stopped or
started, naming the holder (tmux session, playbook, step, since when) and how to stop it; jobs
on disjoint GPUs (`gpus: 0` and `gpus: 1`) run side by side. `status` lists the leases.

`run` first kills a session of the same name (the seed's `tmux kill-session` before each try) and
waits for its processes to exit, so a relaunch never races the old job for GPU memory. It returns
once the script runs the command; the job keeps running, and later `wait_log` steps watch it.

Done while the session is alive with this step's launch id, or when the job has finished with
status 0. `tmux_attach_command` gives the remote command that `bootstrap attach` runs.
Every launch starts a guard beside the job (provision/watch/guard.py): a detached, niced
process that follows it for its whole life. It writes what it sees to `watch.json` (progress,
stalled, NaN loss and the monitor's alert rules, the exit status with the catalog's diagnosis,
the last step reached: provision/watch/watcher.py; `watch:` tunes it), sends one notification
per event through apprise to the URLs in the secret `notify:` names, runs `on_finish` once the
run has ended (provision/watch/spec.py), and with `checkpoints:` (provision/checkpoints/spec.py)
uploads each complete checkpoint to `remote`, verifies it, records it in the remote's manifest
and only then lets `keep` delete it.

`socket:` selects a tmux server other than the box user's default one (a path for `tmux -S`, a
name for `tmux -L`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.agent.files import read_json, tail_lines, write_json_atomic
from provision.agent.gpus import GpuLeases, gpu_set, gpus_text, gpus_value, session_members
from provision.checkpoints import restore
from provision.checkpoints.spec import parse_checkpoints
from provision.errors import StepFailed
from provision.steps.base import Check, Kind, Param, ParamError, StepContext
from provision.steps.common import joblog
from provision.steps.common.environ import swapped_environ
from provision.watch import guard
from provision.watch.spec import parse_on_finish, parse_watch

if TYPE_CHECKING:
    import libtmux

_SESSION_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: A leading `VAR=value` assignments prefix, then the program word `venv:` may resolve.
_LEADING_RE = re.compile(r"^(\s*(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*)(torchrun|python3?)(?=\s|$)")
#: Variables the env file must not set: bash's read-only or per-shell ones, tmux's per-pane
#: ones, and the runner's own step bookkeeping.
_NOT_EXPORTED = frozenset(
    {"BASHOPTS", "BASHPID", "BASH_VERSINFO", "EUID", "PPID", "SHELLOPTS", "UID", "GROUPS",
     "PWD", "OLDPWD", "SHLVL", "_", "TMUX", "TMUX_PANE", "LINES", "COLUMNS"}
)  # fmt: skip
#: The option that marks a session with the launch that made it.
_LAUNCH_OPTION = "@bootstrap_launch"
#: How long the script may take to reach the command, and an old job to exit after SIGHUP.
_START_TIMEOUT_S = 20.0
_STOP_GRACE_S = 10.0

LAUNCH_FILE = "launch.json"
PID_FILE = "job.pid"
STATUS_FILE = "job.status"
ENV_FILE = "job.env"
SCRIPT_FILE = "launch.sh"
CUDA_VAR = "CUDA_VISIBLE_DEVICES"


class TmuxLaunch(Kind):
    """Run a command in a named tmux session through a launch script; see the module doc."""

    name = "tmux_launch"
    summary = "start a long-running job in its own tmux session"
    pip = ("libtmux", "apprise")
    tools = ("tmux",)
    params = (
        Param("session", "str", "tmux session name, one per job", required=True),
        Param("command", "str", "the job's command line (bash)", required=True),
        Param("cwd", "path", "working directory of the job", default="~"),
        Param("log", "path", "log file the output is tee'd to (relative: to cwd)"),
        Param(
            "venv", "path", "virtualenv whose torchrun/python run the command (relative: to cwd)"
        ),
        Param("gpus", "any", "CUDA_VISIBLE_DEVICES: 1, '0,1' or [0, 1]"),
        Param("resume_args", "str", "appended to the command when launching again, e.g. --resume"),
        Param("remain_on_exit", "bool", "keep the pane after the job ends", default=False),
        Param("socket", "str", "tmux server: a socket path (-S) or name (-L); default: tmux's"),
        Param(
            "checkpoints",
            "dict",
            "the job's checkpoints: dir, step, complete, keep, remote, restore, carry, bwlimit "
            "(provision/checkpoints/spec.py)",
        ),
        Param(
            "watch",
            "dict",
            "the guard's watch: poll, stall_factor, stall_min_s, finish_grace_s, repeat_s, "
            "thresholds (provision/watch/spec.py)",
        ),
        Param(
            "notify",
            "str",
            "inventory secret holding apprise URL(s) for the guard's news",
            secret_ref=True,
        ),
        Param(
            "on_finish",
            "any",
            "when the run ends: nothing, stop, destroy (a rented box), or {run: COMMAND, when: ...}",
        ),
    )

    def validate(self, params: dict[str, Any]) -> None:
        if not _SESSION_RE.match(params["session"]):
            raise ParamError("'session' may hold only letters, digits, '_' and '-'", "session")
        if not params["command"].strip():
            raise ParamError("'command' is empty", "command")
        gpus = params["gpus"]
        if gpus is not None and gpus_value(gpus) is None:
            raise ParamError("'gpus' must be an index, a list of indexes or '0,1'", "gpus")
        if params["socket"] is not None and not params["socket"].strip():
            raise ParamError("'socket' is empty", "socket")
        if params["checkpoints"] is not None:
            parse_checkpoints(params["checkpoints"])
        parse_watch(params["watch"])
        parse_on_finish(params["on_finish"])

    def required_tools(self, params: dict[str, Any]) -> tuple[str, ...]:
        # the checkpoint guard uploads with rclone (provision/checkpoints/remote.py)
        return ("tmux", "rclone") if params["checkpoints"] is not None else ("tmux",)

    def describe(self, params: dict[str, Any]) -> str:
        first = params["command"].strip().splitlines()[0]
        venv = f" with {params['venv']}" if params.get("venv") else ""
        return f"tmux session {params['session']}: {first}{venv}"

    def check(self, ctx: StepContext) -> Check:
        record = read_json(ctx.workdir / LAUNCH_FILE, None)
        if not isinstance(record, dict):
            return Check(False, "never launched")
        launch, session = record["launch_id"], record["session"]
        rc = _exit_status(ctx.workdir, launch)
        if rc == 0:
            return Check(True, f"job finished with status 0 (log {record['log']})")
        if rc is not None:
            return Check(False, f"job exited with status {rc} (log {record['log']})")
        owner = session_launch(session, record.get("socket"))
        if owner == launch:
            return Check(True, f"running in tmux session {session} (log {record['log']})")
        if owner is not None:
            return Check(False, f"tmux session {session} holds another launch")
        return Check(False, f"tmux session {session} is gone and the job left no exit status")

    def run(self, ctx: StepContext) -> None:
        p = ctx.params
        session = p["session"]
        cwd = ctx.path(p["cwd"])
        if not cwd.is_dir():
            raise StepFailed(f"cwd {cwd} is not a directory", "create it in an earlier step")
        command = p["command"].strip()
        venv = _under(cwd, ctx.path(p["venv"])) if p["venv"] else None
        if venv is not None:
            command = resolve_venv_command(command, venv)
        previous = read_json(ctx.workdir / LAUNCH_FILE, None)
        visible = gpus_value(p["gpus"]) if p["gpus"] is not None else ctx.env.get(CUDA_VAR)
        wanted = {"run": ctx.run_dir.name, "step": ctx.step_id, "session": session}
        leases = GpuLeases()
        leases.check(gpu_set(visible), **wanted, socket=p["socket"])  # before a long restore
        spec = parse_checkpoints(p["checkpoints"]) if p["checkpoints"] is not None else None
        restored = restore.before_launch(spec, cwd, ctx.env, ctx.log) if spec else None
        resumed = (isinstance(previous, dict) or restored is not None) and bool(p["resume_args"])
        if resumed:
            command = f"{command} {p['resume_args']}"
        log = job_path(p, p["log"] or f"logs/{session}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        launch = uuid.uuid4().hex[:12]
        claim_gpus = leases.claim(gpu_set(visible), **wanted, socket=p["socket"])
        with _client_environ(ctx), claim_gpus as claim:
            if isinstance(previous, dict) and _runs_elsewhere(previous, session, p["socket"]):
                # Renamed or moved since the last launch: that job must not keep the GPUs.
                old = _tmux_server(previous.get("socket"))
                _stop_session(old, previous["session"], ctx)
            server = _tmux_server(p["socket"])
            _stop_session(server, session, ctx)
            for name in (PID_FILE, STATUS_FILE):
                (ctx.workdir / name).unlink(missing_ok=True)
            script = ctx.workdir / SCRIPT_FILE
            script.write_text(
                launch_script(ctx.workdir, launch, session, cwd, command, log, venv, p["gpus"]),
                encoding="utf-8",
            )
            record = {"launch_id": launch, "session": session, "socket": p["socket"]}
            record.update(log=str(log), command=command, resumed=resumed, started=time.time())
            record["restored"] = restored.name if restored is not None else None
            write_json_atomic(ctx.workdir / LAUNCH_FILE, record)
            job_env = {k: v for k, v in _job_env(ctx).items() if k != p["notify"]}
            env_file = _write_env_file(ctx.workdir / ENV_FILE, job_env)
            try:
                claim.grant(launch, ctx.workdir / PID_FILE, _playbook_name(ctx))
                _new_session(server, session, launch, cwd, script, p["remain_on_exit"])
                pid = _wait_started(ctx.workdir, launch, server, session, log)
                claim.started(pid)
            finally:
                env_file.unlink(missing_ok=True)
        ctx.log(f"launched `{command}` in tmux session {session} (pid {pid}), output in {log}")
        ctx.log(f"it holds {gpus_text(claim.gpus)} while it runs")
        config = {**record, "cwd": str(cwd), "step_id": ctx.step_id, "notify": p["notify"]}
        config.update(
            checkpoints=spec.to_dict() if spec is not None else None,
            watch=parse_watch(p["watch"]).to_dict(),
            on_finish=parse_on_finish(p["on_finish"]).to_dict(),
            host=read_json(ctx.run_dir / "plan.json", {}).get("host"),
        )
        guard_pid = guard.start(ctx.workdir, config, _job_env(ctx))
        ctx.log(f"guard {guard_pid} watches the job (log {ctx.workdir / guard.LOG_FILE})")
        ctx.log(f"watch it: {tmux_attach_command(session, p['socket'])}")

    def verify(self, ctx: StepContext) -> None:
        record = read_json(ctx.workdir / LAUNCH_FILE, {})
        launch, session = record.get("launch_id"), record.get("session")
        rc = _exit_status(ctx.workdir, launch)
        if rc == 0:
            return
        if rc is not None:
            raise _job_failed(f"job exited with status {rc}", Path(record["log"]), ctx)
        if session_launch(session, record.get("socket")) != launch:
            raise _job_failed(
                f"tmux session {session} ended without an exit status", Path(record["log"]), ctx
            )


def resolve_venv_command(command: str, venv: Path) -> str:
    """`command` with a leading torchrun/python/python3 replaced by the venv's own binary.

    Raises StepFailed when the venv lacks it: the system binary would run another interpreter.
    """
    if not (venv / "bin").is_dir():
        raise StepFailed(
            f"venv {venv} does not exist (no {venv / 'bin'})",
            "create it first (uv sync) or fix the `venv:` path (relative paths start at cwd)",
        )
    found = _LEADING_RE.match(command)
    if not found:
        return command
    binary = venv / "bin" / found.group(2)
    if not os.access(binary, os.X_OK):
        raise StepFailed(
            f"venv {venv} has no {binary.name} ({binary} is missing)",
            f"install it into the venv; the system {binary.name} runs another python, which "
            "fails with `ModuleNotFoundError: No module named 'safetensors'`",
        )
    return found.group(1) + shlex.quote(str(binary)) + command[found.end() :]


def launch_script(
    workdir: Path,
    launch: str,
    session: str,
    cwd: Path,
    command: str,
    log: Path,
    venv: Path | None,
    gpus: Any,
) -> str:
    """The bash script the tmux session runs (holds no secret: those are in the env file)."""
    q, nl = shlex.quote, "\\n"  # printf turns the two characters \n into a newline
    status, tmp = q(str(workdir / STATUS_FILE)), q(str(workdir / f".{STATUS_FILE}.tmp"))
    lines = [
        "#!/bin/bash",
        f"# bootstrap tmux_launch: launch {launch}, tmux session {session}",
        "set -o pipefail",
        f"set -a; . {q(str(workdir / ENV_FILE))}; set +a; rm -f {q(str(workdir / ENV_FILE))}",
    ]
    if venv is not None:
        lines.append(f'export VIRTUAL_ENV={q(str(venv))} PATH={q(str(venv / "bin"))}:"$PATH"')
    if gpus is not None:
        lines.append(f"export CUDA_VISIBLE_DEVICES={q(gpus_value(gpus) or '')}")
    lines += [
        "finish() {",
        f'  printf {q(joblog.EXITED_FORMAT + nl)} {launch} "$1" >> {q(str(log))}',
        f'  printf "%s %s\\n" "$1" {launch} > {tmp} && mv -f {tmp} {status}',
        '  exit "$1"',
        "}",
        f"cd {q(str(cwd))} 2>> {q(str(log))} || finish 1",
        f'printf "%s %s\\n" "$$" {launch} > {q(str(workdir / PID_FILE))}',
        f"printf {q(joblog.STARTED_FORMAT + nl)} {launch} {session} >> {q(str(log))}",
        "{",
        "set -e",
        command,
        f"}} 2>&1 | tee -a {q(str(log))}",
        'finish "${PIPESTATUS[0]}"',
    ]
    return "\n".join(lines) + "\n"


def session_launch(session: str | None, socket: str | None) -> str | None:
    """The launch id marking tmux session `session`: '' if unmarked, None if there is none.

    Calls the tmux binary (standard library only: `check` runs in the runner's python).
    """
    if not session:
        return None
    argv = ["tmux", *_socket_args(socket), "display-message", "-p", "-t", f"={session}:"]
    try:
        done = subprocess.run(
            # display-message prints an empty format, rc 0, for a session that just went away:
            # the name in the output proves the session exists.
            [*argv, f"#{{session_name}} #{{{_LAUNCH_OPTION}}}"],
            capture_output=True,
            text=True,
            timeout=10,
            env=_tmux_client_env(os.environ, ()),
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    name, _, launch = done.stdout.strip().partition(" ")
    return launch if done.returncode == 0 and name == session else None


def tmux_attach_command(session: str | None = None, socket: str | None = None) -> str:
    """The remote command `bootstrap attach TARGET [SESSION]` runs with `ssh -t`.

    Without a session, tmux attaches the most recently used one. `-u` because an SSH login may
    carry no UTF-8 locale.
    """
    argv = ["tmux", "-u", *_socket_args(socket), "attach-session"]
    if session:
        argv += ["-t", f"={session}"]
    return " ".join(shlex.quote(a) for a in argv)


def _runs_elsewhere(previous: dict[str, Any], session: str, socket: str | None) -> bool:
    """Whether the previous launch ran elsewhere (another name or server) and still runs."""
    where = (previous["session"], previous.get("socket"))
    if where == (session, socket):
        return False
    return bool(session_launch(*where) == previous["launch_id"])


def _playbook_name(ctx: StepContext) -> str:
    """The playbook of the step's run (its plan), for the GPU lease; the run's name without."""
    plan = read_json(ctx.run_dir / "plan.json", {})
    name = plan.get("playbook") if isinstance(plan, dict) else None
    return str(name or ctx.run_dir.name)


def job_path(params: Mapping[str, Any], path: str) -> Path:
    """A path of a launch on this box (its log, its checkpoints): relative paths start at the
    step's `cwd`."""
    cwd = Path(os.path.expanduser(params.get("cwd") or "~"))
    return _under(cwd, Path(os.path.expanduser(path)))


def launch_facts(workdir: Path | None, params: Mapping[str, Any]) -> dict[str, Any]:
    """Where a tmux_launch step's job is, for the commands around it (`monitor`, `attach`):
    its log, tmux session and socket as the last launch recorded them (`launched`: true), else
    where the next launch will put them. The record wins over the params: a job launched
    before the playbook renamed its session still runs in the old one."""
    record = read_json(workdir / LAUNCH_FILE, None) if workdir is not None else None
    if isinstance(record, dict) and record.get("log") and record.get("session"):
        keep = ("log", "session", "socket", "launch_id", "started")
        return {"launched": True, **{k: record.get(k) for k in keep}}
    log = job_path(params, params.get("log") or f"logs/{params['session']}.log")
    return {
        "launched": False,
        "log": str(log),
        "session": params["session"],
        "socket": params.get("socket"),
    }


def _under(base: Path, path: Path) -> Path:
    """`path`, taken relative to `base` unless absolute."""
    return path if path.is_absolute() else base / path


def _socket_args(socket: str | None) -> list[str]:
    if not socket:
        return []
    return ["-S", os.path.expanduser(socket)] if "/" in socket else ["-L", socket]


def _tmux_server(socket: str | None) -> libtmux.Server:
    """libtmux's client of the tmux server at `socket` (a path, a `-L` name, or the default)."""
    import libtmux  # the agent venv's (the kind lists it in `pip`)

    if not socket:
        return libtmux.Server()
    if "/" in socket:
        return libtmux.Server(socket_path=os.path.expanduser(socket))
    return libtmux.Server(socket_name=socket)


@contextlib.contextmanager
def _client_environ(ctx: StepContext) -> Iterator[None]:
    """The environment libtmux's tmux client runs in: UTF-8 locale, and no secrets.

    A tmux server started by this client keeps its environment for every session it ever runs,
    so secrets stay out of it; the job gets them from the env file instead.
    """
    with swapped_environ(_tmux_client_env(ctx.env, ctx.secrets)):
        yield


def _tmux_client_env(env: Mapping[str, str], secrets: Collection[str]) -> dict[str, str]:
    """`env` for a tmux client: no secrets, a UTF-8 locale, and no $TMUX (which would pick the
    server the caller runs in instead of the default one)."""
    out = {k: v for k, v in env.items() if k not in secrets and k != "TMUX"}
    out["LC_ALL"] = "C.UTF-8"
    return out


def _job_env(ctx: StepContext) -> dict[str, str]:
    """What the job's environment is: the step's, minus names bash or tmux own."""
    return {
        k: v
        for k, v in ctx.env.items()
        if _NAME_RE.match(k) and k not in _NOT_EXPORTED and not k.startswith("BOOTSTRAP_")
    }


def _write_env_file(path: Path, env: dict[str, str]) -> Path:
    """Write `env` as bash assignments into a new 0600 file (created with that mode)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for key in sorted(env):
            fh.write(f"{key}={shlex.quote(env[key])}\n")
    return path


def _new_session(
    server: Any, session: str, launch: str, cwd: Path, script: Path, remain_on_exit: bool
) -> None:
    """Start the session running the script, marked with the launch id, in one tmux command.

    Options set in the same command list take effect before tmux runs its event loop again, so
    even a job that exits at once leaves its pane when `remain_on_exit` is set.
    """
    target = f"={session}:"
    args: list[str] = ["-d", "-s", session, "-x", "220", "-y", "50", "-c", str(cwd)]
    args += [f"exec bash {shlex.quote(str(script))}"]
    args += [";", "set-option", "-t", target, _LAUNCH_OPTION, launch]
    if remain_on_exit:
        args += [";", "set-option", "-w", "-t", target, "remain-on-exit", "on"]
    result = server.cmd("new-session", *args)
    if result.stderr:
        raise StepFailed(f"tmux new-session failed: {' '.join(result.stderr)}")


def _wait_started(workdir: Path, launch: str, server: Any, session: str, log: Path) -> int:
    """Wait for the script to write its pid file; return the pid. Fails if the job ended first."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    pid_file = workdir / PID_FILE
    while time.monotonic() < deadline:
        fields = _read_fields(pid_file)
        if fields and fields[1:] == [launch] and fields[0].isdigit():
            return int(fields[0])
        rc = _exit_status(workdir, launch)
        if rc is not None:
            last = joblog.last_message(tail_lines(log, 5))
            raise StepFailed(
                f"the launch script exited with status {rc} before the job"
                + (f": {last}" if last else "")
            )
        time.sleep(0.05)
    screen = ""
    with contextlib.suppress(Exception):
        found = server.sessions.get(session_name=session, default=None)
        if found is not None:
            screen = " | ".join(s for s in found.active_pane.capture_pane() if s.strip())[-500:]
    raise StepFailed(
        f"the launch script did not start within {_START_TIMEOUT_S:.0f}s"
        + (f"; the pane shows: {screen}" if screen else ""),
        f"attach to the session to look: tmux attach -t {session}",
    )


def _stop_session(server: Any, session: str, ctx: StepContext) -> None:
    """Kill a session named `session` and wait for its processes to exit (TERM, then KILL).

    tmux starts each pane's process in a new Unix session, so the pane's pid is the session id
    of everything the job started, job-controlled process groups of an interactive shell
    included. Dead panes (remain-on-exit) are skipped: their pid may belong to someone else now.
    """
    if not server.has_session(session):
        return
    listed = server.cmd("list-panes", "-s", "-t", f"={session}", "-F", "#{pane_dead} #{pane_pid}")
    sids = {int(pid) for dead, _, pid in (x.partition(" ") for x in listed.stdout) if dead == "0"}
    sids.discard(os.getsid(0))  # never the session this process runs in
    ctx.log(f"killing the existing tmux session {session}")
    server.cmd("kill-session", "-t", f"={session}")
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:  # first the grace of kill-session's SIGHUP alone
            for pid in session_members(sids):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + _STOP_GRACE_S
        while time.monotonic() < deadline and session_members(sids):
            time.sleep(0.1)
        left = session_members(sids)
        if not left:
            return
        ctx.log(f"processes of the old session still run: {left}")
    raise StepFailed(f"the old job of tmux session {session} does not exit", "kill it by hand")


def _read_fields(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").split()
    except OSError:
        return []


def _exit_status(workdir: Path, launch: str | None) -> int | None:
    """The exit status the script recorded for launch `launch`, or None while it has none."""
    fields = _read_fields(workdir / STATUS_FILE)
    if len(fields) == 2 and fields[1] == launch and fields[0].isdigit():
        return int(fields[0])
    return None


def _job_failed(reason: str, log: Path, ctx: StepContext) -> StepFailed:
    """A StepFailed for a dead job: its log tail goes to the step log, the catalog gives a hint."""
    lines = tail_lines(log, 30)
    if lines:
        ctx.log(f"last lines of {log}:")
        for line in lines:
            ctx.log(f"  {line}")
    found = joblog.diagnose("\n".join(lines))
    shown = found.line if found is not None else joblog.last_message(lines)
    return StepFailed(reason + (f": {shown}" if shown else ""), found.hint if found else None)


KIND = TmuxLaunch()
