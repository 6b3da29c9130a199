"""Shared pieces of the bench: paired timing, the tools' venv, test boxes, the bootstrap CLI.

Timing rule (issue 6): every figure is the median of >= 5 runs after one untimed warm-up, the
contenders interleaved round by round (A B C, then C B A, ...) so that drift of this shared
machine falls on all of them alike; the min–max is printed beside the median.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from boxes import Box, make_key, start_box, sweep_stale_users  # noqa: E402

VENV = BENCH / ".venv"
#: The competitors, pinned so figures are comparable between runs of the bench.
TOOLS = ("ansible-core==2.19.14", "pyinfra==3.10.0")


class ToolFailed(RuntimeError):
    """A tool under measurement did not run correctly (the bench exits non-zero)."""


# ------------------------------------------------------------------------------ timing


@dataclass
class Sample:
    """The timings of one contender, in seconds."""

    name: str
    times: list[float]
    #: CPU seconds (user + system) of the processes each run started and waited for, on this
    #: side of ssh: far less sensitive than wall time to the other load of a shared machine.
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


Action = Callable[[], object]


def paired(
    contenders: dict[str, Action | tuple[Action, Action]], runs: int, warmup: int = 1
) -> dict[str, Sample]:
    """Time each contender `runs` times after `warmup` untimed rounds, interleaved, alternating
    the order each round. A contender is an action, or (prepare, action): `prepare` runs untimed
    right before each timed action (e.g. wiping the box for a first converge)."""
    samples = {name: Sample(name, []) for name in contenders}
    order = list(contenders.items())
    for round_ in range(warmup + runs):
        for name, contender in order if round_ % 2 == 0 else reversed(order):
            prepare, action = contender if isinstance(contender, tuple) else (None, contender)
            if prepare is not None:
                prepare()
            cpu = _children_cpu()
            start = time.perf_counter()
            action()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                samples[name].times.append(elapsed)
                samples[name].cpu.append(_children_cpu() - cpu)
    return samples


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:7.0f} ms" if seconds < 10 else f"{seconds:7.2f} s "


def report(
    title: str,
    samples: dict[str, Sample],
    baseline: str,
    goals: Sequence[tuple[str, float, str]] = (),
) -> dict[str, float]:
    """Print every contender's median, min–max and ratio to `baseline`; returns the ratios.
    Each goal (contender, max ratio, against which contender) adds a MET/MISSED line."""
    base = samples[baseline].median
    runs = len(next(iter(samples.values())).times)
    print(f"\n== {title}  (median of {runs} paired runs after a warm-up; baseline: {baseline})")
    print(f"  {'':<48} {'wall':>10}  {'(min – max)':<21} {'ratio':>7}   local CPU")
    ratios = {}
    for name, sample in samples.items():
        ratios[name] = sample.median / base
        spread = f"({fmt_s(min(sample.times)).strip()} – {fmt_s(max(sample.times)).strip()})"
        cpu = statistics.median(sample.cpu) * 1000
        print(
            f"  {name:<48} {fmt_s(sample.median)}  {spread:<21} {ratios[name]:6.2f}x"
            f"   {cpu:6.0f} ms"
        )
    for name, limit, against in goals:
        ratio = samples[name].median / samples[against].median
        verdict = "MET" if ratio <= limit else "MISSED"
        # The ratio of the fastest runs: what is left when this shared machine's other load
        # happened to spare both (it often does not, for 5 runs).
        best = min(samples[name].times) / min(samples[against].times)
        print(
            f"  goal: {name} <= {limit}x {against}: {ratio:.2f}x  {verdict}"
            f"  (fastest runs: {best:.2f}x)"
        )
    return ratios


def check(proc: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    """Raise ToolFailed with the output tail when a measured command failed."""
    if proc.returncode != 0:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-2000:]).strip()
        raise ToolFailed(f"{what} exited {proc.returncode}:\n{tail}")
    return proc


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, output captured as text, stdin closed."""
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kwargs
    )


# ------------------------------------------------------------------------------ tools


def ensure_venv() -> Path:
    """bench/.venv with ansible-core and pyinfra (never the project's own environment)."""
    if not (VENV / "bin" / "ansible-playbook").exists() or not (VENV / "bin" / "pyinfra").exists():
        print(f"installing {' '.join(TOOLS)} into {VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "-q", *TOOLS], check=True, stdout=sys.stderr
        )
    return VENV / "bin"


def versions() -> dict[str, str]:
    """Exact versions of everything measured."""
    from importlib.metadata import version

    import provision

    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).stdout.strip()
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "provision"]).stdout.strip()
    out = {
        "bootstrap": f"{provision.__version__} ({commit}{', provision/ modified' if dirty else ''})",
        "python (controller)": sys.version.split()[0],
        "typer (controller)": version("typer"),
        "OpenSSH": run(["ssh", "-V"]).stderr.strip(),
        "box python3": run(["/usr/bin/python3", "--version"]).stdout.strip(),
        "fabric / paramiko (controller: connection: paramiko)": (
            f"{version('fabric')} / {version('paramiko')}"
        ),
    }
    pip = run([str(VENV / "bin" / "python"), "-m", "pip", "list", "--format=freeze"]).stdout
    pinned = dict(line.split("==", 1) for line in pip.split() if "==" in line)
    for name in ("ansible-core", "pyinfra", "paramiko", "gevent"):
        out[name if name != "paramiko" else "paramiko (pyinfra's)"] = pinned.get(name, "?")
    return out


def bootstrap_argv() -> list[str]:
    """The `bootstrap` console script as a user runs it (not pyenv's shell shim)."""
    script = Path(sysconfig.get_path("scripts")) / "bootstrap"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "provision.cli"]


# ------------------------------------------------------------------------------ boxes


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A temporary directory for the bench's files, removed at the end."""
    if os.geteuid() != 0:
        raise SystemExit("the bench starts sshd boxes: run it as root")
    sweep_stale_users()
    path = Path(tempfile.mkdtemp(prefix="bootstrap-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def fleet(work: Path, n: int) -> Iterator[list[Box]]:
    """n fresh boxes (own sshd, user and HOME each), torn down at the end."""
    key = work / "id_ed25519"
    if not key.exists():
        make_key(key)
    boxes: list[Box] = []
    try:
        for i in range(n):
            name = f"b{i + 1}"
            boxes.append(start_box(work / "boxes" / f"{name}-{time.time_ns()}", key, name))
        yield boxes
    finally:
        for box in boxes:
            with contextlib.suppress(Exception):
                box.close()


def controller_env(work: Path, name: str = "controller") -> dict[str, str]:
    """Environment for the bootstrap CLI: its own config dir, no ssh agent, and bytecode
    cached as an installed copy has it (pip compiles at install, a checkout writes
    __pycache__ on first import): without it, an environment with PYTHONDONTWRITEBYTECODE
    compiles every bootstrap module on every command (~45 ms CPU per command here). The
    cache lies in the workspace, so no source tree gets written."""
    env = dict(os.environ)
    env.pop("SSH_AUTH_SOCK", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    env["BOOTSTRAP_CONFIG_DIR"] = str(work / name)
    return env


def close_masters(control_dir: Path) -> None:
    """Close every OpenSSH ControlMaster whose socket lies in `control_dir` (a cold start)."""
    if not control_dir.is_dir():
        return
    for sock in control_dir.iterdir():
        if sock.is_socket():
            run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "placeholder"])
