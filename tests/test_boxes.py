"""The sshd box fixture itself: isolation, outage, host keys, environment, teardown."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from boxes import Box


def _strict_ssh(
    box: Box, known_hosts: Path, cmd: str, checking: str
) -> subprocess.CompletedProcess:
    """ssh with a real known_hosts file, as the controller will use one."""
    argv = box.ssh_argv(
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", f"StrictHostKeyChecking={checking}"
    )
    return subprocess.run(
        [*argv, cmd], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
    )


def test_two_boxes_have_their_own_home(box_factory: Callable[..., list[Box]]) -> None:
    a, b = box_factory(2)
    assert (a.host, a.port) != (b.host, b.port)
    assert a.ssh("echo hello $HOME").stdout == f"hello {a.home}\n"
    assert b.ssh("echo hello $HOME").stdout == f"hello {b.home}\n"

    a.ssh("echo only-a > ~/marker")
    assert (a.home / "marker").read_text() == "only-a\n"
    assert b.ssh("test -e ~/marker", check=False).returncode == 1
    assert not (b.home / "marker").exists()


def test_box_is_root_with_the_tools_a_runbook_needs(box: Box) -> None:
    out = box.ssh(
        "id -u; command -v python3; python3 --version; tmux -V; rclone version; git --version;"
        " echo $TMUX_TMPDIR"
    ).stdout.splitlines()
    assert out[0] == "0"
    assert out[1].startswith("/") and out[2].startswith("Python 3.")
    assert out[3].startswith("tmux ")
    assert out[4].startswith("rclone v")
    assert any(line.startswith("git version") for line in out)
    assert out[-1] == str(box.root / "tmp")  # tmux servers of different boxes stay apart


def test_stop_refuses_connections_and_start_restores_the_same_host_key(
    box: Box, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    assert _strict_ssh(box, known_hosts, "true", "accept-new").returncode == 0

    box.stop()
    down = box.ssh("true", check=False)
    assert down.returncode == 255
    assert "Connection refused" in down.stderr

    box.start()
    assert _strict_ssh(box, known_hosts, "echo back", "yes").stdout == "back\n"


def test_new_host_key_is_refused_by_known_hosts(box: Box, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    assert _strict_ssh(box, known_hosts, "true", "accept-new").returncode == 0

    box.new_host_key()
    changed = _strict_ssh(box, known_hosts, "true", "yes")
    assert changed.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in changed.stderr


def _start_detached_sleep(box: Box) -> int:
    box.ssh("setsid nohup sleep 300 </dev/null >/dev/null 2>&1 & echo $! > ~/sleep.pid")
    pid = int((box.home / "sleep.pid").read_text())
    assert pid in dict(box.processes())
    return pid


def test_teardown_kills_and_reaps_every_process_of_the_box(box: Box) -> None:
    pid = _start_detached_sleep(box)
    assert "sleep 300" in dict(box.processes())[pid]

    box.close()  # what box_factory does at teardown

    assert not Path(f"/proc/{pid}").exists()  # killed and reaped, not left a zombie
    assert box.processes() == []
    assert not box.home.exists()
    assert not re.search(rf"^{box.user}:", Path("/etc/passwd").read_text(), re.M)


def test_kill_all_is_a_crash_and_start_recovers(box: Box) -> None:
    pid = _start_detached_sleep(box)
    box.kill_all()
    assert box.processes() == []
    assert not Path(f"/proc/{pid}").exists()
    assert "Connection refused" in box.ssh("true", check=False).stderr
    box.start()
    assert box.ssh("echo up").stdout == "up\n"


def test_stop_leaves_the_box_running(box: Box) -> None:
    pid = _start_detached_sleep(box)
    box.stop()
    assert pid in dict(box.processes())
    assert not any("sshd" in cmd for _, cmd in box.processes())


def test_setsid_nohup_job_survives_the_ssh_client_being_killed(box: Box) -> None:
    cmd = "setsid nohup sleep 300 </dev/null >/dev/null 2>&1 & echo $!; exec sleep 60"
    with subprocess.Popen(
        [*box.ssh_argv(), cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    ) as client:
        assert client.stdout is not None
        job = int(client.stdout.readline())  # the session is still open: sleep 60 runs
        client.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any("@notty" in cmd for _, cmd in box.processes()):  # sshd ends the session
        assert time.monotonic() < deadline, box.processes()
        time.sleep(0.01)
    assert job in dict(box.processes())


def test_failed_command_reports_output_and_sshd_log(box: Box) -> None:
    with pytest.raises(subprocess.CalledProcessError) as failure:
        box.ssh("echo to-stderr >&2; exit 3")
    assert failure.value.returncode == 3
    message = str(failure.value)
    assert "to-stderr" in message
    assert "Server listening on" in message
