"""`check_safetensors` against real files written in the safetensors format."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from provision.errors import StepFailed
from provision.formats.safetensors import write_file
from provision.steps.base import ParamError, StepContext, validate_params
from provision.steps.check_safetensors import KIND

EXPECT = {
    "count": 4,
    "dtype": "BF16",
    "tensors": {
        "action_in_proj.weight": {"shape": [1024, 32]},
        "time_mlp_in.weight": {"shape": [1024, 1024], "dtype": "BF16"},
    },
}


def _model(path: Path, **overrides: tuple[str, list[int], bytes | None]) -> None:
    tensors = {
        "action_in_proj.weight": ("BF16", [1024, 32], None),
        "time_mlp_in.weight": ("BF16", [1024, 1024], None),
        "paligemma.embed.weight": ("BF16", [64, 16], None),
        "action_out_proj.bias": ("BF16", [32], None),
    }
    tensors.update(overrides)
    write_file(path, tensors, metadata={"format": "pt"})


def _ctx(tmp_path: Path, **params: object) -> StepContext:
    raw = {"path": str(tmp_path / "model.safetensors"), **EXPECT, **params}
    return StepContext(
        step_id="convert-check",
        params=validate_params(KIND, raw),
        run_dir=tmp_path / "run",
        out=io.StringIO(),
    )


def test_matching_file_passes_and_second_check_is_done(tmp_path: Path) -> None:
    _model(tmp_path / "model.safetensors")
    ctx = _ctx(tmp_path)
    first = KIND.check(ctx)
    assert not first.done and "not checked yet" in first.reason
    KIND.run(ctx)
    KIND.verify(ctx)
    again = KIND.check(ctx)
    assert again.done and "4 tensors" in again.reason


def test_rewritten_file_is_checked_again(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    _model(path)
    ctx = _ctx(tmp_path)
    KIND.run(ctx)
    _model(path, **{"action_in_proj.weight": ("BF16", [1024, 16], None)})
    os.utime(path, ns=(1, 1))
    result = KIND.check(ctx)
    assert not result.done and "changed" in result.reason
    with pytest.raises(StepFailed, match=r"'action_in_proj.weight' has shape \[1024, 16\]"):
        KIND.run(ctx)


def test_changed_expectations_are_checked_again(tmp_path: Path) -> None:
    _model(tmp_path / "model.safetensors")
    KIND.run(_ctx(tmp_path))
    assert not KIND.check(_ctx(tmp_path, count=812)).done


@pytest.mark.parametrize(
    ("overrides", "params", "message"),
    [
        ({}, {"count": 812}, "4 tensors, expected 812"),
        ({"time_mlp_in.weight": ("F32", [1024, 1024], None)}, {}, "'time_mlp_in.weight' is F32"),
        ({"action_out_proj.bias": ("F16", [32], None)}, {}, "'action_out_proj.bias' is F16"),
        ({}, {"tensors": {"missing.weight": {"shape": [1]}}}, "'missing.weight' missing"),
    ],
)
def test_mismatches_name_the_tensor(
    tmp_path: Path, overrides: dict, params: dict, message: str
) -> None:
    _model(tmp_path / "model.safetensors", **overrides)
    ctx = _ctx(tmp_path, **params)
    with pytest.raises(StepFailed, match=message):
        KIND.run(ctx)
    assert not KIND.check(ctx).done


def test_truncated_file_fails_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    _model(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(StepFailed, match="truncated") as info:
        KIND.run(_ctx(tmp_path))
    assert info.value.hint


def test_missing_file(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    assert "does not exist" in KIND.check(ctx).reason
    with pytest.raises(StepFailed, match="cannot read"):
        KIND.run(ctx)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"path": "/x", "dtype": "bf16"}, "dtype"),
        ({"path": "/x", "count": -1}, "count"),
        ({"path": "/x", "tensors": {"a": {"shape": "1024"}}}, "tensors"),
        ({"path": "/x", "tensors": {"a": {"shape": [1], "dtyp": "F32"}}}, "tensors"),
        ({"path": "/x", "tensors": {"a": {"dtype": "Q8"}}}, "tensors"),
        ({"count": 3}, "path"),
    ],
)
def test_bad_params_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ParamError) as info:
        validate_params(KIND, raw)
    assert info.value.key == key


def test_describe_says_what_it_checks() -> None:
    params = validate_params(KIND, {"path": "/m.safetensors", **EXPECT})
    assert KIND.describe(params) == "check header of /m.safetensors (4 tensors, 2 named, all BF16)"
