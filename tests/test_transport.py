"""Choosing a transport, and what the two share: the paramiko one when the inventory says
`connection: paramiko` or this machine has no `ssh` (and then no OpenSSH program runs at all),
one known_hosts file both read and write, a box whose sshd stops answering noticed within 10 s
over either, and secrets in no process's argv, on the controller or the box. (The engine's,
access and dead-link tests run over both transports too: test_engine, test_access,
test_faults.)"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from boxes import Box
from conftest import TRANSPORTS
from project import QUICK, Project, away, count, one_line_error, wait_for

from provision.errors import ConfigError, TargetError
from provision.inventory import Host, load_inventory, resolve_targets
from provision.transport import for_host, kind_of
from provision.transport import known_hosts as trusted

# ------------------------------------------------------------------ no box needed


def _found_by_ssh_keygen(path: Path, name: str) -> bool:
    found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(path)], capture_output=True)
    return found.returncode == 0


def test_known_hosts_lines_are_openssh_s_and_forgetting_one_keeps_the_rest(
    tmp_path: Path,
) -> None:
    path = tmp_path / "known_hosts"
    key = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    by_hand = [
        "# kept as written\n",
        f"@cert-authority *.example.org ssh-ed25519 {key}\n",
        f"plain.example.org ssh-ed25519 {key}\n",
    ]
    path.write_text("".join(by_hand))
    trusted.add(path, "[127.0.0.5]:2222", "ssh-ed25519", key)
    trusted.add(path, "box.example.org", "ssh-ed25519", key)
    assert trusted.entry_name("127.0.0.5", 2222) == "[127.0.0.5]:2222"
    assert trusted.entry_name("box.example.org", 22) == "box.example.org"
    for name in ("[127.0.0.5]:2222", "box.example.org", "plain.example.org"):
        assert _found_by_ssh_keygen(path, name), name
    assert "127.0.0.5" not in path.read_text(), "names are hashed, as Debian's ssh writes them"
    # Port 2222 of the same address is another host (vast.ai: one address, many boxes).
    assert not _found_by_ssh_keygen(path, "[127.0.0.5]:2223")

    assert trusted.remove(path, "[127.0.0.5]:2222")
    assert not _found_by_ssh_keygen(path, "[127.0.0.5]:2222")
    assert _found_by_ssh_keygen(path, "box.example.org")
    assert trusted.remove(path, "plain.example.org")
    lines = path.read_text().splitlines(keepends=True)
    assert lines[:2] == by_hand[:2] and len(lines) == 3
    assert not trusted.remove(path, "[127.0.0.5]:2222"), "nothing left to forget"
    assert not trusted.remove(tmp_path / "none", "x"), "no file: nothing to forget"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_the_transport_is_chosen_per_host_and_paramiko_when_there_is_no_ssh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ssh = Host(name="a", host="127.0.0.9", port=2222)
    paramiko_host = Host(name="b", host="127.0.0.9", connection="paramiko")
    local = Host(name="local", connection="local")
    assert [kind_of(h) for h in (ssh, paramiko_host, local)] == ["openssh", "paramiko", "local"]
    assert type(for_host(ssh)).__name__ == "SSHTransport"
    assert type(for_host(paramiko_host)).__name__ == "ParamikoTransport"
    options = Host(name="c", host="x", connection="paramiko", ssh_options=["-o", "Compression=no"])
    with pytest.raises(TargetError, match="OpenSSH options; over paramiko only -J / ProxyJump"):
        for_host(options)
    jump = Host(name="c", host="x", connection="paramiko", ssh_options=["-J", "bastion"])
    assert type(for_host(jump)).__name__ == "ParamikoTransport"
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh binary
    assert [kind_of(h) for h in (ssh, paramiko_host, local)] == ["paramiko", "paramiko", "local"]
    assert type(for_host(ssh)).__name__ == "ParamikoTransport"


def test_the_inventory_names_a_connection_per_host_or_for_all(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(
        "vars: {connection: paramiko}\n"
        "hosts:\n"
        "  a: {host: 10.0.0.1}\n"
        "  b: {host: 10.0.0.2, connection: ssh}\n"
    )
    inv = load_inventory(path)
    assert inv.hosts["a"].connection == "paramiko" and inv.hosts["b"].connection == "ssh"
    adhoc = resolve_targets(["root@10.0.0.3:2200", "ssh -p 41 root@10.0.0.4"], inv)
    assert [h.connection for h in adhoc] == ["paramiko", "paramiko"]

    path.write_text("hosts:\n  a:\n    host: 10.0.0.1\n    connection: fabric\n")
    with pytest.raises(ConfigError) as bad:
        load_inventory(path)
    assert str(bad.value) == (
        f"{path}:4: host 'a': connection must be ssh, paramiko or local (got 'fabric')"
    )
    path.write_text("vars:\n  connection: local\nhosts: {}\n")
    with pytest.raises(ConfigError, match="must be ssh or paramiko"):
        load_inventory(path)


def test_the_cli_starts_without_importing_paramiko() -> None:
    """bench/run.py times the CLI's start: the second transport costs it nothing (~140 ms)."""
    code = (
        "import sys, provision.cli, provision.controller\n"
        "from provision.inventory import Host\n"
        "from provision.transport import for_host\n"
        "for_host(Host(name='a', host='127.0.0.9'))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('paramiko', 'fabric')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ over a box


def _fake_ssh(bin_dir: Path) -> Path:
    """An `ssh` (and `ssh-keygen`) that records each call and fails as ssh fails."""
    calls = bin_dir / "calls.log"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("ssh", "ssh-keygen"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit 255\n')
        script.chmod(0o755)
    return calls


def test_connection_paramiko_runs_no_openssh_program(project: Project, tmp_path: Path) -> None:
    calls = _fake_ssh(tmp_path / "bin")
    env = dict(project.env, PATH=f"{tmp_path / 'bin'}{os.pathsep}{project.env['PATH']}")
    project.playbook(QUICK)
    # The fake is the `ssh` this PATH finds: the OpenSSH transport fails on it.
    assert project.cli("up", "box1", "-p", "playbooks/test.yaml", env=env).returncode == 2
    assert "ssh " in calls.read_text()
    calls.unlink()
    project.connection = "paramiko"
    for args in (("up", "box1"), ("status", "box1"), ("logs", "box1", "hello")):
        result = project.cli(*args, "-p", "playbooks/test.yaml", env=env)
        assert result.returncode == 0, (args, result.stdout + result.stderr)
    assert not calls.exists(), calls.read_text()


def test_without_an_ssh_binary_everything_goes_through_paramiko(
    project: Project, box: Box, tmp_path: Path
) -> None:
    empty = tmp_path / "no-ssh-here"
    empty.mkdir()
    env = dict(project.env, PATH=str(empty))  # no ssh, no ssh-keygen
    args = ("-p", "playbooks/test.yaml")
    project.playbook(QUICK)
    up = project.cli("up", "box1", *args, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    status = project.cli("status", "box1", *args, "--json", env=env)
    assert json.loads(status.stdout)["steps"][0]["status"] == "done", status.stderr
    logs = project.cli("logs", "box1", "hello", *args, env=env)
    assert f"hello from {box.home}" in logs.stdout, logs.stderr
    known = Path(project.env["BOOTSTRAP_CONFIG_DIR"]) / "known_hosts"
    assert _found_by_ssh_keygen(known, f"[{box.host}]:{box.port}")

    box.new_host_key()
    line = one_line_error(project.cli("up", "box1", *args, env=env))
    assert line.endswith(
        f"run: bootstrap forget {box.host}:{box.port} (or pass --accept-new-host-key)"
    ), line
    forget = project.cli("forget", f"{box.host}:{box.port}", env=env)
    assert forget.returncode == 0 and "forgot" in forget.stdout, forget.stdout + forget.stderr
    assert project.cli("up", "box1", *args, env=env).returncode == 0
    box.new_host_key()
    accepted = project.cli("up", "box1", *args, "--accept-new-host-key", env=env)
    assert accepted.returncode == 0, accepted.stderr


def test_both_transports_trust_the_same_file(project: Project, box: Box) -> None:
    known = Path(project.env["BOOTSTRAP_CONFIG_DIR"]) / "known_hosts"
    project.playbook(QUICK)
    assert project.up("box1").returncode == 0  # OpenSSH trusts the box on first use
    first = known.read_text()
    project.connection = "paramiko"
    assert project.up("box1").returncode == 0, "paramiko reads OpenSSH's hashed entry"
    assert known.read_text() == first, "and adds nothing"
    box.new_host_key()
    assert "bootstrap forget" in one_line_error(project.up("box1"))
    assert known.read_text() == first, "a refused key is not stored"
    assert project.up("box1", extra=["--accept-new-host-key"]).returncode == 0
    assert known.read_text() != first
    project.connection = "ssh"
    result = project.up("box1")
    assert result.returncode == 0, ("OpenSSH reads paramiko's entry", result.stderr)


def _sshd_pids(box: Box) -> list[int]:
    return [pid for pid, cmd in box.processes() if cmd.startswith(("sshd", "/usr/sbin/sshd"))]


@contextlib.contextmanager
def _frozen_sshd(box: Box) -> Iterator[None]:
    """Every sshd process of the box stopped (its kernel still acknowledges every packet: only
    an SSH-level keepalive can tell), continued after."""
    stopped = _sshd_pids(box)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
def test_a_box_whose_sshd_stops_answering_is_unreachable_within_10s(
    project: Project, box: Box
) -> None:
    project.playbook(away(14))
    project.write_inventory()
    follower = subprocess.Popen(
        [sys.executable, "-m", "provision.cli", "up", "box1", "-p", "playbooks/test.yaml"],
        cwd=project.root, env=project.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: count(box, "long") == 1, what="the long step")
        with _frozen_sshd(box):
            frozen_at = time.monotonic()
            out, err = follower.communicate(timeout=30)
            took = time.monotonic() - frozen_at
            assert follower.returncode == 2 and "unreachable" in err, (out, err)
            assert took < 11, took
            start = time.monotonic()
            line = one_line_error(project.cli("status", "box1", "-p", "playbooks/test.yaml"))
            assert "unreachable" in line and time.monotonic() - start < 10, line
    finally:
        follower.kill()
        follower.communicate()
    # The run belongs to the box: it went on meanwhile, and status catches up.
    wait_for(lambda: project.status("box1")["runner"] == "idle", timeout=40, what="the run")
    assert [count(box, n) for n in ("first", "long", "last")] == [1, 1, 1]


CANARY = "bt-canary-7f3c9e1d2a"


def _all_cmdlines() -> set[str]:
    """The command line of every process on this machine (controller and boxes alike)."""
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found.add(Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
def test_secrets_reach_no_argv_on_either_side(project: Project, box: Box) -> None:
    project.env["BT_TRANSPORT_CANARY"] = CANARY
    project.secrets = {"TOKEN": {"env": "BT_TRANSPORT_CANARY"}}
    project.playbook(
        """
        name: secret
        steps:
          - id: use
            kind: shell
            secrets: [TOKEN]
            run: echo "got $TOKEN"; sleep 2
        """
    )
    seen: set[str] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.update(_all_cmdlines())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        up = project.up("box1")
    finally:
        done.set()
        sampler.join()
    assert up.returncode == 0, up.stdout + up.stderr
    assert any("sleep 2" in cmd for cmd in seen), "the sampler saw the step run"
    assert any("-m provision up box1" in cmd for cmd in seen), "and the controller"
    assert [cmd for cmd in seen if CANARY in cmd] == []
    log = box.home / ".bootstrap/runs/secret/logs/use.log"
    assert "got ***" in log.read_text() and CANARY not in log.read_text()
    assert CANARY not in up.stdout + up.stderr


ATTACHED = """
import sys
from provision.inventory import Host
from provision.transport import for_host
host = Host(name="box1", host=sys.argv[1], port=int(sys.argv[2]), user=sys.argv[3], key=sys.argv[4],
            connection=sys.argv[5])
sys.exit(for_host(host).interactive("tty; read x; echo got:$x; exit 7"))
"""


@pytest.mark.parametrize("connection", ["ssh", "paramiko"])
def test_an_interactive_command_gets_a_pty_the_keys_typed_and_gives_its_status(
    box: Box, controller_env: dict[str, str], connection: str
) -> None:
    """What `attach` rides: this terminal bridged to a pty on the box, raw."""
    main, terminal = pty.openpty()
    argv = [sys.executable, "-c", ATTACHED, box.host, str(box.port), box.user, str(box.key)]
    proc = subprocess.Popen(
        [*argv, connection], stdin=terminal, stdout=terminal, stderr=terminal,
        env=controller_env, start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    seen = b""
    try:
        while b"/dev/pts/" not in seen:  # the box's tty answers first
            seen += os.read(main, 1024)
        os.write(main, b"typed\r")
        while b"got:typed" not in seen:
            seen += os.read(main, 1024)
        assert proc.wait(timeout=30) == 7, seen
    finally:
        proc.kill()
        proc.wait()
        os.close(main)
