"""No-op rerun, fleet rerun, first converge and status latency of the 15-step runbook.

Run as root: `python bench/noop.py [--runs 5] [--boxes 16]` (or everything: `bench/run.py`).
Against, on the same boxes in the same run: Ansible (ansible-core, pipelining, ControlPersist, no
fact gathering), pyinfra (defaults), and the floor: one plain `ssh` per box running the 15
checks (or, for a first converge, the 15 actions) in one bash. bootstrap's own ssh keeps a
ControlMaster for 60 s after each command (Ansible's is given 10 min here), so bootstrap is
timed with and without a warm one, and so is the floor. The no-op is also timed over bootstrap's
second transport (`connection: paramiko`), which opens a new connection in each process.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import harness
import runbook
import tools
from boxes import Box
from harness import paired, report


@dataclass
class Setup:
    """The runbook written for every tool, for a set of boxes."""

    work: Path
    boxes: list[Box]
    playbook: Path
    bootstrap: tools.Bootstrap
    ansible: tools.Ansible
    pyinfra: tools.Pyinfra
    #: bootstrap again with a directory prepended to PYTHONPATH (another typer, say), timed
    #: beside the rest: what a change of the controller's dependencies would buy.
    alt: tools.Bootstrap | None = None
    #: bootstrap over its second transport (`connection: paramiko`): no ControlMaster, so every
    #: command of a new process pays a handshake.
    paramiko: tools.Bootstrap | None = None

    def variants(self, label: str) -> dict[str, tools.Bootstrap]:
        """The bootstrap contenders: as installed, and the PYTHONPATH variant if any."""
        out = {label: self.bootstrap}
        if self.alt is not None:
            out[f"{label}, PYTHONPATH={Path(self.alt.env['PYTHONPATH']).name}"] = self.alt
        return out

    @property
    def master(self) -> tuple[str, ...]:
        """ssh options giving the floor a warm ControlMaster of its own."""
        return tools.master_options(self.work / "floor-cm")


def prepare(
    work: Path, boxes: list[Box], venv_bin: Path, alt_pythonpath: Path | None = None
) -> Setup:
    """Write the bootstrap project, Ansible project and pyinfra deploy for `boxes` under
    `work` (inventories name the boxes b1, b2, ...; group `fleet` is all of them)."""
    env = harness.controller_env(work)
    playbook = runbook.bootstrap_project(work / "bootstrap", boxes)
    config = runbook.ansible_project(work / "ansible", boxes)
    inventory, deploy = runbook.pyinfra_project(work / "pyinfra", boxes)
    over_paramiko = runbook.write_inventory(
        work / "bootstrap", boxes, "bootstrap", "paramiko", "inventory-paramiko.yaml"
    )
    alt = None
    if alt_pythonpath is not None:
        alt_env = dict(env, PYTHONPATH=str(alt_pythonpath.resolve()))
        alt = tools.Bootstrap(work / "bootstrap", alt_env)
    return Setup(
        work,
        boxes,
        playbook,
        tools.Bootstrap(work / "bootstrap", env),
        tools.Ansible(venv_bin, config, env),
        tools.Pyinfra(venv_bin, inventory, deploy, env),
        alt,
        tools.Bootstrap(work / "bootstrap", env, over_paramiko),
    )


def converge(setup: Setup) -> None:
    """First run of every tool on every box (untimed); the floor's checks must then hold."""
    result = harness.check(
        setup.bootstrap.cli("up", "fleet", "-p", str(setup.playbook)), "bootstrap up fleet"
    )
    checks = tools.floor(setup.boxes, _floor_checks)
    try:
        checks()
    except harness.ToolFailed as exc:
        raise harness.ToolFailed(f"{exc}\n`bootstrap up fleet` said:\n{result.stdout}") from None
    setup.ansible.play(noop=False)()
    setup.pyinfra.deploy(noop=False)()
    checks()


def _floor_checks(box: Box) -> str:
    return runbook.floor_script(runbook.root_for(box, "bootstrap"))


def measure_noop(setup: Setup, runs: int) -> None:
    """Measure 1: no-op rerun on one box."""
    box = setup.boxes[0]
    bs = setup.bootstrap
    warm = {
        label: b.up(box.name, setup.playbook, noop=True)
        for label, b in setup.variants("bootstrap up (warm ssh master)").items()
    }
    samples = paired(
        {
            **warm,
            "bootstrap up (cold: no ssh master)": (
                bs.cold,
                bs.up(box.name, setup.playbook, noop=True),
            ),
            **(
                {
                    "bootstrap up (paramiko, connection: paramiko)": setup.paramiko.up(
                        box.name, setup.playbook, noop=True
                    )
                }
                if setup.paramiko is not None
                else {}
            ),
            "Ansible (pipelining, ControlPersist, no facts)": setup.ansible.play(
                noop=True, limit=box.name
            ),
            "pyinfra (defaults)": setup.pyinfra.deploy(noop=True, limit=box.host),
            "floor: one ssh, 15 checks in one bash": tools.floor([box], _floor_checks),
            "floor, warm ControlMaster": tools.floor([box], _floor_checks, *setup.master),
        },
        runs,
    )
    report(
        "1. no-op rerun, 15 steps, one box",
        samples,
        "floor: one ssh, 15 checks in one bash",
        goals=[
            ("bootstrap up (warm ssh master)", 2.0, "floor: one ssh, 15 checks in one bash"),
            ("bootstrap up (cold: no ssh master)", 2.0, "floor: one ssh, 15 checks in one bash"),
            ("bootstrap up (warm ssh master)", 2.0, "floor, warm ControlMaster"),
        ],
    )


