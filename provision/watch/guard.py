"""The guard: one detached process per launched job that keeps its checkpoints safe.

`tmux_launch` starts it right after the job (`start`): `python -m provision.agent guard DIR`
in a new Unix session (outside the job's tmux session and process group, so killing the job or
its session leaves it running, and so does the controller going away), at the lowest CPU and
disk priority (`nice -n 19`, `ionice -c 3`, the session's autogroup at nice 19, without which
the scheduler would give the guard's session as much CPU as the job's, and the `SCHED_IDLE`
policy: see `provision.agent.priority`); everything it starts inherits them.

Its files, in the step's directory:

- `guard.json`: what to follow (launch id, cwd, log, the `checkpoints:` spec), written by
  `tmux_launch`;
- its environment is the job's, in memory only (secrets never go to a file): a guard started
  again after a kill gets it from the next `up` (the step's env and secrets, as the runner
  gives them);
- `guard.done`: written when the guard ended for good (nothing to revive);
- `guard.pid`: `PID LAUNCH` of the live guard; `guard.log`: what it did;
- `checkpoints.json` (the uploader's last pass).

A guard ends when its job has ended and every complete checkpoint is verified on the remote (or
the remote keeps failing after the job ended, which it reports), or when a newer launch of the
step replaced its own. `revive` starts a guard again for a launch whose guard died (`kill -9`, a
reboot) while its job runs or checkpoints are still pending; the manifest on the remote says
what is already there, so nothing is uploaded twice. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import provision
from provision.agent.files import read_json, write_json_atomic
from provision.agent.priority import nice_prefix, yield_to_the_job
from provision.checkpoints.remote import Remote
from provision.checkpoints.spec import CheckpointSpec
from provision.checkpoints.upload import Uploader, read_status
from provision.watch.notify import Notifier
from provision.watch.record import CONFIG_FILE, WATCH_FILE
from provision.watch.spec import FinishAction, WatchSpec
from provision.watch.watcher import Watcher

DONE_FILE = "guard.done"
PID_FILE = "guard.pid"
LOG_FILE = "guard.log"
#: The launch record, exit status and pid files `tmux_launch` writes.
LAUNCH_FILE = "launch.json"
STATUS_FILE = "job.status"
JOB_PID_FILE = "job.pid"
FINISH_FILE = "finish.json"
HOOK_LOG = "on_finish.log"
#: Seconds between two looks at the job.
TICK_S = 2.0
#: After the job ended: attempts at a last clean upload pass before the guard gives up.
FINAL_ATTEMPTS = 5


def start(workdir: Path, config: dict[str, Any], env: dict[str, str]) -> int:
    """Stop this step's previous guard, then start one for `config` in `env`; returns its pid."""
    stop(workdir)
    (workdir / DONE_FILE).unlink(missing_ok=True)
    write_json_atomic(workdir / CONFIG_FILE, config)
    return _spawn(workdir, env)


def stop(workdir: Path) -> None:
    """End the step's live guard, if any (SIGTERM, then SIGKILL after 5 s)."""
    pid = guard_pid(workdir)
    if pid is None:
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _is_guard(pid, workdir):
        time.sleep(0.05)
    if _is_guard(pid, workdir):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def revive(workdir: Path, env: dict[str, str]) -> int | None:
    """Start the guard again in `env` if it died before its work was done; the new pid."""
    config = read_json(workdir / CONFIG_FILE, None)
    if not isinstance(config, dict) or guard_pid(workdir) is not None:
        return None
    if (workdir / DONE_FILE).exists():
        return None
    return _spawn(workdir, env)


def revive_all(run_dir: Path, env_of: Callable[[str], dict[str, str] | None]) -> list[int]:
    """`revive` for every step of a run that had a guard (agent `up` calls it); `env_of(step
    id)` gives the step's environment, None for a step no longer in the plan."""
    started = []
    for config in sorted(run_dir.glob(f"steps/*/{CONFIG_FILE}")):
        env = env_of(config.parent.name)
        pid = revive(config.parent, env) if env is not None else None
        if pid is not None:
            started.append(pid)
    return started


def guard_pid(workdir: Path) -> int | None:
    """The pid of the step's live guard, or None."""
    try:
        fields = (workdir / PID_FILE).read_text(encoding="utf-8").split()
    except OSError:
        return None
    if not fields or not fields[0].isdigit():
        return None
    pid = int(fields[0])
    return pid if _is_guard(pid, workdir) else None


