"""Build tiny Python distributions at test time: pure-Python wheels and sdists written with
zipfile/tarfile, and uv projects that resolve from a local wheel directory, so uv runs offline."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path


def build_wheel(
    dest: Path,
    name: str,
    version: str,
    *,
    requires: tuple[str, ...] = (),
    tag: str = "py3-none-any",
    files: dict[str, bytes] | None = None,
) -> Path:
    """A wheel whose package `name` has `__version__ = version` (plus `files`, archive paths)."""
    dist_info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    content: dict[str, bytes] = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n".encode(),
        **(files or {}),
        f"{dist_info}/METADATA": (metadata + "\n").encode(),
        f"{dist_info}/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: {tag}\n"
        ).encode(),
    }
    record = []
    path = dest / f"{name}-{version}-{tag}.whl"
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for arcname, data in content.items():
            info = zipfile.ZipInfo(arcname)
            info.external_attr = (0o755 if "/scripts/" in arcname else 0o644) << 16
            zf.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{arcname},sha256={digest.decode()},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


def build_sdist(dest: Path, name: str, version: str) -> Path:
    """An sdist with static metadata (uv locks it without building) whose build backend does not
    exist: installing it fails as a source build fails on a box without the right libraries."""
    base = f"{name}-{version}"
    content = {
        f"{base}/PKG-INFO": f"Metadata-Version: 2.2\nName: {name}\nVersion: {version}\n\n",
        f"{base}/pyproject.toml": (
            '[build-system]\nrequires = ["no-such-build-backend"]\n'
            'build-backend = "no_such_build_backend"\n\n'
            f'[project]\nname = "{name}"\nversion = "{version}"\n'
        ),
        f"{base}/{name}/__init__.py": f"__version__ = {version!r}\n",
    }
    path = dest / f"{base}.tar.gz"
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for arcname, text in content.items():
            data = text.encode()
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_project(
    path: Path, deps: list[str], wheels: Path, *, tool_uv: str = "", name: str = "demo"
) -> Path:
    """A virtual uv project (no build system) depending on `deps`, resolving from `wheels`."""
    path.mkdir(parents=True, exist_ok=True)
    listed = ", ".join(f'"{d}"' for d in deps)
    (path / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "0.1.0"\nrequires-python = ">=3.9"\n'
        f"dependencies = [{listed}]\n\n"
        f'[tool.uv]\nfind-links = ["{wheels}"]\n{tool_uv}'
    )
    return path


def uv_lock(uv: str, project: Path, env: dict[str, str]) -> None:
    """`uv lock --offline` in `project` (raises on failure)."""
    proc = subprocess.run(
        [uv, "lock", "--offline"], cwd=project, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def uv_env(tmp: Path) -> dict[str, str]:
    """Environment for uv in tests: no interpreter downloads, a cold cache of its own, and this
    python as the interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    env.update(
        UV_PYTHON_DOWNLOADS="never",
        UV_CACHE_DIR=str(tmp / "uv-cache"),
        UV_PYTHON=sys.executable,
    )
    return env
