"""`bootstrap checkpoints`: a job's checkpoints on the box and on its remote, with their state.

Built on the box in one process (agent `checkpoints`): the local ones (complete or being
written, and whether the manifest records each), the remote's (verified, broken or partial, see
`restore.survey`), the uploader's last pass and whether the guard runs. Standard library only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provision.checkpoints import local
from provision.checkpoints.remote import Remote, RemoteError
from provision.checkpoints.restore import survey
from provision.checkpoints.spec import CheckpointSpec
from provision.checkpoints.upload import read_status


def checkpoint_report(
    spec: CheckpointSpec, cwd: Path, env: dict[str, str], workdir: Path, guard: int | None
) -> dict[str, Any]:
    """The JSON report `bootstrap checkpoints` prints (see the module doc)."""
    remote_list: list[dict[str, Any]] = []
    error = None
    # Read before and after the survey: an upload may start or end while it lists.
    uploading = _uploading(workdir)
    if spec.remote is not None:
        try:
            remote_list = [c.to_dict() for c in survey(Remote(spec, env), spec)]
        except RemoteError as exc:
            error = str(exc)
    uploading |= _uploading(workdir)
    for item in remote_list:
        if item["state"] == "partial" and item["name"] in uploading and guard is not None:
            item["state"], item["detail"] = "uploading", "the guard is sending it now"
    verified = {c["name"]: c for c in remote_list if c["state"] == "verified"}
    rows = []
    for ckpt in local.scan(cwd / spec.dir, spec):
        sizes = local.files(ckpt.path)
        on_remote = ckpt.name in verified and verified[ckpt.name]["bytes"] == sum(sizes.values())
        state = "uploaded" if on_remote else ("complete" if ckpt.complete else "being written")
        rows.append(
            {"name": ckpt.name, "step": ckpt.step, "state": state, "bytes": sum(sizes.values())}
        )
    return {
        "dir": str(cwd / spec.dir),
        "remote": spec.remote,
        "remote_error": error,
        "local": rows,
        "remote_checkpoints": remote_list,
        "uploader": read_status(workdir),
        "guard": guard,
    }


def _uploading(workdir: Path) -> set[str]:
    """The checkpoints the uploader is sending now (a list; one name before batches)."""
    names = read_status(workdir).get("uploading") or []
    return {names} if isinstance(names, str) else set(names)


def render_report(report: dict[str, Any], only_step: int | None = None) -> str:
    """Plain text for the terminal: one line per checkpoint, newest last."""
    lines = [f"on the box ({report['dir']}):"]
    rows = [r for r in report["local"] if only_step is None or r["step"] == only_step]
    lines += [f"  {r['name']:>12}  {r['state']:<14} {_size(r['bytes'])}" for r in rows] or [
        "  (none)"
    ]
    if report["remote"]:
        lines.append(f"on {report['remote']}:")
        if report["remote_error"]:
            lines.append(f"  cannot list it: {report['remote_error']}")
        remote = [
            r for r in report["remote_checkpoints"] if only_step is None or r["step"] == only_step
        ]
        for r in remote:
            detail = f"  ({r['detail']})" if r["detail"] else ""
            lines.append(f"  {r['name']:>12}  {r['state']:<14} {_size(r['bytes'])}{detail}")
        if not remote and not report["remote_error"]:
            lines.append("  (none)")
    failing = (report.get("uploader") or {}).get("failing")
    if failing:
        lines.append(
            f"checkpoints are not leaving the box: {failing['error']} "
            f"({failing['attempts']} failed passes)"
        )
    lines.append(f"guard: {'pid ' + str(report['guard']) if report['guard'] else 'not running'}")
    return "\n".join(lines)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
