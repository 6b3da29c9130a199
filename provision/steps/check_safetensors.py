"""`check_safetensors`: prove a safetensors file holds the expected tensors, without torch.

A pure check: it reads only the header (two small reads, even for a 7 GB file), validates it
(offsets tile the data exactly, sizes match shapes and dtypes, the file is not truncated), then
compares the tensor count, named tensors' shapes and dtypes, and one dtype for all tensors.
A failure names the tensor and what differs. The result is remembered with the file's size and
mtime, so a rerun costs one `stat`.

Example (the pi0.5 conversion of RUNBOOK A):

```yaml
- id: convert-check
  kind: check_safetensors
  needs: [convert]
  path: /workspace/models/pi05_base_pytorch/model.safetensors
  count: 812
  dtype: BF16
  tensors:
    action_in_proj.weight: {shape: [1024, 32]}
    time_mlp_in.weight: {shape: [1024, 1024], dtype: BF16}
```
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from provision.agent.files import read_json, write_json_atomic
from provision.errors import StepFailed
from provision.formats.safetensors import DTYPE_SIZES, Header, SafetensorsError, read_header
from provision.steps.base import Check, Kind, Param, ParamError, StepContext

_MARKER = "safetensors.json"
#: How many differences one failure message lists before summarising the rest.
_SHOWN = 5


class CheckSafetensors(Kind):
    """Validate a safetensors header against expected count, shapes and dtypes."""

    name = "check_safetensors"
    summary = "check a safetensors file's tensor count, names, shapes and dtypes (no torch)"
    params = (
        Param("path", "path", "the .safetensors file", required=True),
        Param("count", "int", "expected number of tensors"),
        Param(
            "tensors",
            "dict",
            "tensors that must exist: {name: {shape: [..], dtype: BF16}} (both optional)",
            default={},
        ),
        Param("dtype", "str", "dtype every tensor must have", choices=tuple(DTYPE_SIZES)),
    )

    def validate(self, params: dict[str, Any]) -> None:
        if params["count"] is not None and params["count"] < 0:
            raise ParamError("'count' must be >= 0", "count")
        for name, spec in params["tensors"].items():
            if not isinstance(spec, dict) or set(spec) - {"shape", "dtype"}:
                raise ParamError(
                    f"tensors.{name} must be a mapping with 'shape' and/or 'dtype'", "tensors"
                )
            shape = spec.get("shape")
            if shape is not None and not (
                isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            ):
                raise ParamError(f"tensors.{name}.shape must be a list of sizes", "tensors")
            if spec.get("dtype") is not None and spec["dtype"] not in DTYPE_SIZES:
                known = ", ".join(DTYPE_SIZES)
                raise ParamError(f"tensors.{name}.dtype must be one of {known}", "tensors")

    def describe(self, params: dict[str, Any]) -> str:
        what = []
        if params["count"] is not None:
            what.append(f"{params['count']} tensors")
        if params["tensors"]:
            what.append(f"{len(params['tensors'])} named")
        if params["dtype"]:
            what.append(f"all {params['dtype']}")
        return f"check header of {params['path']}" + (f" ({', '.join(what)})" if what else "")

    def check(self, ctx: StepContext) -> Check:
        path = ctx.path(ctx.params["path"])
        try:
            st = path.stat()
        except OSError:
            return Check(False, f"{path} does not exist")
        marker = read_json(ctx.workdir / _MARKER, {})
        if marker.get("expect") != _expect_digest(ctx.params):
            return Check(False, f"{path} not checked yet")
        if marker.get("size") != st.st_size or marker.get("mtime_ns") != st.st_mtime_ns:
            return Check(False, f"{path} changed since it was checked")
        return Check(True, f"{path}: {marker.get('tensors')} tensors as expected")

    def run(self, ctx: StepContext) -> None:
        path = ctx.path(ctx.params["path"])
        try:
            before = path.stat()
            header = read_header(path)
        except OSError as exc:
            raise StepFailed(f"cannot read {path}: {exc.strerror or exc}") from None
        except SafetensorsError as exc:
            raise StepFailed(
                f"{path} is not a valid safetensors file: {exc}",
                "the writer was interrupted or the file is truncated: re-run the step that "
                "produces it",
            ) from None
        problems = differences(header, ctx.params)
        if problems:
            shown = "; ".join(problems[:_SHOWN])
            more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
            raise StepFailed(f"{path.name}: {shown}{more}")
        ctx.log(
            f"{path}: {len(header.tensors)} tensors, {header.file_bytes} bytes, "
            f"dtypes {', '.join(sorted({t.dtype for t in header.tensors.values()}))}"
        )
        write_json_atomic(
            ctx.workdir / _MARKER,
            {
                "expect": _expect_digest(ctx.params),
                "size": before.st_size,
                "mtime_ns": before.st_mtime_ns,
                "tensors": len(header.tensors),
            },
        )

    def verify(self, ctx: StepContext) -> None:
        result = self.check(ctx)
        if not result.done:
            raise StepFailed(result.reason)


def differences(header: Header, params: dict[str, Any]) -> list[str]:
    """What in `header` differs from the expectations in `params`, one phrase each."""
    problems: list[str] = []
    count = params.get("count")
    if count is not None and len(header.tensors) != count:
        problems.append(f"{len(header.tensors)} tensors, expected {count}")
    for name, spec in (params.get("tensors") or {}).items():
        info = header.tensors.get(name)
        if info is None:
            problems.append(f"tensor {name!r} missing")
            continue
        if spec.get("shape") is not None and list(info.shape) != list(spec["shape"]):
            shape = list(info.shape)
            problems.append(f"tensor {name!r} has shape {shape}, expected {spec['shape']}")
        if spec.get("dtype") is not None and info.dtype != spec["dtype"]:
            problems.append(f"tensor {name!r} is {info.dtype}, expected {spec['dtype']}")
    dtype = params.get("dtype")
    if dtype:
        problems.extend(
            f"tensor {t.name!r} is {t.dtype}, expected {dtype}"
            for t in header.tensors.values()
            if t.dtype != dtype
        )
    return problems


def _expect_digest(params: dict[str, Any]) -> str:
    """Identifies the expectations a marker was written for (params may change between runs)."""
    text = json.dumps(
        {k: params.get(k) for k in ("path", "count", "tensors", "dtype")},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


KIND = CheckSafetensors()
