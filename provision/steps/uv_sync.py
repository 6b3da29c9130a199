"""`uv_sync`: create a project's locked environment (`.venv`) with `uv sync`.

Example (RUNBOOK A, rows av-override and uv-sync):

```yaml
- id: uv-sync
  kind: uv_sync
  needs: [clone]
  project: /workspace/openpi
  overrides: ["av>=13.1.0,<14.0.0"]
  verify_imports: {torch: "2.7", jax: "0.5", transformers: "4.53"}
  timeout: 1800
```

- uv is called by absolute path: `uv`, else `~/.bootstrap/bin/uv`, `/usr/local/bin/uv`,
  `~/.local/bin/uv`, `~/.cargo/bin/uv`, then PATH; when none exists, the engine's `tool-uv`
  step fetched uv's PyPI wheel first (without pip) and put its binary in `~/.bootstrap/bin`.
- uv runs with `GIT_LFS_SKIP_SMUDGE=1` and `UV_LINK_MODE=copy` unless the step's `env` sets them
  (copies, so patching a file in the venv never patches uv's cache).
- `overrides` are ensured in `[tool.uv] override-dependencies` of pyproject.toml (a minimal text
  edit; an entry for the same package is replaced). Before syncing, the lock is inspected: a
  pinned `av >= 14` with no wheel for this box, or the removed `av 14.4.0`, would make uv build
  av from source against ffmpeg 7 and fail minutes later; the step re-locks with the overrides
  first and fails at once, with the fix, if the lock still pins such a version.
- `uv sync` is exact: it removes packages installed into the venv after it (`pip_install` steps
  such as TensorFlow). Those steps' checks then say not done, and they run again.
- Done when uv.lock and pyproject.toml hash as they did after the last successful sync, the venv
  interpreter exists, and the files of the `verify_imports` modules are still there. The imports
  themselves (with version prefixes: "2.7" matches 2.7.1+cu126) are verified once, after the sync,
  by one run of `.venv/bin/python`.
- `extra_args` go to `uv sync` only (e.g. `[--frozen]`); `find_links`/`index_url`/`offline` go
  to every uv call, the re-lock included.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from provision.agent.files import read_json, write_json_atomic
from provision.errors import StepFailed
from provision.steps.base import Check, Kind, Param, ParamError, StepContext
from provision.steps.common.pyproject import (
    PyprojectError,
    ensure_overrides,
    read_overrides,
    requirement_name,
)
from provision.steps.common.uv import (
    UV_PARAMS,
    ensure_uv,
    index_args,
    run_uv,
    uv_env,
    validate_index,
)
from provision.steps.common.uvlock import Interpreter, box_interpreter, source_build_traps
from provision.steps.common.venv import (
    IMPORT_PROBE,
    python_of,
    run_probe,
    version_matches_prefix,
)

_MARKER = "synced.json"
_HASHED = ("uv.lock", "pyproject.toml")


class UvSync(Kind):
    """`uv sync` in `project`, after fixing known lock traps; verifies imports and versions."""

    name = "uv_sync"
    summary = "uv sync a project's locked venv (lock traps fixed first; imports verified)"
    receives = True
    params = (
        Param("project", "path", "project directory (holds pyproject.toml)", required=True),
        Param("python", "str", "Python version request for uv (`--python`), e.g. '3.11'"),
        Param(
            "overrides",
            "list",
            "requirements ensured in [tool.uv] override-dependencies",
            default=[],
            items="str",
        ),
        Param(
            "verify_imports",
            "any",
            'modules the venv must import: {module: "version prefix"} ("" for any) or a list',
            default={},
        ),
        Param(
            "extra_args",
            "list",
            "more `uv sync` arguments, e.g. [--frozen]",
            default=[],
            items="str",
        ),
        *UV_PARAMS,
    )

    def required_tools(self, params: dict[str, Any]) -> tuple[str, ...]:
        # An explicit `uv` path is the user's own; else the engine provides uv before the step.
        return () if params["uv"] else ("uv",)

    def validate(self, params: dict[str, Any]) -> None:
        validate_index(params)
        for requirement in params["overrides"]:
            if requirement_name(requirement) is None:
                raise ParamError(f"'overrides': {requirement!r} names no package", "overrides")
        wanted_imports(params["verify_imports"])

    def describe(self, params: dict[str, Any]) -> str:
        text = f"uv sync in {params['project']}"
        if params["overrides"]:
            text += f" (overrides: {', '.join(params['overrides'])})"
        imports = wanted_imports(params["verify_imports"])
        if imports:
            shown = ", ".join(f"{m} {v}".strip() for m, v in imports.items())
            text += f"; verify imports {shown}"
        return text

    def check(self, ctx: StepContext) -> Check:
        project = ctx.path(ctx.params["project"])
        marker = read_json(ctx.workdir / _MARKER, None)
        if not isinstance(marker, dict):
            return Check(False, "not synced by bootstrap yet")
        hashes = _hashes(project)
        for name in _HASHED:
            if hashes[name] is None:
                return Check(False, f"no {name} in {project}")
            if hashes[name] != marker.get("hashes", {}).get(name):
                return Check(False, f"{name} changed since the last sync")
        python = python_of(_venv(ctx, project))
        if not python.exists():
            return Check(False, f"{python} is missing")
        for module, path in marker.get("modules", {}).items():
            if path and not Path(path).exists():
                return Check(False, f"{module} is gone from the venv ({path})")
        return Check(True, f"synced; uv.lock unchanged ({(hashes['uv.lock'] or '')[:12]})")

    def run(self, ctx: StepContext) -> None:
        params = ctx.params
        project = ctx.path(params["project"])
        if not (project / "pyproject.toml").is_file():
            raise StepFailed(
                f"no pyproject.toml in {project}", hint="is `project` the repository's root?"
            )
        uv = str(ensure_uv(ctx, params["uv"]))
        env = uv_env(ctx)
        common = index_args(params) + (["--python", params["python"]] if params["python"] else [])
        edited = _apply_overrides(ctx, project, params["overrides"])
        lock = project / "uv.lock"
        interp = _interpreter(ctx, uv, project, params["python"])
        traps = source_build_traps(lock.read_text(), interp) if lock.is_file() else []
        for trap in traps:
            overrides = ", ".join(read_overrides(_read(project))) or "none"
            ctx.log(f"{trap}; re-locking (overrides: {overrides})")
        if edited or traps or not lock.is_file():
            ctx.progress(message="locking")
            run_uv(ctx, [uv, "lock", *common], cwd=project, env=env)
            traps = source_build_traps(lock.read_text(), interp)
        if traps:
            raise StepFailed(
                f"{traps[0]}: uv sync would build it from source and fail",
                hint='add overrides: ["av>=13.1.0,<14.0.0"] to this step (RUNBOOK D), or run '
                "`uv lock --upgrade-package av` in the project",
            )
        ctx.progress(message="syncing")
        run_uv(ctx, [uv, "sync", *common, *params["extra_args"]], cwd=project, env=env)

    def verify(self, ctx: StepContext) -> None:
        project = ctx.path(ctx.params["project"])
        python = python_of(_venv(ctx, project))
        if not python.exists():
            raise StepFailed(f"{python} is missing after uv sync")
        wanted = wanted_imports(ctx.params["verify_imports"])
        found = run_probe(ctx, python, IMPORT_PROBE, list(wanted), cwd=project)
        failures = []
        for module, prefix in wanted.items():
            result = found[module]
            if "error" in result:
                failures.append(f"import {module} failed ({result['error']})")
            elif prefix and not version_matches_prefix(result["version"] or "", prefix):
                failures.append(f"{module} is {result['version']}, wanted {prefix}.x")
            else:
                ctx.log(f"import {module}: {result['version'] or 'ok'}")
        if failures:
            raise StepFailed(
                "; ".join(failures),
                hint="uv.lock decides these versions: is the checkout on the right branch?",
            )
        modules = {m: found[m]["file"] for m in wanted}
        write_json_atomic(ctx.workdir / _MARKER, {"hashes": _hashes(project), "modules": modules})


def wanted_imports(value: Any) -> dict[str, str]:
    """`verify_imports` as {module: version prefix}; raises ParamError on a bad shape.

    Versions must be strings: YAML reads 4.50 as the float 4.5.
    """
    if isinstance(value, list):
        value = {name: "" for name in value}
    if not isinstance(value, dict):
        raise ParamError("'verify_imports' must be a mapping or a list", "verify_imports")
    out = {}
    for module, prefix in value.items():
        if not isinstance(module, str) or not re.match(r"[A-Za-z_][\w.]*$", module):
            raise ParamError(f"'verify_imports': {module!r} is no module name", "verify_imports")
        if prefix is not None and not isinstance(prefix, str):
            raise ParamError(
                f"'verify_imports': quote the version of {module} ({prefix!r} is not a string; "
                'YAML reads 4.50 as 4.5): write "4.50"',
                "verify_imports",
            )
        out[module] = (prefix or "").strip()
    return out


def _apply_overrides(ctx: StepContext, project: Path, wanted: list[str]) -> bool:
    """Ensure `wanted` in the project's overrides; log and report whether the file changed."""
    if not wanted:
        return False
    path = project / "pyproject.toml"
    try:
        text, changes = ensure_overrides(_read(project), wanted)
    except PyprojectError as exc:
        raise StepFailed(str(exc), hint=f"add the overrides to {path} by hand") from exc
    if changes:
        tmp = path.with_name(f".{path.name}.bootstrap.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        for change in changes:
            ctx.log(f"pyproject.toml [tool.uv] override-dependencies: {change}")
    else:
        ctx.log(f"pyproject.toml already overrides {', '.join(wanted)}")
    return bool(changes)


def _interpreter(
    ctx: StepContext, uv: str, project: Path, python: str | None
) -> Interpreter | None:
    """The interpreter uv will sync with (so wheels can be matched to it), or None if unknown."""
    found = ctx.capture([uv, "python", "find", *([python] if python else [])], cwd=project)
    path = found.stdout.strip().splitlines()[-1:] if found.returncode == 0 else []
    if not path:
        ctx.log("could not tell which python uv will use; matching wheels by name only")
        return None
    probe = "import sys; print(sys.implementation.name, *sys.version_info[:2])"
    info = ctx.capture([path[0], "-c", probe]).stdout.split()
    if len(info) != 3:
        return None
    return box_interpreter(info[0], (int(info[1]), int(info[2])))


def _venv(ctx: StepContext, project: Path) -> Path:
    """The project's environment: `UV_PROJECT_ENVIRONMENT` if the step sets it, else `.venv`."""
    return project / ctx.path(ctx.env.get("UV_PROJECT_ENVIRONMENT") or ".venv")


def _read(project: Path) -> str:
    return (project / "pyproject.toml").read_text(encoding="utf-8")


def _hashes(project: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _HASHED:
        try:
            out[name] = hashlib.sha256((project / name).read_bytes()).hexdigest()
        except OSError:
            out[name] = None
    return out


KIND = UvSync()
