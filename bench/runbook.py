"""The bench's 15-step idempotent runbook, written once per tool.

Six directories, a file with fixed content, two lines in files, a package-present check, two
commands with `creates`, two templates and a symlink — as a bootstrap playbook (real kinds:
shell with creates/done_when, template, apt), an Ansible playbook, a pyinfra deploy, and the
floor: one bash script doing the 15 checks, run through one `ssh`.

Each tool converges its own directory on the box (`~/bench-<tool>`), so that no tool sees
another's files as drift (their templates differ in whitespace); the package is shared.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

import jinja2
import yaml
from boxes import Box

RUN_NAME = "bench15"
DIRS = ("app", "app/conf", "data", "logs", "cache", "releases")
VERSION_TEXT = "1.4.2\n"
HOSTS_LINE = "127.0.0.1 bench.local"
PACKAGE = "openssh-server"
VARS = {"app_port": 8080, "workers": 4}
TEMPLATES = {
    "app.conf.j2": (
        "# written by the bench runbook\n"
        "[server]\n"
        "root = {{ root }}\n"
        "port = {{ app_port }}\n"
        "workers = {{ workers }}\n"
        "{% for n in range(workers) %}worker.{{ n }}.log = {{ root }}/logs/worker-{{ n }}.log\n"
        "{% endfor %}"
    ),
    "env.sh.j2": "export APP_ROOT={{ root }}\nexport APP_PORT={{ app_port }}\n",
}
TEMPLATE_DEST = {"app.conf.j2": "app/conf/app.conf", "env.sh.j2": "app/conf/env.sh"}


def root_for(box: Box, tool: str) -> str:
    """The directory a tool converges on a box."""
    return f"{box.home}/bench-{tool}"


def _dir_id(sub: str) -> str:
    return "dir-" + sub.replace("/", "-")


def _write_templates(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in TEMPLATES.items():
        (directory / name).write_text(text)


# ------------------------------------------------------------------------------ bootstrap


def bootstrap_project(path: Path, boxes: list[Box]) -> Path:
    """playbooks/bench15.yaml, templates/ and inventory.yaml (group `fleet`); returns the
    playbook's path."""
    _write_templates(path / "templates")
    r = "{{ root }}"
    steps: list[dict[str, object]] = []
    for sub in DIRS:
        parent = sub.rsplit("/", 1)[0] if "/" in sub else None
        step: dict[str, object] = {
            "id": _dir_id(sub),
            "kind": "shell",
            "run": f"mkdir -p {r}/{sub}",
            "creates": f"{r}/{sub}",
        }
        if parent:
            step["needs"] = [_dir_id(parent)]
        steps.append(step)
    steps += [
        {
            "id": "version-file",
            "kind": "template",
            "content": VERSION_TEXT,
            "dest": f"{r}/app/VERSION",
            "mode": "0644",
            "needs": ["dir-app"],
        },
        {
            "id": "line-profile",
            "kind": "shell",
            "run": f"echo 'export BENCH_HOME={r}' >> {r}/app/profile",
            "done_when": f"grep -qxF 'export BENCH_HOME={r}' {r}/app/profile",
            "needs": ["dir-app"],
        },
        {
            "id": "line-hosts",
            "kind": "shell",
            "run": f"echo '{HOSTS_LINE}' >> {r}/app/conf/hosts",
            "done_when": f"grep -qxF '{HOSTS_LINE}' {r}/app/conf/hosts",
            "needs": ["dir-app-conf"],
        },
        {"id": "package", "kind": "apt", "packages": [PACKAGE]},
        {
            "id": "cmd-seed",
            "kind": "shell",
            "run": f"seq 1 1000 > {r}/data/seed.txt",
            "creates": f"{r}/data/seed.txt",
            "needs": ["dir-data"],
        },
        {
            "id": "cmd-build",
            "kind": "shell",
            "run": f"tar -C {r}/app -cf {r}/releases/app.tar VERSION",
            "creates": f"{r}/releases/app.tar",
            "needs": ["version-file", "dir-releases"],
        },
    ]
    for name, dest in TEMPLATE_DEST.items():
        steps.append(
            {
                "id": "tpl-" + name.split(".")[0],
                "kind": "template",
                "src": name,
                "dest": f"{r}/{dest}",
                "mode": "0644",
                "needs": ["dir-app-conf"],
            }
        )
    steps.append(
        {
            "id": "link-current",
            "kind": "shell",
            "run": f"ln -sfn {r}/app {r}/current",
            "done_when": f'test "$(readlink {r}/current)" = "{r}/app"',
            "needs": ["dir-app"],
        }
    )
    assert len(steps) == 15
    book = {"name": RUN_NAME, "vars": dict(VARS), "steps": steps}
    playbook = path / "playbooks" / "bench15.yaml"
    playbook.parent.mkdir(parents=True, exist_ok=True)
    playbook.write_text(yaml.safe_dump(book, sort_keys=False))
    write_inventory(path, boxes, "bootstrap")
    return playbook


