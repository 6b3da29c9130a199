"""A cached step's key: everything that determines its outputs, hashed.

The key of a step `S` is the sha256 of (as canonical JSON):

- `S`'s fingerprint (kind, params, creates, done_when, env, secret names), and those of the
  steps cached `with` it (a unit: `uv-sync` with `tf` and `patch`);
- the absolute paths of its outputs: a venv holds its own path in its scripts and
  `pyvenv.cfg`, so a restored copy works only at the same path;
- the content (sha256) of each file it declares as an input (`uv.lock`, `pyproject.toml`),
  named as written (`~/x` on boxes with different homes is the same input);
- the box facts it declares (`python`, `glibc`, `arch`, `cuda`, `os`), read on this box;
- for each step it needs (those of its unit's members too): that step's own cache key when it
  is cached, else the content of its outputs when it declares outputs, else its key computed
  the same way without facts (its fingerprint and its own needs, recursively).

Bootstrap's implicit steps (`agent-venv`, `tool-*`) are left out: they install bootstrap's own
tools, which do not shape a step's outputs.

Content keys hash every file (relative path, type, mode, size, sha256; not where the tree is); a file's sha256 is remembered
by (device, inode, size, mtime) in `hashes.json` of the run, as git's index does, so a second
key of the same tree reads only its metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Bumped when what goes into a key changes: old entries then simply miss.
KEY_VERSION = 1
#: Box facts a step may declare as relevant to its outputs.
FACTS = ("python", "glibc", "arch", "cuda", "os")
#: Directories never archived nor hashed: Python writes them when a module is imported, so a
#: step reading a venv (an import check) would otherwise change its outputs under the saver.
SKIP_DIRS = ("__pycache__",)
IMPLICIT_PREFIXES = ("tool-",)
IMPLICIT_IDS = ("agent-venv",)
_NVIDIA_SMI_TIMEOUT_S = 20


def is_implicit(step_id: str) -> bool:
    """Whether `step_id` names one of bootstrap's own implicit steps."""
    return step_id in IMPLICIT_IDS or step_id.startswith(IMPLICIT_PREFIXES)


def expand(path: str) -> str:
    """A declared path as an absolute path on this box."""
    return os.path.abspath(os.path.expanduser(path))


# ------------------------------------------------------------------------------ box facts


def _python() -> str:
    # What platform.python_version() parses out of sys.version, without importing platform
    # (~1 ms of every agent process that looks at the cache).
    return f"{sys.implementation.name}-{sys.version.split()[0]}"


def _glibc() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or "none"
    except (ValueError, OSError):
        return "none"


def _arch() -> str:
    return os.uname().machine or "unknown"


