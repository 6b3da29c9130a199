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
from gcs_emulator import EmulatorProcess, pi05_like, upload
from githttp import serve_git
from project import Project
from shaper import Shaper, shaped

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
    with (
        shaped(rate * MB) as shaper,
        pyindex.serve_dir(index) as index_port,
        pyindex.serve_dir(drive) as drive_port,
        serve_git(git_root, "x-access-token", TOKEN) as git,
    ):
        try:
            upload(gcs.endpoint, "openpi-assets", objects)
            git_port = int(git.url.rsplit(":", 1)[1])
            urls = {
                "index_url": f"http://127.0.0.1:{shaper.front(index_port, 'index')}/simple",
                "git_url": f"http://127.0.0.1:{shaper.front(git_port, 'git')}/openpi.git",
                "rclone_url": f"http://127.0.0.1:{shaper.front(drive_port, 'rclone')}/",
                "gcs_endpoint": f"http://127.0.0.1:{shaper.front(gcs.port, 'gcs')}",
            }
            shaper.set_rate(0)  # the lock's metadata requests are setup, not the box's
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
            yield World(shaper, rate * MB, work, urls, payload, objects)
        finally:
            gcs.stop()


def _is_extra(wheel: str) -> bool:
    names = {pyindex.normalise(req.split("==")[0]) for req in pyindex.EXTRA_WHEELS}
    return pyindex.normalise(wheel.split("-", 1)[0]) in names | {"polars-runtime-32"}


# ------------------------------------------------------------------ the CPU parts, measured alone


