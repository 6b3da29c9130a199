"""Peak memory of the controller while `up` follows a fleet of boxes.

Used by `bench/run.py` (the runner's own peak on the box comes from `bench/critical.py`). The
controller is the `bootstrap` python process; its ssh clients are separate processes, so the
peak of the whole process tree (python + ssh, sampled every 20 ms) is shown beside it.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import harness
import yaml
from tools import Bootstrap

STEPS = [
    {"id": "fetch", "kind": "shell", "run": "sleep 2; echo fetched"},
    {"id": "build", "kind": "shell", "run": "sleep 2; echo built", "needs": ["fetch"]},
    {"id": "side", "kind": "shell", "run": "for i in 1 2 3; do echo tick $i; sleep 1; done"},
]


def _tree_rss_kb(root: int) -> int:
    """Sum of VmRSS of `root` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total


def _sample_tree(pid: int, done: threading.Event, peaks: list[int]) -> None:
    while not done.wait(0.02):
        peaks[0] = max(peaks[0], _tree_rss_kb(pid))


def controller_peak(bootstrap: Bootstrap, target: str, runs: int = 3) -> tuple[int, int]:
    """Run `up TARGET` on a ~5 s playbook `runs` times; return the largest peak RSS (kB) of
    the controller process and of its process tree."""
    python_peak = tree_peak = 0
    for _ in range(runs):
        playbook = bootstrap.project / "playbooks" / "follow.yaml"
        playbook.parent.mkdir(parents=True, exist_ok=True)
        name = f"follow-{time.time_ns()}"  # a new run each time: never a no-op
        playbook.write_text(yaml.safe_dump({"name": name, "steps": STEPS}, sort_keys=False))
        proc = subprocess.Popen(
            [*harness.bootstrap_argv(), "up", target, "-p", str(playbook)],
            env=bootstrap.env,
            cwd=bootstrap.project,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        done = threading.Event()
        peaks: list[int] = [0]
        sampler = threading.Thread(target=_sample_tree, args=(proc.pid, done, peaks), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        tree_peak = max(tree_peak, peaks[0])
        proc.returncode = os.waitstatus_to_exitcode(status)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        if proc.returncode != 0:
            raise harness.ToolFailed(f"bootstrap up {target} exited {proc.returncode}: {stderr}")
        python_peak = max(python_peak, usage.ru_maxrss)
    return python_peak, tree_peak
