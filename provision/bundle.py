"""The agent shipped to the box: the `provision` package as a zipapp run by the box's python3.

Built deterministically (sorted entries, fixed timestamps) so its hash only changes when the
code does; cached on the controller keyed by the sources' sizes and mtimes. The box keeps the
hash beside the zipapp, so the agent is shipped only when it differs.

Beside each module goes its bytecode for the controller's interpreter: zipimport never caches
what it compiles, so without it every agent process on the box (one per step, one per command)
compiles every module it imports again. A box python with another bytecode version (magic
number) skips these files and compiles the sources, as before.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import marshal
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from provision.home import config_dir

PACKAGE = Path(__file__).resolve().parent
_MAIN = "import sys\nfrom provision.agent.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"

#: What the box's plain python3 imports, relative to `provision/` (files and `dir/*.py` globs):
#: the agent core, the step kinds and what they run. Each must import only the standard library
#: at module level and parse as Python 3.9 (tests/test_agent_portability.py checks every file
#: these match, so a module is checked exactly when it ships). A new box-side module or package
#: is added here; anything else (the CLI, console, controller, transports, renting) never ships.
BOX_STDLIB = (
    "__init__.py",
    "errors.py",
    "dag.py",
    "model.py",
    "agent/*.py",
    "steps/*.py",
    "steps/common/*.py",
    "monitor/*.py",
    "formats/*.py",
    "checkpoints/*.py",
    "watch/*.py",
    "cache/*.py",
    "stats/__init__.py",
    "stats/errors.py",
    "stats/formats.py",
)
#: Shipped too, but imported only inside the agent venv (`dataset_stats` runs the statistics
#: there: numpy, pyarrow).
BOX_VENV = ("stats/*.py",)
#: Files steps read out of the zipapp (`$BOOTSTRAP_AGENT_PYZ`): the smoke playbook's trainer.
BOX_DATA = ("data/fake_trainer.py",)
#: The known-issues catalog, shipped as JSON (the box has no PyYAML): `agent.catalog` reads it.
CATALOG = PACKAGE / "known_issues.yaml"


def box_files(patterns: tuple[str, ...]) -> list[Path]:
    """The files under `provision/` that `patterns` match, sorted (a pattern may match none:
    a module another change adds)."""
    return sorted({path for pattern in patterns for path in PACKAGE.glob(pattern)})


@dataclass(frozen=True)
class Agent:
    """The agent zipapp and its sha256."""

    data: bytes
    sha256: str


def _sources() -> list[Path]:
    return [*box_files(BOX_STDLIB + BOX_VENV + BOX_DATA), CATALOG]


def _catalog_json(path: Path) -> bytes:
    import yaml

    return json.dumps(yaml.safe_load(path.read_text(encoding="utf-8")), sort_keys=True).encode()


def build_agent() -> Agent:
    """Build (or reuse from the cache) the agent zipapp."""
    sources = _sources()
    key = hashlib.sha256(importlib.util.MAGIC_NUMBER)
    for path in sources:
        st = path.stat()
        key.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    cache = config_dir() / "agent-cache" / f"{key.hexdigest()[:20]}.pyz"
    if cache.exists():
        data = cache.read_bytes()
        return Agent(data, hashlib.sha256(data).hexdigest())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        _add(zf, "__main__.py", _MAIN.encode())
        for path in sources:
            rel = "provision/" + str(path.relative_to(PACKAGE))
            if path == CATALOG:
                _add(zf, "provision/known_issues.json", _catalog_json(path))
            else:
                source = path.read_bytes()
                _add(zf, rel, source)
                if path.suffix == ".py":
                    _add(zf, rel + "c", _bytecode(source, rel))
    data = buffer.getvalue()
    cache.parent.mkdir(parents=True, exist_ok=True)
    for old in cache.parent.glob("*.pyz"):
        old.unlink(missing_ok=True)
    # Unique per process and thread: the boxes of a fleet build it at once on a fresh cache.
    tmp = cache.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cache)
    return Agent(data, hashlib.sha256(data).hexdigest())


def _bytecode(source: bytes, name: str) -> bytes:
    """A PEP 552 unchecked hash-based .pyc: the source travels in the same zip, so it cannot
    go stale, and zipimport loads it without comparing timestamps."""
    code = compile(source, name, "exec", dont_inherit=True)
    flags = (0b01).to_bytes(4, "little")  # hash-based, unchecked
    return (
        importlib.util.MAGIC_NUMBER
        + flags
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    )


def _add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)
