"""The contract every step kind implements, and the context it runs in.

A kind is a subclass of `Kind` in its own module under `provision/steps/`, exposed as the
module-level `KIND` instance; `provision.steps.registry` finds it by module name. Kind modules
are imported on the controller (to validate params, resolve templates, describe the plan) and on
the box by the agent (to check, run and verify), so **their top level imports only the standard
library**; a third-party library (google-cloud-storage, rclone-python, ...) is imported inside
`run`/`verify`, and the kind lists it in `pip` so the agent runs it with its private venv.

Lifecycle of one step on the box:

1. `check(ctx)` in the runner process: cheap, no side effects, stdlib only (stat files, read a
   marker, `dpkg-query`). It decides "done" together with the engine's own checks (fingerprint,
   `creates`, `done_when`, upstream generations).
2. If not done, the runner starts a subprocess (`agent exec`) that calls `run(ctx)` then
   `verify(ctx)`. Both raise `StepFailed(reason, hint)` on failure; anything printed goes to the
   step's log (redacted by the runner).
"""

from __future__ import annotations

import codecs
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from provision.agent.files import read_json, write_json_atomic
from provision.errors import StepFailed

T = TypeVar("T")

#: Placeholder the controller puts where a secret's value goes in rendered text; the agent
#: replaces it on the box (`StepContext.fill_secrets`), so plans never hold secret values.
SECRET_MARK = "@@bootstrap-secret:{}@@"

#: Param types understood by `validate_params`.
PARAM_TYPES = ("str", "path", "int", "float", "bool", "list", "dict", "any")

#: No polling interval anywhere may exceed this many seconds (DESIGN.md).
MAX_POLL_S = 30.0
#: Between the polls of `wait_until`, how often its cheap `changed` test is looked at.
GLANCE_S = 0.25
#: `StepContext.sh` reads its command's output this many bytes at a time...
SH_CHUNK = 64 * 1024
#: ...and keeps this many characters of its end, for the last line in an error.
SH_TAIL_CHARS = 4096


@dataclass(frozen=True)
class Param:
    """One kind-specific parameter of a step.

    `type` is one of PARAM_TYPES; `path` is a string the agent expands (`~` is the box's home).
    `items` constrains list items / dict values to a scalar type ("str", "int", ...).
    `secret_ref`: the value names an inventory secret, which the step then receives.
    """

    name: str
    type: str
    help: str
    required: bool = False
    default: Any = None
    choices: tuple[Any, ...] = ()
    items: str | None = None
    secret_ref: bool = False


@dataclass(frozen=True)
class Check:
    """Outcome of a done-check: whether the step's effect holds, and why (shown by `plan`)."""

    done: bool
    reason: str


class ParamError(ValueError):
    """Bad kind params; `key` names the offending param so the loader can point at its line."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ResolveTools(Protocol):
    """What the controller offers `Kind.resolve` (implemented in `provision.playbook`)."""

    def render_template(self, name: str) -> str:
        """Render `templates/NAME` with the host's vars; secrets become placeholders."""
        ...

    def read_local(self, path: str) -> bytes:
        """Read a file on the controller (relative to the playbook's directory)."""
        ...


