"""Run one step: the body of the `agent exec` subprocess the runner starts for each step.

The runner hands the step over on stdin (its resolved params and the values to redact) and
owns the state file; this process only reports through its exit code and the files in the
step's directory (`_result.json`, `_progress.json`, `_warnings.json`). Its stdout and stderr
are a pipe the runner redacts into the step's log.

Each step runs in its own process group, whose id the runner records; `stop_group` ends what
is left of one (a step's shell outlives its `agent exec` when the runner's pipe breaks).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from provision.agent.checks import box_checks
from provision.agent.files import read_json, write_json_atomic
from provision.agent.paths import tools_bin
from provision.agent.redact import Redactor
from provision.agent.state import RunDir
from provision.agent.versions import pyz_path
from provision.errors import StepFailed
from provision.model import PlannedStep
from provision.steps.base import Kind, StepContext
from provision.steps.registry import get_kind

#: Exit codes of `agent exec`: the step ran and failed, or it could not run at all.
EXIT_FAILED = 1
EXIT_ERROR = 3
#: A cached step not restored while a need of it was left out for the cache
#: (provision/agent/prune.py): it must not run before that need has.
EXIT_NEEDS_PRUNED = 75
#: How long `stop_group` keeps SIGKILLing a step's group before it reports survivors
#: (a process in uninterruptible sleep, on a hung NFS mount say, ends only when its I/O does).
STOP_GROUP_S = 10.0


def step_env(step: PlannedStep, secrets: dict[str, str]) -> dict[str, str]:
    """The environment a step sees: the runner's, its own `env`, and only its own secrets."""
    env = dict(os.environ)
    env.update(step.env)
    for name in step.secrets:
        if name in secrets:
            env[name] = secrets[name]
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The zipapp this agent runs from: its stdlib-only helpers for a step's own commands (a
    # stable path for the run; `current.pyz` moves when a newer bootstrap installs).
    env["BOOTSTRAP_AGENT_PYZ"] = str(pyz_path())
    # Tools bootstrap installed itself (`box_tool`) are found last, after the box's own.
    bin_dir = str(tools_bin())
    path = env.get("PATH", os.defpath)
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = f"{path}{os.pathsep}{bin_dir}" if path else bin_dir
    return env


def make_context(
    run: RunDir,
    step: PlannedStep,
    secrets: dict[str, str],
    deadline: float | None = None,
) -> StepContext:
    """The StepContext of `step` (for checks in the runner, and for running in `exec`)."""
    return StepContext(
        step_id=step.id,
        params=dict(step.params),
        run_dir=run.path,
        env=step_env(step, secrets),
        secrets={n: secrets[n] for n in step.secrets if n in secrets},
        poll=float(step.poll or 5),
        deadline=deadline,
    )


def exec_step(
    run: RunDir,
    step: PlannedStep,
    redact_values: list[str],
    restore: bool = True,
    left_out: list[str] | None = None,
) -> int:
    """Run and verify one step (as the runner handed it over); returns the exit code.

    `redact_values` are all the run's secret values: a reason or warning may quote a line
    holding any of them (a job's log read by a watcher). A cached step is restored from the
    cache instead when it can be, unless `restore` is False (`rerun`: it runs). `left_out`:
    needs of it the runner left out because it expected the restore; without one, it does
    not run (EXIT_NEEDS_PRUNED: the runner runs them first).
    """
    step_id = step.id
    result_path = run.step_dir(step_id) / "_result.json"
    run.step_dir(step_id).mkdir(parents=True, exist_ok=True)
    kind = get_kind(step.kind)
    if kind is None:
        write_json_atomic(result_path, {"reason": f"unknown kind '{step.kind}' on the box"})
        return EXIT_ERROR
    # The runner passes the step's secrets in the environment; take only those the step names.
    secrets = {n: os.environ[n] for n in step.secrets if n in os.environ}
    deadline = (
        float(os.environ["BOOTSTRAP_DEADLINE"]) if "BOOTSTRAP_DEADLINE" in os.environ else None
    )
    ctx = make_context(run, step, secrets, deadline)
    redact = Redactor(redact_values)
    started = time.time()
    cached = None
    if step.cache:
        cached = _restore(run, step, ctx, kind) if restore else _key_only(run, step, ctx)
    if cached is not None and cached.get("restored"):
        write_json_atomic(result_path, {"reason": cached["reason"], "cache": cached})
        return 0
    if left_out:
        why = cached["reason"] if cached is not None else "not restored"
        ctx.log(f"{why}; {', '.join(left_out)} must run first (left out for the cache)")
        write_json_atomic(result_path, {"reason": why})
        return EXIT_NEEDS_PRUNED
    try:
        kind.run(ctx)
        kind.verify(ctx)
        after = _post_checks(step, ctx)
        if after:
            raise StepFailed(after)
    except StepFailed as exc:
        ctx.log(f"FAILED: {exc.reason}")
        hint = redact(exc.hint) if exc.hint else exc.hint
        write_json_atomic(result_path, {"reason": redact(exc.reason), "hint": hint})
        return EXIT_FAILED
    except Exception as exc:  # a crash is an error of the kind, not a failure of the work
        import traceback  # only on a crash: linecache and tokenize cost every agent ~6 ms

        traceback.print_exc(file=sys.stdout)
        reason = redact(f"crashed: {type(exc).__name__}: {exc}")
        write_json_atomic(result_path, {"reason": reason})
        return EXIT_ERROR
    finally:
        _redact_warnings(run.step_dir(step_id) / "_warnings.json", redact)
    reason = f"ran in {time.time() - started:.1f}s"
    result: dict[str, Any] = {"reason": reason}
    if cached is not None:
        result.update(reason=f"{reason} ({cached['reason']})", cache=cached)
    write_json_atomic(result_path, result)
    return 0


