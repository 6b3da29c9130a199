"""How the bench runs each tool on the boxes, checks it did what it claims, and resets a box.

Every `*_run` returns a callable that runs the tool once and raises ToolFailed when the tool
failed — or, for a no-op, when it changed something (a no-op that is not one measures nothing).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import runbook
from boxes import Box
from harness import ToolFailed, bootstrap_argv, check, close_masters, run

# ------------------------------------------------------------------------------ bootstrap


class Bootstrap:
    """The bootstrap CLI with its own controller config dir, run in a project directory."""

    def __init__(self, project: Path, env: dict[str, str], inventory: Path | None = None) -> None:
        self.project = project
        self.env = env
        #: An inventory other than the project's inventory.yaml (`-i`).
        self.inventory = inventory

    @property
    def config_dir(self) -> Path:
        return Path(self.env["BOOTSTRAP_CONFIG_DIR"])

    @property
    def control_dir(self) -> Path:
        """Where the CLI keeps its ControlMaster sockets (see provision.home.control_dir)."""
        from provision import home

        saved = os.environ.get("BOOTSTRAP_CONFIG_DIR")
        os.environ["BOOTSTRAP_CONFIG_DIR"] = str(self.config_dir)
        try:
            return home.control_dir()
        finally:
            if saved is None:
                del os.environ["BOOTSTRAP_CONFIG_DIR"]
            else:
                os.environ["BOOTSTRAP_CONFIG_DIR"] = saved

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        inventory = ["-i", str(self.inventory)] if self.inventory else []
        argv = [*bootstrap_argv(), *args, *inventory]
        return run(argv, env=self.env, cwd=self.project, timeout=timeout)

    def up(self, target: str, playbook: Path, noop: bool) -> Callable[[], None]:
        """`bootstrap up TARGET -p PLAYBOOK`; with `noop`, fail if any step ran."""

        def action() -> None:
            result = check(self.cli("up", target, "-p", str(playbook)), f"bootstrap up {target}")
            if noop and ": running" in result.stdout:
                raise ToolFailed(f"bootstrap up {target} was not a no-op:\n{result.stdout[-2000:]}")

        return action

    def cold(self) -> None:
        """Close the CLI's ssh ControlMasters: the next command pays a full handshake."""
        close_masters(self.control_dir)

    def forget_agents(self) -> None:
        """Forget which boxes hold the agent (as for boxes never seen before)."""
        for path in (self.config_dir / "hosts").glob("*.agent"):
            path.unlink()


def wipe_bootstrap(box: Box, tool_dirs: str = "") -> None:
    """Remove the agent, every run and `tool_dirs` from a box (a box bootstrap never saw)."""
    box.ssh(f"rm -rf ~/.bootstrap {tool_dirs}")


# ------------------------------------------------------------------------------ Ansible


class Ansible:
    """ansible-playbook from bench/.venv with the bench's ansible.cfg."""

    def __init__(self, venv_bin: Path, config: Path, env: dict[str, str]) -> None:
        self.argv = [str(venv_bin / "ansible-playbook"), str(config.parent / "site.yml")]
        self.config = config
        self.env = dict(env, ANSIBLE_CONFIG=str(config), ANSIBLE_HOME=str(config.parent / "home"))

    def play(self, noop: bool, limit: str | None = None) -> Callable[[], None]:
        argv = [*self.argv, *(["--limit", limit] if limit else [])]

        def action() -> None:
            result = check(run(argv, env=self.env, cwd=self.config.parent), "ansible-playbook")
            recap = result.stdout[result.stdout.rfind("PLAY RECAP") :]
            if noop and re.search(r"changed=[1-9]", recap):
                raise ToolFailed(f"ansible-playbook was not a no-op:\n{recap}")

        return action

    def cold(self) -> None:
        close_masters(self.config.parent / "cp")


# ------------------------------------------------------------------------------ pyinfra