class Kind:
    """Base class of step kinds. Subclasses set the ClassVars and override what they need."""

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    #: pip requirements for the agent venv; non-empty means run/verify execute in that venv.
    pip: ClassVar[tuple[str, ...]] = ()
    #: executables the kind runs (git, tmux, rclone, uv): the engine puts an implicit step
    #: providing each before the kind's steps (`provision.steps.box_tool`).
    tools: ClassVar[tuple[str, ...]] = ()
    #: kinds whose selected steps this kind's steps run after (a check of the box's tools runs
    #: after the steps that install them), added by the engine where no cycle forbids it.
    runs_after: ClassVar[tuple[str, ...]] = ()
    #: the step's work is mostly bytes arriving over the box's link (a sync, a download): the
    #: runner gives the link to the critical path first (provision/agent/link.py).
    receives: ClassVar[bool] = False

    def validate(self, params: dict[str, Any]) -> None:
        """Cross-field validation on the controller; raise ParamError. Types are already checked."""

    def required_tools(self, params: dict[str, Any]) -> tuple[str, ...]:
        """The executables a step with these params runs (default: the kind's `tools`)."""
        return self.tools

    def resolve(self, params: dict[str, Any], tools: ResolveTools) -> dict[str, Any]:
        """Controller-side resolution (render a template into the params, read a local file)."""
        return params

    def describe(self, params: dict[str, Any]) -> str:
        """One line saying what `run` would do, for `bootstrap plan` (no secrets)."""
        return self.summary

    def check(self, ctx: StepContext) -> Check:
        """Cheap, side-effect-free test that the step's effect holds on this box."""
        return Check(True, "nothing to check")

    def run(self, ctx: StepContext) -> None:
        """Do the work; raise StepFailed on failure."""
        raise NotImplementedError

    def verify(self, ctx: StepContext) -> None:
        """Prove the work took effect; raise StepFailed with the reason otherwise."""


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """ " (did you mean 'X'?)" for the known name closest to `name`, or ""."""
    import difflib  # only for a bad key: every agent process validates params (~2 ms)

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_keys(
    raw: Iterable[Any], known: Sequence[str], where: str, key: str, *, dotted: bool = False
) -> None:
    """Raise ParamError for the first key of a nested mapping (`watch:`, `checkpoints:`, a
    marker) that is not in `known`, with the closest known one as a hint and the whole list.

    The error is keyed `key` (the param holding the mapping), or `key.NAME` with `dotted`.
    """
    for name in raw:
        if name not in known:
            hint = _did_you_mean(str(name), known)
            raise ParamError(
                f"unknown key '{name}' in {where}{hint}; its keys: {', '.join(known)}",
                f"{key}.{name}" if dotted else key,
            )