def measure_fleet(setup: Setup, runs: int) -> None:
    """Measure 2: the same no-op on every box of the setup at once.

    A round here outlasts ssh's ControlPersist (Ansible takes about a minute), so the warm
    contenders get their masters opened, untimed, right before each run, and the cold ones
    get them closed.
    """
    n = len(setup.boxes)
    floor = f"floor: {n} ssh in parallel"
    label = f"bootstrap up fleet ({n} boxes)"
    warm_floor = tools.floor(setup.boxes, _floor_checks, *setup.master)

    def warmed(bs: tools.Bootstrap) -> Callable[[], None]:
        def warm() -> None:
            harness.check(bs.cli("status", "fleet", "--json", "-p", str(setup.playbook)), "status")

        return warm

    bootstraps = {
        f"{name}, warm ssh masters": (warmed(bs), bs.up("fleet", setup.playbook, noop=True))
        for name, bs in setup.variants(label).items()
    }
    samples = paired(
        {
            **bootstraps,
            f"{label}, cold": (
                setup.bootstrap.cold,
                setup.bootstrap.up("fleet", setup.playbook, noop=True),
            ),
            f"Ansible (forks {n})": setup.ansible.play(noop=True),
            "pyinfra (defaults)": setup.pyinfra.deploy(noop=True),
            floor: tools.floor(setup.boxes, _floor_checks),
            f"{floor}, warm ControlMasters": (warm_floor, warm_floor),
        },
        runs,
    )
    report(
        f"2. no-op rerun, 15 steps, {n} boxes",
        samples,
        floor,
        goals=[
            (f"{label}, warm ssh masters", 1.5, floor),
            (f"{label}, cold", 1.5, floor),
            (f"{label}, warm ssh masters", 1.5, f"{floor}, warm ControlMasters"),
        ],
    )


def measure_first_converge(setup: Setup, runs: int) -> None:
    """Measure 3: first converge of the runbook on a box none of the tools has seen."""
    box = setup.boxes[0]
    roots = {tool: runbook.root_for(box, tool) for tool in ("bootstrap", "ansible", "pyinfra")}

    def fresh_for_bootstrap() -> None:
        tools.wipe_bootstrap(box, roots["bootstrap"])
        setup.bootstrap.forget_agents()
        setup.bootstrap.cold()

    def fresh_for_ansible() -> None:
        box.ssh(f"rm -rf ~/.ansible {roots['ansible']}")
        setup.ansible.cold()

    def fresh(root: str) -> Callable[[], None]:
        def wipe() -> None:
            box.ssh(f"rm -rf {root}")

        return wipe

    samples = paired(
        {
            "bootstrap up (agent not on the box)": (
                fresh_for_bootstrap,
                setup.bootstrap.up(box.name, setup.playbook, noop=False),
            ),
            "Ansible (pipelining, ControlPersist, no facts)": (
                fresh_for_ansible,
                setup.ansible.play(noop=False),
            ),
            "pyinfra (defaults)": (fresh(roots["pyinfra"]), setup.pyinfra.deploy(noop=False)),
            "floor: one ssh, 15 actions in one bash": (
                fresh(roots["bootstrap"]),
                tools.floor([box], lambda b: tools.converge_script(roots["bootstrap"])),
            ),
        },
        runs,
    )
    report(
        "3. first converge, 15 steps, one box",
        samples,
        "floor: one ssh, 15 actions in one bash",
        goals=[("bootstrap up (agent not on the box)", 1.0, "pyinfra (defaults)")],
    )


def measure_status(setup: Setup, runs: int) -> None:
    """Measure 5: reading a run's state: `bootstrap status` vs `ssh box cat state.json`."""
    box = setup.boxes[0]
    cat = f"cat ~/.bootstrap/runs/{runbook.RUN_NAME}/state.json"

    def status(bs: tools.Bootstrap, *extra: str) -> Callable[[], None]:
        def action() -> None:
            harness.check(bs.cli("status", box.name, "-p", str(setup.playbook), *extra), "status")

        return action

    floor = "floor: ssh box cat state.json"
    samples = paired(
        {
            **{label: status(b) for label, b in setup.variants("bootstrap status").items()},
            "bootstrap status --json": status(setup.bootstrap, "--json"),
            floor: tools.floor([box], lambda b: cat),
            f"{floor}, warm ControlMaster": tools.floor([box], lambda b: cat, *setup.master),
        },
        runs,
    )
    report(
        "5. status latency, one box",
        samples,
        floor,
        goals=[
            ("bootstrap status", 1.5, floor),
            ("bootstrap status --json", 1.5, floor),
            ("bootstrap status", 1.5, f"{floor}, warm ControlMaster"),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--boxes", type=int, default=16)
    parser.add_argument(
        "--compare-pythonpath",
        type=Path,
        help="also time bootstrap with this directory first on PYTHONPATH (e.g. another typer)",
    )
    args = parser.parse_args()
    venv_bin = harness.ensure_venv()
    with harness.workspace() as work:
        with harness.fleet(work, args.boxes) as boxes:
            setup = prepare(work / "fleet", boxes, venv_bin, args.compare_pythonpath)
            converge(setup)
            measure_noop(setup, args.runs)
            measure_fleet(setup, args.runs)
            measure_status(setup, args.runs)
        with harness.fleet(work, 1) as boxes:
            setup = prepare(work / "converge", boxes, venv_bin)
            measure_first_converge(setup, args.runs)


if __name__ == "__main__":
    try:
        main()
    except harness.ToolFailed as exc:
        raise SystemExit(f"a tool failed: {exc}") from None
