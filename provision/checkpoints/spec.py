"""The `checkpoints:` block of a `tmux_launch` step, checked when the playbook loads.

```yaml
checkpoints:
  dir: checkpoints/waypoint_ae_libero   # relative to cwd; one subdirectory per checkpoint
  step: '(\\d+)'                         # regex on the WHOLE subdirectory name; group 1 = step
  complete: metadata.pt                 # complete when this exists inside it
  keep: 2                               # complete checkpoints kept on the box
  remote: "gg1:runs/waypoint_ae"        # rclone remote path, or gs://bucket/prefix
  restore: true                         # on a box without checkpoints, resume from the remote
  carry: [checkpoints/waypoint_ae_libero/wandb_run_id.txt, configs/waypoint_ae_libero.yaml]
  bwlimit: 50M                          # rclone --bwlimit for uploads and downloads
  rclone_config: ~/.config/rclone/rclone.conf
```

The step regex must match the whole name (`re.fullmatch`): openpi's fork writes each
checkpoint into `tmp_<step>` and renames it to `<step>` when whole
(`save_checkpoint`, scripts/train_waypoint.py:75-92 at 7de21c7 and 2a67705), and a search for
`(\\d+)$` would take `tmp_50` for step 50 while it is being written.

Standard library only: the agent reads it on the box.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from provision.steps.base import MAX_POLL_S, ParamError, check_keys

#: rclone remote names: letters, digits, `_`, `-`, `.`, space (not first); or `:backend,opts:`.
_RCLONE_REMOTE_RE = re.compile(r"^(?::[A-Za-z0-9]+(?:,[^:]*)?|[A-Za-z0-9_][A-Za-z0-9_. -]*):")
_GS_RE = re.compile(r"^gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(?:/(.*))?$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BWLIMIT_RE = re.compile(r"^(off|\d+(\.\d+)?[BKMGTP]?)$", re.IGNORECASE)
_KEYS = (
    "dir",
    "step",
    "complete",
    "keep",
    "remote",
    "restore",
    "carry",
    "bwlimit",
    "rclone_config",
    "transfers",
    "poll",
)


@dataclass(frozen=True)
class CheckpointSpec:
    """A validated `checkpoints:` block (see the module doc); paths are relative to cwd."""

    dir: str
    step: str = r"(\d+)"
    complete: str | None = None
    keep: int | None = None
    remote: str | None = None
    restore: bool = False
    carry: tuple[str, ...] = ()
    bwlimit: str | None = None
    rclone_config: str | None = None
    transfers: int = 4
    poll: float = 10.0

    def pattern(self) -> re.Pattern[str]:
        """The compiled step regex."""
        return re.compile(self.step)

    def step_of(self, name: str) -> int | None:
        """The step a subdirectory name stands for, or None when it is not a checkpoint."""
        found = self.pattern().fullmatch(name)
        if found is None:
            return None
        digits = found.group(1)
        return int(digits) if digits is not None and digits.isdigit() else None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what the guard on the box reads back with `from_dict`)."""
        data = asdict(self)
        data["carry"] = list(self.carry)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointSpec:
        """The spec `to_dict` wrote (already validated)."""
        return cls(**{**data, "carry": tuple(data.get("carry") or ())})