def validate_params(kind: Kind, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check `raw` against the kind's params: unknown keys, required keys, types, choices.

    Returns the params with defaults filled in; raises ParamError naming the key.
    """
    known = {p.name: p for p in kind.params}
    for key in raw:
        if key not in known:
            hint = _did_you_mean(str(key), known)
            expected = ", ".join(sorted(known)) or "none"
            raise ParamError(
                f"unknown key '{key}' for kind '{kind.name}'{hint}; its params: {expected}",
                key,
            )
    out: dict[str, Any] = {}
    for p in kind.params:
        if p.name not in raw or raw[p.name] is None:
            if p.required:
                raise ParamError(f"kind '{kind.name}' requires '{p.name}' ({p.help})", p.name)
            out[p.name] = p.default
            continue
        value = raw[p.name]
        _check_type(p, value)
        if p.choices and value not in p.choices:
            choices = ", ".join(map(str, p.choices))
            raise ParamError(f"'{p.name}' must be one of {choices}, got {value!r}", p.name)
        out[p.name] = value
    kind.validate(out)
    return out


_SCALARS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "path": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
}


def _type_ok(type_name: str, value: Any) -> bool:
    if type_name == "any":
        return True
    if isinstance(value, bool) and type_name in ("int", "float"):
        return False
    return isinstance(value, _SCALARS[type_name])


def _check_type(p: Param, value: Any) -> None:
    if not _type_ok(p.type, value):
        raise ParamError(f"'{p.name}' must be {p.type}, got {type(value).__name__}", p.name)
    if p.items is None:
        return
    members = value.values() if isinstance(value, dict) else value
    for item in members:
        if not _type_ok(p.items, item):
            raise ParamError(
                f"'{p.name}' must hold {p.items} values, got {type(item).__name__}", p.name
            )


@dataclass
class StepContext:
    """Everything a kind sees while checking, running or verifying one step on the box."""

    step_id: str
    params: dict[str, Any]
    run_dir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    secrets: dict[str, str] = field(default_factory=dict)
    poll: float = 5.0
    deadline: float | None = None
    out: Any = None

    @property
    def workdir(self) -> Path:
        """A private directory for this step's markers and manifests (created on demand)."""
        path = self.run_dir / "steps" / self.step_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def path(self, value: str) -> Path:
        """A path param as a Path on this box (`~` expanded)."""
        return Path(os.path.expanduser(value))

    def log(self, message: str) -> None:
        """Write one line to the step's log."""
        stream = self.out or sys.stdout
        stream.write(message.rstrip("\n") + "\n")
        stream.flush()

    def fill_secrets(self, text: str) -> str:
        """Replace secret placeholders with the values this step may see."""
        for name, value in self.secrets.items():
            text = text.replace(SECRET_MARK.format(name), value)
        return text

    def sh(
        self,
        cmd: Sequence[str] | str,
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        check: bool = True,
    ) -> int:
        """Run a command with its output streamed into the log.

        A string runs through `bash -c`. On a non-zero exit with `check`, raises StepFailed
        naming the command and exit code (the log holds its output). Never put a secret in
        `cmd`: pass it through `env` instead.
        """
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        shown = cmd if isinstance(cmd, str) else " ".join(cmd)
        tail = ""  # the end of the output, for the error message (bounded: lines may be huge)
        stream = self.out or sys.stdout
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env) if env is not None else self.env,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        if input is not None and proc.stdin:
            proc.stdin.write(input.encode())
            proc.stdin.close()
        # A pipe's stream is a BufferedReader (typeshed says IO[bytes], which has no read1).
        stdout = proc.stdout
        assert isinstance(stdout, io.BufferedReader)
        # Pass output on as it comes, not a line at a time: a progress bar redrawn with `\r`
        # shows while it runs, and a 10 MB line is never held whole.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for raw in iter(lambda: stdout.read1(SH_CHUNK), b""):
            text = decoder.decode(raw)
            stream.write(text)
            stream.flush()
            tail = (tail + text)[-SH_TAIL_CHARS:]
        rc = proc.wait()
        if rc != 0 and check:
            lines = tail.replace("\r", "\n").splitlines()
            last = next((t.strip() for t in reversed(lines) if t.strip()), "")
            raise StepFailed(f"`{shown}` exited {rc}" + (f": {last}" if last else ""))
        return rc

    def capture(
        self,
        cmd: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run a quiet command (for checks) and return its result; never raises on rc."""
        try:
            return subprocess.run(
                list(cmd),
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return subprocess.CompletedProcess(list(cmd), 127, "", str(exc))

    def progress(
        self,
        *,
        done: float | None = None,
        total: float | None = None,
        unit: str = "",
        files_done: int | None = None,
        files_total: int | None = None,
        speed: float | None = None,
        message: str | None = None,
        received: bool | None = None,
    ) -> None:
        """Report progress of long work (bytes, files, speed in unit/s); shown by `status`.
        `received`: a receiving kind's bytes are all in, what is left is the box's own work (the
        runner lets other downloads have the link, provision/agent/link.py)."""
        data: dict[str, Any] = {"unit": unit, "updated": time.time()}
        for key, value in (
            ("done", done),
            ("total", total),
            ("files_done", files_done),
            ("files_total", files_total),
            ("speed", speed),
            ("message", message),
            ("received", received),
        ):
            if value is not None:
                data[key] = value
        if done is not None and total:
            data["percent"] = round(100.0 * done / total, 1)
        write_json_atomic(self.workdir / "_progress.json", data)

    def warn(self, message: str) -> None:
        """Record a warning: it goes to the log and into the step's status."""
        self.log(f"WARNING: {message}")
        path = self.workdir / "_warnings.json"
        warnings = read_json(path, [])
        warnings.append(message)
        write_json_atomic(path, warnings)

    def wait_until(
        self,
        probe: Callable[[], T | None],
        what: str,
        changed: Callable[[], bool] | None = None,
    ) -> T:
        """Poll `probe` until it returns a value, adaptively from 1 s up to `poll` seconds.

        `changed`, when given, is a cheap test (a stat) of whether the probe could find
        something new: it is looked at every GLANCE_S between polls, and the probe runs at
        once when it says so (a marker is seen within a glance, not up to `poll` late).
        Raises StepFailed when the step's deadline comes first.
        """
        interval = 1.0
        ceiling = min(max(self.poll, 1.0), MAX_POLL_S)
        while True:
            value = probe()
            if value is not None:
                return value
            if self.deadline is not None and time.time() + interval >= self.deadline:
                raise StepFailed(f"timed out waiting for {what}")
            _sleep_unless(changed, interval)
            interval = min(interval * 1.5, ceiling)


def _sleep_unless(changed: Callable[[], bool] | None, seconds: float) -> None:
    """Sleep `seconds`, or until `changed()` says so (looked at every GLANCE_S)."""
    if changed is None:
        time.sleep(seconds)
        return
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(GLANCE_S, left))
        if changed():
            return
