"""Every kind's docstring example loads through the playbook loader and validates as it is.

`bootstrap kinds NAME` prints these examples, so a user can paste one into a playbook.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

from provision.playbook import COMMON_KEYS, load_playbook
from provision.steps.base import validate_params
from provision.steps.registry import get_kind, kind_names


def _examples(name: str) -> list[dict]:
    doc = importlib.import_module(f"provision.steps.{name}").__doc__ or ""
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    return [step for block in blocks for step in yaml.safe_load(block)]


@pytest.mark.parametrize("name", kind_names())
def test_docstring_example_loads_and_validates(name: str, tmp_path: Path) -> None:
    kind = get_kind(name)
    assert kind is not None, name
    steps = _examples(name)
    assert any(step["kind"] == name for step in steps), f"{name}: no yaml example of itself"
    # Through the real loader (keys, types, kinds), with needs on steps outside the example
    # dropped, then the kind's own params, as `resolve` checks them.
    for step in steps:
        step.pop("needs", None)
    playbook = tmp_path / "example.yaml"
    playbook.write_text(yaml.safe_dump({"name": "example", "steps": steps}))
    book = load_playbook(playbook)
    for step in book.steps:
        own = get_kind(step.kind)
        assert own is not None
        params = validate_params(own, {k: v for k, v in step.raw.items() if k not in COMMON_KEYS})
        assert own.describe(params)


def test_the_registry_skips_the_contract_and_every_subpackage() -> None:
    """`provision.steps.common` is helpers, skipped because it is a package, not by its name."""
    names = kind_names()
    assert {"shell", "uv_sync", "tmux_launch"} <= set(names)
    assert not {"base", "registry", "common"} & set(names)
    for name in ("base", "registry", "common", "no_such_kind", "../x", ""):
        assert get_kind(name) is None, name
