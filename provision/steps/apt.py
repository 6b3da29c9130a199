"""`apt`: make sure Debian/Ubuntu packages are installed, installing only the missing ones.

The done-check asks dpkg (`dpkg-query -W`), which costs milliseconds and touches nothing. When
something is missing, the step runs `apt-get update` — at most once per run, and not at all when
the package lists (or this run's own last update) are younger than `max_list_age` seconds; an
install that then fails updates and retries once — and `apt-get install -y
--no-install-recommends` of the missing packages only, noninteractively, through `sudo -n` when
not root. apt steps of one run take turns (a lock in the run directory), and apt-get waits for
a dpkg lock held by anyone else (unattended-upgrades on a fresh box) instead of failing.

Example (RUNBOOK A, base):

```yaml
- id: base-packages
  kind: apt
  packages: [ffmpeg, pkg-config, build-essential, git-lfs]
```
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from provision.errors import StepFailed
from provision.steps.base import Check, Kind, Param, ParamError, StepContext

#: Debian package names (policy 5.6.1), with an optional `:arch` qualifier.
_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?")
#: Where apt keeps its lists; their freshness decides whether `apt-get update` is needed.
APT_LISTS = Path("/var/lib/apt/lists")
_FRESHNESS_FILES = (Path("/var/cache/apt/pkgcache.bin"),)
_UPDATE_STAMP = "apt-update.stamp"
#: How long apt-get waits for another process's dpkg lock (unattended-upgrades on a fresh box).
_LOCK_WAIT_S = 600


class Apt(Kind):
    """Install the packages dpkg does not report as installed."""

    name = "apt"
    summary = "install Debian/Ubuntu packages that are missing (apt-get, noninteractive)"
    params = (
        Param("packages", "list", "package names", required=True, items="str"),
        Param(
            "max_list_age",
            "int",
            "seconds within which the package lists count as fresh (no apt-get update)",
            default=3600,
        ),
    )

    def validate(self, params: dict[str, Any]) -> None:
        if not params["packages"]:
            raise ParamError("'packages' must name at least one package", "packages")
        for name in params["packages"]:
            if not _NAME.fullmatch(name):
                raise ParamError(f"'packages': {name!r} is not a Debian package name", "packages")
        if params["max_list_age"] < 0:
            raise ParamError("'max_list_age' must be >= 0", "max_list_age")

    def describe(self, params: dict[str, Any]) -> str:
        return "apt-get install " + " ".join(params["packages"]) + " (those missing)"

    def check(self, ctx: StepContext) -> Check:
        try:
            missing = missing_packages(ctx, ctx.params["packages"])
        except StepFailed as exc:
            return Check(False, exc.reason)
        if missing:
            return Check(False, "not installed: " + " ".join(missing))
        return Check(True, "installed: " + " ".join(ctx.params["packages"]))

    def run(self, ctx: StepContext) -> None:
        missing = missing_packages(ctx, ctx.params["packages"])
        if not missing:
            ctx.log("all packages already installed")
            return
        _check_privilege(ctx)
        with _run_lock(ctx.run_dir):
            # Another apt step of this run may have installed some while we waited.
            missing = missing_packages(ctx, missing)
            if not missing:
                return
            updated = _update_if_stale(ctx)
            ctx.progress(message="installing " + " ".join(missing))
            if _install(ctx, missing, check=updated) != 0:
                ctx.log("install failed with package lists not refreshed in this run; updating")
                _update(ctx)
                _install(ctx, missing, check=True)

    def verify(self, ctx: StepContext) -> None:
        missing = missing_packages(ctx, ctx.params["packages"])
        if missing:
            raise StepFailed(
                "still not installed after apt-get install: " + " ".join(missing),
                "a virtual package? name the package that provides it",
            )


def missing_packages(ctx: StepContext, packages: list[str]) -> list[str]:
    """The packages dpkg does not report as `install ok installed`, in the given order."""
    result = ctx.capture(["dpkg-query", "-W", "-f=${Package}\t${Status}\n", *packages])
    if result.returncode == 127:
        raise StepFailed(f"dpkg-query not found: {result.stderr.strip()}", "not a Debian box?")
    installed = set()
    for line in result.stdout.splitlines():
        name, _, status = line.partition("\t")
        # "install ok installed", "hold ok installed"; not "deinstall ok config-files".
        if status.split()[-1:] == ["installed"]:
            installed.add(name)
    return [p for p in packages if p.split(":")[0] not in installed]


def lists_age(lists: Path = APT_LISTS) -> float | None:
    """Seconds since apt's package lists were last refreshed; None when there are none."""
    try:
        names = [p.name for p in lists.iterdir()]
        stamps = [lists.stat().st_mtime]
    except OSError:
        return None
    if not any("_Packages" in name for name in names):
        return None
    stamps += [p.stat().st_mtime for p in _FRESHNESS_FILES if p.exists()]
    return time.time() - max(stamps)


def _update_if_stale(ctx: StepContext) -> bool:
    """Run `apt-get update` unless the lists are fresh; True when it ran (or just ran).

    apt leaves the lists untouched when nothing changed upstream, so the time of our own last
    update (a stamp in the run directory) counts too: steps of one run update at most once.
    """
    ages = [lists_age()]
    with contextlib.suppress(OSError):
        ages.append(time.time() - (ctx.run_dir / _UPDATE_STAMP).stat().st_mtime)
    known = [age for age in ages if age is not None]
    if known and min(known) < ctx.params["max_list_age"]:
        ctx.log(f"package lists are {min(known) / 60:.0f} min old; skipping apt-get update")
        return False
    _update(ctx)
    return True


def _update(ctx: StepContext) -> None:
    ctx.progress(message="apt-get update")
    ctx.sh([*_privileged(), "apt-get", *_lock_wait(), "update"])
    (ctx.run_dir / _UPDATE_STAMP).touch()


def _install(ctx: StepContext, packages: list[str], *, check: bool) -> int:
    argv = [
        *_privileged(),
        "apt-get",
        *_lock_wait(),
        "install",
        "-y",
        "--no-install-recommends",
        *packages,
    ]
    return ctx.sh(argv, check=check)


def _check_privilege(ctx: StepContext) -> None:
    if os.geteuid() != 0 and ctx.capture(["sudo", "-n", "true"]).returncode != 0:
        raise StepFailed(
            "not root, and `sudo -n` is refused (no sudo, or it wants a password)",
            "install the packages as root once, or allow passwordless sudo for apt-get",
        )


def _privileged() -> list[str]:
    # `sudo -n` fails at once instead of waiting for a password nobody will type; `env` carries
    # DEBIAN_FRONTEND through sudo's environment reset.
    env = ["env", "DEBIAN_FRONTEND=noninteractive", "NEEDRESTART_MODE=a"]
    return env if os.geteuid() == 0 else ["sudo", "-n", *env]


def _lock_wait() -> list[str]:
    return ["-o", f"DPkg::Lock::Timeout={_LOCK_WAIT_S}"]


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock shared by the apt steps of one run (they would fight over dpkg anyway)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "apt.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


KIND = Apt()
