"""Bad input of every sort: one line on stderr, exit 2, no traceback, nothing written on the box.

Each case is a malformed playbook, inventory, target or option a user can write. The CLI runs
for real against one sshd box shared by the module (bad input must fail before the box is
touched, so the box stays pristine and can serve every case).
"""

from __future__ import annotations

import os
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from boxes import Box, start_box
from project import Project, one_line_error

GOOD_STEP = "  - {id: a, kind: shell, run: echo a}\n"
GOOD = "name: good\nsteps:\n" + GOOD_STEP


@dataclass(frozen=True)
class Case:
    """One malformed input: the playbook (and optionally inventory) text, extra CLI args, and a
    fragment the error line must contain."""

    id: str
    fragment: str
    playbook: str = GOOD
    inventory: str | None = None
    args: tuple[str, ...] = ()
    target: str = "box1"
    command: str = "up"
    secrets: tuple[tuple[str, str, str], ...] = ()
    raw: bytes | None = None


def _steps(*lines: str) -> str:
    return "name: t\nsteps:\n" + "".join(f"  - {line}\n" for line in lines)


CASES = [
    # ---- playbook structure
    Case("top-level-list", "must be a mapping", "- id: a\n  kind: shell\n"),
    Case("no-name", "'name' must be set", "steps:\n" + GOOD_STEP),
    Case("name-with-spaces", "'name' must be set and match", "name: My Run\nsteps:\n" + GOOD_STEP),
    Case("steps-empty", "'steps' must be a non-empty list", "name: t\nsteps: []\n"),
    Case("steps-mapping", "'steps' must be a non-empty list", "name: t\nsteps: {a: 1}\n"),
    Case("step-is-string", "each step must be a mapping", _steps("echo hello")),
    Case("step-id-uppercase", "step id must match", _steps("{id: Fetch, kind: shell, run: x}")),
    Case("step-id-number", "step id must match", _steps("{id: 12, kind: shell, run: x}")),
    Case("missing-kind", "unknown kind None", _steps("{id: a, run: x}")),
    Case("kind-list", "unknown kind", _steps("{id: a, kind: [shell], run: x}")),
    Case("typo-top-key", "did you mean 'steps'", "name: t\nstep:\n" + GOOD_STEP),
    Case("max-parallel-zero", "'max_parallel' must be a positive", "max_parallel: 0\n" + GOOD),
    Case("vars-list", "'vars' must be a mapping", "vars: [a, b]\n" + GOOD),
    Case(
        "retries-negative",
        "'retries' must be a non-negative",
        _steps("{id: a, kind: shell, run: x, retries: -1}"),
    ),
    Case(
        "retries-string",
        "'retries' must be a non-negative",
        _steps("{id: a, kind: shell, run: x, retries: two}"),
    ),
    Case(
        "timeout-bool",
        "'timeout' must be a positive",
        _steps("{id: a, kind: shell, run: x, timeout: true}"),
    ),
    Case(
        "estimate-negative",
        "'estimate' must be a positive",
        _steps("{id: a, kind: shell, run: x, estimate: -5}"),
    ),
    Case(
        "timeout-nan",
        "'timeout' must be a positive",
        _steps("{id: a, kind: shell, run: x, timeout: .nan}"),
    ),
    Case(
        "reserved-id", "'agent-venv' is reserved", _steps("{id: agent-venv, kind: shell, run: x}")
    ),
    Case("playbook-not-utf8", "not UTF-8", raw=b"name: t\xff\xfe\nsteps: []\n"),
    Case("playbook-is-directory", "Is a directory", args=("-p", "playbooks")),
    Case(
        "poll-zero",
        "'poll' must be between 1 and 30",
        _steps("{id: a, kind: shell, run: x, poll: 0}"),
    ),
    Case(
        "env-list",
        "'env' must map names to strings",
        _steps("{id: a, kind: shell, run: x, env: [A=1]}"),
    ),
    Case(
        "env-nested",
        "'env' must map names to strings",
        _steps("{id: a, kind: shell, run: x, env: {A: {b: 1}}}"),
    ),
    Case(
        "needs-number",
        "'needs' must be a list of strings",
        _steps("{id: a, kind: shell, run: x, needs: 5}"),
    ),
    Case(
        "tags-number",
        "'tags' must be a list of strings",
        _steps("{id: a, kind: shell, run: x, tags: [1]}"),
    ),
    Case(
        "secrets-mapping",
        "'secrets' must be a list of strings",
        _steps("{id: a, kind: shell, run: x, secrets: {A: b}}"),
    ),
    Case(
        "creates-list",
        "'creates' must be a string",
        _steps("{id: a, kind: shell, run: x, creates: [a, b]}"),
    ),
    Case(
        "self-cycle", "cycle in needs: a -> a", _steps("{id: a, kind: shell, run: x, needs: [a]}")
    ),
    Case(
        "duplicate-yaml-key",
        "duplicate key 'run'",
        "name: t\nsteps:\n  - id: a\n    kind: shell\n    run: x\n    run: y\n",
    ),
    Case("tab-indent", "invalid YAML", "name: t\nsteps:\n\t- {id: a, kind: shell, run: x}\n"),
    Case("jinja-syntax", "template error", _steps("{id: a, kind: shell, run: '{{ x +  }}'}")),
    Case(
        "jinja-unknown-filter",
        "template error",
        "vars: {x: 1}\n" + _steps("{id: a, kind: shell, run: '{{ x | nofilter }}'}"),
    ),
    Case(
        "undefined-in-creates",
        "'where' is undefined",
        _steps("{id: a, kind: shell, run: x, creates: '{{ where }}/f'}"),
    ),
    # ---- kind params of the wrong type or shape
    Case("shell-run-missing", "requires 'run'", _steps("{id: a, kind: shell}")),
    Case("shell-cwd-number", "'cwd' must be path", _steps("{id: a, kind: shell, run: x, cwd: 5}")),
    Case(
        "apt-packages-string",
        "'packages' must be list",
        _steps("{id: a, kind: apt, packages: curl}"),
    ),
    Case(
        "apt-packages-numbers",
        "'packages' must hold str",
        _steps("{id: a, kind: apt, packages: [1, 2]}"),
    ),
    Case(
        "git-submodules-string",
        "'submodules' must be bool",
        _steps(
            "{id: a, kind: git_clone, repo: 'https://x/y.git', dest: /tmp/y, submodules: 'yes'}"
        ),
    ),
    Case(
        "git-depth-float",
        "'depth' must be int",
        _steps("{id: a, kind: git_clone, repo: 'https://x/y.git', dest: /tmp/y, depth: 1.5}"),
    ),
    Case(
        "template-mode-unquoted",
        "quoted octal",
        _steps("{id: a, kind: template, content: x, dest: /tmp/x, mode: 0600}"),
    ),
    Case(
        "template-both-sources",
        "exactly one of 'src'",
        _steps("{id: a, kind: template, content: x, src: y, dest: /tmp/x}"),
    ),
    Case(
        "template-missing",
        "template 'nope.txt'",
        _steps("{id: a, kind: template, src: nope.txt, dest: /tmp/x}"),
    ),
    Case(
        "safetensors-dtype",
        "'dtype' must be one of",
        _steps("{id: a, kind: check_safetensors, path: /x.safetensors, dtype: float7}"),
    ),
    Case(
        "wait-log-markers-string",
        "'markers' must be list",
        _steps("{id: a, kind: wait_log, log: /tmp/l, markers: started}"),
    ),
    Case(
        "preflight-gpus-string",
        "'min_gpus' must be int",
        _steps("{id: a, kind: preflight, min_gpus: two}"),
    ),
    Case(
        "tmux-session-spaces",
        "'session' may hold only",
        _steps("{id: a, kind: tmux_launch, session: my job, command: x}"),
    ),
    # ---- secrets where they must not be
    Case(
        "secret-in-params",
        "may only be used in templates",
        _steps("{id: a, kind: shell, run: 'echo {{ secrets.TOKEN }}'}"),
        secrets=(("TOKEN", "value", "abcdefgh"),),
    ),
    Case(
        "secret-in-vars",
        "may only be used in templates",
        "vars: {auth: '{{ secrets.TOKEN }}'}\n"
        + _steps("{id: a, kind: shell, run: 'echo {{ auth }}'}"),
        secrets=(("TOKEN", "value", "abcdefgh"),),
    ),
    Case(
        "secret-env-unset",
        "environment variable BT_NOT_SET_ANYWHERE is not set",
        _steps("{id: a, kind: shell, run: x, secrets: [TOKEN]}"),
        secrets=(("TOKEN", "env", "BT_NOT_SET_ANYWHERE"),),
    ),
    Case(
        "secret-file-missing",
        "secret 'TOKEN': cannot read",
        _steps("{id: a, kind: shell, run: x, secrets: [TOKEN]}"),
        secrets=(("TOKEN", "file", "/nonexistent/bt-token"),),
    ),
    # ---- inventories
    Case("inventory-list", "the inventory must be a mapping", inventory="- box1\n"),
    Case(
        "inventory-unknown-key", "unknown key 'host'", inventory="host: {box9: {host: 127.0.0.1}}\n"
    ),
    Case(
        "inventory-host-key-typo",
        "unknown key 'hostname'",
        inventory="hosts: {box9: {hostname: x}}\n",
        target="box9",
    ),
    Case(
        "inventory-port-range",
        "port must be 1..65535",
        inventory="hosts: {box9: {host: x, port: 70000}}\n",
        target="box9",
    ),
    Case(
        "inventory-port-string",
        "port must be 1..65535",
        inventory="hosts: {box9: {host: x, port: '22a'}}\n",
        target="box9",
    ),
    Case(
        "inventory-port-bool",
        "port must be 1..65535",
        inventory="hosts: {box9: {host: x, port: yes}}\n",
        target="box9",
    ),
    Case(
        "inventory-user-number",
        "user must be a string",
        inventory="hosts: {box9: {host: x, user: 1000}}\n",
        target="box9",
    ),
    Case(
        "inventory-host-number",
        "host must be a string",
        inventory="hosts: {box9: {host: 1.5}}\n",
        target="box9",
    ),
    Case(
        "inventory-key-list",
        "key must be a string",
        inventory="hosts: {box9: {host: x, key: [a, b]}}\n",
        target="box9",
    ),
    Case(
        "inventory-key-missing",
        "inventory.yaml:4: host 'box9': key file /nonexistent/id_box9 does not exist",
        inventory="hosts:\n  box9:\n    host: x\n    key: /nonexistent/id_box9\n",
        target="box9",
    ),
    Case(
        "inventory-no-host",
        "needs 'host'",
        inventory="hosts: {box9: {user: root}}\n",
        target="box9",
    ),
    Case(
        "inventory-connection",
        "connection must be ssh, paramiko or local",
        inventory="hosts: {box9: {host: x, connection: docker}}\n",
        target="box9",
    ),
    Case(
        "inventory-host-name",
        "bad host name 'box nine'",
        inventory="hosts: {'box nine': {host: x}}\n",
        target="x.y",
    ),
    Case(
        "inventory-group-unknown",
        "names unknown host 'ghost'",
        inventory="hosts: {box9: {host: x}}\ngroups: {g: [box9, ghost]}\n",
        target="g",
    ),
    Case(
        "inventory-group-string",
        "must be a list of host names",
        inventory="hosts: {box9: {host: x}}\ngroups: {g: box9}\n",
        target="g",
    ),
    Case(
        "inventory-secret-source", "must be {env: VAR}", inventory="secrets: {TOKEN: {vault: x}}\n"
    ),
    Case("inventory-vars-list", "'vars' must be a mapping", inventory="vars: [1]\n"),
    Case(
        "inventory-ssh-options-string",
        "ssh_options must be a list",
        inventory="hosts: {box9: {host: x, ssh_options: -v}}\n",
        target="box9",
    ),
    Case("inventory-file-missing", "no such inventory file", args=("-i", "nope.yaml")),
    # ---- targets and options
    Case("unknown-target", "unknown target 'box99'", target="box99"),
    Case("ssh-command-without-host", "no host in ssh command", target="ssh -p 2222"),
    Case("ssh-command-bad-quote", "cannot parse ssh command", target="ssh -p 22 'root@x"),
    Case("target-bad-port", "unknown target 'root@box:port'", target="root@box:port"),
    Case("unknown-tag", "no step has tag(s) nope", args=("--tags", "nope")),
    Case("var-without-value", "--var expects NAME=VALUE", args=("--var", "novalue")),
    Case("var-bad-name", "--var expects NAME=VALUE", args=("--var", "=value")),
    Case("playbook-missing", "no such playbook file", args=("-p", "playbooks/absent.yaml")),
    Case("rerun-unknown-step", "no step 'zzz'", command="rerun", args=("zzz",)),
]