def cpu_parts(w: World) -> dict[str, float]:
    """Seconds of the CPU work that follows the bytes, each measured alone on this machine:
    uv linking the venv from a warm cache (copy mode, as on the box), the extra install from a
    warm cache, the conversion, and the trainer from its start to step 0."""
    scratch = w.work / "cpu"
    scratch.mkdir()
    env = {
        **shaped_repo.uv_env(),
        "UV_CACHE_DIR": str(scratch / "uv-cache"),
        "UV_LINK_MODE": "copy",
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_INDEX_URL": w.urls["index_url"],
    }
    repo = scratch / "openpi"
    subprocess.run(
        ["git", "clone", "-q", str(w.work / "git" / "openpi.git"), str(repo)], check=True
    )
    w.shaper.set_rate(0)
    try:
        sync = [UV, "sync", "--locked", "--python", "/usr/bin/python3.11"]
        extra = [UV, "pip", "install", "--python", ".venv/bin/python", *pyindex.EXTRA_WHEELS]
        harness.check(_timed(sync, repo, env)[1], "uv sync (filling the cache)")
        harness.check(_timed(extra, repo, env)[1], "uv pip install (filling the cache)")
        shutil.rmtree(repo / ".venv")
        venv_s, done = _timed(sync, repo, env)
        harness.check(done, "uv sync from a warm cache")
        extra_s, done = _timed(extra, repo, env)
        harness.check(done, "uv pip install from a warm cache")
    finally:
        w.shaper.set_rate(w.rate)
    ckpt = scratch / "pi05_base"
    for name, content in w.ckpt_objects.items():
        path = ckpt / name.split("pi05_base/", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    python = str(repo / ".venv" / "bin" / "python")
    convert = [python, "examples/convert_jax_model_to_pytorch.py", "--checkpoint_dir", str(ckpt),
               "--config_name", "pi05_libero", "--output_path", str(scratch / "model"),
               "--passes", str(CONVERT_PASSES)]  # fmt: skip
    convert_s, done = _timed(convert, repo, env)
    harness.check(done, "the conversion stand-in")
    stats = scratch / "stats.json"
    stats.write_text("{}")
    return {
        "venv": venv_s,
        "extra": extra_s,
        "convert": convert_s,
        "launch": _until_step0(python, repo, scratch / "model" / "model.safetensors", stats),
    }


CONVERT_PASSES = 4


def _timed(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, Any]:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, done


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
    last wheel arrived (uv links after downloading); the extra install links after its bytes
    and the venv; the conversion needs the venv and the checkpoint; the trainer needs all.
    Everything else (unpacking while downloading, statistics, checks) is taken to overlap."""
    bw = rate * MB
    sync, extra, ckpt = payload["uv-sync"], payload["extra"], payload["ckpt"]
    everything = sum(payload.values()) / bw
    venv = sync / bw + cpu["venv"]
    extra_done = max(venv, (sync + extra) / bw) + cpu["extra"]
    convert_done = max(venv, (sync + ckpt) / bw) + cpu["convert"]
    ready = max(everything, extra_done, convert_done)
    return {"link": everything, "ready": ready, "limit": ready + cpu["launch"]}


# ------------------------------------------------------------------ one scenario on a fresh box


@dataclass
class Result:
    scenario: str
    step0_s: float  # from `up` starting to the trainer's step-0 line
    up_s: float  # until `up` returned
    received: dict[str, int]
    steps: dict[str, dict[str, Any]]


def run_scenario(w: World, key: Path, scenario: str, round_no: int) -> Result:
    """`bootstrap up` of the bench playbook on a new box; the box is torn down afterwards."""
    box = start_box(w.work / "boxes" / f"{scenario}{round_no}", key, f"{scenario[:4]}{round_no}")
    try:
        return _up_on(w, box, scenario)
    finally:
        with contextlib.suppress(Exception):
            box.close()


def _up_on(w: World, box: Box, scenario: str) -> Result:
    (box.home / ".bashrc").write_text(f'export PATH="{Path(UV).parent}:$PATH"\n')
    project = Project(
        root=w.work / f"project-{box.name}", env=harness.controller_env(w.work / box.name)
    )
    project.boxes = [box]
    book = yaml.safe_load(PLAYBOOK.read_text())
    if scenario == "serial":
        book["max_parallel"] = 1
    project.playbook(yaml.safe_dump(book, sort_keys=False), "shaped.yaml")
    ws = box.home / "workspace"
    project.host_vars = {
        "agent_python": sys.executable,  # has the agent kinds' libraries (see bench/README.md)
        "repo": str(ws / "openpi"),
        "data": str(ws / "data"),
        "models": str(ws / "models"),
        "convert_passes": CONVERT_PASSES,
        **w.urls,
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
    received, _sent = w.shaper.counts()
    log = (ws / "openpi" / "logs" / "waypoint_ae_bench.log").read_text()
    found = STEP0.search(log)
    if not found:
        raise harness.ToolFailed(f"no step-0 line in the training log ({scenario})")
    return Result(
        scenario,
        _clock(found, start) - start,
        up_s,
        received,
        project.steps(box.name, "shaped.yaml"),
    )


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
    print(f"  profile of one {result.scenario} run (seconds from the first step's start):")
    for s in sorted(steps, key=lambda s: s["started"]):
        print(f"    {s['id']:<16} {s['started'] - t0:7.2f} -> {s['ended'] - t0:7.2f}"
              f"  ({s['ended'] - s['started']:6.2f} s)  {s['status']}")  # fmt: skip


def report(results: list[Result], payload: dict[str, int], rate: float, cpu: dict[str, float],
           loads: list[str]) -> None:  # fmt: skip
    by: dict[str, list[Result]] = {}
    for r in results:
        by.setdefault(r.scenario, []).append(r)
    limit = cold_limit(payload, rate, cpu)
    total = sum(payload.values())
    print(f"\n== time to step 0 on a shaped network ({rate:g} MB/s for the box, "
          f"{len(by.get('cold', []))} rounds; load average {', '.join(loads)})")  # fmt: skip
    print("  bytes that must cross the link: "
          + ", ".join(f"{k} {v / MB:.0f} MB" for k, v in payload.items())
          + f"; {total / MB:.0f} MB = {total / rate / MB:.1f} s at {rate:g} MB/s")  # fmt: skip
    print("  CPU parts alone (same run): " + ", ".join(f"{k} {v:.2f} s" for k, v in cpu.items()))
    print(
        f"  cold limit: {limit['limit']:.1f} s (all bytes {limit['link']:.1f} s; everything the"
        f" trainer needs ready at {limit['ready']:.1f} s; + launch to step 0 {cpu['launch']:.1f} s)"
    )
    medians = {k: statistics.median(r.step0_s for r in v) for k, v in by.items()}
    print(
        f"  {'scenario':<28} {'step 0, median (min-max)':>28} {'up returned':>12} {'received':>10}"
    )
    for name, runs in by.items():
        s0 = [r.step0_s for r in runs]
        ups = statistics.median(r.up_s for r in runs)
        got = statistics.median(sum(r.received.values()) for r in runs) / MB
        print(f"  {LABELS[name]:<28} {medians[name]:9.1f} s ({min(s0):.1f} - {max(s0):.1f})"
              f"{ups:11.1f} s {got:8.0f} MB")  # fmt: skip
    cold = medians.get("cold")
    if cold:
        ratio = cold / limit["limit"]
        print(
            f"  cold / its limit            {ratio:6.2f}x  (goal <= 1.15: {'MET' if ratio <= 1.15 else 'MISSED'})"
        )
    if cold and "serial" in medians:
        print(f"  serial (by hand) / cold     {medians['serial'] / cold:6.2f}x  (the DAG's gain)")
    if cold and "warm" in medians:
        warm = medians["warm"]
        print(
            f"  warm / cold                 {warm / cold:6.2f}x  (goal <= 0.35: {'MET' if warm / cold <= 0.35 else 'MISSED'})"
        )
    for name in ("cold", "warm"):
        if by.get(name):
            _timeline(sorted(by[name], key=lambda r: r.step0_s)[len(by[name]) // 2])
    for name, runs in by.items():
        got: dict[str, int] = {}
        for r in runs:
            for k, v in r.received.items():
                got[k] = got.get(k, 0) + v // len(runs)
        print(
            f"  received per service, {name}: "
            + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in sorted(got.items()))
        )


LABELS = {"cold": "cold (fresh box, no cache)", "warm": "warm (cache filled by cold)",
          "serial": "serial, one step at a time"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=40.0, help="MB/s towards the box")
    parser.add_argument("--runs", type=int, default=3, help="rounds (each: cold, warm, serial)")
    parser.add_argument("--no-serial", action="store_true", help="skip the serial baseline")
    args = parser.parse_args()
    scenarios = ["cold"] + ([] if args.no_serial else ["serial"])
    with harness.workspace() as work, world(work, args.rate) as w:
        key = make_key(work / "id_ed25519")
        loads = [_load()]
        cpu = cpu_parts(w)
        results: list[Result] = []
        for i in range(args.runs):
            order = scenarios if i % 2 == 0 else scenarios[::-1]
            for scenario in order:
                results.append(run_scenario(w, key, scenario, i))
                print(f"  round {i + 1} {scenario}: step 0 at {results[-1].step0_s:.1f} s "
                      f"(load {_load()})", flush=True)  # fmt: skip
                loads.append(_load())
        report(results, w.payload, args.rate, cpu, [loads[0], loads[-1]])


if __name__ == "__main__":
    try:
        main()
    except harness.ToolFailed as exc:
        raise SystemExit(f"a tool failed: {exc}") from None