def write_inventory(
    path: Path, boxes: list[Box], tool: str, connection: str = "ssh", name: str = "inventory.yaml"
) -> Path:
    """A bootstrap inventory of the boxes (group `fleet`), `root` set per host, each reached
    over `connection` (ssh: the OpenSSH client, or paramiko)."""
    hosts = {
        b.name: {
            **b.inventory_entry(),
            "connection": connection,
            "vars": {"root": root_for(b, tool)},
        }
        for b in boxes
    }
    data = {"hosts": hosts, "groups": {"fleet": [b.name for b in boxes]}}
    inventory = path / name
    inventory.write_text(yaml.safe_dump(data))
    return inventory


# ------------------------------------------------------------------------------ Ansible


def ansible_project(path: Path, boxes: list[Box]) -> Path:
    """ansible.cfg (pipelining, ControlPersist, no fact gathering), inventory, playbook;
    returns the config file (for ANSIBLE_CONFIG)."""
    _write_templates(path / "templates")
    hosts = {
        b.name: {
            "ansible_host": b.host,
            "ansible_port": b.port,
            "ansible_user": b.user,
            "ansible_ssh_private_key_file": str(b.key),
            "root": root_for(b, "ansible"),
        }
        for b in boxes
    }
    (path / "inventory.yml").write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    r = "{{ root }}"
    tasks: list[dict[str, object]] = [
        {"name": _dir_id(sub), "ansible.builtin.file": {"path": f"{r}/{sub}", "state": "directory"}}
        for sub in DIRS
    ]
    tasks += [
        {
            "name": "version-file",
            "ansible.builtin.copy": {
                "content": VERSION_TEXT,
                "dest": f"{r}/app/VERSION",
                "mode": "0644",
            },
        },
        {
            "name": "line-profile",
            "ansible.builtin.lineinfile": {
                "path": f"{r}/app/profile",
                "line": f"export BENCH_HOME={r}",
                "create": True,
                "mode": "0644",
            },
        },
        {
            "name": "line-hosts",
            "ansible.builtin.lineinfile": {
                "path": f"{r}/app/conf/hosts",
                "line": HOSTS_LINE,
                "create": True,
                "mode": "0644",
            },
        },
        {"name": "package", "ansible.builtin.apt": {"name": PACKAGE, "state": "present"}},
        {
            "name": "cmd-seed",
            "ansible.builtin.shell": {
                "cmd": f"seq 1 1000 > {r}/data/seed.txt",
                "creates": f"{r}/data/seed.txt",
            },
        },
        {
            "name": "cmd-build",
            "ansible.builtin.shell": {
                "cmd": f"tar -C {r}/app -cf {r}/releases/app.tar VERSION",
                "creates": f"{r}/releases/app.tar",
            },
        },
    ]
    for name, dest in TEMPLATE_DEST.items():
        tasks.append(
            {
                "name": "tpl-" + name.split(".")[0],
                "ansible.builtin.template": {"src": name, "dest": f"{r}/{dest}", "mode": "0644"},
            }
        )
    tasks.append(
        {
            "name": "link-current",
            "ansible.builtin.file": {"src": f"{r}/app", "dest": f"{r}/current", "state": "link"},
        }
    )
    assert len(tasks) == 15
    play = {"hosts": "all", "gather_facts": False, "vars": dict(VARS), "tasks": tasks}
    (path / "site.yml").write_text(yaml.safe_dump([play], sort_keys=False))
    config = path / "ansible.cfg"
    config.write_text(
        "[defaults]\n"
        f"inventory = {path / 'inventory.yml'}\n"
        "host_key_checking = False\n"
        "gathering = explicit\n"
        "forks = 16\n"
        "interpreter_python = /usr/bin/python3\n"
        "retry_files_enabled = False\n"
        f"local_tmp = {path / 'tmp'}\n"
        "[ssh_connection]\n"
        "pipelining = True\n"
        # Masters outlive a whole bench round (a 16-box Ansible run takes about a minute).
        "ssh_args = -F /dev/null -o ControlMaster=auto -o ControlPersist=10m"
        " -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no -o IdentitiesOnly=yes"
        " -o LogLevel=ERROR\n"
        f"control_path_dir = {path / 'cp'}\n"
    )
    return config


