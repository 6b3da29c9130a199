"""JSON files of datasets and results: read with clear errors, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from provision.agent.files import write_json_atomic
from provision.stats.errors import DatasetError


def load(path: Path, *, allow_list: bool = False) -> Any:
    """The JSON object in `path` (or a list, when allowed); DatasetError when unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) and not (allow_list and isinstance(data, list)):
        raise DatasetError(f"{path} does not hold a JSON object")
    return data


def write_atomic(
    path: Path, data: Any, *, indent: int | None = 2, sort_keys: bool = False, newline: bool = True
) -> None:
    """Write `data` as JSON in the statistics files' style, atomically (`files.atomic_writer`),
    creating missing parent directories.

    Keys keep their insertion order (the statistics files list mean, std, q01, q99, ...) unless
    `sort_keys`; `newline=False` leaves out the final newline (TFDS writes none).
    """
    write_json_atomic(path, data, indent=indent, sort_keys=sort_keys, newline=newline, parents=True)
