"""rclone_copy and gcs_download end to end: `bootstrap up` over a real sshd box, pulling from
`rclone serve webdav` (password in a secret, rendered into rclone.conf) and from the GCS
emulator, then a second `up` that does nothing, and `plan` saying why."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gcs_emulator
import pytest
from boxes import Box
from project import Project

PLAYBOOK = """
name: downloads
vars:
  webdav: "{webdav}"
  gcs: "{gcs}"
steps:
  - id: rclone-config
    kind: template
    src: rclone.conf
    dest: ~/.config/rclone/rclone.conf
    secrets: [WEBDAV_PASS]
  - id: data-wp
    kind: rclone_copy
    needs: [rclone-config]
    src: "gg1:libero_object_wp_001/"
    dest: ~/data/libero_object_wp_001
    config: ~/.config/rclone/rclone.conf
    transfers: 4
    rclone_retries: 1
    expect:
      - {{path: "waypoint_filtered_rlds__libero/1.0.0", entries: 6}}
      - {{path: "waypoint_indices.json", exists: true}}
  - id: ckpt
    kind: gcs_download
    src: gs://openpi-assets/checkpoints/pi05_base
    dest: ~/models/pi05_base_jax
    endpoint: "{{{{ gcs }}}}"
    workers: 4
    chunked_above_mib: 4
    expect:
      - {{path: "pi05_base/params/commit_success.txt", exists: true}}
      - {{path: "pi05_base/params", contains: ["ocdbt.process_0"]}}
"""

RCLONE_CONF = """[gg1]
type = webdav
url = {{ webdav }}
user = u
pass = {{ secrets.WEBDAV_PASS }}
"""

WP = {f"waypoint_filtered_rlds__libero/1.0.0/shard-{i:05d}-of-00004": 30_000 + i for i in range(4)}
WP |= {
    "waypoint_filtered_rlds__libero/1.0.0/dataset_info.json": 400,
    "waypoint_filtered_rlds__libero/1.0.0/features.json": 300,
    "waypoint_indices.json": 80,
}


@pytest.fixture
def webdav(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """`rclone serve webdav` on loopback; yields (url, served dir, password)."""
    served = tmp_path / "drive"
    served.mkdir()
    password = "e2e-webdav-" + os.urandom(8).hex()
    serve = ["rclone", "serve", "webdav", str(served), "--addr", "127.0.0.1:0", "--config"]
    proc = subprocess.Popen(
        [*serve, "/dev/null", "--user", "u", "--pass", password], stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    url = None
    deadline = time.monotonic() + 20
    while url is None and time.monotonic() < deadline:
        match = re.search(r"started on \[?(http://127\.0\.0\.1:\d+/)", proc.stderr.readline())
        url = match.group(1) if match else None
    assert url, "rclone serve webdav did not start"
    yield url, served, password
    proc.terminate()
    proc.wait(10)


@pytest.mark.slow
def test_downloads_up_then_noop(project: Project, box: Box, webdav: tuple[str, Path, str]) -> None:
    url, served, password = webdav
    for rel, size in WP.items():
        path = served / "libero_object_wp_001" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    obscured = subprocess.run(
        ["rclone", "obscure", "-"], input=password, capture_output=True, text=True, check=True
    ).stdout.strip()
    objects = gcs_emulator.pi05_like(9 << 20)
    with gcs_emulator.in_process() as (_, endpoint):
        gcs_emulator.upload(endpoint, "openpi-assets", objects)
        project.host_vars = {"agent_python": sys.executable}
        project.secrets = {"WEBDAV_PASS": {"value": obscured}}
        project.template("rclone.conf", RCLONE_CONF)
        project.playbook(PLAYBOOK.format(webdav=url, gcs=endpoint))

        first = project.up("box1")
        assert first.returncode == 0, first.stdout + first.stderr
        steps = project.steps("box1")
        assert {s["status"] for s in steps.values()} == {"done"}, steps
        progress = (
            box.home / ".bootstrap" / "runs" / "downloads" / "steps" / "ckpt" / "_progress.json"
        )
        assert json.loads(progress.read_text())["done"] == sum(len(c) for c in objects.values())

        second = project.up("box1")
        assert second.returncode == 0, second.stdout + second.stderr
        again = project.steps("box1")
        assert {k: s["attempts"] for k, s in again.items()} == {
            k: s["attempts"] for k, s in steps.items()
        }
        plan = project.cli("plan", "box1", "-p", "playbooks/test.yaml", "--json")
        assert plan.returncode == 0, plan.stderr

    reasons = {s["id"]: s for s in json.loads(plan.stdout)["steps"]}
    assert not any(s["run"] for s in reasons.values()), reasons
    assert "7 files (118.0 KiB) present as fetched from gg1:" in reasons["data-wp"]["reason"]
    assert "20 files (9.6 MiB) present as fetched from gs://" in reasons["ckpt"]["reason"]

    ckpt = box.home / "models" / "pi05_base_jax" / "pi05_base" / "params"
    assert (ckpt / "commit_success.txt").read_bytes() == objects[
        "checkpoints/pi05_base/params/commit_success.txt"
    ]
    data = box.home / "data" / "libero_object_wp_001"
    assert {str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()} == set(WP)
    for path in (box.home / ".bootstrap").rglob("*"):
        if path.is_file() and path.stat().st_size < 10_000_000:
            content = path.read_bytes()
            assert obscured.encode() not in content, path
            assert password.encode() not in content, path
    output = first.stdout + first.stderr + second.stdout + plan.stdout
    assert obscured not in output and password not in output
