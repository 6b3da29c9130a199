"""The runner: executes a plan's DAG on the box, one subprocess per step, and owns the state.

It holds the run's lock for its whole life, so there is one runner per run. Steps start as soon
as their needs are done (stdlib `graphlib`), at most `max_parallel` at once. Each step is an
`agent exec` child in its own process group; a waiter thread per child puts its exit on a queue,
so completion is noticed at once, not on a poll. Timeouts kill the whole process group (SIGTERM,
then SIGKILL after a grace period). Requests to rerun steps arrive as files in `requests/` and
are applied between events.

Never two copies of a step at once: each attempt's process group is recorded before the step
is handed its work (on stdin, so a runner killed in between leaves a child that does nothing),
and before a step starts again whatever is left of its previous group is killed and waited for.
A runner killed with SIGKILL leaves steps marked `running`; the next runner kills what is left
of them (the group, even when the step's own `agent exec` died and its shell lives on) and runs
them again. A runner that crashes records the crash in the state, for `status` and `up`.
"""

from __future__ import annotations

import contextlib
import graphlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision import dag
from provision.agent import checks, output
from provision.agent.ahead import Ahead
from provision.agent.execute import (
    EXIT_ERROR,
    EXIT_NEEDS_PRUNED,
    clear_reports,
    make_context,
    read_result,
    step_env,
    stop_group,
)
from provision.agent.files import read_json, tail_text, write_json_atomic
from provision.agent.link import Link
from provision.agent.paths import venv_python
from provision.agent.prune import Pruner, Verdict
from provision.agent.redact import Redactor
from provision.agent.state import (
    RunDir,
    forget_secrets,
    load_state,
    make_reserve,
    read_secrets,
    remove_stale_temps,
    save_state,
)
from provision.agent.versions import pyz_path
from provision.model import (
    ModelError,
    Outcome,
    Plan,
    PlannedStep,
    RunnerRecord,
    RunnerStatus,
    StepStatus,
)
from provision.steps.registry import get_kind

#: Seconds between SIGTERM and SIGKILL for a step that timed out or was cancelled.
KILL_GRACE_S = 5.0
#: How often the runner looks for rerun requests while it waits for children.
REQUEST_POLL_S = 0.5
DEFAULT_MAX_PARALLEL = 8


@dataclass
class Launched:
    """A running step process."""

    proc: subprocess.Popen[bytes]
    token: int
    deadline: float | None
    kill_at: float | None = None
    cancelled: str = ""
    threads: list[threading.Thread] = field(default_factory=list)
    #: The last output, kept in memory: the log file may not take it (disk full).
    tail: output.Tail = field(default_factory=output.Tail)


