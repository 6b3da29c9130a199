"""Start a command's SSH handshakes at process start, before the CLI's own imports.

A cold `bootstrap up HOST` could open its ControlMaster only once typer, the inventory (yaml)
and the targets were loaded: ~80–150 ms of CPU before the handshake began (bench/README.md, "A
cold no-op in one handshake"). For a command line typed before, in the same directory, the ssh
command lines it opened its masters with are known before any of that: they are remembered
here, keyed by the command line, the directory and bootstrap's config dir, together with the
files they were derived from (the inventory, the ssh configs). When those files are unchanged,
`start` spawns the same `ssh -N` masters at once, and the transport (transport/ssh.py) `claim`s
a master it would have opened itself and waits for it instead of starting a second handshake.

Nothing here decides anything the transport does not: a remembered command line is used only
when the transport builds the identical one, and a master that failed early is opened again the
ordinary way, whose errors are reported as before. Standard library only, and cheap to import:
it runs before everything else.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading

#: How many command lines are remembered (the oldest is forgotten first).
MAX_ENTRIES = 64

_lock = threading.Lock()
_key: str | None = None
_started: dict[tuple[str, ...], subprocess.Popen[bytes]] = {}
#: The masters of the entry `start` found valid; then every master this command opened more.
_masters: list[list[str]] = []
_inputs: set[str] = {os.path.expanduser("~/.ssh/config"), "/etc/ssh/ssh_config"}


def _config_dir() -> str:
    # The same rule as home.config_dir, without creating it (a start must cost nothing).
    return os.environ.get("BOOTSTRAP_CONFIG_DIR") or os.path.expanduser("~/.config/bootstrap")


def _store() -> str:
    return os.path.join(_config_dir(), "early-ssh.json")


def _stat(path: str) -> list[int]:
    """What says a file changed: size and mtime; [] when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    return [st.st_size, st.st_mtime_ns]


def _load() -> dict[str, dict[str, object]]:
    try:
        with open(_store(), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def start(args: list[str], cwd: str) -> None:
    """Spawn the masters remembered for this command line, when their inputs are unchanged."""
    global _key
    # The command line itself is the key (no hash: hashlib loads OpenSSL, ~2 ms before the
    # handshake could start; the file beside it already holds the ssh command lines).
    _key = json.dumps([cwd, args, _config_dir()])
    entry = _load().get(_key)
    if not isinstance(entry, dict):
        return
    inputs, masters = entry.get("inputs"), entry.get("masters")
    if not isinstance(inputs, dict) or not isinstance(masters, list):
        return
    if any(_stat(path) != seen for path, seen in inputs.items()):
        return
    for argv in masters:
        if isinstance(argv, list) and argv[:1] == ["ssh"] and "-N" in argv:
            _masters.append(argv)
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            except OSError:
                return
            _started[tuple(argv)] = proc


def depends_on(path: str) -> None:
    """A file the command's ssh command lines were derived from (the inventory)."""
    with _lock:
        _inputs.add(os.path.abspath(path))


def claim(argv: list[str]) -> subprocess.Popen[bytes] | None:
    """The master started early with exactly `argv`, handed over once; None when there is none."""
    with _lock:
        return _started.pop(tuple(argv), None)


def remember(argv: list[str]) -> None:
    """A master this command opened: the next same command line may start it early."""
    if _key is None:
        return
    with _lock:
        if argv in _masters:
            return
        _masters.append(argv)
        data = _load()
        data.pop(_key, None)  # re-inserted last: the oldest entries are dropped first
        data[_key] = {
            "inputs": {path: _stat(path) for path in sorted(_inputs)},
            "masters": _masters,
        }
        while len(data) > MAX_ENTRIES:
            data.pop(next(iter(data)))
        try:
            os.makedirs(_config_dir(), mode=0o700, exist_ok=True)
            tmp = f"{_store()}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh)
            os.replace(tmp, _store())
        except OSError:
            pass  # not remembered: the next run opens its master the ordinary way
