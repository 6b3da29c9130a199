"""Checkpoints leave the box: the `checkpoints:` block, the uploader and the guard.

Real rclone (a `type = local` remote, `rclone serve` read-only), the real GCS emulator and the
stand-in trainer writing checkpoints as openpi's fork does (provision/data/fake_trainer.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from ckpt_remotes import (
    manifest,
    no_process_outlives,
    processes_of,
    rclone_config,
    reap,
    serve,
    train,
    trainer_command,
)
from gcs_emulator import EmulatorProcess, client
from project import one_line_error, wait_for

from provision.checkpoints import local
from provision.checkpoints.remote import Remote
from provision.checkpoints.spec import CheckpointSpec, parse_checkpoints
from provision.checkpoints.upload import Uploader, read_status
from provision.steps.base import ParamError, StepContext, validate_params
from provision.steps.tmux_launch import KIND as TMUX_LAUNCH
from provision.watch import guard
from provision.watch.record import read_watch

FORK = {"dir": "ck", "step": r"(\d+)", "complete": "metadata.pt"}


@pytest.fixture(autouse=True)
def _no_process_outlives_the_test(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """Guards, their rclone and trainers a test started end with it, whatever happened."""
    with no_process_outlives(request, tmp_path):
        yield


def make(tmp_path: Path, **extra: object) -> tuple[CheckpointSpec, dict[str, str], Path]:
    """A spec with a local rclone remote `store:` rooted at tmp_path/remote."""
    conf = rclone_config(tmp_path / "rclone.conf", store={"type": "local"})
    raw = {**FORK, "remote": f"store:{tmp_path / 'remote'}", "rclone_config": str(conf)}
    raw.update(extra)
    return parse_checkpoints(raw), dict(os.environ), tmp_path / "remote"


def uploader(spec: CheckpointSpec, env: dict[str, str], cwd: Path, lines: list[str]) -> Uploader:
    work = cwd / "step"
    work.mkdir(exist_ok=True)
    remote = Remote(spec, env) if spec.remote else None
    return Uploader(spec, cwd, work, remote, lines.append)


# ---- the block, at load ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"dir": "ck", "step": "(\\d+"}, "checkpoints.step", "not a valid regex"),
        ({"dir": "ck", "step": "\\d+"}, "checkpoints.step", "needs a group"),
        ({"dir": "ck", "keep": 0}, "checkpoints.keep", ">= 1"),
        (
            {"dir": "ck", "remote": "s3://b/x"},
            "checkpoints.remote",
            "unknown remote scheme 's3://'",
        ),
        ({"dir": "ck", "remote": "just/a/path"}, "checkpoints.remote", "neither an rclone remote"),
        ({"dir": "ck", "restore": True}, "checkpoints.restore", "needs a 'remote'"),
        ({"dir": "/abs"}, "checkpoints.dir", "inside cwd"),
        ({"dir": "ck", "kep": 2}, "checkpoints.kep", "unknown key 'kep'"),
        ({"dir": "ck", "bwlimit": "fast"}, "checkpoints.bwlimit", "--bwlimit"),
    ],
)
def test_bad_blocks_are_refused(raw: dict, key: str, fragment: str) -> None:
    with pytest.raises(ParamError) as err:
        parse_checkpoints(raw)
    assert err.value.key == key
    assert fragment in str(err.value)


@pytest.mark.slow
def test_bad_block_in_a_playbook_is_one_line_with_file_line_and_step(
    tmp_path: Path, controller_env: dict[str, str]
) -> None:
    book = tmp_path / "pb.yaml"
    book.write_text(
        textwrap.dedent(
            """\
            name: t
            steps:
              - id: train
                kind: tmux_launch
                session: s
                command: python3 train.py
                checkpoints:
                  dir: ck
                  step: '(\\d+'
                  keep: 2
            """
        )
    )
    for bad, line in (("step: '(\\d+'", 9), ("keep: 0", 10), ("remote: s3://b/p", 10)):
        text = book.read_text().replace("step: '(\\d+'", "step: '(\\d+)'")
        text = text.replace("keep: 2", bad) if "step" not in bad else book.read_text()
        (tmp_path / "bad.yaml").write_text(text)
        result = subprocess.run(
            ["bootstrap", "plan", "local", "-p", str(tmp_path / "bad.yaml")],
            env=controller_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        error = one_line_error(result)
        assert f"bad.yaml:{line}: step 'train':" in error, error


def test_step_regex_matches_whole_names_so_tmp_dirs_are_not_checkpoints(tmp_path: Path) -> None:
    spec = parse_checkpoints({"dir": "ck", "step": r"(\d+)$"})
    assert spec.step_of("tmp_50") is None
    assert spec.step_of("50") == 50


# ---- the uploader ----------------------------------------------------------------------------


@pytest.mark.slow
def test_complete_checkpoints_are_uploaded_verified_recorded_then_pruned(tmp_path: Path) -> None:
    spec, env, root = make(tmp_path, keep=1, carry=["ck/wandb_run_id.txt"])
    train(tmp_path, 30, 10)
    # A checkpoint being written: the fork's tmp_N (marker and all) and an N without its marker.
    (tmp_path / "ck" / "tmp_40").mkdir()
    (tmp_path / "ck" / "tmp_40" / "metadata.pt").write_text("{}")
    (tmp_path / "ck" / "35").mkdir()
    (tmp_path / "ck" / "35" / "model.safetensors").write_bytes(b"half")
    lines: list[str] = []
    report = uploader(spec, env, tmp_path, lines).sync()
    assert report.error is None, lines
    assert report.uploaded == ["10", "20", "30"]
    entries = manifest(root)
    assert sorted(entries) == ["10", "20", "30"]
    assert sorted(p.name for p in root.iterdir()) == [".bootstrap", "10", "20", "30"]
    for name, entry in entries.items():
        assert set(entry["files"]) == {"metadata.pt", "model.safetensors", "optimizer.pt"}
        size = (root / name / "model.safetensors").stat().st_size
        assert entry["files"]["model.safetensors"]["size"] == size == 4096
        assert entry["files"]["model.safetensors"]["hashes"]["md5"]
        assert entry["carry"]["ck/wandb_run_id.txt"]["size"] == 8
    carried = root / ".bootstrap" / "carry" / "30" / "ck" / "wandb_run_id.txt"
    assert carried.read_text() == (tmp_path / "ck" / "wandb_run_id.txt").read_text()
    # keep: 1 leaves the newest complete one, and the ones being written.
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "30", "35", "tmp_40", "wandb_run_id.txt"
    ]  # fmt: skip
    assert report.deleted == ["10", "20"]


@pytest.mark.slow
def test_a_second_pass_sends_nothing(tmp_path: Path) -> None:
    spec, env, root = make(tmp_path)
    train(tmp_path, 20, 10)
    up = uploader(spec, env, tmp_path, [])
    assert up.sync().uploaded == ["10", "20"]
    stamps = {p: p.stat().st_ctime_ns for p in root.rglob("*") if p.is_file()}
    fresh = uploader(spec, env, tmp_path, [])  # a new process: knows only the manifest
    assert fresh.sync().uploaded == []
    assert {p: p.stat().st_ctime_ns for p in root.rglob("*") if p.is_file()} == stamps


@pytest.mark.slow
def test_a_manifest_entry_torn_by_a_kill_is_verified_again_not_sent_again(tmp_path: Path) -> None:
    spec, env, root = make(tmp_path)
    train(tmp_path, 20, 10)
    assert uploader(spec, env, tmp_path, []).sync().uploaded == ["10", "20"]
    # Killed while writing 20's entry (the local backend writes in place): half a JSON line.
    entry = root / ".bootstrap" / "manifest" / "20.json"
    entry.write_text(entry.read_text()[:40])
    stamps = {p: p.stat().st_ctime_ns for p in (root / "20").iterdir()}
    fresh = uploader(spec, env, tmp_path, [])
    assert fresh.sync().uploaded == ["20"]  # not restorable until verified again
    assert {p: p.stat().st_ctime_ns for p in (root / "20").iterdir()} == stamps  # not resent
    recorded = json.loads(entry.read_text())["files"]
    assert {k: v["size"] for k, v in recorded.items()} == local.files(tmp_path / "ck" / "20")
    assert sorted(Remote(spec, env).entries()) == ["10", "20"]


@pytest.mark.slow
def test_the_box_is_hashed_by_the_sync_and_skipped_files_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, env, root = make(tmp_path)
    train(tmp_path, 20, 10)
    hashed: list[list[str]] = []
    real = Remote.local_listings

    def local_listings(self: Remote, parent: Path, names: list[str]) -> dict:
        hashed.append(names)
        return real(self, parent, names)

    monkeypatch.setattr(Remote, "local_listings", local_listings)

    def recorded_md5s_are_the_files() -> None:
        for name, entry in manifest(root).items():
            for rel, info in entry["files"].items():
                data = (tmp_path / "ck" / name / rel).read_bytes()
                assert info["hashes"]["md5"] == hashlib.md5(data).hexdigest(), (name, rel)

    assert uploader(spec, env, tmp_path, []).sync().uploaded == ["10", "20"]
    assert hashed == []  # no second pass over the box's files: rclone's checks gave them
    recorded_md5s_are_the_files()
    # A pass killed after its sync, before the manifest: the files are there, unrecorded; the
    # next sync skips them (no check, no hash from it), so they are hashed here.
    shutil.rmtree(root / ".bootstrap")
    assert uploader(spec, env, tmp_path, []).sync().uploaded == ["10", "20"]
    assert hashed == [["10", "20"]]
    recorded_md5s_are_the_files()


@pytest.mark.slow
def test_nothing_is_deleted_before_it_is_on_the_remote(tmp_path: Path) -> None:
    spec, env, _root = make(tmp_path, keep=1, remote="nosuch:runs")
    train(tmp_path, 30, 10)
    report = uploader(spec, env, tmp_path, []).sync()
    assert report.error
    assert [c.name for c in local.complete(tmp_path / "ck", spec)] == ["10", "20", "30"]
    assert report.pending == ["10", "20", "30"]


class _Killed(BaseException):
    """The uploader's process dying (kill -9) at the point a test chooses."""


