"""Time to step 0 on a shaped network: a fresh box, seed 003's tracks, one link for everything.

Run as root: `python bench/shaped.py [--rate 40] [--runs 3]` (not part of bench/run.py: ~10 min).

Everything is on loopback, behind one simulated link (`bench/shaper.py`: one token bucket for all
bytes towards the box, `--rate` MB/s): a PEP 503 index of ~400 MB of real wheels from PyPI
(`bench/pyindex.py`, fetched once into ~/.cache/bootstrap-bench), git over smart HTTP
(tests/githttp.py), the GCS emulator holding a 190 MB pi0.5-shaped checkpoint, and an HTTP tree
that rclone's `http` remote copies the two LIBERO RLDS datasets from (70 MB, the runbook's
episode and step counts). The playbook (`bench/shaped_playbook.yaml`) has the seed's tracks:
clone, uv sync of a project locked against the index (`bench/shaped_repo.py`), an extra
install, the transformers patch, two rclone pulls, statistics, the checkpoint download, a
CPU-bound conversion, the launch in tmux of a stand-in trainer printing the fork's log lines,
and the wait for step 0.

Scenarios, each on a fresh test box (tests/boxes.py: new user, empty HOME, empty uv cache),
interleaved round by round:
- **cold**: `bootstrap up` with nothing anywhere;
- **warm**: the same on another fresh box after the cold one filled the step cache (only when
  the playbook kinds support `cache:`; see bench/README.md);
- **serial**: the same steps one after another (`max_parallel: 1`), as by hand.

Each is compared with its **limit**, computed from figures of the same run: the bytes that must
cross the link over the bandwidth, plus the CPU work measured alone (uv linking a venv from a
warm cache, the extra install, the conversion, the trainer's start to step 0) where the DAG
forces it after those bytes. The time to step 0 is when the trainer logged `[AE] step=0/`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import pyindex
import shaped_repo
import uv as uv_package
import yaml
from boxes import Box, make_key, start_box
from gcs_emulator import EmulatorProcess, free_port, pi05_like, upload, wait_for_port
from githttp import serve_git
from project import Project
from shaper import Shaper, shaped

from provision.cache.restore import archives_of
from provision.stats.samples import write_preset

BENCH = Path(__file__).resolve().parent
PLAYBOOK = BENCH / "shaped_playbook.yaml"
UV = uv_package.find_uv_bin()
TOKEN = "ghp_" + "Sh4p3dB3nch" * 3
MB = 1_000_000
CKPT_BIG = 150 * MB  # the one large Orbax data file, plus 14 smaller shards
CKPT_SMALL = 2 * MB
STEP0 = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \[I\] \[AE\] step=0/", re.M)


@dataclass
class World:
    """The loopback services behind one link, and what the bytes that must cross it are."""

    shaper: Shaper
    rate: float  # bytes/s
    work: Path
    urls: dict[str, str]
    payload: dict[str, int] = field(default_factory=dict)  # bytes per track that must cross
    ckpt_objects: dict[str, bytes] = field(default_factory=dict)
    logs: Path | None = None  # where each box's run directory is copied, for profiling
    link_mode: str = "copy"  # UV_LINK_MODE of the box's uv steps
    cache_url: str | None = None  # the step cache's WebDAV server, behind the link
    cache_dir: Path | None = None  # what it serves


@contextlib.contextmanager
def world(work: Path, rate: float) -> Iterator[World]:
    """Build the index, the data, the checkpoint and the repo; serve them behind the link."""
    wheels = pyindex.fetch_wheels()
    index = pyindex.write_simple(wheels, work / "index")
    drive = work / "drive"
    libero = drive / "dissert_ntu" / "libero"
    write_preset(libero / "libero_object_no_noops", "libero_object", {"image_bytes": 400})
    write_preset(libero / "libero_object_wp_001", "libero_wp", {"image_bytes": 400})
    objects = pi05_like(big_bytes=CKPT_BIG, small_bytes=CKPT_SMALL)
    git_root = work / "git"
    git_root.mkdir()
    gcs = EmulatorProcess(threaded=True)
    cache_dir = work / "stepcache"
    cache_dir.mkdir()
    with (
        webdav(cache_dir) as cache_port,
        shaped(rate * MB) as shaper,
        pyindex.serve_dir(index) as index_port,
        pyindex.serve_dir(drive) as drive_port,
        serve_git(git_root, "x-access-token", TOKEN) as git,
    ):
        try:
            git_port = int(git.url.rsplit(":", 1)[1])
            urls = {
                "index_url": f"http://127.0.0.1:{shaper.front(index_port, 'index')}/simple",
                "git_url": f"http://127.0.0.1:{shaper.front(git_port, 'git')}/openpi.git",
                "rclone_url": f"http://127.0.0.1:{shaper.front(drive_port, 'rclone')}/",
                "gcs_endpoint": f"http://127.0.0.1:{shaper.front(gcs.port, 'gcs')}",
            }
            cache_url = f"http://127.0.0.1:{shaper.front(cache_port, 'cache')}/"
            shaper.set_rate(0)  # setting the world up is not the box's traffic
            # Through the link's port: the emulator keeps the upload's Host in each mediaLink.
            upload(urls["gcs_endpoint"], "openpi-assets", objects)
            bare = shaped_repo.build_repo(git_root, urls["index_url"], UV, shaped_repo.uv_env())
            shaper.set_rate(rate * MB)
            lock = subprocess.run(
                ["git", "-C", str(bare), "show", "HEAD:uv.lock"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            extra = [w for w in wheels.glob("*.whl") if _is_extra(w.name)]
            payload = {
                "uv-sync": sum(
                    (wheels / name).stat().st_size for name in shaped_repo.locked_wheels(lock)
                ),
                "extra": sum(w.stat().st_size for w in extra),
                "ckpt": sum(len(v) for v in objects.values()),
                "data": sum(p.stat().st_size for p in drive.rglob("*") if p.is_file()),
            }
            yield World(
                shaper, rate * MB, work, urls, payload, objects,
                cache_url=cache_url if playbook_caches() else None, cache_dir=cache_dir,
            )  # fmt: skip
        finally:
            gcs.stop()


def playbook_caches() -> bool:
    """Whether the bench playbook has cached steps (the remote step cache, issue 16)."""
    book = yaml.safe_load(PLAYBOOK.read_text())
    return any(step.get("cache") for step in book["steps"])


@contextlib.contextmanager
def webdav(root: Path) -> Iterator[int]:
    """`rclone serve webdav ROOT` on a free loopback port (yielded): the step cache's bucket."""
    port = free_port()
    proc = subprocess.Popen(
        ["rclone", "serve", "webdav", str(root), "--addr", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def restore_cpu(cache_dir: Path, root: str, scratch: Path) -> dict[str, tuple[int, float]]:
    """Per cached step of the round: (archive bytes, seconds to unpack it alone here; a sharded
    entry's shards at once, then its directories, as `provision.cache.restore` does)."""
    out: dict[str, tuple[int, float]] = {}
    for entry_path in sorted((cache_dir / root / "entries").glob("*.json")):
        entry = json.loads(entry_path.read_text())
        together, last = archives_of(entry)
        dest = scratch / entry["step"]
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        decompress = "zstd -dc" if entry["codec"] == "zstd" else "gzip -dc"
        size = 0
        start = time.perf_counter()
        for group in (together, last):
            paths = [cache_dir / root / a["object"] for a in group]
            size += sum(p.stat().st_size for p in paths)
            # Each pipeline in the background, then each waited for: one that fails fails all.
            starts = "".join(
                f'{decompress} {p} | tar -x -C {dest} & pids="$pids $!"; ' for p in paths
            )
            subprocess.run(
                f"{starts}for p in $pids; do wait $p || exit 1; done", shell=True, check=True
            )
        out[entry["step"]] = (size, time.perf_counter() - start)
        shutil.rmtree(dest, ignore_errors=True)
    return out


def _is_extra(wheel: str) -> bool:
    names = {pyindex.normalise(req.split("==")[0]) for req in pyindex.EXTRA_WHEELS}
    return pyindex.normalise(wheel.split("-", 1)[0]) in names | {"polars-runtime-32"}


# ------------------------------------------------------------------ the CPU parts, measured alone


class CpuParts:
    """The CPU work that follows the bytes, measured alone on this machine between the rounds:
    uv linking the venv from a warm cache (in the box's link mode), the extra install from a
    warm cache, the conversion, and the trainer from its start to step 0."""

    def __init__(self, w: World, link_mode: str) -> None:
        self.scratch = w.work / "cpu"
        self.scratch.mkdir()
        self.env = {
            **shaped_repo.uv_env(),
            "PATH": f"{Path(UV).parent}:{os.environ['PATH']}",  # the box's python3.11 first
            "UV_CACHE_DIR": str(self.scratch / "uv-cache"),
            "UV_LINK_MODE": link_mode,
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_INDEX_URL": w.urls["index_url"],
        }
        self.repo = self.scratch / "openpi"
        bare = str(w.work / "git" / "openpi.git")
        subprocess.run(["git", "clone", "-q", bare, str(self.repo)], check=True)
        self.ckpt = self.scratch / "pi05_base"
        for name, content in w.ckpt_objects.items():
            path = self.ckpt / name.split("pi05_base/", 1)[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        self.stats = self.scratch / "stats.json"
        self.stats.write_text("{}")
        w.shaper.set_rate(0)  # filling this machine's uv cache is no box's traffic
        try:
            self._run(self.sync, "uv sync (filling the cache)")
            self._run(self.extra, "uv pip install (filling the cache)")
        finally:
            w.shaper.set_rate(w.rate)

    @property
    def sync(self) -> list[str]:
        return [UV, "sync", "--locked", "--python", "3.11"]

    @property
    def extra(self) -> list[str]:
        return [UV, "pip", "install", "--python", ".venv/bin/python", *pyindex.EXTRA_WHEELS]

    def _run(self, argv: list[str], what: str) -> float:
        start = time.perf_counter()
        done = subprocess.run(
            argv, cwd=self.repo, env=self.env, capture_output=True, text=True, check=False
        )
        harness.check(done, what)
        return time.perf_counter() - start

    def measure(self) -> dict[str, float]:
        """Seconds of each part, once (a fresh venv from the warm cache)."""
        shutil.rmtree(self.repo / ".venv", ignore_errors=True)
        shutil.rmtree(self.scratch / "model", ignore_errors=True)
        python = str(self.repo / ".venv" / "bin" / "python")
        convert = [python, "examples/convert_jax_model_to_pytorch.py", "--checkpoint_dir",
                   str(self.ckpt), "--config_name", "pi05_libero", "--output_path",
                   str(self.scratch / "model"), "--passes", str(CONVERT_PASSES)]  # fmt: skip
        # The checks a step's verification runs on the venv (the playbook's verify_imports,
        # the extra's and the patch's verify): one python each, as the steps start them.
        imports = [python, "-c", "import jax, numpy, transformers"]
        extra_imports = [python, "-c", "import cv2, polars"]
        patch_import = [python, "-c", "import transformers.models.siglip"]
        return {
            "venv": self._run(self.sync, "uv sync from a warm cache"),
            "verify": self._run(imports, "the venv's verification imports"),
            "patch": self._run(patch_import, "the patch's verification import"),
            "extra": self._run(self.extra, "uv pip install from a warm cache"),
            "verify_extra": self._run(extra_imports, "the extra's verification imports"),
            "convert": self._run(convert, "the conversion stand-in"),
            "launch": _until_step0(
                python, self.repo, self.scratch / "model" / "model.safetensors", self.stats
            ),
        }


CONVERT_PASSES = 4


def _until_step0(python: str, repo: Path, model: Path, stats: Path) -> float:
    argv = [python, "scripts/train.py", str(model), str(stats), "--mode", "ae", "--config",
            "configs/ae.yaml", "--wandb", "disabled", "--steps", "3", "--step-sleep", "0.5",
            "--startup-sleep", "0.2"]  # fmt: skip
    start = time.perf_counter()
    with subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            if "[AE] step=0/" in line:
                elapsed = time.perf_counter() - start
                proc.kill()
                return elapsed
    raise harness.ToolFailed("the trainer stand-in never logged step 0")


# ------------------------------------------------------------------ the limit of a scenario


def cold_limit(payload: dict[str, int], rate: float, cpu: dict[str, float]) -> dict[str, float]:
    """The earliest step 0 a perfect schedule could reach on a fresh box with nothing cached.

    The link carries every byte at `rate` at best; the venv is usable `venv` seconds after its
    last wheel arrived (uv links after downloading) and its verification imports (`verify`:
    nothing may use a venv before it is verified); the extra install links after its bytes
    and the venv, and is verified; the conversion needs the venv, the patch (its verification
    import) and the checkpoint; the trainer needs all. Everything else (unpacking while
    downloading, statistics, cheap checks) is taken to overlap."""
    bw = rate * MB
    sync, extra, ckpt = payload["uv-sync"], payload["extra"], payload["ckpt"]
    everything = sum(payload.values()) / bw
    venv = sync / bw + cpu["venv"] + cpu["verify"]
    extra_done = max(venv, (sync + extra) / bw) + cpu["extra"] + cpu["verify_extra"]
    convert_done = max(venv + cpu["patch"], (sync + ckpt) / bw) + cpu["convert"]
    ready = max(everything, extra_done, convert_done)
    return {"link": everything, "ready": ready, "limit": ready + cpu["launch"]}


def warm_limit(
    payload: dict[str, int],
    restore: dict[str, tuple[int, float]],
    rate: float,
    cpu: dict[str, float],
) -> dict[str, float]:
    """The earliest step 0 on a fresh box whose cache holds the round's archives: every
    archive and the uncached download the trainer needs (the data) cross the link; the
    checkpoint does not (only the cached conversion needs it: the box leaves it out,
    provision/agent/prune.py); a restore unpacks while it downloads (streamed), so each archive
    is ready after the longer of its transfer and its unpacking measured alone; the restored
    venv is verified like a synced one (`verify`, its imports) before anything uses it; the
    trainer needs all."""
    bw = rate * MB
    archives = sum(size for size, _ in restore.values())
    everything = (archives + payload["data"]) / bw
    chains = {step: max(size / bw, seconds) for step, (size, seconds) in restore.items()}
    if "uv-sync" in chains:
        chains["uv-sync"] += cpu["verify"]
    ready = max([everything, *chains.values()])
    return {"link": everything, "ready": ready, "limit": ready + cpu["launch"]}


# ------------------------------------------------------------------ one scenario on a fresh box


@dataclass
class Result:
    scenario: str
    step0_s: float  # from `up` starting to the trainer's step-0 line
    up_s: float  # until `up` returned
    start: float  # epoch time `up` started
    received: dict[str, int]
    steps: dict[str, dict[str, Any]]
    saved_after_s: float | None = None  # the cache's saves ended this long after `up` returned


def run_scenario(w: World, key: Path, scenario: str, round_no: int) -> Result:
    """`bootstrap up` of the bench playbook on a new box; the box is torn down afterwards.
    cold and warm share the round's cache root (cold fills it); serial runs without one."""
    box = start_box(w.work / "boxes" / f"{scenario}{round_no}", key, f"{scenario[:4]}{round_no}")
    cache_root = f"stepcache:round{round_no}" if w.cache_url and scenario != "serial" else None
    try:
        return _up_on(w, box, scenario, cache_root)
    finally:
        with contextlib.suppress(Exception):
            box.close()


def _up_on(w: World, box: Box, scenario: str, cache_root: str | None) -> Result:
    # Every box works in the same directory, as every rented box has /workspace: a restored
    # venv only works at the path it was made at (its scripts and pyvenv.cfg hold it).
    ws = w.work / "workspace"
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir()
    os.chown(ws, box_uid(box), -1)
    bashrc = f'export PATH="{Path(UV).parent}:$PATH"\n'
    if w.cache_url:  # the step cache's remote, defined in the environment (needs no file)
        bashrc += (
            "export RCLONE_CONFIG_STEPCACHE_TYPE=webdav RCLONE_CONFIG_STEPCACHE_VENDOR=other"
            f" RCLONE_CONFIG_STEPCACHE_URL={w.cache_url}\n"
        )
    (box.home / ".bashrc").write_text(bashrc)
    env = controller_env(w, box.name)
    project = Project(root=w.work / f"project-{box.name}", env=env)
    project.boxes = [box]
    book = yaml.safe_load(PLAYBOOK.read_text())
    if scenario == "serial":
        book["max_parallel"] = 1
    project.playbook(yaml.safe_dump(book, sort_keys=False), "shaped.yaml")
    project.host_vars = {
        "agent_python": sys.executable,  # has the agent kinds' libraries (see bench/README.md)
        "repo": str(ws / "openpi"),
        "data": str(ws / "data"),
        "models": str(ws / "models"),
        "convert_passes": CONVERT_PASSES,
        "uv_link_mode": w.link_mode,
        **w.urls,
        "cache_remote": cache_root,
    }
    project.secrets = {"GIT_TOKEN": {"value": TOKEN}}
    w.shaper.reset_counts()
    start = time.time()
    done = project.cli("up", box.name, "-p", "playbooks/shaped.yaml", timeout=900)
    up_s = time.time() - start
    if done.returncode != 0:
        raise harness.ToolFailed(
            f"bootstrap up ({scenario}) failed:\n{done.stdout[-4000:]}{done.stderr}"
        )
    step0 = time.time()
    saved = wait_for_saves(project, box) if cache_root else None
    received, _sent = w.shaper.counts()
    if w.logs:
        runs = box.home / ".bootstrap" / "runs"
        shutil.copytree(runs, w.logs / box.name, dirs_exist_ok=True)
    log = (ws / "openpi" / "logs" / "waypoint_ae_bench.log").read_text()
    found = STEP0.search(log)
    if not found:
        raise harness.ToolFailed(f"no step-0 line in the training log ({scenario})")
    return Result(
        scenario,
        _clock(found, start) - start,
        up_s,
        start,
        received,
        project.steps(box.name, "shaped.yaml"),
        None if saved is None else saved - step0,
    )


def controller_env(w: World, name: str) -> dict[str, str]:
    """The CLI's environment for one box: a config dir of its own (known hosts, what each box
    was given), but the bytecode and the built agent a user's controller already has after its
    first command (both shared by every box of the run), so no scenario pays compiling the CLI
    or building the agent zipapp (~0.5 s here) as a rented box's user never does."""
    env = harness.controller_env(w.work / name)
    env["PYTHONPYCACHEPREFIX"] = str(w.work / "pycache")
    # The CLI of this checkout, not whatever the editable install points at.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(harness.ROOT), env.get("PYTHONPATH")]))
    built = w.work / "controller-warm"
    if not (built / "agent-cache").is_dir():
        warm = dict(env, BOOTSTRAP_CONFIG_DIR=str(built))
        code = "from provision.bundle import build_agent; build_agent()"
        subprocess.run([sys.executable, "-c", code], env=warm, check=True)
        package = str(harness.ROOT / "provision")
        subprocess.run([sys.executable, "-m", "compileall", "-q", package], env=warm, check=True)
    mine = Path(env["BOOTSTRAP_CONFIG_DIR"]) / "agent-cache"
    shutil.copytree(built / "agent-cache", mine, dirs_exist_ok=True)
    return env


def box_uid(box: Box) -> int:
    import pwd

    return pwd.getpwnam(box.user).pw_uid


def wait_for_saves(project: Project, box: Box, timeout: float = 600) -> float:
    """Wait until no cached step of the box is still saving; returns when (epoch)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = project.steps(box.name, "shaped.yaml").values()
        states = [(s.get("cache") or {}).get("state") for s in steps if s.get("cache")]
        if all(state not in ("queued", "saving") for state in states):
            return time.time()
        time.sleep(0.5)
    raise harness.ToolFailed("the step cache was still saving after 10 minutes")


def _clock(found: re.Match[str], near: float) -> float:
    """The epoch time of a log line's HH:MM:SS.mmm stamp (local time, the day of `near`)."""
    day = datetime.datetime.fromtimestamp(near)
    hour, minute, second, ms = (int(g) for g in found.groups())
    stamp = day.replace(hour=hour, minute=minute, second=second, microsecond=ms * 1000)
    return stamp.timestamp()


# ------------------------------------------------------------------ report


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _timeline(result: Result) -> None:
    steps = [s for s in result.steps.values() if s.get("started") and s.get("ended")]
    if not steps:
        return
    t0 = min(s["started"] for s in steps)
    print(
        f"  profile of one {result.scenario} run (seconds from the first step's start, which"
        f" came {t0 - result.start:.2f} s after `up` started):"
    )
    for s in sorted(steps, key=lambda s: s["started"]):
        print(f"    {s['id']:<16} {s['started'] - t0:7.2f} -> {s['ended'] - t0:7.2f}"
              f"  ({s['ended'] - s['started']:6.2f} s)  {s['status']}")  # fmt: skip


def report(rounds: list[Round], payload: dict[str, int], rate: float, loads: list[str]) -> None:
    """Print the figures: medians over the rounds, each ratio taken within its round."""
    total = sum(payload.values())
    print(
        f"\n== time to step 0 on a shaped network ({rate:g} MB/s for the box, {len(rounds)} rounds;"
        f" load average {loads[0]} at the start, {loads[-1]} at the end)"
    )
    print(
        "  bytes that must cross the link: "
        + ", ".join(f"{k} {v / MB:.0f} MB" for k, v in payload.items())
        + f"; {total / MB:.0f} MB = {total / rate / MB:.1f} s at {rate:g} MB/s"
    )
    for name in CPU_LABELS:
        values = [r.cpu[name] for r in rounds]
        print(f"  CPU alone, {CPU_LABELS[name]:<44} {_spread(values)}")
    limits = [cold_limit(payload, rate, r.cpu)["limit"] for r in rounds]
    print(f"  cold limit (bytes / bandwidth + the CPU after them)  {_spread(limits)}")
    warm_rounds = [r for r in rounds if r.restore and "warm" in r.results]
    warm_limits = [warm_limit(payload, r.restore, rate, r.cpu)["limit"] for r in warm_rounds]
    for step in sorted({s for r in warm_rounds for s in r.restore}):
        sizes = [r.restore[step][0] / MB for r in warm_rounds if step in r.restore]
        unpack = [r.restore[step][1] for r in warm_rounds if step in r.restore]
        print(
            f"  cache archive of {step:<12} {statistics.median(sizes):6.0f} MB, unpacked alone in"
            f" {_spread(unpack)}"
        )
    if warm_limits:
        print(f"  warm limit (archives + uncached bytes, unpacking)    {_spread(warm_limits)}")
    print(
        f"  {'scenario':<34} {'step 0: median (min-max)':>26} {'up returned':>12} {'received':>10}"
    )
    scenarios = [name for name in LABELS if any(name in r.results for r in rounds)]
    for name in scenarios:
        runs = [r.results[name] for r in rounds if name in r.results]
        ups = statistics.median(x.up_s for x in runs)
        got = statistics.median(sum(x.received.values()) for x in runs) / MB
        print(
            f"  {LABELS[name]:<34} {_spread([x.step0_s for x in runs]):>26}"
            f" {ups:10.1f} s {got:7.0f} MB"
        )
    ratios = {
        "cold / its limit": (
            [r.results["cold"].step0_s / limit for r, limit in zip(rounds, limits, strict=True)],
            1.15,
        ),
        "serial (by hand) / cold": (
            [
                r.results["serial"].step0_s / r.results["cold"].step0_s
                for r in rounds
                if "serial" in r.results
            ],
            None,
        ),
        "warm / its limit": (
            [
                r.results["warm"].step0_s / lim
                for r, lim in zip(warm_rounds, warm_limits, strict=True)
            ],
            1.15,
        ),
        "warm / cold": (
            [
                r.results["warm"].step0_s / r.results["cold"].step0_s
                for r in rounds
                if "warm" in r.results
            ],
            0.35,
        ),
    }
    for label, (values, goal) in ratios.items():
        if not values:
            continue
        median = statistics.median(values)
        verdict = (
            "" if goal is None else f"  goal <= {goal}: {'MET' if median <= goal else 'MISSED'}"
        )
        spread = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {label:<26} {median:5.2f}x (rounds: {spread}){verdict}")
    for name in ("cold", "warm"):
        runs = [r.results[name] for r in rounds if name in r.results]
        if runs:
            _timeline(sorted(runs, key=lambda x: x.step0_s)[len(runs) // 2])
    for name in scenarios:
        runs = [r.results[name] for r in rounds if name in r.results]
        got: dict[str, float] = {}
        for x in runs:
            for k, v in x.received.items():
                got[k] = got.get(k, 0) + v / len(runs)
        per = ", ".join(f"{k} {v / MB:.1f} MB" for k, v in sorted(got.items()))
        print(f"  received per service, {name}: {per}")


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f} s ({min(values):.1f} - {max(values):.1f})"


LABELS = {
    "cold": "cold (fresh box, empty cache)",
    "warm": "warm (fresh box, cache filled)",
    "serial": "serial: one step at a time",
}
CPU_LABELS = {
    "venv": "uv sync into a fresh venv, warm uv cache",
    "verify": "the venv's verification imports",
    "patch": "the patch's verification import",
    "extra": "the extra install, warm uv cache",
    "verify_extra": "the extra's verification imports",
    "convert": "the conversion",
    "launch": "the trainer, start to step 0",
}


@dataclass
class Round:
    cpu: dict[str, float]
    results: dict[str, Result] = field(default_factory=dict)
    restore: dict[str, tuple[int, float]] = field(default_factory=dict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=40.0, help="MB/s towards the box")
    parser.add_argument("--runs", type=int, default=3, help="rounds (each: cold, warm, serial)")
    parser.add_argument("--no-serial", action="store_true", help="skip the serial baseline")
    parser.add_argument(
        "--link-mode", default="copy", choices=("copy", "hardlink"), help="UV_LINK_MODE on the box"
    )
    parser.add_argument("--logs", type=Path, help="copy each box's run directory here")
    args = parser.parse_args()
    scenarios = ["cold", "warm"] if playbook_caches() else ["cold"]
    scenarios += [] if args.no_serial else ["serial"]
    with harness.workspace() as work, world(work, args.rate) as w:
        key = make_key(work / "id_ed25519")
        w.logs = args.logs
        w.link_mode = args.link_mode
        loads = [_load()]
        parts = CpuParts(w, args.link_mode)
        rounds: list[Round] = []
        for i in range(args.runs):
            rounds.append(Round(cpu=parts.measure()))
            # cold fills the cache warm reads: it always comes first of the two
            paired = [x for x in scenarios if x != "serial"]
            order = (
                scenarios if i % 2 == 0 or len(paired) == len(scenarios) else ["serial", *paired]
            )
            for scenario in order:
                result = run_scenario(w, key, scenario, i)
                rounds[-1].results[scenario] = result
                if scenario == "cold" and w.cache_dir and w.cache_url:
                    rounds[-1].restore = restore_cpu(w.cache_dir, f"round{i}", work / "unpack")
                print(
                    f"  round {i + 1} {scenario}: step 0 at {result.step0_s:.1f} s"
                    f" (load {_load()})",
                    flush=True,
                )
            loads.append(_load())
        report(rounds, w.payload, args.rate, loads)


if __name__ == "__main__":
    try:
        main()
    except harness.ToolFailed as exc:
        raise SystemExit(f"a tool failed: {exc}") from None
