"""A package index on loopback: real wheels fetched once from PyPI, served as PEP 503 pages.

`fetch_wheels()` downloads `WHEELS` (and their dependencies, binary wheels only, for this
machine's CPython 3.11) into ~/.cache/bootstrap-bench/wheels once; `write_simple()` lays out
`simple/<name>/index.html` (PEP 503) with each wheel's sha256 and its METADATA beside it
(PEP 658/714 `data-core-metadata`), so `uv lock` reads a few KB per wheel instead of the
wheel; `serve_dir()` serves any directory over plain HTTP (index pages, git-free files, the
rclone remote's tree) on a free loopback port.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("BOOTSTRAP_BENCH_CACHE", "~/.cache/bootstrap-bench")).expanduser()
#: A set shaped like openpi's environment, without torch (whose CUDA wheels alone are 4 GB):
#: jax's stack, the Hugging Face stack, the data stack; ~280 MB with dependencies.
PROJECT_WHEELS = (
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "ml_dtypes==0.7.0",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "sentencepiece==0.2.3",
    "pyarrow==26.0.1",
    "pandas==3.1.1",
    "pillow==13.0.0",
    "einops==0.8.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    "h5py==3.16.0",
    "matplotlib==3.11.2",
)
#: The extra install after the sync (TensorFlow's place in the seed): ~120 MB.
EXTRA_WHEELS = ("opencv-python-headless==5.1.0.95", "polars==2.1.0")
WHEELS = PROJECT_WHEELS + EXTRA_WHEELS


def fetch_wheels(cache: Path = CACHE) -> Path:
    """The wheel directory, downloaded from PyPI on the first call (`pip download`)."""
    wheels = cache / "wheels"
    if (wheels / ".complete").exists():
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    # Every glibc tag a 2.28 box accepts, named: pip 23's `--platform` takes a tag literally
    # (jaxlib 0.10.2 ships manylinux_2_27 only, and `--platform manylinux_2_28_x86_64` alone
    # finds no jaxlib there).
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--only-binary", ":all:", "--dest",
         str(wheels), "--python-version", "3.11",
         *(arg for tag in [*platforms, "manylinux2014_x86_64"] for arg in ("--platform", tag)),
         "--implementation", "cp", *WHEELS],
        check=True,
    )  # fmt: skip
    (wheels / ".complete").touch()
    return wheels


def normalise(name: str) -> str:
    """A project name as PEP 503 normalises it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _metadata(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return zf.read(name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_simple(wheels: Path, root: Path) -> Path:
    """`root/simple/...` and `root/files/...` (wheels hardlinked or copied); returns root."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    projects: dict[str, list[str]] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        dest = files / wheel.name
        if not dest.exists():
            try:
                os.link(wheel, dest)
            except OSError:
                shutil.copy2(wheel, dest)
        meta = _metadata(wheel)
        (files / f"{wheel.name}.metadata").write_bytes(meta)
        meta_hash = hashlib.sha256(meta).hexdigest()
        href = f"../../files/{wheel.name}#sha256={_sha256(wheel)}"
        projects.setdefault(normalise(wheel.name.split("-", 1)[0]), []).append(
            f'<a href="{html.escape(href)}" data-core-metadata="sha256={meta_hash}" '
            f'data-dist-info-metadata="sha256={meta_hash}">{html.escape(wheel.name)}</a><br/>'
        )
    simple = root / "simple"
    for name, links in projects.items():
        (simple / name).mkdir(parents=True, exist_ok=True)
        (simple / name / "index.html").write_text(
            f"<!DOCTYPE html><html><body>\n{chr(10).join(links)}\n</body></html>\n"
        )
    index = "".join(f'<a href="{n}/">{n}</a><br/>\n' for n in sorted(projects))
    (simple / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{index}</body></html>\n")
    return root


class _Quiet(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as PyPI's CDN
    seen: list[str] | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self) -> object:
        if self.seen is not None:
            self.seen.append(self.path)
        return super().send_head()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


@contextlib.contextmanager
def serve_dir(root: Path, seen: list[str] | None = None) -> Iterator[int]:
    """Serve `root` over HTTP on a free loopback port (yielded) until the block ends; the path
    of every GET and HEAD is appended to `seen` when given."""
    handler_class = type("Handler", (_Quiet,), {"seen": seen})
    handler = functools.partial(handler_class, directory=str(root))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
