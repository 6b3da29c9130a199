"""Host keys and access: trust on first use keyed by host and port, a changed key refused with
the exact command that forgets it, the user's ~/.ssh/config (aliases, IdentityFile, ProxyJump)
honoured, and an authentication failure retried for a while, then explained."""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from boxes import Box, _free_port, _write_sshd_config
from conftest import TRANSPORTS
from netlink import Link
from project import QUICK, Project, one_line_error

#: Every test here runs over both transports: each one's host-key, ~/.ssh/config and
#: authentication handling is its own code.
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)]


def _move(box: Box, host: str) -> None:
    """Restart `box`'s sshd on `host` (another box's address), on a new port."""
    box.stop()
    box.host = host
    box.port = _free_port(host)
    _write_sshd_config(box)
    box.start()


def _trusted(project: Project, host: str, port: int) -> bool:
    """Whether bootstrap's known_hosts (hashed, as Debian's ssh writes it) has `[host]:port`."""
    path = Path(project.env["BOOTSTRAP_CONFIG_DIR"]) / "known_hosts"
    found = subprocess.run(
        ["ssh-keygen", "-F", f"[{host}]:{port}", "-f", str(path)], capture_output=True
    )
    return found.returncode == 0


def test_trust_is_per_host_and_port(
    project: Project, box_factory: Callable[..., list[Box]]
) -> None:
    box1 = project.boxes[0]
    (box2,) = box_factory(1)
    _move(box2, box1.host)  # vast.ai: many boxes behind one address, one port each
    project.boxes.append(box2)
    project.playbook(QUICK)
    both = project.up("box1", "box2")
    assert both.returncode == 0, both.stdout + both.stderr
    assert _trusted(project, box1.host, box1.port) and _trusted(project, box2.host, box2.port)

    box2.new_host_key()
    line = one_line_error(project.up("box2"))
    assert line.endswith(
        f"run: bootstrap forget {box2.host}:{box2.port} (or pass --accept-new-host-key)"
    ), line
    assert "vast.ai reuses addresses" in line
    # The neighbour on the same address is still trusted and reachable.
    assert project.up("box1").returncode == 0

    forget = project.cli("forget", f"{box2.host}:{box2.port}")
    assert forget.returncode == 0 and "forgot" in forget.stdout
    assert _trusted(project, box1.host, box1.port)
    assert not _trusted(project, box2.host, box2.port)
    assert project.up("box2").returncode == 0

    box2.new_host_key()
    refused = project.cli("status", "box2", "-p", "playbooks/test.yaml")
    assert refused.returncode == 2 and "bootstrap forget" in refused.stderr
    accepted = project.up("box2", extra=["--accept-new-host-key"])
    assert accepted.returncode == 0, accepted.stderr
    assert project.up("box1").returncode == 0