@pytest.fixture(scope="module")
def shared_box(tmp_path_factory: pytest.TempPathFactory, client_key: Path) -> Iterator[Box]:
    """One box for the whole module: every case must leave it untouched."""
    with start_box(tmp_path_factory.mktemp("badinput") / "box1", client_key, "box1") as box:
        yield box


@pytest.fixture(scope="module")
def bad_project(tmp_path_factory: pytest.TempPathFactory, shared_box: Box) -> Project:
    env = dict(os.environ)
    env.pop("SSH_AUTH_SOCK", None)
    root = tmp_path_factory.mktemp("badproject")
    env["BOOTSTRAP_CONFIG_DIR"] = str(root / "controller")
    scripts = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    env["PATH"] = os.pathsep.join(dict.fromkeys([*scripts, env.get("PATH", os.defpath)]))
    return Project(root / "project", env, [shared_box])


def test_there_are_at_least_30_cases() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(
    bad_project: Project, shared_box: Box, case: Case
) -> None:
    path = bad_project.playbook(case.playbook, name=f"{case.id}.yaml")
    if case.raw is not None:
        path.write_bytes(case.raw)
    args = [case.command, case.target]
    if case.command == "rerun":
        args += list(case.args)
        extra: list[str] = []
    else:
        extra = list(case.args)
    if "-p" not in extra:
        args += ["-p", f"playbooks/{case.id}.yaml"]
    if case.inventory is not None:
        inventory = bad_project.root / f"{case.id}.inventory.yaml"
        inventory.write_text(textwrap.dedent(case.inventory))
        args += ["-i", str(inventory)]
    bad_project.secrets = {name: {source: value} for name, source, value in case.secrets}
    line = one_line_error(bad_project.cli(*args, *extra))
    assert case.fragment in line, line
    assert not (shared_box.home / ".bootstrap").exists()
    assert sorted(p.name for p in shared_box.home.iterdir()) == [".ssh"]
