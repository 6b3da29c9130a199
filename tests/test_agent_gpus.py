"""GPU leases (provision/agent/gpus.py) over real processes: sets, liveness, claims.

The tmux_launch tests (test_kind_tmux_launch.py) drive the same leases through real tmux jobs.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from provision.agent import gpus
from provision.agent.gpus import ALL, GpuLeases, Lease
from provision.errors import StepFailed


@pytest.fixture
def leader() -> Iterator[subprocess.Popen[bytes]]:
    """A live process leading its own Unix session, as a tmux pane's script does."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def lease(tmp_path: Path, pid: int | None, **fields: object) -> Lease:
    base = Lease(
        gpus=("0",),
        session="ae",
        socket=None,
        launch_id="abc123",
        run="waypoint",
        playbook="openpi-waypoint",
        step="train-ae",
        since=time.time(),
        pid_file=str(tmp_path / "job.pid"),
        pid=pid,
        pid_start=gpus.process_start(pid) if pid else None,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, (ALL,)),
        ("0,1", ("0", "1")),
        (" 1 , 0,1", ("1", "0")),
        ("", ()),
        ("GPU-ab", ("GPU-ab",)),
    ],
)
def test_gpu_set(value: str | None, expected: tuple[str, ...]) -> None:
    assert gpus.gpu_set(value) == expected


@pytest.mark.parametrize(
    ("a", "b", "common"),
    [
        (("0", "1"), ("1",), ("1",)),
        (("0",), ("1",), ()),
        ((ALL,), ("1", "2"), ("1", "2")),
        (("3",), (ALL,), ("3",)),
        ((ALL,), (ALL,), (ALL,)),
        ((), (ALL,), ()),  # a job that sees no GPU shares none
    ],
)
def test_shared(a: tuple[str, ...], b: tuple[str, ...], common: tuple[str, ...]) -> None:
    assert gpus.shared(a, b) == common


def test_a_live_session_holds_and_a_dead_one_does_not(
    tmp_path: Path, leader: subprocess.Popen[bytes]
) -> None:
    held = lease(tmp_path, leader.pid)
    assert held.alive() and held.running()
    leader.kill()
    leader.wait()
    assert not held.alive()


def test_a_reused_pid_is_not_the_job(tmp_path: Path, leader: subprocess.Popen[bytes]) -> None:
    start = gpus.process_start(leader.pid)
    assert start is not None
    assert not lease(tmp_path, leader.pid, pid_start=start - 1).alive()  # a younger process now


def test_a_pid_leading_no_session_is_not_the_job(tmp_path: Path) -> None:
    plain = subprocess.Popen(["sleep", "60"])  # in this test's session, leads none
    try:
        assert not lease(tmp_path, plain.pid).alive()
    finally:
        plain.kill()
        plain.wait()


def test_a_lease_without_pid_reads_the_pid_file_then_expires(
    tmp_path: Path, leader: subprocess.Popen[bytes]
) -> None:
    starting = lease(tmp_path, None)
    assert starting.running() is None and starting.alive()  # a launch in progress
    (tmp_path / "job.pid").write_text(f"{leader.pid} other-launch\n")
    assert starting.running() is None  # not this launch's pid
    (tmp_path / "job.pid").write_text(f"{leader.pid} abc123\n")
    assert starting.running() is True
    (tmp_path / "job.pid").unlink()
    assert not replace(starting, since=time.time() - gpus.STARTING_S - 1).alive()


def test_malformed_entries_are_dropped(tmp_path: Path, leader: subprocess.Popen[bytes]) -> None:
    good = lease(tmp_path, leader.pid).to_dict()
    data = {"version": 1, "leases": [good, {"gpus": ["1"]}, "junk", dict(good, since="x")]}
    (tmp_path / gpus.LEASES_FILE).write_text(json.dumps(data))
    assert [x.session for x in GpuLeases(tmp_path).live()] == ["ae"]
    (tmp_path / gpus.LEASES_FILE).write_text("{not json")
    assert GpuLeases(tmp_path).live() == []


def test_claim_refuses_held_gpus_and_a_used_session(
    tmp_path: Path, leader: subprocess.Popen[bytes]
) -> None:
    book = GpuLeases(tmp_path)
    with book.claim(("0", "1"), run="waypoint", step="train-ae", session="ae", socket=None) as c:
        c.grant("abc123", tmp_path / "job.pid", "openpi-waypoint")
        c.started(leader.pid)
    claim = book.claim((ALL,), run="lerobot", step="train", session="lora", socket=None)
    with pytest.raises(StepFailed) as err, claim:
        pass
    assert err.value.reason.startswith("GPUs 0,1 are held by tmux session ae (playbook ")
    assert "run waypoint, step train-ae" in err.value.reason
    claim = book.claim(("5",), run="lerobot", step="train", session="ae", socket=None)
    with pytest.raises(StepFailed, match="tmux session ae is already used by"), claim:
        pass
    with book.claim(("2",), run="lerobot", step="train", session="lora", socket="x") as c:
        c.grant("def456", tmp_path / "other.pid", "openpi-lerobot")
    assert {x.session for x in book.live()} == {"ae", "lora"}


def test_a_failed_launch_gives_its_lease_back(tmp_path: Path) -> None:
    book = GpuLeases(tmp_path)
    claim = book.claim(("0",), run="r", step="s", session="ae", socket=None)
    with pytest.raises(StepFailed), claim as claimed:
        claimed.grant("abc123", tmp_path / "job.pid", "p")
        assert [x.session for x in book.live()] == ["ae"]  # held while it starts
        raise StepFailed("the launch script exited with status 1 before the job")
    assert book.live() == [] and json.loads(book.path.read_text())["leases"] == []


def test_stale_leases_are_dropped_from_the_file(tmp_path: Path) -> None:
    book = GpuLeases(tmp_path)
    job = subprocess.Popen(["sleep", "60"], start_new_session=True)
    with book.claim(("0",), run="r", step="s", session="ae", socket=None) as claim:
        claim.grant("abc123", tmp_path / "job.pid", "p")
        claim.started(job.pid)
    job.kill()
    job.wait()
    assert len(json.loads(book.path.read_text())["leases"]) == 1  # recorded, but dead
    assert book.live() == []
    assert json.loads(book.path.read_text())["leases"] == []  # the next look costs nothing