class Runner:
    """Runs the plan of one run directory to the end."""

    def __init__(
        self,
        run: RunDir,
        plan: Plan | None = None,
        secrets: dict[str, str] | None = None,
    ) -> None:
        self.run = run
        self.plan = plan if plan is not None else read_plan(run)
        self.steps: dict[str, PlannedStep] = {s.id: s for s in self.plan.steps}
        self.selected = [s.id for s in self.plan.selected]
        self.needs = {sid: list(self.steps[sid].needs) for sid in self.selected}
        self.state = load_state(run)
        self.state.damage = None  # set aside by `up` (with the lock) before it came here
        self.secrets = secrets if secrets is not None else read_secrets(run)
        self.redact = Redactor(self.secrets.values())
        self.events: queue.Queue[tuple[str, int, int]] = queue.Queue()
        self.procs: dict[str, Launched] = {}
        self.tokens = 0
        self.max_parallel = self.plan.max_parallel or DEFAULT_MAX_PARALLEL
        # Steps that ran successfully, started at least once, or ended badly in this runner's life.
        self.executed: set[str] = set()
        self.started: set[str] = set()
        self.final: set[str] = set()
        # Steps the current pass's sorter has handed out and not yet been told are done: a
        # step still running from before a restart (a rerun request) may end before its turn.
        self.passed: set[str] = set()
        self.cache = CacheHook(self)
        self.prune = Pruner(
            run.path,
            self.steps,
            self.needs,
            self.status,
            lambda sid: bool(sid in self.state.steps and self.state.steps[sid].forced),
            lambda step: step_env(step, self.secrets),
            lambda: self.events.put(("", -1, 0)),  # a lookup ended: dispatch again
        )
        self.ahead = Ahead(
            run,
            self.steps,
            self.needs,
            self.prune,
            self.status,
            lambda sid: bool(sid in self.state.steps and self.state.steps[sid].forced),
            lambda step: step_env(step, self.secrets),
            lambda: self.events.put(("", -1, 0)),  # a fetch ended: dispatch again
            lambda line: _log(self.redact(line)),
        )
        self.link = Link(
            self.needs,
            self.durations,
            self.receives,
            lambda sid: read_json(run.step_dir(sid) / "_progress.json", None),
        )
        #: A step left out is needed after all: the pass starts over (its sorter has settled it).
        self.replan = False
        #: Steps held for a cache lookup (prune), with their done decision.
        self.holding: dict[str, checks.Decision] = {}
        #: Steps whose wait for the link the runner's log has told.
        self.told_waiting: set[str] = set()

    # ----------------------------------------------------------------- deciding, without running

    def status(self, step_id: str) -> StepStatus:
        return self.state.status(step_id)

    def gens(self, step_id: str) -> dict[str, int]:
        return {n: self.state.gen(n) for n in self.needs.get(step_id, [])}

    def decide(self, step_id: str, rerun: set[str]) -> checks.Decision:
        """Is the step done? `rerun` holds the steps that ran (or will run) this session."""
        step = self.steps[step_id]
        ctx = make_context(self.run, step, self.secrets)
        # A step restored from the cache `with` this one brought this one's work along: it is
        # judged by its checks, not re-run because that need "ran".
        exempt = self.cache.restored_for(step_id)
        rerun_needs = [n for n in self.needs[step_id] if n in rerun and n not in exempt]
        rec = self.state.steps.get(step_id)
        gens = {n: g for n, g in self.gens(step_id).items() if n not in exempt}
        return checks.decide(step, rec, gens, ctx, rerun_needs)

    def evaluate(self) -> list[tuple[str, checks.Decision]]:
        """Decide every selected step as if all that must run succeeded (for `plan` and `up`),
        in the plan's order.

        A step is decided once its needs are (whether a need will run is part of its decision),
        and the steps whose needs are decided are decided side by side, at most `max_parallel`
        at once: their checks are mostly other processes (`done_when`, dpkg, tmux, a venv's
        imports), so a no-op `up` waits for the longest chain of checks, not for their sum.
        """
        sorter = graphlib.TopologicalSorter({k: tuple(v) for k, v in self.needs.items()})
        sorter.prepare()
        answers: queue.SimpleQueue[tuple[str, checks.Decision | BaseException]]
        answers = queue.SimpleQueue()
        will_run: set[str] = set()
        decided: dict[str, checks.Decision] = {}
        ready: list[str] = []
        busy = 0

        def decide(step_id: str, rerun: set[str]) -> None:
            try:
                answers.put((step_id, self.decide(step_id, rerun)))
            except BaseException as exc:  # raised again by the caller's thread
                answers.put((step_id, exc))

        while sorter.is_active():
            ready.extend(sorter.get_ready())
            while ready and busy < self.max_parallel:
                args = (ready.pop(0), set(will_run))  # a copy: the loop adds to it
                threading.Thread(target=decide, args=args, daemon=True).start()
                busy += 1
            step_id, answer = answers.get()
            busy -= 1
            if isinstance(answer, BaseException):
                raise answer
            decided[step_id] = answer
            if not answer.done:
                will_run.add(step_id)
            sorter.done(step_id)
        return [(step_id, decided[step_id]) for step_id in dag.topo_order(self.needs)]

    def mark_done(self, step_id: str, reason: str) -> None:
        """Record a step found done without running it."""
        self.state.record(step_id).found_done(
            self.redact(reason), self.steps[step_id].fingerprint, self.gens(step_id), time.time()
        )
        self.cache.step_done(step_id, None)

    def mark_skipped(self) -> None:
        """Steps not selected are `skipped`, unless they are done from an earlier run."""
        for step_id in self.steps:
            if step_id not in self.needs and self.status(step_id) is not StepStatus.DONE:
                self.state.record(step_id).skip()

    # ----------------------------------------------------------------------------- running

    def execute(self) -> bool:
        """Run until every selected step is done, failed or blocked; True when all are done."""
        # The values are in memory now; the file must not outlive the runner's start (the next
        # `up` ships them again, and `agent exec` gets what it redacts from the runner).
        forget_secrets(self.run)
        self.recover()
        self.apply_requests()
        runner = self.state.runner = RunnerRecord(
            status=RunnerStatus.RUNNING,
            pid=os.getpid(),
            host=os.uname().nodename,  # gethostname's source, without importing socket
            started=time.time(),
        )
        self.mark_skipped()
        remove_stale_temps(self.run)
        make_reserve(self.run)
        self.save()
        try:
            while self.schedule():
                pass
        except Exception as exc:
            # A bug: say so in the state (its traceback goes to runner.log), not "idle".
            runner.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.stop_all("runner stopping")
            self.ahead.end()
            runner.status = RunnerStatus.CRASHED if runner.error else RunnerStatus.IDLE
            runner.ended, runner.pid = time.time(), None
            self.save()
        self.tell_news()
        return all(self.finished(s) for s in self.selected)

    def finished(self, step_id: str) -> bool:
        """Done, or left out because what needs it came from the cache."""
        status = self.status(step_id)
        return status is StepStatus.DONE or (
            status is StepStatus.SKIPPED and step_id in self.prune.candidates
        )

    def tell_news(self) -> None:
        """Notify the launch steps' `notify:` URLs of a setup that failed or of training
        verified (provision/watch/run_news.py); a notification never fails the run."""
        from provision.watch.run_news import tell_run_end

        try:
            tell_run_end(
                self.run.path, self.plan, self.state, self.secrets, self.python_for, _log,
                self.redact,
            )  # fmt: skip
        except Exception as exc:  # a bug there must not turn a finished run into a crash
            _log(f"notifications failed: {type(exc).__name__}: {exc}")

    def save(self) -> None:
        """Write the state. A disk too full even after the reserve was spent must not stop the
        runner: the state stays in memory, and the next write that succeeds catches up."""
        try:
            save_state(self.run, self.state)
        except OSError as exc:
            with contextlib.suppress(OSError):
                print(f"runner: could not write the state: {exc}", file=sys.stderr, flush=True)

    def schedule(self) -> bool:
        """One pass over the DAG; returns True when a rerun request means starting over."""
        self.holding.clear()  # a new pass (a rerun, a left-out step wanted) decides again
        order = {sid: i for i, sid in enumerate(dag.topo_order(self.needs))}
        sorter = graphlib.TopologicalSorter({k: tuple(v) for k, v in self.needs.items()})
        sorter.prepare()
        self.passed = set()
        ready: list[str] = []
        while sorter.is_active():
            new = sorter.get_ready()
            self.passed.update(new)
            ready.extend(new)
            ready.sort(key=lambda sid: (self.link.rank(sid), order[sid]))  # critical first
            if self.dispatch(ready, sorter):
                continue
            if not self.procs and not self.prune.busy() and not self.ahead.busy():
                raise RuntimeError(f"stalled with ready steps {ready}")
            if self.wait(sorter):
                return True
        return False

    def dispatch(self, ready: list[str], sorter: graphlib.TopologicalSorter[str]) -> bool:
        """Settle or start ready steps; True when some step was settled (new ones may be ready)."""
        settled = False
        self.ahead.consider(lambda sid: sid in self.started)
        for step_id in list(ready):
            if step_id in self.procs:
                ready.remove(step_id)  # still running from before a restart: await its exit
                continue
            bad = [n for n in self.needs[step_id] if self.status(n).bad]
            if bad or step_id in self.final:
                ready.remove(step_id)
                if bad:
                    self.state.record(step_id).block(bad)
                self.settle(sorter, step_id)
                settled = True
                continue
            # A step held for the cache lookup is not checked again at every wakeup.
            decision = self.holding.pop(step_id, None) or self.decide(step_id, self.executed)
            verdict, why = (
                self.prune.verdict(step_id, self.executed)
                if not decision.done
                else (Verdict.RUN, "")
            )
            if decision.done or verdict == Verdict.SKIP:
                ready.remove(step_id)
                if decision.done:
                    self.mark_done(step_id, decision.reason)
                else:
                    self.state.record(step_id).leave_out(why)
                self.settle(sorter, step_id)
                settled = True
            elif verdict == Verdict.HOLD or self.ahead.fetching(step_id):
                self.holding[step_id] = decision  # a lookup, or its own fetch ahead, to end
                continue
            elif len(self.procs) < self.max_parallel:
                first = self.link.yields_to(step_id, self.procs)
                if first is not None:
                    self.holding[step_id] = decision
                    self.tell_waiting(step_id, first)
                    continue
                ready.remove(step_id)
                if not self.start(step_id, decision.reason):
                    self.settle(sorter, step_id)
                    settled = True
        if settled:
            self.save()
        return settled

    def tell_waiting(self, step_id: str, first: str) -> None:
        """Say once in the runner's log that a step waits for the link."""
        if step_id not in self.told_waiting:
            self.told_waiting.add(step_id)
            slack = self.link.rank(step_id)
            _log(f"{step_id}: waits for the link while {first} receives (slack {slack:.0f}s)")

    def durations(self) -> dict[str, float | None]:
        """Each selected step's expected seconds: measured on this box, else its `estimate:`."""
        out: dict[str, float | None] = {}
        for sid in self.selected:
            estimate = self.steps[sid].estimate
            measured = self.state.expected_duration(sid)
            out[sid] = measured if measured is not None else estimate
        return out

    def receives(self, step_id: str) -> bool:
        """Is the step's kind one that mostly receives bytes (provision/agent/link.py)?"""
        kind = get_kind(self.steps[step_id].kind)
        return bool(kind is not None and kind.receives)

    def settle(self, sorter: graphlib.TopologicalSorter[str], step_id: str) -> None:
        """Tell this pass's sorter the step is over, if it has handed the step out yet."""
        if step_id in self.passed:
            self.passed.discard(step_id)
            sorter.done(step_id)

    def start(self, step_id: str, why: str) -> bool:
        """Launch a step; False (and the step recorded as `error`) when it cannot start."""
        try:
            self.launch(step_id, why)
        except (OSError, StillRunning) as exc:
            self.state.record(step_id).could_not_start(f"could not start: {exc}", time.time())
            self.final.add(step_id)
            return False
        return True

    def launch(self, step_id: str, why: str) -> None:
        """Start `agent exec` for a step in its own process group.

        Raises OSError, or StillRunning when its previous attempt's processes cannot be ended.
        """
        step = self.steps[step_id]
        rec = self.state.record(step_id)
        self.end_previous(step_id, rec.pgid or rec.pid)
        attempts = rec.attempts + 1 if step_id in self.started else 1
        self.started.add(step_id)
        rec.begin_attempt(attempts, self.redact(why), time.time())
        clear_reports(self.run, step_id)
        log_path = self.run.log(step_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.time() + float(step.timeout) if step.timeout else None
        env = step_env(step, self.secrets)
        env.update(BOOTSTRAP_RUN=self.run.name, BOOTSTRAP_STEP=step_id)
        if deadline:
            env["BOOTSTRAP_DEADLINE"] = repr(deadline)
        argv = [self.python_for(step), str(pyz_path()), "exec", "--run", self.run.name, step_id]
        mode = "ab" if attempts > 1 else "wb"
        with contextlib.suppress(OSError), open(log_path, mode) as log:  # disk full: run anyway
            log.write(f"=== {step_id}: attempt {attempts} ({why}) ===\n".encode())
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=os.path.expanduser("~"),
            env=env,
        )
        # Its group is on disk before it gets its work: a runner killed from here on leaves a
        # group the next runner finds (and before that, a child that reads EOF and stops).
        rec.pid = rec.pgid = proc.pid
        self.save()
        self.hand_over(proc, step)
        self.tokens += 1
        launched = Launched(proc, self.tokens, deadline)
        pump = threading.Thread(
            target=self._pump, args=(proc, log_path, launched.tail), daemon=True
        )
        waiter = threading.Thread(
            target=self._wait_child, args=(step_id, launched, pump), daemon=True
        )
        launched.threads = [pump, waiter]
        self.procs[step_id] = launched
        pump.start()
        waiter.start()

    def hand_over(self, proc: subprocess.Popen[bytes], step: PlannedStep) -> None:
        """Give `agent exec` its step and the values to redact; raises OSError (then the child
        is killed). The step comes from the runner's own plan, never from a `plan.json` that a
        newer `up` may have replaced meanwhile."""
        assert proc.stdin is not None
        handoff: dict[str, Any] = {"step": step.to_json(), "redact": sorted(self.secrets.values())}
        if self.state.record(step.id).forced:
            handoff["restore"] = False  # `rerun` means run it, not fetch it from the cache
        left_out = self.prune.left_out_needs(step.id)
        if left_out:
            handoff["left_out"] = left_out
        try:
            with proc.stdin:
                proc.stdin.write(json.dumps(handoff).encode())
        except OSError:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise

    def end_previous(self, step_id: str, pgid: int | None) -> None:
        """Kill and wait for what is left of the step's previous process group, if anything."""
        if not pgid:
            return
        survivors = stop_group(pgid, self.run.name, step_id)
        if survivors:
            raise StillRunning(
                f"processes {survivors} of its previous attempt survive SIGKILL; "
                "end them, then rerun the step"
            )

    def python_for(self, step: PlannedStep) -> str:
        """The interpreter for a step: the box's python3, or the agent venv's for library kinds."""
        kind = get_kind(step.kind)
        if kind is not None and kind.pip:
            return self.plan.agent_python or str(venv_python())
        return sys.executable

    def _pump(self, proc: subprocess.Popen[bytes], log_path: Path, tail: output.Tail) -> None:
        """Copy a child's output into its log and `tail`, through the redactor."""
        assert proc.stdout is not None
        output.pump(proc.stdout, log_path, self.redact, tail)

    def _wait_child(self, step_id: str, launched: Launched, pump: threading.Thread) -> None:
        rc = launched.proc.wait()
        # A step may leave a daemon holding the pipe; the log gets what arrives within 1 s.
        pump.join(timeout=1.0)
        self.events.put((step_id, launched.token, rc))

    def wait(self, sorter: graphlib.TopologicalSorter[str]) -> bool:
        """Wait for the next child exit, timeout or request; True when the DAG must restart."""
        try:
            step_id, token, rc = self.events.get(timeout=self._next_wakeup())
        except queue.Empty:
            pass
        else:
            launched = self.procs.get(step_id)
            if launched is not None and launched.token == token:
                self.finish(step_id, launched, rc, sorter)
        self.enforce_timeouts()
        replan, self.replan = self.replan, False
        return self.apply_requests() or replan

    def _next_wakeup(self) -> float:
        times = [REQUEST_POLL_S]
        now = time.time()
        for launched in self.procs.values():
            for when in (launched.deadline, launched.kill_at):
                if when is not None:
                    times.append(max(0.0, when - now))
        return min(times)

    def finish(
        self,
        step_id: str,
        launched: Launched,
        rc: int,
        sorter: graphlib.TopologicalSorter[str],
    ) -> None:
        """Record a child's exit: done, retried, failed or error."""
        del self.procs[step_id]
        if launched.cancelled:
            # The step's own process is gone; what it left in its group must not outlive it.
            _signal_group(launched.proc.pid, signal.SIGKILL)
        step = self.steps[step_id]
        rec = self.state.record(step_id)
        result = read_result(self.run, step_id)
        warnings = read_json(self.run.step_dir(step_id) / "_warnings.json", [])
        said = [self.redact(str(w)) for w in warnings] if isinstance(warnings, list) else []
        rec.end_attempt(rc, time.time(), said, step.fingerprint)
        if rc == EXIT_NEEDS_PRUNED and not launched.cancelled:
            self.want_left_out(step_id, str(result.get("reason") or "not restored"))
        elif rc == 0 and not launched.cancelled:
            if rec.forced != "only":  # `rerun --only`: what depends on the step stays done
                self.executed.add(step_id)
            self.state.remember_duration(step_id, rec.duration_s or 0.0)
            reason = result.get("reason")
            rec.succeed(self.redact(str(reason)) if reason else None, self.gens(step_id))
            self.cache.step_done(step_id, result.get("cache"))
            self.settle(sorter, step_id)
        else:
            # A kind's reason may quote the command's last output line: redact like the log.
            reason = self.redact(launched.cancelled or result.get("reason") or f"exited {rc}")
            hint = result.get("hint") or self.diagnose(step_id, launched.tail)
            rec.reason, rec.hint = reason, self.redact(str(hint)) if hint else None
            if rec.attempts <= step.retries:
                self.save()
                if self.start(step_id, f"retry after: {reason}"):
                    return
                self.settle(sorter, step_id)
                self.save()
                return
            could_not_run = rc == EXIT_ERROR and not launched.cancelled
            rec.fail(StepStatus.ERROR if could_not_run else StepStatus.FAILED, reason, rec.hint)
            self.final.add(step_id)
            self.settle(sorter, step_id)
        self.save()

    def want_left_out(self, step_id: str, reason: str) -> None:
        """A cached step was not restored after all: the needs left out for it run first, then
        it (the pass starts over: this pass's sorter has settled them)."""
        back = self.prune.restore_failed(step_id)
        for need in back:
            self.state.record(need).want(f"needed: {step_id} was not restored ({reason})")
        self.state.record(step_id).interrupt(f"{reason}: waits for {', '.join(back)}")
        self.replan = True

    def diagnose(self, step_id: str, tail: output.Tail) -> str | None:
        """A known-issue hint for a failed step's last output, when the catalog knows it.

        The output kept in memory is read first: it is there even when the disk was too full
        for the log to take it (then the failure is often the full disk itself)."""
        from provision.agent.catalog import hint_for

        return hint_for(tail.text() or tail_text(self.run.log(step_id), 64 * 1024))

    def enforce_timeouts(self) -> None:
        """SIGTERM steps past their deadline; SIGKILL them after the grace period."""
        now = time.time()
        for step_id, launched in self.procs.items():
            if launched.kill_at is not None and now >= launched.kill_at:
                _signal_group(launched.proc.pid, signal.SIGKILL)
                launched.kill_at = None
            elif launched.deadline is not None and now >= launched.deadline:
                launched.cancelled = f"timed out after {self.steps[step_id].timeout}s"
                launched.deadline = None
                launched.kill_at = now + KILL_GRACE_S
                _signal_group(launched.proc.pid, signal.SIGTERM)

    def stop_all(self, why: str) -> None:
        """Kill every running step (runner shutting down)."""
        for step_id, launched in list(self.procs.items()):
            _kill_group(launched.proc)
            self.state.record(step_id).interrupt(f"interrupted: {why}")
        self.procs.clear()

    # ----------------------------------------------------------------- recovery and requests

    def recover(self) -> None:
        """Steps left `running` by a runner that died: kill what is left of their process
        groups (a step's shell outlives its `agent exec` dying on the broken pipe), and mark
        them interrupted, so they run again whatever their checks say."""
        for step_id, rec in self.state.steps.items():
            if rec.status is not StepStatus.RUNNING and rec.outcome is not Outcome.RUNNING:
                continue
            pgid = rec.pid or rec.pgid
            if pgid:
                stop_group(pgid, self.run.name, step_id)
            rec.interrupt("interrupted: the runner stopped")

    def apply_requests(self) -> bool:
        """Apply rerun requests queued by `agent up --reset`; True when any step was reset."""
        try:
            names = sorted(os.listdir(self.run.requests))
        except FileNotFoundError:
            return False
        changed = False
        # `.NAME.PID.tmp` is a request still being written: taking it would break its rename.
        for name in (n for n in names if not n.startswith(".")):
            path = self.run.requests / name
            request = read_json(path, {})
            path.unlink(missing_ok=True)
            if isinstance(request, dict) and isinstance(request.get("reset"), str):
                self.reset(request["reset"], bool(request.get("only")))
                changed = True
        if changed:
            self.save()
        return changed

    def reset(self, step_id: str, only: bool) -> None:
        """Mark a step (and, unless `only`, everything downstream) pending and forced."""
        targets = {step_id} if only else dag.downstream(self.needs, [step_id])
        for sid in targets:
            if sid not in self.steps:
                continue
            launched = self.procs.pop(sid, None)
            rec = self.state.record(sid)
            if launched is not None:
                _kill_group(launched.proc)
                rec.outcome, rec.pid = Outcome.INTERRUPTED, None
            rec.force(only)
            self.final.discard(sid)
            self.executed.discard(sid)
            self.started.discard(sid)


