"""Fleets and multi-node training: several boxes at once, each on its own.

`up`, `status` and `rerun` over several targets and groups run every box in parallel with one
combined view and a per-box summary; a failing or unreachable box never stops or hides the
others. A group target gives each host `node_rank`, `nnodes`, `master_addr` and `master_port`,
so one `tmux_launch` of torchrun starts one rank per box: a stand-in torchrun checks what it was
given and meets the other ranks at the rendezvous endpoint, as torch's c10d rendezvous would.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from boxes import Box
from conftest import TRANSPORTS
from project import Project, count

pytestmark = pytest.mark.slow

FLEET = """
name: fleet
steps:
  - id: work
    kind: shell
    run: echo x >> ~/count-work; sleep 2
  - id: check
    kind: shell
    needs: [work]
    run: echo x >> ~/count-check; test "{{ host }}" != box2
  - id: after-check
    kind: shell
    needs: [check]
    run: echo x >> ~/count-after
  - id: side
    kind: shell
    run: echo x >> ~/count-side
"""


@pytest.fixture
def fleet(project: Project, box_factory: Callable[..., list[Box]]) -> list[Box]:
    """Three boxes in the inventory group `fleet` (box1 comes from `project`)."""
    project.boxes += box_factory(2)
    return project.boxes


def _steps(snap: dict) -> dict[str, str]:
    return {s["id"]: s["status"] for s in snap["steps"]}


def _status_lines(result) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    return {snap["host"]: snap for snap in map(json.loads, result.stdout.splitlines())}


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)  # parallel connections
def test_fleet_runs_in_parallel_and_one_bad_box_hides_nothing(
    project: Project, fleet: list[Box]
) -> None:
    box3 = fleet[2]
    project.playbook(FLEET)
    box3.stop()
    result = project.up("fleet")
    # Unreachable beats failed: exit 2 (bad input / unreachable), as for a single box.
    assert result.returncode == 2, result.stdout + result.stderr
    out = result.stdout
    # One combined view: every box's progress lines, then a summary per box.
    for host in ("box1", "box2"):
        assert f"[{host}] work: running" in out and f"[{host}] work: done" in out
    assert "box1: 4 done" in out
    assert "box2: 1 blocked, 2 done, 1 failed" in out
    assert "failed: check" in out and "bootstrap rerun box2 check" in out
    assert "box3" in result.stderr and "unreachable" in result.stderr
    assert "Traceback" not in result.stderr

    box3.start()
    status = project.cli("status", "fleet", "-p", "playbooks/test.yaml", "--json")
    assert status.returncode == 2, status.stderr  # box3 has no run yet: an error line for it
    snaps = _status_lines(status)
    assert _steps(snaps["box1"]) == dict.fromkeys(("work", "check", "after-check", "side"), "done")
    assert _steps(snaps["box2"]) == {
        "work": "done", "check": "failed", "after-check": "blocked", "side": "done"
    }  # fmt: skip
    assert "box3: no bootstrap run" in status.stderr
    # The boxes really overlapped in time.
    work1 = next(s for s in snaps["box1"]["steps"] if s["id"] == "work")
    work2 = next(s for s in snaps["box2"]["steps"] if s["id"] == "work")
    assert work1["started"] < work2["ended"] and work2["started"] < work1["ended"]

    again = project.up("box1", "box3")
    assert again.returncode == 0, again.stdout + again.stderr
    assert [count(b, "work") for b in fleet] == [1, 1, 1]
    final = project.cli("status", "fleet", "-p", "playbooks/test.yaml", "--json")
    assert final.returncode == 1, "box2 still has a failed step"
    assert set(_status_lines(final)) == {"box1", "box2", "box3"}


def test_failed_box_gives_exit_1_and_rerun_covers_several_targets(
    project: Project, fleet: list[Box]
) -> None:
    project.playbook(FLEET)
    result = project.up("box1", "box2", "box3")
    assert result.returncode == 1, result.stdout + result.stderr
    assert [count(b, "after") for b in fleet] == [1, 0, 1]
    # Rerun `side` on two named boxes and a group (duplicates count once).
    rerun = project.cli("rerun", "box1", "fleet", "side", "-p", "playbooks/test.yaml")
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr  # box2's check still failed
    assert [count(b, "side") for b in fleet] == [2, 2, 2]
    assert [count(b, "work") for b in fleet] == [1, 1, 1]
    status = project.cli("status", "box1", "box3", "-p", "playbooks/test.yaml", "--json")
    assert status.returncode == 0
    assert set(_status_lines(status)) == {"box1", "box3"}


# --------------------------------------------------------------------------- multi-node

#: Stand-in for torchrun's multi-node launch (no torch here). It parses the rendezvous
#: arguments as torchrun does, checks them, then meets the other nodes at the endpoint: rank 0
#: listens there, every other rank connects and says who it is, and all start together, or
#: fail. What it saw goes to ~/torchrun.json.
TORCHRUN = r"""#!{python}
import argparse, json, os, socket, sys, time