@pytest.mark.slow
def test_a_pass_killed_while_pruning_leaves_the_remote_copy_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, env, root = make(tmp_path, keep=1)
    train(tmp_path, 30, 10)
    box = tmp_path / "ck"
    sent = {p.relative_to(box): p.read_bytes() for p in box.rglob("*") if p.is_file()}
    real = shutil.rmtree

    def dies_after_one_file(path: str | Path, ignore_errors: bool = False) -> None:
        if not (Path(path) / "metadata.pt").is_file():
            real(path, ignore_errors=ignore_errors)  # not a checkpoint (the manifest's scratch)
            return
        # What rmtree leaves when the process dies after its first unlink: the marker still
        # there (os.walk's order), a data file gone.
        (Path(path) / "model.safetensors").unlink()
        raise _Killed

    monkeypatch.setattr(shutil, "rmtree", dies_after_one_file)
    with pytest.raises(_Killed):
        uploader(spec, env, tmp_path, []).sync()  # uploaded, recorded, then pruning 10
    monkeypatch.undo()
    recorded = manifest(root)
    assert sorted(recorded) == ["10", "20", "30"]
    report = uploader(spec, env, tmp_path, []).sync()  # the guard started again
    assert report.error is None and report.uploaded == []
    assert manifest(root) == recorded  # no entry rewritten over fewer files
    for rel, data in sent.items():
        if rel.parts[0] != "wandb_run_id.txt":
            assert (root / rel).read_bytes() == data, rel  # the remote's copies are whole
    assert [c.name for c in local.complete(box, spec)] == ["30"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ck")) == []


def test_keep_without_a_remote_rotates(tmp_path: Path) -> None:
    spec = parse_checkpoints({**FORK, "keep": 2})
    train(tmp_path, 40, 10)
    report = uploader(spec, {}, tmp_path, []).sync()
    assert report.deleted == ["10", "20"]


@pytest.mark.slow
def test_a_remote_that_rejects_writes_is_reported_and_loses_nothing(tmp_path: Path) -> None:
    (tmp_path / "served").mkdir()
    with serve("webdav", tmp_path / "served", "--read-only") as url:
        conf = rclone_config(tmp_path / "rclone.conf", ro={"type": "webdav", "url": url})
        spec = parse_checkpoints(
            {**FORK, "keep": 1, "remote": "ro:runs", "rclone_config": str(conf)}
        )
        train(tmp_path, 20, 10)
        up = uploader(spec, dict(os.environ), tmp_path, [])
        first, second = up.sync(), up.sync()
    assert first.error and second.error
    status = read_status(tmp_path / "step")
    assert status["failing"]["attempts"] == 2
    assert status["pending"] == ["10", "20"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["10", "20", "wandb_run_id.txt"]
    assert list((tmp_path / "served").iterdir()) == []


@pytest.mark.slow
def test_gs_remote_on_the_emulator(tmp_path: Path) -> None:
    emulator = EmulatorProcess()
    try:
        client(emulator.endpoint).create_bucket("ckpts")
        env = {**os.environ, "STORAGE_EMULATOR_HOST": emulator.endpoint}
        spec = parse_checkpoints({**FORK, "keep": 1, "remote": "gs://ckpts/runs/ae"})
        train(tmp_path, 20, 10)
        report = uploader(spec, env, tmp_path, []).sync()
        assert report.error is None
        names = sorted(b.name for b in client(emulator.endpoint).list_blobs("ckpts"))
        assert "runs/ae/20/model.safetensors" in names
        assert "runs/ae/.bootstrap/manifest/20.json" in names
        assert sorted(Remote(spec, env).entries()) == ["10", "20"]
    finally:
        emulator.stop()


# ---- the guard -------------------------------------------------------------------------------


def _guard_config(tmp_path: Path, spec: CheckpointSpec, launch: str = "abc123") -> dict:
    return {"launch_id": launch, "cwd": str(tmp_path), "checkpoints": spec.to_dict()}


def _done_files(root: Path, box: Path) -> dict[Path, int]:
    """The remote's files that rclone finished (the box's size and modification time, to
    the nanosecond: rclone sets it once the file is written, and a file written within the
    second its source was has the same whole-second mtime before that, which a later sync
    then sets, changing the ctime): a later sync skips those, so their ctime stays;
    {path: ctime}."""
    done = {}
    for path in root.rglob("*"):
        if not path.is_file() or ".bootstrap" in path.parts:
            continue
        mine = box / path.relative_to(root)
        if mine.is_file():
            theirs, ours = path.stat(), mine.stat()
            if theirs.st_size == ours.st_size and theirs.st_mtime_ns == ours.st_mtime_ns:
                done[path] = theirs.st_ctime_ns
    return done


def _started_guard(
    tmp_path: Path, bwlimit: str, steps: int, ckpt_bytes: int
) -> tuple[dict[str, str], Path, Path, int]:
    """Checkpoints of `ckpt_bytes` every 10 of `steps` steps, and a guard uploading them at
    `bwlimit` (slow enough to be caught mid-pass); (env, remote root, step dir, guard pid)."""
    spec, env, root = make(tmp_path, bwlimit=bwlimit, poll=1)
    train(tmp_path, steps, 10, "--ckpt-bytes", str(ckpt_bytes))
    work = tmp_path / "step"
    work.mkdir()
    return env, root, work, guard.start(work, _guard_config(tmp_path, spec), env)


@pytest.mark.slow
def test_kill_9_mid_upload_loses_nothing_and_sends_nothing_twice(tmp_path: Path) -> None:
    env, root, work, pid = _started_guard(tmp_path, "2M", 30, 3 << 20)
    box = tmp_path / "ck"
    wait_for(lambda: _done_files(root, box), timeout=60, what="a first file sent")
    # The guard and its rclone (its session) die mid-pass, before anything is recorded.
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: guard.guard_pid(work) is None, timeout=10, what="the guard dead")
    assert manifest(root) == {}  # partial on the remote: nothing recorded
    done = _done_files(root, box)
    assert done and len(done) < sum(1 for p in box.rglob("*") if p.is_file()) - 1
    assert guard.revive(work, env) is not None
    wait_for(lambda: manifest(root).keys() == {"10", "20", "30"}, timeout=90, what="all three")
    assert {p: p.stat().st_ctime_ns for p in done} == done  # not sent again
    for name in ("10", "20", "30"):
        for path in (box / name).iterdir():
            assert (root / name / path.name).read_bytes() == path.read_bytes()
    (work / "job.status").write_text("0 abc123\n")
    wait_for(lambda: guard.guard_pid(work) is None, timeout=30, what="guard ends after the job")
    assert (work / guard.DONE_FILE).exists()
    assert guard.revive(work, env) is None  # ended for good


@pytest.mark.slow
def test_guard_outlives_the_process_group_that_started_it(tmp_path: Path) -> None:
    spec, env, root = make(tmp_path, poll=1)
    work = tmp_path / "step"
    work.mkdir()
    script = (
        "import sys; sys.path.insert(0, %r); from pathlib import Path;"
        "from provision.watch import guard; import json;"
        "print(guard.start(Path(%r), json.loads(%r), {}))"
    )
    code = script % (
        str(Path(guard.__file__).parents[2]),
        str(work),
        json.dumps(_guard_config(tmp_path, spec)),
    )
    starter = subprocess.Popen(
        ["python3", "-c", code], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    out, _ = starter.communicate(timeout=30)
    pid = int(out.split()[-1])
    with pytest.raises(ProcessLookupError):
        os.killpg(starter.pid, signal.SIGKILL)  # the starter's group is gone with it
    assert os.getpgid(pid) != starter.pid
    assert guard.guard_pid(work) == pid
    # The lowest CPU weight: its own nice, and its session's autogroup (else the scheduler
    # gives the guard's session as much CPU as the training's).
    assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16]) == 19
    if Path("/proc/self/autogroup").exists():
        assert Path(f"/proc/{pid}/autogroup").read_text().split()[-1] == "19"
    # And the CPU only when nothing else wants it (a CPU running it counts as idle).
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    train(tmp_path, 10, 10)
    wait_for(lambda: "10" in manifest(root), timeout=30, what="upload by the detached guard")
    guard.stop(work)
    assert guard.guard_pid(work) is None


