"""One root error type; subclasses carry where the bad input came from.

Everything a user can cause (a bad playbook, an unknown host, a refused key) is raised as a
`ProvisionError` and rendered by `cli.py` as one line, exit code 2, no traceback. This module is
standard-library only: the agent on the box imports it too.
"""

from __future__ import annotations


class ProvisionError(Exception):
    """Bad input or an environment problem the user can fix; rendered as one line."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        step: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.step = step

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        step = f"step '{self.step}': " if self.step else ""
        return f"{where}{step}{self.message}"


class ConfigError(ProvisionError):
    """A playbook, inventory or template that does not validate."""


class UsageError(ProvisionError):
    """A command line that does not make sense (a missing argument, options that conflict)."""


class TargetError(ProvisionError):
    """A target that names no host, or a host that cannot be reached or authenticated."""


class HostKeyError(TargetError):
    """The host presented a key different from the one trusted on first use."""


class StepFailed(Exception):
    """Raised by a step kind when its action or its verification fails.

    `reason` is one line shown in `status`; `hint` optionally says how to fix it.
    """

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint
