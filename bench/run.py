"""Where bootstrap stands against the tools users would use instead: every figure of issue 6.

Run as root on this machine: `python bench/run.py [--runs 5] [--only noop fleet ...]`.
The first run installs ansible-core and pyinfra (pinned, see harness.TOOLS) into bench/.venv,
never into the project's environment. Measures (names for --only):

  startup    `bootstrap --version` vs the bare interpreter (and the other tools' --version)
  transport  `true` over both of bootstrap's transports vs ssh and fabric (bench/ssh_roundtrip.py)
  noop       1. no-op rerun of the 15-step runbook, one box: bootstrap, Ansible, pyinfra, floor
  fleet      2. the same on --boxes boxes at once
  status     5. `bootstrap status` vs `ssh box cat state.json`
  memory     7. peak RSS of the controller following --boxes boxes
  converge   3. first converge of the runbook
  critical   4. critical-path efficiency (openpi-shaped sleeps, ~30 s) + the runner's peak RSS
  gcs        6. checkpoint download: gcs_download vs one sequential stream (bench/gcs.py),
             on the stock emulator (one request at a time), a threaded one, and a threaded
             one pacing each stream at 100 MB/s

Every timing is a median of --runs paired, interleaved runs after a warm-up, min–max shown.
Exits 1 only when a tool failed to run (or a no-op was not one); a missed goal is reported.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import critical
import harness
import memory
import noop
from boxes import Box
from harness import paired, report

MEASURES = (
    "startup",
    "transport",
    "noop",
    "fleet",
    "status",
    "memory",
    "converge",
    "critical",
    "gcs",
)


def measure_startup(runs: int, venv_bin: Path) -> None:
    def cmd(*argv: str) -> Callable[[], None]:
        def action() -> None:
            harness.check(harness.run(list(argv)), " ".join(argv))

        return action

    samples = paired(
        {
            "bootstrap --version": cmd(*harness.bootstrap_argv(), "--version"),
            "python -c pass (the same interpreter)": cmd(sys.executable, "-c", "pass"),
            "ansible-playbook --version": cmd(str(venv_bin / "ansible-playbook"), "--version"),
            "pyinfra --version": cmd(str(venv_bin / "pyinfra"), "--version"),
        },
        runs,
    )
    report("CLI start-up", samples, "python -c pass (the same interpreter)")


def run_script(script: str, *args: str) -> None:
    """Run another bench script, its output shown as it comes; ToolFailed if it fails."""
    print(f"\n== {script} {' '.join(args)}", flush=True)
    code = subprocess.call([sys.executable, str(harness.BENCH / script), *args])
    if code != 0:
        raise harness.ToolFailed(f"{script} exited {code}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per figure (>= 5)")
    parser.add_argument("--boxes", type=int, default=16, help="boxes for fleet and memory")
    parser.add_argument("--gcs-mb", type=int, default=1000, help="checkpoint size for gcs")
    parser.add_argument("--only", nargs="+", choices=MEASURES, default=list(MEASURES))
    parser.add_argument(
        "--compare-pythonpath",
        type=Path,
        help="also time bootstrap (noop, fleet, status) with this directory first on PYTHONPATH,"
        " e.g. `pip install --no-deps --target DIR typer==0.28.0`",
    )
    args = parser.parse_args()
    selected = set(args.only)
    venv_bin = harness.ensure_venv()
    print("versions:")
    for name, version in harness.versions().items():
        print(f"  {name:<20} {version}")
    failures: list[str] = []

    def attempt(name: str, action: Callable[[], object], always: bool = False) -> None:
        if name not in selected and not always:
            return
        try:
            action()
        except harness.ToolFailed as exc:
            failures.append(f"{name}: {exc}")
            print(f"\n!! {name}: a tool failed: {exc}", flush=True)
        except Exception:
            failures.append(f"{name}: {traceback.format_exc()}")
            traceback.print_exc()

    attempt("startup", lambda: measure_startup(args.runs, venv_bin))
    attempt("transport", lambda: run_script("ssh_roundtrip.py", "-n", str(max(args.runs, 10))))
    with harness.workspace() as work:
        if selected & {"noop", "fleet", "status", "memory"}:
            with harness.fleet(work, args.boxes) as boxes:
                setup = noop.prepare(work / "fleet", boxes, venv_bin, args.compare_pythonpath)
                attempt("fleet set-up", lambda: noop.converge(setup), always=True)
                attempt("noop", lambda: noop.measure_noop(setup, args.runs))
                attempt("fleet", lambda: noop.measure_fleet(setup, args.runs))
                attempt("status", lambda: noop.measure_status(setup, args.runs))
                attempt("memory", lambda: print_controller_memory(setup))
        if "converge" in selected:
            with harness.fleet(work, 1) as boxes:
                setup = noop.prepare(work / "converge", boxes, venv_bin)
                attempt("converge", lambda: noop.measure_first_converge(setup, args.runs))
        if "critical" in selected:
            with harness.fleet(work, 1) as boxes:
                attempt("critical", lambda: print_runner_memory(work, boxes[0], args.runs))
    if (harness.BENCH / "gcs.py").exists():
        gcs_args = ["--total-mb", str(args.gcs_mb), "--objects", "20", "--runs", str(args.runs)]
        # The stock emulator serves one request at a time; a threaded one is closer to GCS,
        # and pacing each response as one GCS stream (~100 MB/s) shows what parallel streams buy.
        servers = (["single"], ["threaded"], ["threaded", "--stream-mb-s", "100"])
        for server in servers:
            attempt("gcs", lambda s=server: run_script("gcs.py", *gcs_args, "--server", *s))
    elif "gcs" in selected:
        print("\n== gcs: bench/gcs.py is missing, skipped")
    if failures:
        print(f"\n{len(failures)} measure(s) could not run: a tool failed.")
        return 1
    return 0


def print_controller_memory(setup: noop.Setup) -> None:
    python_kb, tree_kb = memory.controller_peak(setup.bootstrap, "fleet")
    n = len(setup.boxes)
    print(f"\n== 7. memory: the controller following {n} boxes (`up fleet`, ~5 s run, max of 3)")
    print(f"  bootstrap python process peak RSS       {python_kb / 1024:6.1f} MiB")
    print(f"  with its {n} ssh clients (process tree)  {tree_kb / 1024:6.1f} MiB")


def print_runner_memory(work: Path, box: Box, runs: int) -> None:
    peak = critical.measure(work, box, runs)
    print("\n== 7. memory: the agent on the box (during the critical-path runs)")
    for role, kb in peak.items():
        print(f"  peak RSS, {role:<28} {kb / 1024:6.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