# ------------------------------------------------------------------------------ pyinfra


_DEPLOY = '''\
"""The bench's 15-step runbook as a pyinfra deploy (pyinfra's own operations and facts)."""

from io import StringIO

from pyinfra import host
from pyinfra.facts.files import File
from pyinfra.operations import apt, files, server

TEMPLATES = {templates!r}
root = host.data.root
for sub in {dirs!r}:
    files.directory(name="dir " + sub, path=f"{{root}}/{{sub}}")
files.put(
    name="version-file", src=StringIO({version!r}), dest=f"{{root}}/app/VERSION", mode="644"
)
files.line(name="line-profile", path=f"{{root}}/app/profile", line=f"export BENCH_HOME={{root}}")
files.line(name="line-hosts", path=f"{{root}}/app/conf/hosts", line={hosts_line!r})
apt.packages(name="package", packages=[{package!r}])
if not host.get_fact(File, path=f"{{root}}/data/seed.txt"):  # pyinfra's idiom for `creates`
    server.shell(name="cmd-seed", commands=[f"seq 1 1000 > {{root}}/data/seed.txt"])
if not host.get_fact(File, path=f"{{root}}/releases/app.tar"):
    server.shell(
        name="cmd-build", commands=[f"tar -C {{root}}/app -cf {{root}}/releases/app.tar VERSION"]
    )
for name, dest in {template_dest!r}.items():
    files.template(
        name="tpl " + name,
        src=f"{{TEMPLATES}}/{{name}}",
        dest=f"{{root}}/{{dest}}",
        mode="644",
        root=root,
        app_port={app_port!r},
        workers={workers!r},
    )
files.link(name="link-current", path=f"{{root}}/current", target=f"{{root}}/app")
'''


def pyinfra_project(path: Path, boxes: list[Box]) -> tuple[Path, Path]:
    """inventory.py and deploy.py; returns both paths."""
    _write_templates(path / "templates")
    hosts = [
        (
            b.host,
            {
                "ssh_port": b.port,
                "ssh_user": b.user,
                "ssh_key": str(b.key),
                "ssh_known_hosts_file": "/dev/null",
                "ssh_strict_host_key_checking": "off",
                "root": root_for(b, "pyinfra"),
            },
        )
        for b in boxes
    ]
    inventory = path / "inventory.py"
    inventory.write_text(f"hosts = {hosts!r}\n")
    deploy = path / "deploy.py"
    deploy.write_text(
        _DEPLOY.format(
            templates=str(path / "templates"),
            dirs=DIRS,
            version=VERSION_TEXT,
            hosts_line=HOSTS_LINE,
            package=PACKAGE,
            template_dest=TEMPLATE_DEST,
            **VARS,
        )
    )
    return inventory, deploy


# ------------------------------------------------------------------------------ the floor


def render(name: str, root: str) -> str:
    """A template as bootstrap renders it (jinja2, StrictUndefined, trailing newline kept)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(TEMPLATES[name]).render(root=root, **VARS)


def floor_script(root: str) -> str:
    """The 15 checks of the runbook in one bash script: exits 0 when all hold."""

    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    q = shlex.quote
    lines = ["set -e", """trap 'echo "check failed: $BASH_COMMAND" >&2' ERR"""]
    lines += [f"test -d {q(f'{root}/{sub}')}" for sub in DIRS]
    lines.append(f"echo {digest(VERSION_TEXT)}' {root}/app/VERSION' | sha256sum --check --status")
    lines.append(f"grep -qxF {q(f'export BENCH_HOME={root}')} {q(f'{root}/app/profile')}")
    lines.append(f"grep -qxF {q(HOSTS_LINE)} {q(f'{root}/app/conf/hosts')}")
    lines.append(f"dpkg-query -W -f='${{Status}}' {PACKAGE} | grep -qx 'install ok installed'")
    lines.append(f"test -e {q(f'{root}/data/seed.txt')}")
    lines.append(f"test -e {q(f'{root}/releases/app.tar')}")
    for name, dest in TEMPLATE_DEST.items():
        lines.append(
            f"echo {digest(render(name, root))}' {root}/{dest}' | sha256sum --check --status"
        )
    lines.append(f'test "$(readlink {q(f"{root}/current")})" = {q(f"{root}/app")}')
    assert len(lines) == 17  # set -e, trap, 15 checks
    return "\n".join(lines) + "\n"