def _cuda() -> str:
    """The driver's CUDA major version (what `nvidia-smi` prints as `CUDA Version: 12.8`)."""
    try:
        done = subprocess.run(
            ["nvidia-smi"],
            capture_output=True,
            text=True,
            timeout=_NVIDIA_SMI_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    found = re.search(r"CUDA Version:\s*(\d+)\.", done.stdout)
    return found.group(1) if found and done.returncode == 0 else "none"


def _os() -> str:
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
    except OSError:
        return os.uname().sysname.lower()
    values = dict(re.findall(r'^([A-Z_]+)="?([^"\n]*)"?$', text, re.M))
    return f"{values.get('ID', 'linux')}-{values.get('VERSION_ID', '')}"


_FACT_READERS: dict[str, Callable[[], str]] = {
    "python": _python,
    "glibc": _glibc,
    "arch": _arch,
    "cuda": _cuda,
    "os": _os,
}


class Probe:
    """Reads this box: facts (each once) and file contents (remembered across runs)."""

    def __init__(self, memo_path: Path | None = None) -> None:
        self.memo_path = memo_path
        self._facts: dict[str, str] = {}
        self._memo: dict[str, list[Any]] = _load_memo(memo_path)
        self._dirty = False

    def fact(self, name: str) -> str:
        """The value of one box fact (see FACTS)."""
        if name not in self._facts:
            self._facts[name] = _FACT_READERS[name]()
        return self._facts[name]

    def file_digest(self, path: str, st: os.stat_result) -> str:
        """sha256 of a regular file, remembered by its device, inode, size and mtime."""
        sig = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
        known = self._memo.get(path)
        if known is not None and known[:4] == sig:
            return str(known[4])
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        self._memo[path] = [*sig, digest.hexdigest()]
        self._dirty = True
        return digest.hexdigest()

    def input_digest(self, path: str) -> str | None:
        """sha256 of an input file, None when it is absent."""
        full = expand(path)
        try:
            st = os.stat(full)
        except OSError:
            return None
        if stat.S_ISDIR(st.st_mode):
            return self.tree_digest([full])
        return self.file_digest(full, st)

    def tree_digest(self, paths: list[str]) -> str:
        """The content key of some outputs: every entry's path, type, mode, size and content."""
        digest = hashlib.sha256()
        for index, path in enumerate(paths):
            full = expand(path)
            digest.update(f"output {index}\n".encode())
            for rel, st in walk(full):
                where = os.path.join(full, rel) if rel else full
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISLNK(st.st_mode):
                    line = f"l {rel} {os.readlink(where)}"
                elif stat.S_ISDIR(st.st_mode):
                    line = f"d {rel} {mode:o}"
                elif stat.S_ISREG(st.st_mode):
                    line = f"f {rel} {mode:o} {st.st_size} {self.file_digest(where, st)}"
                else:
                    line = f"o {rel}"
                digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
        return digest.hexdigest()

    def save(self) -> None:
        """Keep the remembered file digests for the next key (best effort)."""
        if not self._dirty or self.memo_path is None:
            return
        tmp = self.memo_path.with_name(f".{self.memo_path.name}.{os.getpid()}.tmp")
        try:
            self.memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self._memo), encoding="utf-8")
            os.replace(tmp, self.memo_path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._dirty = False


def _load_memo(path: Path | None) -> dict[str, list[Any]]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def walk(root: str) -> list[tuple[str, os.stat_result]]:
    """(relative path, lstat) of `root` and everything under it, sorted, without SKIP_DIRS;
    empty when `root` is absent. Symlinks are entries, never followed."""
    try:
        top = os.lstat(root)
    except OSError:
        return []
    found: list[tuple[str, os.stat_result]] = [("", top)]
    if not stat.S_ISDIR(top.st_mode):
        return found
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            names = sorted(os.listdir(os.path.join(root, rel_dir)))
        except OSError:
            continue
        for name in names:
            if name in SKIP_DIRS:
                continue
            rel = os.path.join(rel_dir, name) if rel_dir else name
            try:
                st = os.lstat(os.path.join(root, rel))
            except OSError:
                continue
            found.append((rel, st))
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)
    found.sort(key=lambda item: item[0])
    return found


# ------------------------------------------------------------------------------------ keys


def material(step_id: str, graph: dict[str, Any], probe: Probe) -> dict[str, Any]:
    """What the key of cached step `step_id` hashes (see the module doc), as plain data.

    `graph` holds the step and everything upstream of it (and of its unit), each as
    {fingerprint, outputs, needs, cache: {facts, inputs, with} or None}.
    """
    node = graph[step_id]
    cache = node.get("cache") or {}
    unit = [step_id, *cache.get("with", [])]
    needs: dict[str, str] = {}
    for member in unit:
        for need in graph[member].get("needs", []):
            if need not in unit and not is_implicit(need):
                needs[need] = _upstream_key(need, graph, probe)
    return {
        "v": KEY_VERSION,
        "fingerprints": {m: graph[m]["fingerprint"] for m in unit},
        "outputs": sorted(expand(p) for p in node.get("outputs", [])),
        "facts": {f: probe.fact(f) for f in sorted(cache.get("facts", []))},
        "inputs": {p: probe.input_digest(p) for p in sorted(cache.get("inputs", []))},
        "needs": needs,
    }


def step_key(step_id: str, graph: dict[str, Any], probe: Probe) -> str:
    """The cache key of `step_id` (hex sha256)."""
    return _hash(material(step_id, graph, probe))


def _upstream_key(step_id: str, graph: dict[str, Any], probe: Probe) -> str:
    node = graph[step_id]
    if node.get("cache"):
        return "cache:" + step_key(step_id, graph, probe)
    if node.get("outputs"):
        return "content:" + probe.tree_digest(list(node["outputs"]))
    needs = {n: _upstream_key(n, graph, probe) for n in node.get("needs", []) if not is_implicit(n)}
    return "step:" + _hash({"fingerprint": node["fingerprint"], "needs": needs})


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