parser = argparse.ArgumentParser(prog="torchrun")
parser.add_argument("--nnodes", type=int, required=True)
parser.add_argument("--node_rank", "--node-rank", type=int, required=True)
parser.add_argument("--rdzv-endpoint", "--rdzv_endpoint", required=True)
parser.add_argument("--nproc_per_node", "--nproc-per-node", type=int, default=1)
parser.add_argument("script")
parser.add_argument("args", nargs=argparse.REMAINDER)
a = parser.parse_args()
host, port = a.rdzv_endpoint.rsplit(":", 1)
if not 0 <= a.node_rank < a.nnodes:
    sys.exit(f"torchrun: node_rank {{a.node_rank}} outside 0..{{a.nnodes - 1}}")
deadline = time.time() + 60
if a.node_rank == 0:
    server = socket.create_server((host, int(port)))
    server.settimeout(60)
    peers, ranks = [], {{0}}
    while len(ranks) < a.nnodes:
        conn, _ = server.accept()
        rank = int(conn.recv(16))
        if rank in ranks:
            sys.exit(f"torchrun: rank {{rank}} joined twice")
        ranks.add(rank)
        peers.append(conn)
    for conn in peers:
        conn.sendall(b"go")
else:
    while True:
        try:
            conn = socket.create_connection((host, int(port)), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    conn.sendall(str(a.node_rank).encode())
    if conn.recv(16) != b"go":
        sys.exit("torchrun: rendezvous refused")
record = {{"nnodes": a.nnodes, "node_rank": a.node_rank, "endpoint": a.rdzv_endpoint,
          "script": a.script, "args": a.args}}
with open(os.path.expanduser("~/torchrun.json"), "w") as fh:
    json.dump(record, fh)
print(f"rendezvous complete: rank {{a.node_rank}} of {{a.nnodes}} at {{a.rdzv_endpoint}}", flush=True)
"""

MULTINODE = r"""
name: multinode
steps:
  - id: train
    kind: tmux_launch
    session: train
    command: >-
      torchrun --nnodes {{{{ nnodes }}}} --node_rank {{{{ node_rank }}}}
      --rdzv-endpoint {{{{ master_addr }}}}:{{{{ master_port }}}} train.py --steps 3
    log: ~/train.log
    env: {{PATH: "{bindir}:/usr/local/bin:/usr/bin:/bin"}}
  - id: joined
    kind: wait_log
    needs: [train]
    log: ~/train.log
    markers: ['rendezvous complete: rank \d+ of 3 at ']
    timeout: 90
    poll: 2
"""


def test_group_target_gives_each_box_its_rank_and_one_rendezvous(
    project: Project, fleet: list[Box], tmp_path: Path
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    torchrun = bindir / "torchrun"
    torchrun.write_text(TORCHRUN.format(python=sys.executable))
    torchrun.chmod(0o755)
    project.playbook(MULTINODE.format(bindir=bindir))
    project.host_vars = {"agent_python": sys.executable}
    with socket.socket() as s:  # a free port on the master's address, for this test alone
        s.bind((fleet[0].host, 0))
        port = s.getsockname()[1]
    result = project.up("fleet", extra=["--var", f"master_port={port}"])
    assert result.returncode == 0, result.stdout + result.stderr
    seen = [json.loads((b.home / "torchrun.json").read_text()) for b in fleet]
    assert [s["node_rank"] for s in seen] == [0, 1, 2]
    assert {s["nnodes"] for s in seen} == {3}
    assert {s["endpoint"] for s in seen} == {f"{fleet[0].host}:{port}"}
    assert all(s["script"] == "train.py" and s["args"] == ["--steps", "3"] for s in seen)
    for rank, box in enumerate(fleet):
        assert f"rendezvous complete: rank {rank} of 3" in (box.home / "train.log").read_text()
    # One box named alone keeps its rank in its group: nothing would relaunch as a 1-node job.
    plan = project.cli(
        "plan", "box2", "-p", "playbooks/test.yaml", "--var", f"master_port={port}", "--json"
    )
    assert plan.returncode == 0, plan.stderr
    assert not any(s["run"] for s in json.loads(plan.stdout)["steps"]), plan.stdout