class CacheHook:
    """What the runner does for the remote step cache (provision/cache/): the restore happens
    in the step's own `agent exec`; here, a restored step's unit is remembered, and a step that
    ran is saved, detached, once the steps cached `with` it are done too."""

    #: A save awaiting its unit, on disk: a runner that restarts meanwhile still starts it.
    PENDING = "_cache_pending.json"

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.restored: dict[str, set[str]] = {}
        #: Steps that ran, awaiting their unit: (key, whether the entry there is to be replaced).
        self.to_save: dict[str, tuple[str, bool]] = {}
        #: Per step that ran: the unit members not yet done since. A member's DONE status can
        #: be an earlier run's, with the member about to run again and write into the outputs
        #: the save would be reading.
        self.unit_left: dict[str, set[str]] = {}
        for sid, step in runner.steps.items():
            pending = (
                read_json(runner.run.step_dir(sid) / self.PENDING, None) if step.cache else None
            )
            if isinstance(pending, dict) and pending.get("key"):
                self.to_save[sid] = (str(pending["key"]), bool(pending.get("replace")))
                # This run decides the members again (and may run them): wait for that too.
                self.unit_left[sid] = set((step.cache or {}).get("with") or [])

    def restored_for(self, step_id: str) -> set[str]:
        """The needs of `step_id` restored from the cache with it in their unit."""
        return {n for n, unit in self.restored.items() if step_id in unit}

    def step_done(self, step_id: str, outcome: dict[str, Any] | None) -> None:
        """A step is done (ran, restored, or found done); start the saves it completes."""
        step = self.runner.steps[step_id]
        if outcome and outcome.get("key") and step.cache:
            pending = self.runner.run.step_dir(step_id) / self.PENDING
            if outcome.get("restored"):
                self.restored[step_id] = set(step.cache.get("with") or [])
                self.to_save.pop(step_id, None)
                with contextlib.suppress(OSError):
                    pending.unlink()
            else:
                self.to_save[step_id] = (str(outcome["key"]), bool(outcome.get("replace")))
                self.unit_left[step_id] = set(step.cache.get("with") or [])
                with contextlib.suppress(OSError):
                    write_json_atomic(
                        pending, {"key": outcome["key"], "replace": outcome.get("replace")}
                    )
        for left in self.unit_left.values():
            left.discard(step_id)
        for sid, (key, replace) in list(self.to_save.items()):
            members = [sid, *((self.runner.steps[sid].cache or {}).get("with") or [])]
            if not self.unit_left.get(sid) and all(
                self.runner.status(m) is StepStatus.DONE for m in members
            ):
                del self.to_save[sid]
                self.unit_left.pop(sid, None)
                self.spawn(sid, key, replace)

    def spawn(self, step_id: str, key: str, replace: bool) -> None:
        from provision.cache import save

        runner = self.runner
        step = runner.steps[step_id]
        with contextlib.suppress(OSError):
            (runner.run.step_dir(step_id) / self.PENDING).unlink()
        try:
            save.spawn(
                runner.run.path,
                runner.run.name,
                step.to_json(),
                key,
                replace,
                step_env(step, {}),
                sorted(runner.secrets.values()),
                [sys.executable, str(pyz_path())],
            )
        except OSError as exc:  # not saved is never a failure of the step
            runner.state.record(step_id).warnings.append(f"cache: could not start the save: {exc}")


def read_plan(run: RunDir) -> Plan:
    """The run's `plan.json`; raises RuntimeError when there is none or it does not fit."""
    data = read_json(run.plan, None)
    if not isinstance(data, dict):
        raise RuntimeError(f"no plan at {run.plan}")
    try:
        return Plan.from_json(data)
    except ModelError as exc:
        raise RuntimeError(f"{run.plan}: {exc}") from None


def _log(message: str) -> None:
    """One line of the runner's own log (its stderr: `runner.log`)."""
    print(f"runner: {message}", file=sys.stderr, flush=True)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a step's process group, give its `agent exec` the grace period to stop, then
    SIGKILL whatever is left of the group (nothing of a cancelled step outlives it)."""
    _signal_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


class StillRunning(Exception):
    """A step's previous attempt left processes that SIGKILL did not end."""
