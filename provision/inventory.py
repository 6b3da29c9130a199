"""The inventory (hosts, groups, vars, secrets) and the targets a user names on the command line.

A target is an inventory host, a group, `local`, `user@host[:port]`, an alias from
~/.ssh/config, or an `ssh -p PORT user@host ...` command pasted as vast.ai prints it.
Secrets are resolved here, on the controller, from the environment or a file; their values
never enter a plan.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision import earlyssh
from provision.errors import ConfigError, TargetError
from provision.yamlsrc import LineMap, load_yaml

_HOST_KEYS = {"host", "port", "user", "key", "connection", "vars", "ssh_options"}
#: How a host is reached: the OpenSSH client, paramiko, or this machine (provision/transport/).
CONNECTIONS = ("ssh", "paramiko", "local")
_TOP_KEYS = {"hosts", "groups", "vars", "secrets"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Host:
    """One box to provision."""

    name: str
    connection: str = "ssh"  # one of CONNECTIONS
    host: str | None = None
    port: int | None = None
    user: str | None = None
    key: str | None = None
    ssh_options: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    #: Where `key` was written (inventory file, line), for errors about the key file.
    key_origin: tuple[str, int] | None = None

    @property
    def address(self) -> str:
        """`user@host:port` as far as known, for messages and known_hosts."""
        if self.connection == "local":
            return "local"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{self.host}{port}"


@dataclass
class Inventory:
    """Hosts, groups, shared vars and secret sources."""

    path: Path | None = None
    hosts: dict[str, Host] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)
    secret_sources: dict[str, dict[str, str]] = field(default_factory=dict)
    secret_lines: dict[str, int] = field(default_factory=dict)

    def secret(self, name: str) -> str:
        """The value of a secret, read now from its source; ConfigError when unavailable."""
        source = self.secret_sources.get(name)
        where = str(self.path) if self.path else "inventory"
        line = self.secret_lines.get(name)
        if source is None:
            known = ", ".join(sorted(self.secret_sources)) or "none"
            raise ConfigError(f"unknown secret '{name}' (inventory secrets: {known})", file=where)
        if "env" in source:
            value = os.environ.get(source["env"])
            if not value:
                raise ConfigError(
                    f"secret '{name}': environment variable {source['env']} is not set",
                    file=where,
                    line=line,
                )
            return value
        if "file" in source:
            path = Path(os.path.expanduser(source["file"]))
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"secret '{name}': cannot read {path}: {exc.strerror}", file=where, line=line
                ) from None
        return source["value"]


def load_inventory(path: Path | None) -> Inventory:
    """Load an inventory file; a missing default inventory is an empty one."""
    if path is not None:
        earlyssh.depends_on(str(path))  # a remembered ssh line holds while this file does
    if path is None or not path.exists():
        return Inventory(path=None)
    data = load_yaml(path)
    src = str(path)
    if data is None:
        return Inventory(path=path)
    if not isinstance(data, LineMap):
        raise ConfigError("the inventory must be a mapping", file=src, line=1)
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(
                f"unknown key '{key}' (expected: {', '.join(sorted(_TOP_KEYS))})",
                file=src,
                line=data.line_of(key),
            )
    inv = Inventory(path=path)
    inv.vars = dict(_mapping(data.get("vars") or LineMap(), "vars", src, data.line_of("vars")))
    default = inv.vars.get("connection", "ssh")
    if default not in CONNECTIONS or default == "local":
        raise ConfigError(
            "vars: connection (every host's default) must be ssh or paramiko",
            file=src,
            line=data.line_of("vars"),
        )
    for name, spec in _mapping(data.get("hosts") or LineMap(), "hosts", src, data.line).items():
        inv.hosts[name] = _host(name, spec, src, data["hosts"].line_of(name), default)
    for name, members in _mapping(
        data.get("groups") or LineMap(), "groups", src, data.line
    ).items():
        line = data["groups"].line_of(name)
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"group '{name}' must be a list of host names", file=src, line=line)
        for member in members:
            if member not in inv.hosts:
                raise ConfigError(
                    f"group '{name}' names unknown host '{member}'", file=src, line=line
                )
        inv.groups[name] = list(members)
    secrets = _mapping(data.get("secrets") or LineMap(), "secrets", src, data.line)
    for name, spec in secrets.items():
        line = secrets.line_of(name) if isinstance(secrets, LineMap) else None
        if (
            not isinstance(spec, dict)
            or len(spec) != 1
            or next(iter(spec)) not in ("env", "file", "value")
        ):
            raise ConfigError(
                f"secret '{name}' must be {{env: VAR}}, {{file: PATH}} or {{value: ...}}",
                file=src,
                line=line,
            )
        inv.secret_sources[name] = {k: str(v) for k, v in spec.items()}
        inv.secret_lines[name] = line or 0
    return inv


def _mapping(value: Any, what: str, src: str, line: int) -> LineMap:
    if not isinstance(value, dict):
        raise ConfigError(f"'{what}' must be a mapping", file=src, line=line)
    return value  # type: ignore[return-value]


def _host(name: str, spec: Any, src: str, line: int, default: str = "ssh") -> Host:
    if not _NAME.match(str(name)):
        raise ConfigError(f"bad host name '{name}'", file=src, line=line)
    if not isinstance(spec, dict):
        raise ConfigError(f"host '{name}' must be a mapping", file=src, line=line)
    for key in spec:
        if key not in _HOST_KEYS:
            raise ConfigError(
                f"host '{name}': unknown key '{key}' (expected: {', '.join(sorted(_HOST_KEYS))})",
                file=src,
                line=spec.line_of(key) if isinstance(spec, LineMap) else line,
            )
    connection = spec.get("connection", default)
    if connection not in CONNECTIONS:
        raise ConfigError(
            f"host '{name}': connection must be {', '.join(CONNECTIONS[:-1])} or "
            f"{CONNECTIONS[-1]} (got {connection!r})",
            file=src,
            line=spec.line_of("connection") if isinstance(spec, LineMap) else line,
        )
    if connection != "local" and not spec.get("host"):
        raise ConfigError(f"host '{name}' needs 'host' (or connection: local)", file=src, line=line)
    for key in ("host", "user", "key"):
        where = spec.line_of(key) if isinstance(spec, LineMap) else line
        # YAML reads `user: 1000` or `host: 1.5` as numbers; ssh's argv needs strings.
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise ConfigError(
                f"host '{name}': {key} must be a string, got {type(spec[key]).__name__}",
                file=src,
                line=where,
            )
        # ssh would read `-oProxyCommand=...` as an option and run it on this machine.
        if isinstance(spec.get(key), str) and _option_like(spec[key]):
            raise ConfigError(
                f"host '{name}': {key} must not be blank or start with '-' (ssh would read it "
                f"as an option): {spec[key]!r}",
                file=src,
                line=where,
            )
    port = spec.get("port")
    bad_port = isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
    if port is not None and bad_port:
        raise ConfigError(f"host '{name}': port must be 1..65535", file=src, line=line)
    host_vars = spec.get("vars") or {}
    if not isinstance(host_vars, dict):
        raise ConfigError(f"host '{name}': vars must be a mapping", file=src, line=line)
    options = spec.get("ssh_options") or []
    if not isinstance(options, list):
        raise ConfigError(f"host '{name}': ssh_options must be a list", file=src, line=line)
    return Host(
        name=name,
        connection=connection,
        host=spec.get("host"),
        port=port,
        user=spec.get("user"),
        key=spec.get("key"),
        ssh_options=[str(o) for o in options],
        vars=dict(host_vars),
        key_origin=(src, spec.line_of("key") if isinstance(spec, LineMap) else line),
    )


def _option_like(value: str) -> bool:
    """Whether a value would be read as an option where ssh expects a name (or is blank)."""
    return value.lstrip().startswith("-") or not value.strip()


def resolve_targets(targets: list[str], inv: Inventory) -> list[Host]:
    """Turn command-line targets into hosts (groups expanded, duplicates dropped)."""
    if not targets:
        raise TargetError("no target given (a host, a group, local, user@host[:port])")
    out: dict[str, Host] = {}
    for target in targets:
        for host in _resolve_one(target.strip(), inv):
            out.setdefault(host.name, host)
    hosts = list(out.values())
    for host in hosts:
        check_key_file(host)
    named = [t.strip() for t in targets if t.strip() in inv.groups]
    for host in hosts:
        _assign_rank(host, _nodes_of(host, named, inv) or hosts)
    return hosts


def check_key_file(host: Host) -> None:
    """Refuse a key file ssh could not use: missing, unreadable, or (ssh's own rule) readable by
    others while owned by this user. Named by inventory file, line and host; exit 2."""
    if not host.key or host.connection == "local":
        return
    path = Path(os.path.expanduser(host.key))
    problem = None
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a file"
        elif not os.access(path, os.R_OK):
            problem = "is not readable by you"
        elif st.st_uid == os.getuid() and st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            problem = f"has permissions {mode:04o}: ssh refuses a private key others can read (chmod 600 {host.key})"
    except OSError as exc:
        problem = "does not exist" if isinstance(exc, FileNotFoundError) else exc.strerror
    if problem is None:
        return
    message = f"host '{host.name}': key file {host.key} {problem}"
    if host.key_origin:
        raise ConfigError(message, file=host.key_origin[0], line=host.key_origin[1])
    raise TargetError(message)


def _resolve_one(target: str, inv: Inventory) -> list[Host]:
    if target in inv.hosts:
        return [inv.hosts[target]]
    if target in inv.groups:
        return [inv.hosts[m] for m in inv.groups[target]]
    if target == "local":
        return [Host(name="local", connection="local")]
    connection = str(inv.vars.get("connection", "ssh"))
    if target.startswith("ssh ") or target.startswith("ssh\t"):
        pasted = _from_ssh_command(target)
        pasted.connection = connection
        return [pasted]
    match = re.match(r"^(?:([^@\s]+)@)?([A-Za-z0-9_.-]+|\[[0-9a-fA-F:]+\])(?::(\d+))?$", target)
    if match and ("@" in target or ":" in target or "." in target or _in_ssh_config(target)):
        user, host, port = match.groups()
        if _option_like(host) or (user is not None and _option_like(user)):
            raise TargetError(
                f"bad target '{target}': a user or host must not be blank or start with '-'"
            )
        return [
            Host(
                name=target,
                host=host.strip("[]"),
                port=int(port) if port else None,
                user=user,
                connection=connection,
            )
        ]
    known = sorted([*inv.hosts, *inv.groups])
    listing = f" (inventory: {', '.join(known)})" if known else " (no inventory loaded)"
    raise TargetError(
        f"unknown target '{target}': not a host or group{listing}, not local, "
        "not user@host[:port], not a Host in ~/.ssh/config"
    )


def _from_ssh_command(command: str) -> Host:
    """Parse `ssh -p 41234 root@ssh5.vast.ai -L 8080:localhost:8080` into a host."""
    try:
        words = shlex.split(command)[1:]
    except ValueError as exc:
        raise TargetError(f"cannot parse ssh command: {exc}") from None
    port = key = user = None
    options: list[str] = []
    dest = None
    takes_value = set("BbcDEeFIiJLlmOoPpRSWw")
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("-") and len(word) >= 2 and word[1] in takes_value:
            value = word[2:] or (words[i + 1] if i + 1 < len(words) else "")
            i += 1 if word[2:] else 2
            flag = word[1]
            if flag == "p":
                port = int(value) if value.isdigit() else None
            elif flag == "i":
                key = value
            elif flag == "l":
                user = value
            elif flag in "oJ":
                options += [f"-{flag}", value]
            continue
        if word.startswith("-"):
            i += 1
            continue
        dest = dest or word
        i += 1
    if dest is None:
        raise TargetError(f"no host in ssh command: {command}")
    if "@" in dest:
        user, dest = dest.split("@", 1)
    name = f"{user + '@' if user else ''}{dest}{':' + str(port) if port else ''}"
    return Host(name=name, host=dest, port=port, user=user, key=key, ssh_options=options)


def _in_ssh_config(alias: str) -> bool:
    """Whether ~/.ssh/config has a `Host` line naming `alias` exactly."""
    try:
        text = Path(os.path.expanduser("~/.ssh/config")).read_text(encoding="utf-8")
    except OSError:
        return False
    for line in text.splitlines():
        words = line.strip().split()
        if len(words) > 1 and words[0].lower() == "host" and alias in words[1:]:
            return True
    return False


def _nodes_of(host: Host, named: list[str], inv: Inventory) -> list[Host]:
    """The nodes of the multi-node job `host` belongs to: the group named on the command line
    that holds it, else the one group holding it. Then `up box2` alone gives box2 the same rank
    as `up fleet` did, and does not relaunch its training as a one-node job. [] when neither
    (a host of several groups, none named, or no group): the targets named together count."""
    holding = [g for g in named if host.name in inv.groups[g]]
    if not holding:
        holding = [g for g, members in inv.groups.items() if host.name in members]
        if len(holding) != 1:
            return []
    return [inv.hosts[m] for m in inv.groups[holding[0]]]


def _assign_rank(host: Host, nodes: list[Host]) -> None:
    """Multi-node vars: node_rank/nnodes among `nodes`; the first is the rendezvous master."""
    master = nodes[0]
    host.vars.setdefault("node_rank", [n.name for n in nodes].index(host.name))
    host.vars.setdefault("nnodes", len(nodes))
    host.vars.setdefault(
        "master_addr", master.vars.get("private_addr") or master.host or "127.0.0.1"
    )
    host.vars.setdefault("master_port", 29500)
