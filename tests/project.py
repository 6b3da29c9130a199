"""A throwaway bootstrap project for a test: playbooks and an inventory of test boxes.

`Project.up(...)` and friends run the real CLI as a subprocess against the boxes, so every test
goes through the same path a user does: YAML -> plan -> SSH -> agent -> runner on the box.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from boxes import Box, run_cli

#: One quick step: what a test that is about reaching the box runs.
QUICK = """
name: quick
steps:
  - id: hello
    kind: shell
    run: echo hello from $HOME
"""

#: first -> long (sleeps `{seconds}`) -> last, each counting its runs in ~/count-ID: a run to
#: cut the link under, or to kill the controller during (`away(N)`).
_AWAY = """
name: {name}
steps:
  - id: first
    kind: shell
    run: echo x >> ~/count-first
  - id: long
    kind: shell
    needs: [first]
    run: echo x >> ~/count-long; sleep {seconds}{then}
  - id: last
    kind: shell
    needs: [long]
    run: echo x >> ~/count-last
"""


def away(seconds: float, name: str = "away", marker: bool = False) -> str:
    """The three steps with `long` sleeping `seconds`; with `marker`, it writes ~/long.out and is done
    only when that exists (a step a second `up` finds done)."""
    then = "; echo done > ~/long.out\n    creates: ~/long.out" if marker else ""
    return _AWAY.format(name=name, seconds=seconds, then=then)


@dataclass
class Project:
    """A directory with `playbooks/`, `templates/` and `inventory.yaml`."""

    root: Path
    env: dict[str, str]
    boxes: list[Box] = field(default_factory=list)
    host_vars: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, Any] = field(default_factory=dict)
    #: Every box's `connection` in the inventory ('ssh': the OpenSSH client, or 'paramiko').
    connection: str = "ssh"

    def playbook(self, text: str, name: str = "test.yaml") -> Path:
        """Write a playbook (dedented) and return its path."""
        path = self.root / "playbooks" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def template(self, name: str, text: str) -> Path:
        path = self.root / "templates" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def write_inventory(self) -> Path:
        hosts = {
            b.name: {
                **b.inventory_entry(),
                "connection": self.connection,
                "vars": dict(self.host_vars),
            }
            for b in self.boxes
        }
        data: dict[str, Any] = {"hosts": hosts, "groups": {"fleet": [b.name for b in self.boxes]}}
        if self.connection != "ssh":  # the default of targets outside the inventory too
            data["vars"] = {"connection": self.connection}
        if self.secrets:
            data["secrets"] = self.secrets
        path = self.root / "inventory.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def cli(
        self, *args: str, timeout: float = 120, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `bootstrap ARGS` in the project dir."""
        self.write_inventory()
        return run_cli(list(args), env=env or self.env, timeout=timeout, cwd=self.root)

    def up(
        self, *targets: str, playbook: str = "test.yaml", extra: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        return self.cli("up", *targets, "-p", f"playbooks/{playbook}", *extra)

    def status(self, target: str, playbook: str = "test.yaml") -> dict[str, Any]:
        result = self.cli("status", target, "-p", f"playbooks/{playbook}", "--json")
        assert result.returncode in (0, 1), result.stderr
        return json.loads(result.stdout.strip().splitlines()[0])

    def steps(self, target: str, playbook: str = "test.yaml") -> dict[str, dict[str, Any]]:
        return {s["id"]: s for s in self.status(target, playbook)["steps"]}


def count(box: Box, name: str) -> int:
    """How many times a step appended a line to ~/count-NAME in the box."""
    path = box.home / f"count-{name}"
    return len(path.read_text().splitlines()) if path.exists() else 0


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Assert the CLI failed as bad input: exit 2, one line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
