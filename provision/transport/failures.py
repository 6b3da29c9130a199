"""The one-line errors every SSH transport raises, worded the same whichever client failed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from provision.errors import HostKeyError, TargetError

if TYPE_CHECKING:
    from provision.inventory import Host


def host_key_changed(host: Host, address: str, port: int) -> HostKeyError:
    """The box at `address:port` (as its key is filed) presented a key it was not trusted with."""
    return HostKeyError(
        f"{host.name}: the host key of {host.address} changed since it was first trusted "
        f"(vast.ai reuses addresses). If the box was replaced, run: bootstrap forget "
        f"{address}:{port} (or pass --accept-new-host-key)"
    )


def auth_failed(host: Host, keys: str, waited: float | None) -> TargetError:
    """The box refused every key offered (`keys`, as words); `waited`: the seconds it was to be
    retried for (`--auth-wait`), None when it was not."""
    tried = f" (tried for {waited:.0f}s)" if waited is not None else ""
    return TargetError(
        f"{host.name}: authentication failed for {host.address} with {keys}{tried}; "
        "a new vast.ai box may still be installing your key: retry in a minute, or give "
        "`up --auth-wait SECONDS`"
    )


def unreachable(host: Host, why: str) -> TargetError:
    """The box could not be reached, or the link to it died (`why`: lower case, no full stop)."""
    return TargetError(f"{host.name}: unreachable ({host.address}): {why}")
