"""The error every reader and check in `provision.stats` raises for a bad dataset or request."""

from __future__ import annotations

from provision.errors import ConfigError


class DatasetError(ConfigError):
    """A dataset that is corrupt, incomplete or not what was asked for; `hint` says what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
