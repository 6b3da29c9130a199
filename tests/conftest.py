"""Shared fixtures: throwaway sshd boxes (see boxes.py) and a controller environment.

Two tiers by what a test needs. A `box` test needs root or sshd: box users are uid 0 (as on
vast.ai), and some tests mount a tmpfs, chroot or install packages. Such a test is marked `box`
here, automatically when it uses a box fixture or is a fresh-box test, and by hand otherwise. As
another user a box test fails, loudly (CI runs as root after `apt-get install -y openssh-server`:
a skip would hide it). Everything else needs neither: `python3 -m pytest -m "not box"` runs it as
any user.

And two by time. A `slow` test takes about a third of a second or more (measured on the 2-core
machine): an end-to-end run of real processes (the CLI or the agent as subprocesses, tmux jobs,
rclone, uv, git, the GCS emulator, the guard's polls), real waits, or a big input (a 1000-step
graph, a big log, every module's source). It is skipped, saying so, unless `--run-slow` is given;
`.ci/run` gives it, so CI runs every test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from boxes import SSHD, Box, make_key, start_box, sweep_stale_users
from project import Project

#: Fixtures that start sshd boxes: a test using one, directly or through another fixture, is a
#: `box` test.
BOX_FIXTURES = frozenset({"client_key"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="run the `slow` tests too (skipped otherwise; .ci/run runs them)",
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs root or sshd `box`, and skip the `slow` ones unless
    `--run-slow` is given (see the module's docstring)."""
    run_slow = config.getoption("--run-slow")
    skip_slow = pytest.mark.skip(reason="slow: --run-slow runs it (.ci/run does)")
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        if uses & BOX_FIXTURES or item.get_closest_marker("freshbox"):
            item.add_marker(pytest.mark.box)
        if not run_slow and item.get_closest_marker("slow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Private key (ed25519, `.pub` beside it) that every box of the session authorizes."""
    if os.geteuid() != 0:
        pytest.fail("sshd boxes need root (box users are uid 0); -m 'not box' leaves them out")
    if not Path(SSHD).exists() or not shutil.which("ssh-keygen"):
        pytest.fail("sshd boxes need openssh-server: apt-get install -y openssh-server")
    sweep_stale_users()
    return make_key(tmp_path_factory.mktemp("client") / "id_ed25519")


@pytest.fixture
def box_factory(tmp_path: Path, client_key: Path) -> Iterator[Callable[..., list[Box]]]:
    """`make(n=1)` starts n fresh boxes (named box1, box2, ... within the test); all are torn
    down when the test ends: processes killed and reaped, users and HOMEs removed."""
    boxes: list[Box] = []

    def make(n: int = 1) -> list[Box]:
        new = []
        for _ in range(n):
            name = f"box{len(boxes) + 1}"
            boxes.append(start_box(tmp_path / name, client_key, name))
            new.append(boxes[-1])
        return new

    yield make
    errors = []
    for box in boxes:
        try:
            box.close()
        except Exception as exc:  # close the other boxes anyway
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def box(box_factory: Callable[..., list[Box]]) -> Box:
    """One fresh box for this test."""
    return box_factory(1)[0]


@pytest.fixture
def controller_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running the bootstrap CLI as a subprocess (see `boxes.run_cli`): its own
    controller config dir (known_hosts etc.; not created here), this python's scripts on PATH,
    and no ssh agent, so only the keys a test names are used."""
    env = dict(os.environ)
    env.pop("SSH_AUTH_SOCK", None)
    env["BOOTSTRAP_CONFIG_DIR"] = str(tmp_path / "controller")
    scripts = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    env["PATH"] = os.pathsep.join(dict.fromkeys([*scripts, env.get("PATH", os.defpath)]))
    return env


#: Transport ids, as a test parametrizes `transport` (indirect=True) to run over each.
TRANSPORTS = ("openssh", "paramiko")


@pytest.fixture
def transport(request: pytest.FixtureRequest) -> str:
    """How the project's boxes are reached: 'openssh' (the default: `connection: ssh`) or
    'paramiko' (`connection: paramiko`). A test runs over both, as testinfra runs a test per
    backend, with `@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)`."""
    return str(getattr(request, "param", "openssh"))


@pytest.fixture
def project(tmp_path: Path, controller_env: dict[str, str], box: Box, transport: str) -> Project:
    """A bootstrap project directory whose inventory holds one fresh box (`box1`), reached
    over `transport`."""
    connection = "paramiko" if transport == "paramiko" else "ssh"
    return Project(tmp_path / "project", controller_env, [box], connection=connection)


@pytest.fixture
def socket() -> Iterator[str]:
    """A tmux server socket of the test's own (a short path: unix sockets allow ~107 bytes);
    its server is killed when the test ends."""
    folder = tempfile.mkdtemp(prefix="tmx", dir="/tmp")
    path = f"{folder}/tmux"
    yield path
    subprocess.run(["tmux", "-S", path, "kill-server"], capture_output=True, check=False)
    shutil.rmtree(folder, ignore_errors=True)
