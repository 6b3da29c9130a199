"""bootstrap's own known_hosts file, in OpenSSH's format, shared by every transport.

Entries are named as OpenSSH names them (`[host]:port`, or `host` on port 22) and hashed as
Debian's ssh writes them (`HashKnownHosts yes`: `|1|base64(salt)|base64(HMAC-SHA1(salt, name))`),
so the OpenSSH client and paramiko read and write the same file. Hand-written (stdlib): removing
one host is `ssh-keygen -R`, which a controller without the OpenSSH client lacks, and paramiko's
own `HostKeys.save` rewrites the file dropping every line it cannot parse (markers, key types
it does not know).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import threading
from collections.abc import Iterator
from pathlib import Path

#: One writer at a time within this process; `flock` orders processes.
_LOCK = threading.Lock()


def entry_name(address: str, port: int) -> str:
    """The name OpenSSH files a host's key under."""
    return address if port == 22 else f"[{address}]:{port}"


def hashed(name: str, salt: bytes | None = None) -> str:
    """`name` hashed as `ssh-keygen -H` writes it (a fresh salt unless one is given)."""
    salt = os.urandom(20) if salt is None else salt
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def _names_match(field: str, name: str) -> bool:
    """Whether the host field of a known_hosts line (comma-separated, plain or hashed) names
    `name` (patterns with wildcards are left alone: they were written by hand)."""
    for item in field.split(","):
        if item.startswith("|1|"):
            try:
                salt = base64.b64decode(item.split("|")[2])
            except (IndexError, ValueError):
                continue
            if hmac.compare_digest(hashed(name, salt), item):
                return True
        elif item == name:
            return True
    return False


def _host_field(line: str) -> str:
    words = line.split()
    if not words or words[0].startswith("#"):
        return ""
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _LOCK, open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def add(path: Path, name: str, key_type: str, key_base64: str) -> None:
    """Trust `name`'s key (appended as one hashed line)."""
    with _locked(path), open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{hashed(name)} {key_type} {key_base64}\n")


def remove(path: Path, name: str) -> bool:
    """Forget every key stored for `name`; True when one was removed. The file is replaced
    atomically, every other line kept as it was."""
    with _locked(path):
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except FileNotFoundError:
            return False
        kept = [line for line in lines if not _names_match(_host_field(line), name)]
        if len(kept) == len(lines):
            return False
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text("".join(kept), encoding="utf-8")
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return True
