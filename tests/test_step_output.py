"""A step's output on its way to the log: progress bars that redraw with `\\r` only, and lines
of many megabytes.

Both go through the real path: bash -> `agent exec` -> the runner's pump -> the log -> `status`
and `logs` over ssh. On the main of issue 13 a bar drawn with `\\r` stayed invisible until the
step printed a newline, and the runner kept its last 200 lines whole in memory (60 lines of
10 MB took it to 563 MB).
"""

from __future__ import annotations

import json
import random

import pytest
from boxes import Box
from project import Project, wait_for

from provision.agent.output import Pending, Tail
from provision.agent.redact import MASK, Redactor

SECRETS = ["ghp_AbCdEfGhIj0123456789", "p@ss w0rd$x!y&z"]


def test_a_secret_cut_across_reads_is_still_masked() -> None:
    """However the pipe cuts the output, a secret in it never comes out whole or in part."""
    redact = Redactor(SECRETS)
    pieces = ["line\n", "bar 10%\r", SECRETS[0], json.dumps(SECRETS[1]), " x ", "\\", "é"]
    rng = random.Random(13)
    text = "".join(rng.choice(pieces) for _ in range(2000))
    for _ in range(30):
        pending, out, i = Pending(redact, redact.longest), "", 0
        while i < len(text):
            n = rng.randint(1, 120)
            out += pending.feed(text[i : i + n])
            i += n
        out += pending.flush()
        assert out == redact(text)
        assert SECRETS[0][:12] not in out and "p@ss w0rd" not in out and MASK in out


def test_without_secrets_everything_is_released_at_once() -> None:
    pending = Pending(Redactor([]), Redactor([]).longest)
    assert pending.feed("\rdownloading 40%") == "\rdownloading 40%"


def test_the_tail_keeps_the_last_characters_only() -> None:
    tail = Tail(1000)
    for size in [10, 5000, 3, 999, 1001, 0, 400] * 20:
        tail.append(str(size % 10) * size)
    text = tail.text()
    assert len(text) == 1000 and text.endswith("0" * 400)


BAR_PLAYBOOK = """
name: bar
steps:
  - id: bar
    kind: shell
    run: |
      for p in 10 20 30 40; do printf '\\rdownloading %s%%' "$p"; sleep 0.2; done
      printf '\\rdownloading 50%% waiting'
      for i in $(seq 200); do [ -e ~/release ] && break; sleep 0.1; done
      printf '\\rdownloading 100%%\\n'
"""


@pytest.mark.slow
def test_a_progress_bar_drawn_with_carriage_returns_shows_while_it_runs(
    project: Project, box: Box
) -> None:
    project.playbook(BAR_PLAYBOOK)
    assert project.up("box1", extra=["--detach"]).returncode == 0

    def bar_tail() -> list[str] | None:
        result = project.cli("status", "box1", "-p", "playbooks/test.yaml", "--json")
        step = json.loads(result.stdout.splitlines()[0])["steps"][0]
        tail = step["log_tail"]
        return tail if step["status"] == "running" and "waiting" in "".join(tail) else None

    tail = wait_for(bar_tail, timeout=15, what="the bar's last drawing in status")
    # What a terminal shows: the last drawing only, not one line per redraw.
    assert tail[-1] == "downloading 50% waiting", tail
    assert not any("10%" in line for line in tail), tail
    logs = project.cli("logs", "box1", "bar", "-p", "playbooks/test.yaml")
    assert "downloading 50% waiting" in logs.stdout, logs.stdout
    (box.home / "release").touch()
    result = project.up("box1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert project.steps("box1")["bar"]["log_tail"][-1] == "downloading 100%"


#: Megabytes of each line, and how many lines: enough that holding them costs far more than
#: the runner's own ~20 MB, small enough for the test to stay quick.
LINE_MB, LINES = 8, 8

BIG_PLAYBOOK = f"""
name: big
steps:
  - id: big
    kind: shell
    secrets: [TOKEN]
    run: |
      python3 -c 'import sys; [sys.stdout.write("x" * {LINE_MB} * 2**20 + "\\n") for _ in range({LINES})]'
      echo "token $TOKEN end"
  - id: measure
    kind: shell
    needs: [big]
    run: |
      runner=$(awk '/^PPid:/ {{print $2}}' /proc/$PPID/status)
      awk '/^VmHWM:/ {{print $2}}' /proc/$runner/status > ~/runner-hwm-kb
"""


@pytest.mark.slow
def test_huge_lines_do_not_grow_the_runner(project: Project, box: Box) -> None:
    project.secrets = {"TOKEN": {"value": "tok-Cnry-1234567890abcdef"}}
    project.playbook(BIG_PLAYBOOK)
    result = project.up("box1")
    assert result.returncode == 0, result.stdout + result.stderr
    log = box.home / ".bootstrap" / "runs" / "big" / "logs" / "big.log"
    assert log.stat().st_size > LINE_MB * LINES * 2**20
    assert log.read_text().rstrip().endswith("token *** end")
    hwm_mb = int((box.home / "runner-hwm-kb").read_text()) / 1024
    # Holding the lines would take more than LINE_MB * LINES; the pump holds one chunk.
    assert hwm_mb < 45, f"runner peaked at {hwm_mb:.0f} MB"


@pytest.mark.slow
def test_a_long_log_line_leaves_the_status_table_readable_at_80_columns(
    project: Project, box: Box
) -> None:
    project.playbook(
        """
        name: wide
        steps:
          - id: prepare-dataset
            kind: shell
            run: python3 -c 'print("x" * 400)'; exit 3
          - {id: train-model, kind: shell, needs: [prepare-dataset], run: 'true'}
        """
    )
    assert project.up("box1").returncode == 1
    env = {**project.env, "COLUMNS": "80"}
    result = project.cli("status", "box1", "-p", "playbooks/test.yaml", env=env)
    assert result.returncode == 1, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if "│" in line}
    assert "✗ failed" in rows["prepare-dataset"] and "⊘ blocked" in rows["train-model"], rows
    assert "1" in rows["prepare-dataset"].split("│")[2], "the tries column is there"
    assert all(len(line) <= 80 for line in result.stdout.splitlines()), result.stdout
