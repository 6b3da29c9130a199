"""The agent's command line on the box: `python3 agent.pyz COMMAND ...`.

- `up`: read the controller's payload (plan, secrets, optional rerun request) on stdin, store it,
  and either find every step done in-process (the cheap no-op path: no runner is started) or
  start a detached runner holding the run's lock; then stream snapshots until the run ends
  (or return at once with `--detach`).
- `plan`: the same payload; says what `up` would do and why, writing nothing.
- `run`: the runner itself (started by `up`, detached, without a pty).
- `exec`: one step (started by the runner).
- `guard`: the detached guard of a launched job (started by `tmux_launch`).
- `status`, `logs`, `check`, `monitor`, `launch`, `checkpoints`: read-only reports.

Every verb the controller asks answers in JSON with a meaningful exit code: see `protocol`.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from provision.agent import blobs, protocol, report
from provision.agent.execute import EXIT_ERROR, exec_step, step_env
from provision.agent.files import write_json_atomic
from provision.agent.runner import Runner
from provision.agent.state import (
    RunDir,
    RunLock,
    forget_secrets,
    load_state,
    remove_stale_temps,
    save_state,
    set_aside_damaged,
    write_secrets,
)
from provision.agent.versions import prune_agents, pyz_path
from provision.model import ModelError, Plan, PlannedStep, RunnerStatus, StepStatus
from provision.watch.record import CONFIG_FILE


def _read_payload() -> dict[str, Any]:
    """The controller's payload, its plan's blobs put back (see `blobs`). A plan naming blobs
    this box lacks ends the command with NEED_BLOBS (exit 3): the controller sends them."""
    payload = blobs.decode(sys.stdin.buffer.read())
    if "plan" not in payload:
        raise SystemExit("agent: expected a JSON payload with a plan on stdin")
    payload["plan"], missing = blobs.join(payload["plan"])
    if missing:
        sys.stdout.write(f"{blobs.NEED_BLOBS} {' '.join(missing)}\n")
        sys.stdout.flush()
        raise SystemExit(3)
    return payload


def _plan_stored(run: RunDir, plan: dict[str, Any]) -> bool:
    """Whether `plan.json` holds this very plan."""
    try:
        return run.plan.read_text(encoding="utf-8") == json.dumps(plan, indent=1, sort_keys=True)
    except OSError:
        return False


def _store_plan(run: RunDir, plan: dict[str, Any]) -> None:
    if not _plan_stored(run, plan):
        write_json_atomic(run.plan, plan)


def _request(run: RunDir, reset: dict[str, Any] | None) -> Path | None:
    """Queue a rerun request for the runner (or for the runner this `up` starts)."""
    if not reset:
        return None
    request = run.requests / f"{time.time_ns()}.json"
    data = {"reset": reset["step"], "only": bool(reset.get("only")), "at": time.time()}
    write_json_atomic(request, data)
    return request


class Refused(Exception):
    """`up` cannot go on (another plan's run in progress with --detach, a full disk)."""


def cmd_up(args: argparse.Namespace) -> int:
    payload = _read_payload()
    plan = Plan.from_json(payload["plan"])
    run = RunDir(plan.name)
    try:
        run.make()
        _revive_guards(run, plan, payload.get("secrets") or {})
        started = _start_or_attach(run, payload, args.detach)
    except Refused as exc:
        report.emit("refused", {"error": str(exc), "reason": protocol.UP_REFUSED})
        return protocol.REFUSED
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        error = f"the box's disk is full: cannot write under {run.path} ({exc.strerror})"
        report.emit("refused", {"error": error, "reason": protocol.UP_REFUSED})
        return protocol.REFUSED
    prune_agents()
    if args.detach:
        report.emit("final" if not started else "snapshot", report.snapshot(run).to_json())
        return 0
    report.follow(run)
    return 0


def _revive_guards(run: RunDir, plan: Plan, secrets: dict[str, str]) -> None:
    """A job's guard killed (kill -9, a reboot of the box) comes back with the next `up`, in
    the environment the runner gives its step (the guard keeps no secret on disk)."""
    # Most runs launch no job: the guard's imports (checkpoints, monitor) would cost every
    # no-op `up` tens of ms for nothing.
    if not any(run.path.glob(f"steps/*/{CONFIG_FILE}")):
        return
    from provision.watch.guard import revive_all

    steps = {s.id: s for s in plan.steps}
    revive_all(run.path, lambda sid: step_env(steps[sid], secrets) if sid in steps else None)


#: How long `up` keeps trying to hand its rerun request to a runner (see `_start_or_attach`).
REQUEST_WAIT_S = 60.0
#: How long a plain `up` retries a lock held for a moment (a status probe, another `up`).
LOCK_RETRY_S = 1.0


def _start_or_attach(run: RunDir, payload: dict[str, Any], detach: bool) -> bool:
    """Start a runner unless one is running; True when this call started one.

    A runner in progress with another plan (the playbook changed, other tags) is never given
    the new one: this `up` waits for it to end, saying so, then starts the new plan; with
    `detach` it is refused. So `plan.json` only changes with the lock held, and a run never
    mixes two plans.

    The secrets file is written only with the lock held: a runner ending meanwhile removes it,
    and a running one has its values already.

    The lock can be busy without a runner that will act: a status probe holds it shared for a
    moment, another `up` holds it while it decides, a runner holds it while it exits after its
    last look at the requests. So a rerun request is waited on until a runner took it (its
    file is gone) or the lock is ours; a plain `up` attaches to a live runner, and otherwise
    retries the lock for a moment.
    """
    plan, secrets = payload["plan"], payload.get("secrets") or {}
    request = _request(run, payload.get("reset")) if _plan_stored(run, plan) else None
    lock = RunLock(run)
    start = time.time()
    announced = False
    while True:
        if lock.acquire():
            try:
                if not _plan_stored(run, plan):
                    _store_plan(run, plan)
                    request = _request(run, payload.get("reset"))
                if secrets:
                    write_secrets(run, secrets)
                return _start_unless_done(run, lock)
            finally:
                lock.release()
        if not _plan_stored(run, plan):
            # Only with the lock may the plan change: wait for it (a runner's run to end).
            if _runner_alive(run) and not announced:
                if detach:
                    raise Refused(_other_plan(run, "run `up` without --detach to wait for it"))
                report.emit("notice", {"message": _other_plan(run, "waiting for it to end")})
                announced = True
            time.sleep(0.2)
            continue
        waited = time.time() - start
        if request is not None and (not request.exists() or waited > REQUEST_WAIT_S):
            return False
        if request is None and (_runner_alive(run) or waited > LOCK_RETRY_S):
            return False
        time.sleep(0.05)


def _other_plan(run: RunDir, then: str) -> str:
    """The message for an `up` whose plan differs from the one of the run in progress."""
    running = [k for k, r in load_state(run).steps.items() if r.status is StepStatus.RUNNING]
    now = f" (running: {', '.join(sorted(running))})" if running else ""
    return (
        f"a run of '{run.name}' from another plan is in progress{now}; "
        f"the new plan starts only after it ends: {then}"
    )


def _runner_alive(run: RunDir) -> bool:
    """Whether the state names a running runner whose process exists."""
    runner = load_state(run).runner
    if runner.status is not RunnerStatus.RUNNING or not runner.pid:
        return False
    try:
        os.kill(runner.pid, 0)
    except OSError:
        return False
    return True


def _start_unless_done(run: RunDir, lock: RunLock) -> bool:
    """With the lock held: settle everything in-process if all is done, else start a runner.

    Returns True when a runner was started (it inherits the lock; ours is then released).
    """
    remove_stale_temps(run)
    set_aside_damaged(run)
    runner = Runner(run)
    runner.apply_requests()
    decisions = runner.evaluate()
    if all(d.done for _, d in decisions):
        for step_id, decision in decisions:
            runner.mark_done(step_id, decision.reason)
        runner.mark_skipped()
        runner.state.runner.status = RunnerStatus.IDLE
        runner.state.runner.checked = time.time()
        save_state(run, runner.state)
        forget_secrets(run)
        return False
    save_state(run, runner.state)
    assert lock.fd is not None
    with open(run.runner_log, "ab") as log:
        subprocess.Popen(
            [sys.executable, str(pyz_path()), "run", "--run", run.name, "--lock-fd", str(lock.fd)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(lock.fd,),
            cwd=os.path.expanduser("~"),
        )
    return True


def cmd_run(args: argparse.Namespace) -> int:
    run = RunDir(args.run)
    lock = RunLock(run, args.lock_fd) if args.lock_fd is not None else RunLock(run)
    if args.lock_fd is None and not lock.acquire():
        print(f"a runner for '{run.name}' is already running", flush=True)
        return 0
    # SIGTERM/SIGHUP end the runner through its `finally`: children killed, state saved.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    set_aside_damaged(run, keep_notices=True)  # those of the `up` that started it
    print(f"runner {os.getpid()} started for '{run.name}'", flush=True)
    ok = Runner(run).execute()
    print(f"runner {os.getpid()} finished: {'all done' if ok else 'not all done'}", flush=True)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    # The runner's SIGTERM (timeout, rerun) reaches the step's whole process group. Outlive it,
    # so the step's own processes get the grace period to stop and are waited for; whatever
    # ignores it is SIGKILLed with the group when the grace ends. (A Python handler, unlike
    # SIG_IGN, is not inherited: the step's commands keep the default disposition.)
    signal.signal(signal.SIGTERM, lambda *_: None)
    # The runner writes the step and closes the pipe; EOF first means it died before handing
    # the step over, and nothing may run (it was not recorded as started).
    try:
        handoff = json.loads(sys.stdin.buffer.read() or b"null")
    except ValueError:
        handoff = None
    try:
        step = PlannedStep.from_json(handoff.get("step") if isinstance(handoff, dict) else None)
    except ModelError:
        return EXIT_ERROR
    if step.id != args.step:
        return EXIT_ERROR
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # what the step runs reads nothing from the runner
    os.close(devnull)
    restore = bool(handoff.get("restore", True))
    left_out = [str(n) for n in handoff.get("left_out") or []]
    return exec_step(RunDir(args.run), step, list(handoff.get("redact") or []), restore, left_out)


def cmd_plan(args: argparse.Namespace) -> int:
    payload = _read_payload()
    plan = Plan.from_json(payload["plan"])
    runner = Runner(RunDir(plan.name), plan=plan, secrets=payload.get("secrets") or {})
    from provision.steps.registry import get_kind

    out = []
    will_run: set[str] = set()
    for step_id, decision in runner.evaluate():
        step = runner.steps[step_id]
        kind = get_kind(step.kind)
        describe = kind.describe(step.params) if kind else step.kind
        reason = decision.reason
        if not decision.done:
            if step.cache and decision.reason != "rerun requested":
                from provision.cache.restore import preview

                env = step_env(step, runner.secrets)
                reason = f"{reason}; {preview(runner.run.path, step.to_json(), env, will_run)}"
            if step_id in runner.prune.candidates:  # decided when it is ready (agent/prune.py)
                users = ", ".join(runner.prune.dependents[step_id])
                reason = f"{reason}; left out if {users} can be restored from the step cache then"
            will_run.add(step_id)
        reason, does = runner.redact(reason), runner.redact(describe)
        out.append({"id": step_id, "run": not decision.done, "reason": reason, "does": does})
    skipped = [s.id for s in plan.steps if not s.selected]
    protocol.emit({"steps": out, "skipped": skipped})
    return 0


def _run_for(name: str | None) -> RunDir | None:
    name = name or report.latest_run()
    return RunDir(name) if name else None


def _existing_run(name: str | None) -> RunDir:
    """The run named (else the latest); a refusal when the box has none."""
    run = _run_for(name)
    if run is None or not run.plan.exists():
        named = f" named '{name}'" if name else ""
        raise protocol.Refusal(
            f"no bootstrap run{named} on this box (run `bootstrap up` first)",
            protocol.NO_RUN,
            run=name,
        )
    return run


def cmd_status(args: argparse.Namespace) -> int:
    run = _existing_run(args.run)
    snap = report.snapshot(run, args.lines)
    from provision.agent.gpus import GpuLeases  # `status` only

    snap.gpu_leases = [lease.to_dict() for lease in GpuLeases().live()]
    protocol.emit(snap.to_json())
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    return report.print_log(_existing_run(args.run), args.step, args.lines, args.follow)


def _read_params() -> dict[str, Any]:
    """A JSON payload for `check`/`monitor`; its `env` (the step's own) applies to this process."""
    data = sys.stdin.buffer.read()
    payload = json.loads(data.decode("utf-8")) if data.strip() else {}
    payload = payload if isinstance(payload, dict) else {}
    os.environ.update({k: str(v) for k, v in (payload.get("env") or {}).items()})
    return payload


def cmd_check(args: argparse.Namespace) -> int:
    """Preflight of this box (GPUs, disk, RAM, tools) as JSON."""
    from provision.monitor.preflight import preflight_report

    payload = _read_params()
    protocol.emit(preflight_report(payload.get("params") or {}, run=payload.get("run")))
    return 0


def _launch(payload: dict[str, Any]) -> tuple[dict[str, Any], Path | None, dict[str, Any]]:
    """The payload's tmux_launch step: its params, its directory in the run (None without a
    run), and where its job is (`tmux_launch.launch_facts`)."""
    from provision.steps.tmux_launch import launch_facts

    step = payload["step"]
    params = step.get("params") or {}
    run = _run_for(payload.get("run"))
    workdir = run.step_dir(step["id"]) if run is not None else None
    return params, workdir, launch_facts(workdir, params)


def cmd_launch(args: argparse.Namespace) -> int:
    """Where a tmux_launch step's job is (log, session, socket), from its launch record."""
    _params, _workdir, facts = _launch(_read_params())
    protocol.emit(facts)
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """Training progress, GPUs, host and alerts of a tmux_launch step's job, as JSON: its log
    and checkpoint directory as its launch put them on this box, what its guard saw."""
    from provision.monitor.snapshot import monitor_snapshot
    from provision.steps.tmux_launch import job_path
    from provision.watch.record import read_watch

    payload = _read_params()
    params, workdir, launch = _launch(payload)
    block = params.get("checkpoints")
    checkpoints = payload.get("checkpoints")  # the plan's preflight checkpoint_dir, if any
    if isinstance(block, dict) and block.get("dir"):
        checkpoints = {k: block.get(k) for k in ("keep", "step", "complete")}
        checkpoints["dir"] = str(job_path(params, str(block["dir"])))
    snap = monitor_snapshot(
        str(launch["log"]),
        payload.get("batch_size"),
        payload.get("thresholds") or None,
        checkpoints=checkpoints,
    )
    snap["launch"] = launch
    snap["watch"] = read_watch(workdir) if workdir is not None else None
    protocol.emit(snap)
    return 0


def cmd_guard(args: argparse.Namespace) -> int:
    """The detached guard of one launched job (started by `tmux_launch`)."""
    from provision.watch.guard import main

    return main(args.dir)


def cmd_checkpoints(args: argparse.Namespace) -> int:
    """A tmux_launch step's checkpoints on the box and on its remote, as JSON."""
    from provision.checkpoints.listing import checkpoint_report
    from provision.checkpoints.spec import parse_checkpoints
    from provision.watch.guard import guard_pid

    payload = _read_params()
    run = _run_for(payload.get("run"))
    step = payload["step"]
    params = step.get("params") or {}
    spec = parse_checkpoints(params["checkpoints"])
    workdir = run.step_dir(step["id"]) if run is not None else Path(os.devnull)
    env = dict(os.environ)  # with the step's env and secrets from the payload
    cwd = Path(os.path.expanduser(params.get("cwd") or "~"))
    report_data = checkpoint_report(spec, cwd, env, workdir, guard_pid(workdir))
    protocol.emit(report_data)
    return 0


def cmd_cache_save(args: argparse.Namespace) -> int:
    """Save a cached step's outputs (started detached by the runner; see provision.cache.save)."""
    from provision.cache import save

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the runner's session may end first
    try:
        payload = json.loads(sys.stdin.buffer.read() or b"null")
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return EXIT_ERROR
    return save.main(RunDir(args.run).path, args.step, payload)


class _Formatter(argparse.HelpFormatter):
    """Help at a fixed width: the default asks `shutil` for the terminal's, and every
    `add_argument` makes a formatter (importing shutil, bz2 and lzma cost an agent ~3 ms;
    only the controller reads the agent's usage errors)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100)


class _Parser(argparse.ArgumentParser):
    """A parser whose help, its verbs' included (a subparser is of its parent's class), is
    `_Formatter`'s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=_Formatter, **kwargs)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="agent")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up")
    up.add_argument("--detach", action="store_true")
    up.set_defaults(func=cmd_up)
    sub.add_parser("plan").set_defaults(func=cmd_plan)
    run = sub.add_parser("run")
    run.add_argument("--run", required=True)
    run.add_argument("--lock-fd", type=int)
    run.set_defaults(func=cmd_run)
    ex = sub.add_parser("exec")
    ex.add_argument("--run", required=True)
    ex.add_argument("step")
    ex.set_defaults(func=cmd_exec)
    st = sub.add_parser("status")
    st.add_argument("--run")
    st.add_argument("-n", "--lines", type=int, default=report.DEFAULT_TAIL_LINES)
    st.set_defaults(func=cmd_status)
    lg = sub.add_parser("logs")
    lg.add_argument("--run")
    lg.add_argument("step")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.add_argument("-f", "--follow", action="store_true")
    lg.set_defaults(func=cmd_logs)
    sub.add_parser("check").set_defaults(func=cmd_check)
    sub.add_parser("monitor").set_defaults(func=cmd_monitor)
    sub.add_parser("launch").set_defaults(func=cmd_launch)
    sub.add_parser("checkpoints").set_defaults(func=cmd_checkpoints)
    gd = sub.add_parser("guard")
    gd.add_argument("dir")
    gd.set_defaults(func=cmd_guard)
    cs = sub.add_parser("cache-save")
    cs.add_argument("--run", required=True)
    cs.add_argument("step")
    cs.set_defaults(func=cmd_cache_save)
    return p


#: The verbs only the runner and the kinds start (not the controller): a crash there is
#: the runner's to record (`runner.log`, the step's record), not an answer.
_INTERNAL = ("run", "exec", "guard", "cache-save")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in _INTERNAL:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except protocol.Refusal as exc:
        return protocol.refuse(exc)
    except Exception as exc:
        return protocol.crashed(exc)


if __name__ == "__main__":
    sys.exit(main())
