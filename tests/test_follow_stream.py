"""Following a run streams what changes, not the whole run at every change.

A 2,000-step run once streamed 230 MB of full snapshots to `up`. The stream is read here where
`up` reads it, on the box's side of ssh: `box_python` is a wrapper that copies the agent's
stdout to a file on its way to the controller.
"""

from __future__ import annotations

import json

import pytest
from boxes import Box
from project import Project

STEPS = 120


@pytest.mark.slow
def test_following_a_long_run_streams_changes(project: Project, box: Box) -> None:
    stream = box.home / "stream.jsonl"
    wrapper = box.home / "py" / "python"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/bash\n"
        # The prelude (python3 -S -c ...): its output is the stream.
        f'if [ "$1" = -S ]; then python3 "$@" | tee -a {stream}; exit "${{PIPESTATUS[0]}}"; fi\n'
        'exec python3 "$@"\n'
    )
    wrapper.chmod(0o755)
    project.host_vars = {"box_python": str(wrapper)}
    steps = "".join(
        f"  - {{id: s{i}, kind: shell, run: 'sleep 0.2'"
        + (f", needs: [s{i - 8}]" if i >= 8 else "")
        + "}\n"
        for i in range(STEPS)
    )
    project.playbook(f"name: long\nmax_parallel: 8\nsteps:\n{steps}")
    result = project.up("box1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{STEPS} done" in result.stdout, result.stdout
    events = [json.loads(line) for line in stream.read_text().splitlines() if line.startswith("{")]
    final = events[-1]
    assert final["event"] == "final" and len(final["steps"]) == STEPS
    full = len(json.dumps(final))
    total = stream.stat().st_size
    kinds = [e["event"] for e in events]
    # One snapshot at the start, one at the end, and between them the records of the steps
    # that changed (started, ended, a second more of running), not the whole run each time.
    assert kinds.count("snapshot") + kinds.count("final") <= 3, kinds
    assert kinds.count("changes") >= 10, kinds
    assert total < 0.35 * len(events) * full, (total, full, len(events))