class Pyinfra:
    """pyinfra from bench/.venv, defaults (paramiko, its own parallelism)."""

    def __init__(self, venv_bin: Path, inventory: Path, deploy: Path, env: dict[str, str]) -> None:
        self.argv = [str(venv_bin / "pyinfra"), "-y", str(inventory), str(deploy)]
        self.cwd = deploy.parent
        self.env = env

    def deploy(self, noop: bool, limit: str | None = None) -> Callable[[], None]:
        argv = [*self.argv, *(["--limit", limit] if limit else [])]

        def action() -> None:
            result = check(run(argv, env=self.env, cwd=self.cwd), "pyinfra")
            output = result.stdout + result.stderr  # pyinfra reports on stderr
            if "Grand total" not in output:
                raise ToolFailed(f"pyinfra ran no operation:\n{output[-2000:]}")
            if noop and _pyinfra_changed(output):
                raise ToolFailed(f"pyinfra was not a no-op:\n{output[-2000:]}")

        return action


def _pyinfra_changed(stdout: str) -> bool:
    """Whether pyinfra's results table reports any changed (successful, non-noop) operation."""
    total = re.search(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", stdout)
    return bool(total and total.group(2) not in ("-", "0"))


# ------------------------------------------------------------------------------ the floor


def floor(boxes: list[Box], script: Callable[[Box], str], *options: str) -> Callable[[], None]:
    """One plain `ssh` per box running `script(box)` in one bash, all boxes in parallel."""
    argvs = {b.name: [*b.ssh_argv(*options), script(b)] for b in boxes}

    def one(name: str) -> None:
        check(run(argvs[name], timeout=120), f"floor ssh to {name}")

    def action() -> None:
        if len(argvs) == 1:
            one(next(iter(argvs)))
            return
        with ThreadPoolExecutor(len(argvs)) as pool:
            list(pool.map(one, argvs))

    return action


def master_options(control_dir: Path) -> tuple[str, ...]:
    """ssh options for a warm ControlMaster per box in `control_dir`."""
    control_dir.mkdir(parents=True, exist_ok=True)
    return (
        "-o", "ControlMaster=auto",
        "-o", f"ControlPath={control_dir}/%C",
        "-o", "ControlPersist=60",
    )  # fmt: skip


def converge_script(root: str) -> str:
    """The 15 steps done by hand in one bash (what the floor of a first converge costs)."""
    q = shlex.quote
    lines = ["set -e"]
    lines += [f"mkdir -p {q(f'{root}/{sub}')}" for sub in runbook.DIRS]
    lines.append(f"printf %s {q(runbook.VERSION_TEXT)} > {q(f'{root}/app/VERSION')}")
    for line, path in (
        (f"export BENCH_HOME={root}", f"{root}/app/profile"),
        (runbook.HOSTS_LINE, f"{root}/app/conf/hosts"),
    ):
        lines.append(f"grep -qxF {q(line)} {q(path)} 2>/dev/null || echo {q(line)} >> {q(path)}")
    lines.append(
        f"dpkg-query -W -f='${{Status}}' {runbook.PACKAGE} | grep -qx 'install ok installed'"
        f" || apt-get install -y {runbook.PACKAGE}"
    )
    lines.append(
        f"test -e {q(f'{root}/data/seed.txt')} || seq 1 1000 > {q(f'{root}/data/seed.txt')}"
    )
    lines.append(
        f"test -e {q(f'{root}/releases/app.tar')}"
        f" || tar -C {q(f'{root}/app')} -cf {q(f'{root}/releases/app.tar')} VERSION"
    )
    for name, dest in runbook.TEMPLATE_DEST.items():
        text = runbook.render(name, root)
        lines.append(f"printf %s {q(text)} > {q(f'{root}/{dest}')}")
    lines.append(f"ln -sfn {q(f'{root}/app')} {q(f'{root}/current')}")
    return "\n".join(lines) + "\n"