def _restore(run: RunDir, step: PlannedStep, ctx: StepContext, kind: Kind) -> dict[str, Any]:
    """Restore a cached step and verify it as after a run: {key, restored, reason}.

    Not restored (a miss, an unusable copy, a failed verification): the reason says why, and
    the step runs."""
    from provision.cache.restore import RECEIVING, restore

    def report(done: int, total: int, speed: float) -> None:
        ctx.progress(done=done, total=total or None, unit="B", speed=speed, message=RECEIVING)

    attempt = restore(run.path, step.to_json(), ctx.env, report)
    restored, reason = attempt.restored, attempt.reason
    # An entry that is there but unusable is replaced by what this run makes.
    replace = attempt.found
    if restored:
        try:
            kind.verify(ctx)
            failed = _failed_check(step, ctx, kind)
        except StepFailed as exc:
            failed = exc.reason
        except Exception as exc:  # a crashing verify on a restored copy: run the step
            failed = f"{type(exc).__name__}: {exc}"
        if failed:
            restored, reason = False, f"restored copy failed verification ({failed}): ran"
    ctx.log(f"cache: {reason}")
    return {"key": attempt.key, "restored": restored, "reason": reason, "replace": replace}


def _key_only(run: RunDir, step: PlannedStep, ctx: StepContext) -> dict[str, Any]:
    """A cached step that runs without looking in the cache (`rerun`): its key, to save it."""
    from provision.cache.restore import compute_key, drop_ahead, short

    drop_ahead(step.to_json())  # fetched ahead before the rerun was asked for: not used
    try:
        key: str | None = compute_key(run.path, step.to_json())
    except OSError as exc:
        return {"key": None, "restored": False, "reason": f"cache key unknown ({exc})"}
    reason = f"rerun: not restored from the cache, saved as key {short(str(key))}"
    ctx.log(f"cache: {reason}")
    return {"key": key, "restored": False, "reason": reason, "replace": True}


def _failed_check(step: PlannedStep, ctx: StepContext, kind: Kind) -> str | None:
    """`creates`, `done_when` and the kind's own check on a restored copy: why one fails,
    None when all hold (after its `verify` passed: what a run must pass, and more)."""
    result = box_checks(step, ctx, kind)
    return None if result.done else result.reason


def _redact_warnings(path: Path, redact: Redactor) -> None:
    warnings = read_json(path, None)
    if isinstance(warnings, list) and redact:
        write_json_atomic(path, [redact(str(w)) for w in warnings])


def _post_checks(step: PlannedStep, ctx: StepContext) -> str | None:
    """After a run, `creates` must exist and `done_when` must pass: else the step failed."""
    if not (step.creates or step.done_when):
        return None
    result = box_checks(step, ctx, None)
    return None if result.done else f"ran, but {result.reason}"


def read_result(run: RunDir, step_id: str) -> dict[str, Any]:
    """What the last `exec` of a step reported (reason, hint)."""
    data = read_json(run.step_dir(step_id) / "_result.json", {})
    return data if isinstance(data, dict) else {}


def clear_reports(run: RunDir, step_id: str) -> None:
    """Forget the previous attempt's result, progress and warnings before a new attempt."""
    for name in ("_result.json", "_progress.json", "_warnings.json"):
        with contextlib.suppress(FileNotFoundError):
            (run.step_dir(step_id) / name).unlink()


def group_members(pgid: int, run_name: str, step_id: str) -> list[int]:
    """Live processes of group `pgid` when it is this step's group (one of them carries the
    step's BOOTSTRAP_RUN/BOOTSTRAP_STEP environment: a reused group id is left alone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    members: list[int] = []
    marked = False
    markers = {f"BOOTSTRAP_RUN={run_name}".encode(), f"BOOTSTRAP_STEP={step_id}".encode()}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        # A zombie has ended; only its parent's wait() (or init) removes it.
        if int(fields[2]) != pgid or fields[0] in (b"Z", b"X"):
            continue
        members.append(int(name))
        if not marked:
            marked = markers <= _environ(int(name))
    return members if marked else []


def _environ(pid: int) -> set[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return set(fh.read().split(b"\0"))
    except OSError:
        return set()


def stop_group(pgid: int, run_name: str, step_id: str, wait_s: float = STOP_GROUP_S) -> list[int]:
    """SIGKILL the step's process group until no member lives; returns the pids still alive
    after `wait_s` (empty: the group is gone, the step may start again)."""
    deadline = time.monotonic() + wait_s
    while True:
        members = group_members(pgid, run_name, step_id)
        if not members or time.monotonic() > deadline:
            return members
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.02)