@pytest.fixture
def ssh_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory that `as_user_ssh` shows the CLI as the user's ~/.ssh.

    OpenSSH reads ~/.ssh/config from the passwd entry's home, not $HOME, so the CLI runs in a
    private mount namespace with this directory bind-mounted over that home's .ssh (created
    empty when missing, removed after if it is still empty).
    """
    path = tmp_path / "user-ssh"
    path.mkdir(mode=0o700)
    real = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"
    created = not real.exists()
    real.mkdir(mode=0o700, exist_ok=True)
    yield path
    if created:
        with contextlib.suppress(OSError):
            real.rmdir()


def as_user_ssh(ssh_dir: Path, argv: list[str], mount_ns: bool = True) -> list[str]:
    """`argv` run with `ssh_dir` as the user's ~/.ssh (in a new mount namespace unless the
    command already runs in one, as `ip netns exec` does)."""
    real = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"
    script = f'mount --bind {shlex.quote(str(ssh_dir))} {shlex.quote(str(real))} && exec "$@"'
    unshare = ["unshare", "--mount", "--propagation", "private"] if mount_ns else []
    return [*unshare, "sh", "-c", script, "sh", *argv]


def _cli_as_user(project: Project, ssh_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    project.write_inventory()
    return subprocess.run(
        as_user_ssh(ssh_dir, [sys.executable, "-m", "provision.cli", *args]),
        cwd=project.root, env=project.env, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


def _write_config(ssh_dir: Path, config: str) -> None:
    (ssh_dir / "config").write_text(config)
    (ssh_dir / "config").chmod(0o600)


def _alias(name: str, box: Box, host: str | None = None, extra: str = "") -> str:
    return (
        f"Host {name}\n  HostName {host or box.host}\n  Port {box.port}\n  User {box.user}\n"
        f"  IdentityFile {box.key}\n  IdentitiesOnly yes\n{extra}"
    )


def test_ssh_config_alias_is_a_target(project: Project, box: Box, ssh_dir: Path) -> None:
    _write_config(ssh_dir, _alias("bt-gpu", box))
    project.playbook(QUICK)
    result = _cli_as_user(project, ssh_dir, "up", "bt-gpu", "-p", "playbooks/test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    log = box.home / ".bootstrap" / "runs" / "quick" / "logs" / "hello.log"
    assert f"hello from {box.home}" in log.read_text()
    # The key is trusted under the real address, so forget works with the alias or the address.
    assert _trusted(project, box.host, box.port)
    box.new_host_key()
    line = one_line_error(_cli_as_user(project, ssh_dir, "status", "bt-gpu"))
    assert f"bootstrap forget {box.host}:{box.port} " in line, line
    forget = _cli_as_user(project, ssh_dir, "forget", "bt-gpu")
    assert forget.returncode == 0 and "forgot" in forget.stdout, forget.stdout + forget.stderr
    assert _cli_as_user(project, ssh_dir, "status", "bt-gpu").returncode == 0


def test_proxyjump_reaches_a_box_only_reachable_through_another(
    project: Project, box_factory: Callable[..., list[Box]], ssh_dir: Path
) -> None:
    jump = project.boxes[0]
    (inner,) = box_factory(1)
    project.playbook(QUICK)
    with Link(jump) as link:
        # In the namespace only the jump box is reachable; `inner` listens on loopback, which
        # there is the namespace's own: only the jump box's sshd can forward to it.
        _write_config(
            ssh_dir,
            _alias("bt-jump", jump, host=link.box_addr)
            + _alias("bt-inner", inner, extra="  ProxyJump bt-jump\n"),
        )
        direct = subprocess.run(
            ["ip", "netns", "exec", link.ns, "ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
             "-o", "ConnectTimeout=3", "-p", str(inner.port), inner.host, "true"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert direct.returncode == 255, "inner must not be reachable directly"
        project.write_inventory()
        argv = link.cli_argv("up", "bt-inner", "-p", "playbooks/test.yaml")
        netns, cli = argv[:4], argv[4:]  # `ip netns exec NS` makes the mount namespace
        result = subprocess.run(
            [*netns, *as_user_ssh(ssh_dir, cli, mount_ns=False)],
            cwd=project.root, env=project.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    log = inner.home / ".bootstrap" / "runs" / "quick" / "logs" / "hello.log"
    assert f"hello from {inner.home}" in log.read_text()
    assert not (jump.home / ".bootstrap").exists()


def _revoke(box: Box) -> Path:
    keys = box.home / ".ssh" / "authorized_keys"
    saved = keys.with_name("authorized_keys.saved")
    shutil.move(keys, saved)
    return saved


def test_auth_failure_names_the_key_and_vast_then_gives_up(project: Project, box: Box) -> None:
    project.playbook(QUICK)
    _revoke(box)
    start = time.monotonic()
    line = one_line_error(project.cli("status", "box1"))
    assert time.monotonic() - start < 5, "status does not wait for a key by default"
    assert f"with {box.key}" in line and "vast.ai" in line and "installing" in line, line
    start = time.monotonic()
    line = one_line_error(project.up("box1", extra=["--auth-wait", "3"]))
    took = time.monotonic() - start
    assert 3 <= took < 12, took
    assert f"with {box.key}" in line and "tried for 3s" in line, line
    assert not (box.home / ".bootstrap").exists()


def test_up_waits_for_a_key_being_installed(project: Project, box: Box) -> None:
    project.playbook(QUICK)
    project.write_inventory()
    saved = _revoke(box)
    proc = subprocess.Popen(
        [sys.executable, "-m", "provision.cli", "up", "box1", "-p", "playbooks/test.yaml",
         "--auth-wait", "30"],
        cwd=project.root, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    time.sleep(3)  # the box "boots" and installs the key a little later
    shutil.move(saved, box.home / ".ssh" / "authorized_keys")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "hello" in (box.home / ".bootstrap/runs/quick/logs/hello.log").read_text()


def test_default_key_files_are_named_when_no_key_is_given(
    project: Project, box: Box, ssh_dir: Path
) -> None:
    project.playbook(QUICK)
    target = f"{box.user}@{box.host}:{box.port}"
    line = one_line_error(_cli_as_user(project, ssh_dir, "status", target))
    home = pwd.getpwuid(os.getuid()).pw_dir
    assert f"no key ({home}/.ssh/id_rsa" in line and "vast.ai" in line, line