def parse_checkpoints(raw: Any) -> CheckpointSpec:
    """Validate a `checkpoints:` mapping; raises ParamError keyed `checkpoints.KEY`."""
    if not isinstance(raw, dict):
        raise ParamError("'checkpoints' must be a mapping with at least 'dir'", "checkpoints")
    check_keys(raw, _KEYS, "'checkpoints'", "checkpoints", dotted=True)
    directory = _string(raw, "dir", required=True)
    assert directory is not None
    if directory.startswith("/") or ".." in directory.split("/"):
        raise ParamError("'checkpoints.dir' must be a path inside cwd", "checkpoints.dir")
    step = _string(raw, "step") or CheckpointSpec.step
    _check_regex(step)
    complete = _string(raw, "complete")
    if complete is not None and ("/" in complete or complete in (".", "..")):
        raise ParamError("'checkpoints.complete' must be a file name", "checkpoints.complete")
    keep = _int(raw, "keep", minimum=1)
    remote = _string(raw, "remote")
    if remote is not None:
        check_remote(remote)
    restore = raw.get("restore", False)
    if not isinstance(restore, bool):
        raise ParamError("'checkpoints.restore' must be true or false", "checkpoints.restore")
    if restore and remote is None:
        raise ParamError(
            "'checkpoints.restore' needs a 'remote' to restore from", "checkpoints.restore"
        )
    carry = raw.get("carry") or []
    if not isinstance(carry, list) or not all(isinstance(c, str) and c for c in carry):
        raise ParamError("'checkpoints.carry' must be a list of paths", "checkpoints.carry")
    for path in carry:
        if path.startswith("/") or ".." in path.split("/"):
            raise ParamError(
                f"'checkpoints.carry': {path!r} is not inside cwd", "checkpoints.carry"
            )
    bwlimit = _string(raw, "bwlimit")
    if bwlimit is not None and not _BWLIMIT_RE.match(bwlimit):
        raise ParamError(
            f"'checkpoints.bwlimit' must be rclone's --bwlimit form (50M, 1G, off), got {bwlimit!r}",
            "checkpoints.bwlimit",
        )
    poll = raw.get("poll", CheckpointSpec.poll)
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 1 <= poll <= MAX_POLL_S:
        raise ParamError(
            f"'checkpoints.poll' must be 1..{MAX_POLL_S:.0f} seconds", "checkpoints.poll"
        )
    return CheckpointSpec(
        dir=directory.rstrip("/"),
        step=step,
        complete=complete,
        keep=keep,
        remote=remote.rstrip("/") if remote else None,
        restore=restore,
        carry=tuple(carry),
        bwlimit=bwlimit,
        rclone_config=_string(raw, "rclone_config"),
        transfers=_int(raw, "transfers", minimum=1) or CheckpointSpec.transfers,
        poll=float(poll),
    )


def check_remote(remote: str) -> None:
    """Raise ParamError unless `remote` is an rclone `remote:path` or `gs://bucket[/prefix]`."""
    scheme = _SCHEME_RE.match(remote)
    if scheme and scheme.group(1) != "gs":
        raise ParamError(
            f"unknown remote scheme '{scheme.group(1)}://' in {remote!r}: use an rclone remote "
            "(name:path, configured in rclone.conf) or gs://bucket/prefix",
            "checkpoints.remote",
        )
    if scheme:
        if not _GS_RE.match(remote):
            raise ParamError(f"'{remote}' is not gs://bucket/prefix", "checkpoints.remote")
        return
    if not _RCLONE_REMOTE_RE.match(remote):
        raise ParamError(
            f"remote {remote!r} is neither an rclone remote (name:path) nor gs://bucket/prefix",
            "checkpoints.remote",
        )


def gs_bucket_path(remote: str) -> tuple[str, str] | None:
    """(bucket, prefix) of a gs:// remote, else None."""
    found = _GS_RE.match(remote)
    return (found.group(1), (found.group(2) or "").strip("/")) if found else None


def _check_regex(step: str) -> None:
    try:
        compiled = re.compile(step)
    except re.error as exc:
        raise ParamError(
            f"'checkpoints.step' is not a valid regex: {exc}", "checkpoints.step"
        ) from None
    if compiled.groups < 1:
        raise ParamError(
            f"'checkpoints.step' {step!r} needs a group around the step number, e.g. '(\\d+)'",
            "checkpoints.step",
        )


def _string(raw: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise ParamError(f"'checkpoints' requires '{key}'", f"checkpoints.{key}")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ParamError(f"'checkpoints.{key}' must be a non-empty string", f"checkpoints.{key}")
    return value.strip()


def _int(raw: dict[str, Any], key: str, *, minimum: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParamError(
            f"'checkpoints.{key}' must be an integer >= {minimum}, got {value!r}",
            f"checkpoints.{key}",
        )
    return value