@pytest.mark.slow
def test_tmux_launch_starts_a_guard_that_outlives_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOOTSTRAP_AGENT_DIR", str(tmp_path / "agent"))  # its own GPU leases
    spec, env, root = make(tmp_path, poll=1, keep=1)
    folder = Path(tempfile.mkdtemp(prefix="tmx", dir="/tmp"))
    socket = str(folder / "tmux")
    try:
        command = trainer_command("ck", 10, 1000, "--step-sleep", "0.05")
        params = {"session": "train", "socket": socket, "cwd": str(tmp_path), "command": command,
                  "checkpoints": spec.to_dict() | {"carry": []}}  # fmt: skip
        ctx = StepContext(
            step_id="train",
            params=validate_params(TMUX_LAUNCH, params),
            run_dir=tmp_path / "run",
            env=env,
            out=io.StringIO(),
        )
        TMUX_LAUNCH.run(ctx)
        wait_for(lambda: len(manifest(root)) >= 2, timeout=60, what="two checkpoints uploaded")
        pid = guard.guard_pid(ctx.workdir)
        assert pid is not None
        subprocess.run(["tmux", "-S", socket, "kill-server"], check=True)
        wait_for(lambda: guard.guard_pid(ctx.workdir) is None, timeout=60, what="guard ends")
        on_box = [c.name for c in local.complete(tmp_path / "ck", spec)]
        assert on_box and set(on_box) <= set(manifest(root))  # the last one went up too
        watch = read_watch(ctx.workdir)
        assert watch is not None and watch["state"] == "crashed"
        crashed = [f for f in watch["findings"] if f["kind"] == "crashed"]
        assert "gone without an exit status" in crashed[0]["message"]
    finally:
        subprocess.run(["tmux", "-S", socket, "kill-server"], capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_guard_left_running_is_found_and_ended_by_pid(tmp_path: Path) -> None:
    # What the autouse fixture does after every test here: a guard (its own Unix session,
    # reparented away from pytest) and its rclone, mid-upload, are found by their paths.
    _env, root, work, pid = _started_guard(tmp_path, "1M", 10, 4 << 20)

    def syncing() -> bool:  # its rclone sync: 4 MiB at 1 MB/s takes seconds
        return any("rclone sync" in a for a in processes_of(tmp_path).values())

    wait_for(syncing, timeout=30, what="the guard's rclone sync running")
    left = processes_of(tmp_path)
    assert pid in left and os.getsid(pid) == pid
    syncs = [p for p, argv in left.items() if "rclone sync" in argv]
    assert syncs and all(os.sched_getscheduler(p) == os.SCHED_IDLE for p in syncs)  # inherited
    killed = reap(tmp_path, grace=0.5)
    assert pid in killed and any("rclone sync" in argv for argv in killed.values())
    assert processes_of(tmp_path) == {} and guard.guard_pid(work) is None
    assert manifest(root) == {}
