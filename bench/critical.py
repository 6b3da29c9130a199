"""Critical-path efficiency of `up`, and the memory of the runner on the box.

Run as root: `python bench/critical.py [--runs 5]` (or everything: `bench/run.py`).
A playbook shaped like the openpi runbook (seed 003: base, clone, then three tracks — uv sync and
its patch/tf, the two rclone pulls and their statistics, the checkpoint and its conversion — then
the two trainings), every step a `sleep` scaled so that the critical path is ~30 s. Each run
starts on a box without the agent (and a controller that has not seen the box). The wall time of
`bootstrap up` is compared with: the critical path itself (the ideal), the same steps one after
another (their sum), and a controller that sleeps a fixed 30 s between polls, as the seed's agent
rules prescribe (simulated: each step starts at the first poll after its needs ended).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import harness
import tools
import yaml
from boxes import Box

from provision import dag

RUN_NAME = "openpi-shape"
#: step id -> (seconds, needs). The openpi tracks of RUNBOOK.md A, with the seed's measured
#: minutes scaled down (uv sync 3–10 min is the long pole; the pulls ~1 min; the checkpoint 1–3 min).
STEPS: dict[str, tuple[float, list[str]]] = {
    "base": (1.5, []),
    "clone": (1.0, ["base"]),
    "av-override": (0.3, ["clone"]),
    "uv-sync": (15.5, ["av-override"]),
    "tf": (4.0, ["uv-sync"]),
    "patch": (0.5, ["uv-sync"]),
    "rclone-config": (0.3, ["base"]),
    "data-rlds": (3.0, ["rclone-config"]),
    "data-wp": (1.5, ["rclone-config"]),
    "stats-ae": (1.5, ["data-rlds"]),
    "stats-vlm": (1.0, ["data-wp"]),
    "ckpt": (6.0, ["base"]),
    "convert": (6.0, ["ckpt", "uv-sync", "patch"]),
    "wandb": (0.3, ["base"]),
    "train-ae": (3.0, ["convert", "tf", "stats-ae", "wandb"]),
    "wait-ae-step0": (2.0, ["train-ae"]),
    "train-vlm": (3.0, ["convert", "tf", "stats-vlm", "wandb"]),
    "wait-vlm-step0": (2.0, ["train-vlm"]),
}
SEED_POLL_S = 30.0


def write_playbook(path: Path) -> Path:
    steps = [
        {
            "id": sid,
            "kind": "shell",
            "run": f"sleep {seconds}",
            **({"needs": needs} if needs else {}),
            "estimate": seconds,
        }
        for sid, (seconds, needs) in STEPS.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": RUN_NAME, "steps": steps}, sort_keys=False))
    return path


def critical_path() -> tuple[list[str], float]:
    needs = {sid: needs for sid, (_, needs) in STEPS.items()}
    return dag.critical_path(needs, {sid: s for sid, (s, _) in STEPS.items()})


def polled(interval: float) -> float:
    """End time of the DAG under a controller that looks every `interval` seconds and then
    starts every step whose needs it has seen finished."""
    started: dict[str, float] = {}
    seen_done: set[str] = set()
    t = 0.0
    while True:
        seen_done |= {s for s, at in started.items() if at + STEPS[s][0] <= t}
        if len(seen_done) == len(STEPS):
            return t
        for sid, (_, needs) in STEPS.items():
            if sid not in started and all(n in seen_done for n in needs):
                started[sid] = t
        t += interval


class PeakRSS:
    """Samples the box's agent processes and keeps each role's peak RSS (VmHWM, kB)."""

    ROLES = (("runner", " run --run "), ("step (agent exec)", " exec --run "))

    def __init__(self, box: Box) -> None:
        self.box = box
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            for pid, cmdline in self.box.processes():
                for role, marker in self.ROLES:
                    if marker in cmdline:
                        self.peak[role] = max(self.peak.get(role, 0), _vm_hwm(pid))


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def measure(work: Path, box: Box, runs: int) -> dict[str, int]:
    """Measure 4; returns the runner's peak RSS per role (kB)."""
    project = work / "critical"
    playbook = write_playbook(project / "playbooks" / "openpi-shape.yaml")
    tools_inventory = project / "inventory.yaml"
    tools_inventory.write_text(yaml.safe_dump({"hosts": {box.name: box.inventory_entry()}}))
    bs = tools.Bootstrap(project, harness.controller_env(work / "critical-controller"))

    def fresh() -> None:
        tools.wipe_bootstrap(box)
        bs.forget_agents()
        bs.cold()

    times: list[float] = []
    with PeakRSS(box) as rss:
        for i in range(runs + 1):
            fresh()
            start = time.perf_counter()
            harness.check(bs.cli("up", box.name, "-p", str(playbook)), "bootstrap up openpi-shape")
            if i:  # the first run is the warm-up
                times.append(time.perf_counter() - start)
    path, length = critical_path()
    wall = statistics.median(times)
    sequential = sum(seconds for seconds, _ in STEPS.values())
    poll = polled(SEED_POLL_S)
    print(f"\n== 4. critical-path efficiency ({len(STEPS)} sleep steps shaped like seed 003)")
    print(f"  critical path: {' -> '.join(path)} = {length:.1f} s")
    print(
        f"  bootstrap up (agent not on the box)   median {wall:6.2f} s "
        f"(min–max {min(times):.2f} – {max(times):.2f}, {len(times)} runs after a warm-up)"
    )
    print(
        f"  up / critical path                    {wall / length:6.3f}x  (goal <= 1.05: "
        f"{'MET' if wall / length <= 1.05 else 'MISSED'})"
    )
    print(
        f"  the same steps one after another      {sequential:6.1f} s  "
        f"(sum of step times; up is {sequential / wall:.2f}x faster)"
    )
    print(
        f"  a controller polling every {SEED_POLL_S:.0f} s     {poll:6.1f} s  "
        f"(simulated; up is {poll / wall:.2f}x faster)"
    )
    return rss.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with harness.workspace() as work, harness.fleet(work, 1) as boxes:
        peak = measure(work, boxes[0], args.runs)
    for role, kb in peak.items():
        print(f"  peak RSS on the box, {role:<20} {kb / 1024:6.1f} MiB")


if __name__ == "__main__":
    try:
        main()
    except harness.ToolFailed as exc:
        raise SystemExit(f"a tool failed: {exc}") from None
