"""What `uv.lock` pins, and whether a pinned package has a wheel this box can install.

The lock is read line by line instead of with `tomllib`: the box's python3 may be 3.9 or 3.10
(no tomllib), and uv writes the lock in one fixed layout (`[[package]]` blocks with `name`,
`version`, `sdist` and `wheels` at the start of their lines).

The case this exists for (RUNBOOK D, first row): a lock pinning `av >= 14`, which uv can only
build from source against ffmpeg 7 when no wheel fits (boxes have ffmpeg 6), and `av 14.4.0`,
whose wheels were removed from PyPI. Caught before `uv sync`, it costs a second instead of a
failed 10-minute sync.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from dataclasses import dataclass
from urllib.parse import unquote

from provision.steps.common.venv import canonical_name

#: Packages that build from source only against a newer system library than boxes have: name ->
#: (first major version that needs it, versions whose wheels were removed from PyPI).
SOURCE_BUILD_TRAPS = {"av": (14, ("14.4.0",))}


@dataclass(frozen=True)
class LockedPackage:
    """One `[[package]]` of the lock: its version and the file names of its artifacts."""

    name: str
    version: str
    wheels: tuple[str, ...]
    has_sdist: bool


@dataclass(frozen=True)
class Interpreter:
    """What decides which wheels fit: the venv interpreter's version and the box's platform."""

    implementation: str  # sys.implementation.name: "cpython", "pypy", ...
    version: tuple[int, int]
    machine: str  # platform.machine(): "x86_64", "aarch64"
    glibc: tuple[int, int] | None  # None on musl or non-Linux

    @property
    def label(self) -> str:
        """Short description for messages: `cp311, x86_64, glibc 2.36`."""
        libc = f"glibc {self.glibc[0]}.{self.glibc[1]}" if self.glibc else "no glibc"
        return f"cp{self.version[0]}{self.version[1]}, {self.machine}, {libc}"


def box_interpreter(implementation: str, version: tuple[int, int]) -> Interpreter:
    """An Interpreter for a python of this box (platform facts come from this process)."""
    libc, libc_version = platform.libc_ver()
    glibc = None
    match = re.match(r"(\d+)\.(\d+)", libc_version)
    if sys.platform.startswith("linux") and libc == "glibc" and match:
        glibc = (int(match.group(1)), int(match.group(2)))
    return Interpreter(implementation, version, platform.machine(), glibc)


def locked_packages(lock_text: str, name: str) -> list[LockedPackage]:
    """Every locked version of `name` (a lock may hold several, one per resolution fork)."""
    found = []
    for block in re.split(r"(?m)^\[\[package\]\]\s*$", lock_text)[1:]:
        # The package's own keys come before its first sub-table (`[package.metadata]`...).
        own = re.split(r"(?m)^\[", block, maxsplit=1)[0]
        pkg_name = re.search(r'(?m)^name = "([^"]+)"', own)
        version = re.search(r'(?m)^version = "([^"]+)"', own)
        if not pkg_name or not version or canonical_name(pkg_name.group(1)) != canonical_name(name):
            continue
        wheels_part = own.split("\nwheels = [", 1)[1] if "\nwheels = [" in own else ""
        wheels = tuple(
            os.path.basename(unquote(m.group(1)))
            for m in re.finditer(r'"([^"]+\.whl)"', wheels_part)
        )
        has_sdist = re.search(r"(?m)^sdist = ", own) is not None
        found.append(LockedPackage(pkg_name.group(1), version.group(1), wheels, has_sdist))
    return found


def wheel_fits(filename: str, interp: Interpreter) -> bool:
    """Whether the wheel `filename` installs on `interp` (PEP 425 tags, manylinux by glibc)."""
    parts = filename[: -len(".whl")].split("-") if filename.endswith(".whl") else []
    if len(parts) not in (5, 6):
        return False
    pythons, abis, platforms = (set(p.split(".")) for p in parts[-3:])
    supported = _supported_pairs(interp)
    if not any((py, abi) in supported for py in pythons for abi in abis):
        return False
    return any(_platform_fits(tag, interp) for tag in platforms)


def _supported_pairs(interp: Interpreter) -> set[tuple[str, str]]:
    major, minor = interp.version
    pairs = {(f"py{major}", "none")} | {(f"py{major}{m}", "none") for m in range(minor + 1)}
    if interp.implementation == "cpython":
        own = f"cp{major}{minor}"
        pairs |= {(own, own), (own, "none")}
        pairs |= {(f"cp{major}{m}", "abi3") for m in range(2, minor + 1)}
    return pairs


_MANYLINUX_ALIASES = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def _platform_fits(tag: str, interp: Interpreter) -> bool:
    if tag == "any":
        return True
    arch = interp.machine
    if not tag.endswith("_" + arch):
        return False
    base = tag[: -len(arch) - 1]
    if not sys.platform.startswith("linux"):
        return False
    if base == "linux":
        return True
    if interp.glibc is None:
        return base.startswith("musllinux_")
    needed = _MANYLINUX_ALIASES.get(base)
    match = re.match(r"manylinux_(\d+)_(\d+)$", base)
    if match:
        needed = (int(match.group(1)), int(match.group(2)))
    return needed is not None and needed <= interp.glibc


def source_build_traps(lock_text: str, interp: Interpreter | None) -> list[str]:
    """Why the lock would make uv build a trap package from source, one line per pin; empty when
    it would not. Without `interp`, only pins with no wheel at all or removed wheels count."""
    problems = []
    for name, (first_major, removed) in SOURCE_BUILD_TRAPS.items():
        for pkg in locked_packages(lock_text, name):
            major = re.match(r"\d+", pkg.version)
            if not major or int(major.group()) < first_major:
                continue
            pin = f"uv.lock pins {pkg.name} {pkg.version}"
            if pkg.version in removed:
                problems.append(f"{pin}, whose wheels were removed from PyPI")
            elif not pkg.wheels:
                problems.append(f"{pin} with only an sdist (a source build needs newer libraries)")
            elif interp and not any(wheel_fits(w, interp) for w in pkg.wheels):
                problems.append(
                    f"{pin}, and none of its {len(pkg.wheels)} wheels fits this box "
                    f"({interp.label})"
                )
    return problems
