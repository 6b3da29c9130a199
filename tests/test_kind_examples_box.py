"""The YAML example in each of these kinds' docstrings loads and validates as it is."""

from __future__ import annotations

import importlib
import re

import pytest
import yaml

from provision.steps.base import validate_params
from provision.steps.registry import get_kind

COMMON_KEYS = {
    "id", "kind", "needs", "creates", "done_when", "timeout", "retries", "poll", "env",
    "secrets", "tags", "estimate",
}  # fmt: skip
KINDS = ["apt", "git_clone", "template", "patch_tree", "check_safetensors"]


@pytest.mark.parametrize("name", KINDS)
def test_docstring_example_validates(name: str) -> None:
    kind = get_kind(name)
    assert kind is not None
    doc = importlib.import_module(f"provision.steps.{name}").__doc__ or ""
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    assert blocks, f"{name}: no yaml example in the module docstring"
    steps = [step for block in blocks for step in yaml.safe_load(block)]
    assert any(step["kind"] == name for step in steps)
    for step in steps:
        assert step["kind"] == name
        params = validate_params(kind, {k: v for k, v in step.items() if k not in COMMON_KEYS})
        assert kind.describe(params)
