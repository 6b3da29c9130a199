"""The guard: one detached process per launched job that keeps its checkpoints safe.

`tmux_launch` starts it right after the job (`start`): `python -m provision.agent guard DIR`
in a new Unix session (outside the job's tmux session and process group, so killing the job or
its session leaves it running, and so does the controller going away), at the lowest CPU and
disk priority (`nice -n 19`, `ionice -c 3`); everything it starts inherits both.

Its files, in the step's directory:

- `guard.json`: what to follow (launch id, cwd, log, the `checkpoints:` spec), written by
  `tmux_launch`;
- `guard.env`: the job's environment (0600), so a guard started again after a kill still reaches
  the remote with the job's credentials; removed when the guard ends for good;
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
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import provision
from provision.checkpoints.remote import Remote, nice_prefix
from provision.checkpoints.spec import CheckpointSpec
from provision.checkpoints.upload import Uploader
from provision.steps.base import read_json, write_json_atomic

CONFIG_FILE = "guard.json"
ENV_FILE = "guard.env"
PID_FILE = "guard.pid"
LOG_FILE = "guard.log"
#: The launch record, exit status and pid files `tmux_launch` writes.
LAUNCH_FILE = "launch.json"
STATUS_FILE = "job.status"
JOB_PID_FILE = "job.pid"
#: Seconds between two looks at the job.
TICK_S = 2.0
#: After the job ended: attempts at a last clean upload pass before the guard gives up.
FINAL_ATTEMPTS = 5


def start(workdir: Path, config: dict[str, Any], env: dict[str, str]) -> int:
    """Stop this step's previous guard, then start one for `config`; returns its pid."""
    stop(workdir)
    write_json_atomic(workdir / CONFIG_FILE, config)
    _write_private_json(workdir / ENV_FILE, env)
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


def revive(workdir: Path) -> int | None:
    """Start the guard again if it died before its work was done; returns the new pid."""
    config = read_json(workdir / CONFIG_FILE, None)
    if not isinstance(config, dict) or guard_pid(workdir) is not None:
        return None
    if not (workdir / ENV_FILE).exists():
        return None  # it ended for good
    env = read_json(workdir / ENV_FILE, {})
    return _spawn(workdir, env if isinstance(env, dict) else dict(os.environ))


def revive_all(run_dir: Path) -> list[int]:
    """`revive` for every step of a run that had a guard (agent `up` calls it)."""
    started = []
    for config in sorted(run_dir.glob(f"steps/*/{CONFIG_FILE}")):
        pid = revive(config.parent)
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


def _write_private_json(path: Path, data: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


class Guard:
    """The guard's main loop (see the module doc)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.config = read_json(workdir / CONFIG_FILE, {})
        env = read_json(workdir / ENV_FILE, None)
        self.env = env if isinstance(env, dict) else dict(os.environ)
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
        replaced = False
        while not self.stopping.is_set():
            if self._replaced():
                replaced = True
                break
            if not self.job_ended.is_set() and self.job_gone():
                rc = self.exit_status()
                self.log(f"job exited with status {rc}" if rc is not None else "job is gone")
                self.job_ended.set()
            if self.job_ended.is_set() and self.uploads_settled.is_set():
                break
            self.stopping.wait(TICK_S)
        self.stopping.set()
        worker.join(timeout=30)
        if not replaced and self.job_ended.is_set():
            (self.workdir / ENV_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            fields = (self.workdir / PID_FILE).read_text(encoding="utf-8").split()
            if fields and fields[0] == str(os.getpid()):
                (self.workdir / PID_FILE).unlink()
        self.log(f"guard {os.getpid()} ends")
        return 0

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
        try:
            fields = (self.workdir / JOB_PID_FILE).read_text(encoding="utf-8").split()
        except OSError:
            return False  # not started yet
        if fields[1:] != [self.launch] or not fields[0].isdigit():
            return False
        return not _alive(int(fields[0]))

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
    return Guard(Path(workdir)).run()
