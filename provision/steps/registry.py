"""Find step kinds by name: the kind `foo` is `provision.steps.foo.KIND`.

There is no central list to edit: a new kind is a new module. What is not a kind is skipped by
what it is, not by its name's spelling: `base` (the kinds' contract) and `registry`, and every
subpackage (`provision.steps.common`, the helpers the kinds share).
"""

from __future__ import annotations

import importlib
import re

from provision.steps.base import Kind

_NOT_KINDS = {"base", "registry"}


def kind_names() -> list[str]:
    """Names of every kind, sorted."""
    import pkgutil  # only to list kinds: an agent process looks its kinds up by name

    import provision.steps as package

    return sorted(
        m.name
        for m in pkgutil.iter_modules(package.__path__)
        if not m.ispkg and m.name not in _NOT_KINDS
    )


def get_kind(name: str) -> Kind | None:
    """The kind called `name`, or None when there is none."""
    if name in _NOT_KINDS or not name.isidentifier():
        return None
    try:
        module = importlib.import_module(f"provision.steps.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"provision.steps.{name}":
            return None
        raise
    if hasattr(module, "__path__"):  # a package: helpers, not a kind
        return None
    kind = getattr(module, "KIND", None)
    return kind if isinstance(kind, Kind) else None


def kind_example(name: str) -> str:
    """The YAML example in a kind module's docstring (its first ```yaml block)."""
    doc = importlib.import_module(f"provision.steps.{name}").__doc__ or ""
    match = re.search(r"```yaml\n(.*?)```", doc, re.S)
    return match.group(1) if match else ""
