"""Where a cold no-op `up` spends its time: when each ssh call starts and ends, in ms after the
CLI starts (issue 16: a cold no-op in one handshake).

Run as root: `python bench/noop_timeline.py [--runs 8]`. Same runbook and box as
`bench/noop_cold.py`; `ssh` on the CLI's PATH is a wrapper that logs each call's start, its
last argument (the host, or the agent's prelude) and its end, then runs the real one. Each line
of output is one cold run (its master closed first):

    total 336 ms: ssh-N@34..195 ssh-G@90..114 agent@239..333

`ssh-N` is the early master (its end: the master is up), `ssh-G` the transport reading its
effective config, `agent` the agent's session through the master. The wrapper's bash costs
each call ~3 ms, so the totals run a little above `bench/noop_cold.py`'s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

import harness
import runbook
import tools

WRAPPER = """#!/bin/bash
echo "$(date +%s.%N) start $$ $1 ${{*: -1}}" | head -c 200 | tr '\\n' ' ' >> {log}; echo >> {log}
{ssh} "$@"
rc=$?
echo "$(date +%s.%N) end $$" >> {log}
exit $rc
"""


def _label(first: str, last: str) -> str:
    if first == "-G" or " -G " in last:
        return "ssh-G"
    return "agent" if "python" in last or "-c" in last else "ssh-N"


def timeline(log: Path, t0: float) -> str:
    """One run's calls as `label@start..end`, in ms after t0."""
    starts: dict[str, tuple[str, float]] = {}
    spans = []
    for line in log.read_text().splitlines():
        parts = line.split(maxsplit=4)
        if len(parts) < 3 or not parts[0][:1].isdigit():
            continue
        at, what, pid = float(parts[0]), parts[1], parts[2]
        if what == "start":
            first = parts[3] if len(parts) > 3 else ""
            starts[pid] = (_label(first, line), at)
        elif pid in starts:
            label, began = starts.pop(pid)
            spans.append((began, f"{label}@{(began - t0) * 1000:.0f}..{(at - t0) * 1000:.0f}"))
    return " ".join(text for _, text in sorted(spans))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    real = shutil.which("ssh")
    assert real is not None, "no ssh on PATH"
    with harness.workspace() as work, harness.fleet(work, 1) as boxes:
        box = boxes[0]
        playbook = runbook.bootstrap_project(work / "bootstrap", boxes)
        bs = tools.Bootstrap(work / "bootstrap", harness.controller_env(work))
        log = work / "ssh-calls.log"
        wrapped = work / "wrapped"
        wrapped.mkdir()
        (wrapped / "ssh").write_text(WRAPPER.format(log=log, ssh=real))
        (wrapped / "ssh").chmod(0o755)
        env = dict(bs.env, PATH=f"{wrapped}{os.pathsep}{bs.env.get('PATH', os.defpath)}")
        inventory = ["-i", str(bs.inventory)] if bs.inventory else []
        argv = [*tools.bootstrap_argv(), "up", box.name, "-p", str(playbook), *inventory]
        subprocess.run(argv, env=env, cwd=bs.project, capture_output=True, check=True)
        for _ in range(args.runs):
            bs.cold()
            log.unlink(missing_ok=True)
            t0 = time.time()
            subprocess.run(argv, env=env, cwd=bs.project, capture_output=True, check=True)
            total = (time.time() - t0) * 1000
            print(f"total {total:.0f} ms: {timeline(log, t0)}", flush=True)


if __name__ == "__main__":
    main()
