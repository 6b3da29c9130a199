"""Hostile inventory values never become ssh options.

`host: "-oProxyCommand=touch /tmp/x"` once ran the command on the controller at `up`: ssh read
the destination as an option. Such values are refused at load (exit 2, file:line), and every
ssh argv puts `--` before the destination, so a value that slips past the loader (a Host built
in code, an alias) is still only a name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from boxes import Box
from project import Project, one_line_error

from provision.errors import TargetError
from provision.inventory import Host
from provision.transport.ssh import SSHTransport, _proxy_command, effective

GOOD = "name: t\nsteps:\n  - {id: a, kind: shell, run: echo a}\n"


def _hostile(canary: Path) -> str:
    return f"-oProxyCommand=touch {canary}"


@pytest.mark.slow
@pytest.mark.parametrize("key", ["host", "user", "key"])
@pytest.mark.parametrize("command", ["up", "status", "plan"])
def test_an_option_like_inventory_value_is_refused_with_file_and_line(
    project: Project, box: Box, tmp_path: Path, key: str, command: str
) -> None:
    canary = tmp_path / "pwned"
    project.playbook(GOOD)
    entry = {**box.inventory_entry(), key: _hostile(canary)}
    lines = ["hosts:", "  evil:"] + [f"    {k}: {v!r}" for k, v in entry.items()]
    inventory = project.root / "evil.yaml"
    inventory.write_text("\n".join(lines) + "\n")
    line_no = 3 + list(entry).index(key)
    result = project.cli(command, "evil", "-p", "playbooks/test.yaml", "-i", str(inventory))
    error = one_line_error(result)
    assert (
        f"{inventory}:{line_no}:" in error and f"{key} must not be blank or start with '-'" in error
    ), error
    assert not canary.exists()
    assert not (box.home / ".bootstrap").exists()


@pytest.mark.slow
def test_an_option_like_command_line_target_is_refused(project: Project, tmp_path: Path) -> None:
    project.playbook(GOOD)
    for target in ("-v.example", "root@-v.example:22"):
        error = one_line_error(project.cli("up", "-p", "playbooks/test.yaml", "--", target))
        assert "must not be blank or start with '-'" in error, error


def test_every_ssh_argv_ends_options_before_the_destination(tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    host = Host(name="evil", host=_hostile(canary), port=22, user="root")
    transport = SSHTransport(host)
    argv = transport.base_argv()
    assert argv[-2:] == ["--", host.host]
    assert transport.interactive_argv("true")[-3:] == ["--", host.host, "true"]
    # A value that slips past the loader is a (bad) host name to ssh, never an option.
    with pytest.raises(TargetError):
        transport.run("true", timeout=20)
    effective(host)
    assert not canary.exists()


def test_a_jump_host_from_ssh_config_is_named_after_double_dash() -> None:
    # The ProxyCommand that carries bootstrap's options to a ProxyJump host names it after `--`.
    (proxy,) = [w for w in _proxy_command("root@jump.example:2200") if w.startswith("Proxy")]
    assert proxy.endswith("-- ssh://root@jump.example:2200")


@pytest.mark.slow
def test_a_blank_user_is_refused(project: Project, box: Box) -> None:
    project.playbook(GOOD)
    inventory = project.root / "blank.yaml"
    inventory.write_text(f"hosts:\n  b:\n    host: {box.host}\n    user: ' '\n")
    error = one_line_error(
        project.cli("up", "b", "-p", "playbooks/test.yaml", "-i", str(inventory))
    )
    assert f"{inventory}:4:" in error and "must not be blank" in error, error
