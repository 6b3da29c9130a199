"""Measure 1 alone, bootstrap against the floors only: the no-op rerun of the 15-step runbook on
one box, with and without a warm ssh master (issue 16: a cold no-op in one handshake).

Run as root: `python bench/noop_cold.py [--runs 11]`. Same runbook, boxes and floors as
`bench/noop.py` (one plain `ssh` running the 15 checks in one bash; the same through a warm
ControlMaster), without Ansible and pyinfra, so many paired runs fit in a minute. The goal of
issue 16: cold `up` <= 1.5x the plain floor (2.31x before the early master).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import harness
import noop
import runbook
import tools
from harness import paired, report

FLOOR = "floor: one ssh, 15 checks in one bash"
COLD = "bootstrap up (cold: no ssh master)"
WARM = "bootstrap up (warm ssh master)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument(
        "--compare-pythonpath",
        type=Path,
        help="also time a cold up with this tree first on PYTHONPATH (e.g. main before a change)",
    )
    args = parser.parse_args()
    with harness.workspace() as work, harness.fleet(work, 1) as boxes:
        box = boxes[0]
        playbook = runbook.bootstrap_project(work / "bootstrap", boxes)
        bs = tools.Bootstrap(work / "bootstrap", harness.controller_env(work))
        harness.check(bs.cli("up", box.name, "-p", str(playbook)), "first bootstrap up")
        floor = tools.floor([box], noop._floor_checks)
        floor()  # the floor's checks pass on bootstrap's output: both check the same thing
        master = tools.master_options(work / "floor-cm")
        other = {}
        if args.compare_pythonpath is not None:
            # Its own config dir: the two trees' agents differ, and one dir would rebuild and
            # ship the agent on every run (the box keeps both side by side).
            shutil.copytree(bs.config_dir, work / "controller-compared", symlinks=True)
            alt_env = dict(
                harness.controller_env(work, "controller-compared"),
                PYTHONPATH=str(args.compare_pythonpath.resolve()),
            )
            alt = tools.Bootstrap(bs.project, alt_env)
            label = f"{COLD}, PYTHONPATH={args.compare_pythonpath}"
            other[label] = (alt.cold, alt.up(box.name, playbook, noop=True))
        samples = paired(
            {
                **other,
                WARM: bs.up(box.name, playbook, noop=True),
                COLD: (bs.cold, bs.up(box.name, playbook, noop=True)),
                "bootstrap --version (start-up alone)": lambda: harness.check(
                    bs.cli("--version"), "bootstrap --version"
                ),
                FLOOR: floor,
                "floor, warm ControlMaster": tools.floor([box], noop._floor_checks, *master),
            },
            args.runs,
        )
        report(
            "1. no-op rerun, 15 steps, one box (bootstrap against the floors)",
            samples,
            FLOOR,
            goals=[(COLD, 1.5, FLOOR), (WARM, 1.5, FLOOR)],
        )


if __name__ == "__main__":
    try:
        main()
    except harness.ToolFailed as exc:
        raise SystemExit(f"a tool failed: {exc}") from None
