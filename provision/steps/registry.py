"""Find step kinds by name: the kind `foo` is `provision.steps.foo.KIND`.

There is no central list to edit: a new kind is a new module. Modules of this package that are
not kinds (`base`, `registry`, private helpers starting with `_`) are skipped.
"""

from __future__ import annotations

import importlib
import pkgutil

from provision.steps.base import Kind

_NOT_KINDS = {"base", "registry"}


def kind_names() -> list[str]:
    """Names of every kind, sorted."""
    import provision.steps as package

    return sorted(
        m.name
        for m in pkgutil.iter_modules(package.__path__)
        if m.name not in _NOT_KINDS and not m.name.startswith("_")
    )


def get_kind(name: str) -> Kind | None:
    """The kind called `name`, or None when there is none."""
    if name in _NOT_KINDS or name.startswith("_") or not name.replace("_", "").isalnum():
        return None
    try:
        module = importlib.import_module(f"provision.steps.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"provision.steps.{name}":
            return None
        raise
    kind = getattr(module, "KIND", None)
    return kind if isinstance(kind, Kind) else None
