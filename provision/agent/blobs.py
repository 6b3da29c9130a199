"""Large plan values shipped by content hash: sent once, then named by their sha256.

A plan holds what its steps need, a rendered template included; a 50 MB template was sent again
on every `up`, even a no-op one. The controller replaces each large param by `{"$blob": SHA}`
(`split`) and sends the bytes after the payload's JSON line only when it has not sent them to
that box before. The agent keeps them in `~/.bootstrap/blobs/SHA` and puts them back into the
plan (`join`) before anything else reads it; a blob the box lacks (its directory was removed)
is asked for again (`NEED_BLOBS`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from provision.agent.paths import blobs_dir

#: A param whose text is at least this long travels as a blob.
BLOB_MIN_BYTES = 64 * 1024
#: The agent's first line when the plan names blobs the box does not have.
NEED_BLOBS = "BOOTSTRAP_NEED_BLOBS"
_REF = "$blob"


def split(plan: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The plan with each large string param replaced by a reference, and the blobs by sha."""
    blobs: dict[str, bytes] = {}
    steps = []
    for step in plan.get("steps", []):
        params = dict(step.get("params") or {})
        for key, value in params.items():
            data = value.encode("utf-8") if isinstance(value, str) else b""
            if len(data) >= BLOB_MIN_BYTES:
                sha = _sha256(data)
                blobs[sha] = data
                params[key] = {_REF: sha}
        steps.append({**step, "params": params})
    return {**plan, "steps": steps}, blobs


def encode(document: dict[str, Any], blobs: dict[str, bytes]) -> bytes:
    """A payload: the JSON document on one line, naming the blobs whose bytes follow it."""
    head = dict(document, blobs=[[sha, len(data)] for sha, data in blobs.items()])
    return json.dumps(head).encode() + b"\n" + b"".join(blobs.values())


def decode(data: bytes) -> dict[str, Any]:
    """Read a payload; the blobs in it are stored (each checked against its sha256)."""
    head, _, rest = data.partition(b"\n")
    document = json.loads(head.decode("utf-8")) if head.strip() else {}
    if not isinstance(document, dict):
        return {}
    offset = 0
    for sha, size in document.pop("blobs", None) or []:
        _store(str(sha), rest[offset : offset + int(size)])
        offset += int(size)
    return document


def join(plan: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The plan with its references replaced by the blobs' text, and the shas the box lacks."""
    missing: list[str] = []
    steps = []
    for step in plan.get("steps", []):
        params = dict(step.get("params") or {})
        for key, value in params.items():
            if isinstance(value, dict) and set(value) == {_REF}:
                try:
                    params[key] = (blobs_dir() / str(value[_REF])).read_bytes().decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    missing.append(str(value[_REF]))
        steps.append({**step, "params": params})
    return {**plan, "steps": steps}, missing


def _sha256(data: bytes) -> str:
    import hashlib  # only when a blob travels: a no-op's payload names none (~6 ms to import)

    return hashlib.sha256(data).hexdigest()


def _store(sha: str, data: bytes) -> None:
    if _sha256(data) != sha:
        return  # cut short on the way: not stored, so `join` asks for it again
    path = blobs_dir() / sha
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{sha}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