def _is_guard(pid: int, workdir: Path) -> bool:
    """Whether `pid` is alive and is a guard of `workdir` (pids are reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and b"guard" in argv and os.fsencode(str(workdir)) in argv


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _session_members(sid: int) -> list[int]:
    """Live processes whose Unix session is `sid` (the job's launch script leads it)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _spawn(workdir: Path, env: dict[str, str]) -> int:
    root = str(Path(provision.__file__).resolve().parent.parent)
    child_env = dict(env)
    child_env["PYTHONPATH"] = root + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    argv = [*nice_prefix(), sys.executable, "-m", "provision.agent", "guard", str(workdir)]
    with open(workdir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=child_env,
            cwd=str(workdir),
        )
    # The guard writes its pid file itself; wait for it, so `guard_pid` answers at once.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and guard_pid(workdir) is None and proc.poll() is None:
        time.sleep(0.02)
    return proc.pid


class Guard:
    """The guard's main loop (see the module doc)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.config = read_json(workdir / CONFIG_FILE, {})
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.launch = self.config.get("launch_id")
        self.stopping = threading.Event()
        self.job_ended = threading.Event()
        self.uploads_settled = threading.Event()
        raw = self.config.get("checkpoints")
        self.spec = CheckpointSpec.from_dict(raw) if isinstance(raw, dict) else None
        self.uploader: Uploader | None = None
        if self.spec is not None:
            remote = Remote(self.spec, self.env) if self.spec.remote else None
            cwd = Path(self.config["cwd"])
            self.uploader = Uploader(self.spec, cwd, workdir, remote, self.log, self.launch)
        self.watch = WatchSpec(**(self.config.get("watch") or {}))
        step_id = str(self.config.get("step_id") or workdir.name)
        self.watcher = Watcher(
            workdir, self.config.get("log") or "", self.launch, step_id, self.watch
        )
        where = f"{self.config.get('host') or socket.gethostname()} · {step_id}"
        notify = self.config.get("notify")
        self.notifier = Notifier(self.env.get(notify) if notify else None, workdir, where, self.log)
        self.rerun = f"bootstrap rerun {self.config.get('host') or 'TARGET'} {step_id}"
        self.finish = FinishAction.from_dict(self.config.get("on_finish") or {"action": "nothing"})

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        sys.stdout.write(f"{stamp} {message}\n")
        sys.stdout.flush()

    def run(self) -> int:
        (self.workdir / PID_FILE).write_text(f"{os.getpid()} {self.launch}\n", encoding="utf-8")
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        self.log(f"guard {os.getpid()} follows launch {self.launch}")
        worker = threading.Thread(target=self._upload_loop, daemon=True)
        worker.start()
        replaced, outcome, next_look = False, None, 0.0
        while not self.stopping.is_set():
            if self._replaced():
                replaced = True
                break
            gone = self.job_gone()
            if time.monotonic() >= next_look or gone:
                next_look = time.monotonic() + self.watch.poll
                outcome = self._look(gone) or outcome
            if outcome and not self.job_ended.is_set():
                rc = self.exit_status()
                self.log(f"run {outcome}" + (f" (status {rc})" if rc is not None else ""))
                self.job_ended.set()
            if self.job_ended.is_set() and self.uploads_settled.is_set():
                if outcome:
                    self._on_finish(outcome)
                if gone or self.job_gone():
                    self._look(True)
                    break
            self.stopping.wait(min(TICK_S, self.watch.poll))
        self.stopping.set()
        worker.join(timeout=30)
        if not replaced and self.job_ended.is_set():
            (self.workdir / DONE_FILE).write_text(f"{time.time()}\n", encoding="utf-8")
        with contextlib.suppress(OSError):
            fields = (self.workdir / PID_FILE).read_text(encoding="utf-8").split()
            if fields and fields[0] == str(os.getpid()):
                (self.workdir / PID_FILE).unlink()
        self.log(f"guard {os.getpid()} ends")
        return 0

    def _look(self, gone: bool) -> str | None:
        """One look at the job: `watch.json` written, new events told; the outcome once over."""
        uploads = read_status(self.workdir) if self.spec is not None else {}
        try:
            doc = self.watcher.observe(self.exit_status(), gone, uploads)
        except Exception as exc:  # a bad log line must not end the guard (uploads go on)
            self.log(f"watcher failed: {type(exc).__name__}: {exc}")
            return None
        for finding in doc["findings"]:
            if finding["kind"] == "upload_failing":
                self.log(f"LOUD: {finding['message']}")
        doc["on_finish"] = read_json(self.workdir / FINISH_FILE, None)
        doc["guard"] = os.getpid()
        write_json_atomic(self.workdir / WATCH_FILE, doc)
        self.notifier.tell_findings(doc, self.rerun, self.watch.repeat_s)
        return self.watcher.ended(doc, gone)

    def _on_finish(self, outcome: str) -> None:
        """The `on_finish` action, once per launch (recorded in `finish.json`)."""
        if read_json(self.workdir / FINISH_FILE, None) is not None:
            return
        record: dict[str, Any] = {
            "outcome": outcome,
            "action": self.finish.action,
            "at": time.time(),
        }
        if self.finish.action != "nothing" and outcome in self.finish.when:
            if self.finish.action in ("stop", "destroy"):
                record["stopped"] = self._stop_job()
            else:
                record["rc"] = self._run_hook(outcome)
            message = f"on_finish {self.finish.action} after the run {outcome}: {record}"
            if self.finish.action == "destroy":
                record["why_not"] = self._unsafe_to_destroy()
                record["ready"] = not record["why_not"]
                message = (
                    f"the run {outcome}; the box may be destroyed: {self._safe_line()} (the "
                    "controller that rented it destroys it: `bootstrap monitor TARGET --watch`, "
                    "or `bootstrap down TARGET`)"
                    if record["ready"]
                    else f"the run {outcome}; not ready to be destroyed: {record['why_not']}"
                )
            self.notifier.tell(f"on_finish@{self.launch}", "on_finish", message)
        write_json_atomic(self.workdir / FINISH_FILE, record)
        self.log(f"on_finish: {record}")

    def _unsafe_to_destroy(self) -> str:
        """'' when the box's checkpoints are all safe on the remote (the uploader's last pass
        verified every complete one, none failing), else why not."""
        if self.spec is None:
            return ""
        if self.spec.remote is None:
            return "its checkpoints have no remote: they exist only on the box"
        status = read_status(self.workdir)
        if status.get("failing"):
            return f"checkpoint uploads are failing: {status['failing'].get('error')}"
        if status.get("pending"):
            return f"checkpoints not verified on {self.spec.remote}: {', '.join(status['pending'])}"
        return ""

    def _safe_line(self) -> str:
        if self.spec is None or self.spec.remote is None:
            return "no checkpoints declared"
        newest = (read_status(self.workdir).get("verified") or ["none"])[-1]
        return f"every complete checkpoint is verified on {self.spec.remote} (newest {newest})"

    def _stop_job(self) -> list[int]:
        """End the job: TERM (then KILL after 10 s) every process of its Unix session."""
        sid = self._job_pid()
        if sid is None:
            return []
        members = _session_members(sid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _session_members(sid):
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _session_members(sid):
                time.sleep(0.1)
            if not _session_members(sid):
                break
        return members

    def _run_hook(self, outcome: str) -> int:
        verified = (read_status(self.workdir).get("verified") or [None])[-1]
        pending = read_status(self.workdir).get("pending") or []
        progress = (read_json(self.workdir / WATCH_FILE, {}) or {}).get("progress") or {}
        env = dict(self.env)
        env.update(
            BOOTSTRAP_OUTCOME=outcome,
            BOOTSTRAP_RC=str(self.exit_status() if self.exit_status() is not None else ""),
            BOOTSTRAP_LAST_STEP=str(
                progress.get("step") if progress.get("step") is not None else ""
            ),
            BOOTSTRAP_CHECKPOINT=str(verified or ""),
            BOOTSTRAP_UPLOADS_OK="1" if not pending else "0",
        )
        self.log(f"on_finish: running `{self.finish.command}`")
        with open(self.workdir / HOOK_LOG, "ab") as out:
            done = subprocess.run(
                ["bash", "-c", self.finish.command or "true"],
                cwd=self.config.get("cwd") or None,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        return done.returncode

    def _job_pid(self) -> int | None:
        try:
            fields = (self.workdir / JOB_PID_FILE).read_text(encoding="utf-8").split()
        except OSError:
            return None
        ok = fields[1:] == [self.launch] and fields[0].isdigit()
        return int(fields[0]) if ok else None

    def exit_status(self) -> int | None:
        """The job's exit status, once its launch script recorded one."""
        try:
            fields = (self.workdir / STATUS_FILE).read_text(encoding="utf-8").split()
        except OSError:
            return None
        if len(fields) == 2 and fields[1] == self.launch and fields[0].isdigit():
            return int(fields[0])
        return None

    def job_gone(self) -> bool:
        """Whether the job ended: it recorded an exit status, or its launch script is gone
        (a killed tmux session leaves no status)."""
        if self.exit_status() is not None:
            return True
        pid = self._job_pid()
        return pid is not None and not _alive(pid)

    def _replaced(self) -> bool:
        record = read_json(self.workdir / LAUNCH_FILE, {})
        return isinstance(record, dict) and record.get("launch_id") not in (None, self.launch)

    def _upload_loop(self) -> None:
        if self.uploader is None or self.spec is None:
            self.uploads_settled.set()
            return
        final_attempts = 0
        while not self.stopping.is_set():
            ended = self.job_ended.is_set()
            report = self.uploader.sync()
            if ended:
                final_attempts += 1
                if (not report.error and not report.pending) or final_attempts >= FINAL_ATTEMPTS:
                    if report.error:
                        self.log(
                            f"giving up: checkpoints did not all leave the box: {report.error}"
                        )
                    self.uploads_settled.set()
                    return
            self.stopping.wait(self.spec.poll if not ended else min(self.spec.poll * 2, 30))


def main(workdir: str) -> int:
    """`agent guard DIR`: run the guard of the step whose directory is DIR."""
    yield_to_the_job()
    return Guard(Path(workdir)).run()
