"""`pip_install`: `uv pip install` exact pins into a venv, from the project root.

Example (RUNBOOK A, row tf; D, the ml_dtypes row):

```yaml
- id: tf
  kind: pip_install
  needs: [uv-sync]
  cwd: /workspace/openpi
  packages: [tensorflow==2.15.0, tensorflow-datasets==4.9.3]
  verify:
    - ml_dtypes.__version__ == "0.4.1"
    - tensorflow.__version__ == "2.15.0"
```

- Runs `uv pip install --python VENV/bin/python PKG==VER ...` with `cwd` as the working
  directory: uv applies the project's `[tool.uv] override-dependencies` only there (from
  elsewhere ml-dtypes may fall to 0.2.x and break jax). `venv` defaults to `.venv` in `cwd`.
- Requirements must be exact pins (`name==version`, extras allowed) unless `allow_ranges: true`.
- Done when the last run passed its verification and each package's installed version, read
  from the venv's `*.dist-info/METADATA` without starting python, still equals its pin (for
  ranges: the version the last run installed).
  A later `uv sync` removes these packages again (it is exact), which this check notices.
- Afterwards the venv's interpreter, in one run, reports the versions (importlib.metadata) and
  evaluates each `verify` expression, importing the modules it names; a failing expression is
  named in the failure with the values of its parts.
- `find_links`, `index_url` and `offline` serve air-gapped boxes; `extra_args` go to
  `uv pip install` (e.g. `[--no-deps]`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from provision.agent.files import read_json, write_json_atomic
from provision.errors import StepFailed
from provision.steps.base import Check, Kind, Param, ParamError, StepContext
from provision.steps.common.uv import (
    UV_PARAMS,
    ensure_uv,
    index_args,
    run_uv,
    uv_env,
    validate_index,
)
from provision.steps.common.venv import (
    EXPRESSION_PROBE,
    canonical_name,
    installed_versions,
    python_of,
    run_probe,
    same_version,
)

_MARKER = "installed.json"
_NAME_RE = r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)"
#: An exact pin: name, optional [extras], `==`, a version without wildcard or marker.
_PIN = re.compile(_NAME_RE + r"\s*(\[[^\]]*\])?\s*==\s*([^\s;,=*]+)\s*$")
_NAME = re.compile(_NAME_RE)


class PipInstall(Kind):
    """Install pinned packages into a venv with `uv pip install`, from the project root."""

    name = "pip_install"
    summary = "uv pip install exact pins into a venv, from the project root (versions verified)"
    receives = True
    params = (
        Param("packages", "list", "requirements, each `name==version`", required=True, items="str"),
        Param(
            "cwd", "path", "project root: uv applies its overrides only from there", required=True
        ),
        Param("venv", "path", "the venv (relative paths start at `cwd`)", default=".venv"),
        Param("allow_ranges", "bool", "accept requirements other than exact pins", default=False),
        Param(
            "verify",
            "list",
            "python expressions that must hold in the venv",
            default=[],
            items="str",
        ),
        Param("extra_args", "list", "more `uv pip install` arguments", default=[], items="str"),
        *UV_PARAMS,
    )

    def required_tools(self, params: dict[str, Any]) -> tuple[str, ...]:
        # An explicit `uv` path is the user's own; else the engine provides uv before the step.
        return () if params["uv"] else ("uv",)

    def validate(self, params: dict[str, Any]) -> None:
        validate_index(params)
        if not params["packages"]:
            raise ParamError("'packages' is empty", "packages")
        for requirement in params["packages"]:
            if _PIN.match(requirement):
                continue
            if not params["allow_ranges"]:
                raise ParamError(
                    f"'packages': {requirement!r} is not an exact pin (name==version); "
                    "pin it, or set allow_ranges: true",
                    "packages",
                )
            if not _NAME.match(requirement):
                raise ParamError(f"'packages': {requirement!r} names no package", "packages")
        for i, expr in enumerate(params["verify"]):
            try:
                ast.parse(expr, mode="eval")
            except SyntaxError as exc:
                raise ParamError(
                    f"'verify' item {i + 1} is not a python expression: {expr!r} ({exc.msg})",
                    "verify",
                ) from exc

    def describe(self, params: dict[str, Any]) -> str:
        return (
            f"uv pip install {' '.join(params['packages'])} into {params['venv']} "
            f"(from {params['cwd']})"
        )

    def check(self, ctx: StepContext) -> Check:
        venv = _venv(ctx)
        if not python_of(venv).exists():
            return Check(False, f"no venv at {venv}")
        recorded = read_json(ctx.workdir / _MARKER, None)
        if not isinstance(recorded, dict):
            return Check(False, "not installed and verified by this step yet")
        installed = installed_versions(venv)
        for requirement in ctx.params["packages"]:
            name, pin = _parse(requirement)
            have = installed.get(name)
            if have is None:
                return Check(False, f"{name} is not installed in {venv}")
            want = pin or recorded.get(name) or ""
            if not same_version(want, have):
                return Check(False, f"{name} is {have}, wanted {want}")
        return Check(True, f"installed: {', '.join(ctx.params['packages'])}")

    def run(self, ctx: StepContext) -> None:
        params = ctx.params
        cwd = ctx.path(params["cwd"])
        python = python_of(_venv(ctx))
        if not python.exists():
            raise StepFailed(
                f"no venv interpreter at {python}", hint="does a uv_sync step run first?"
            )
        uv = str(ensure_uv(ctx, params["uv"]))
        argv = [uv, "pip", "install", "--python", str(python), *index_args(params)]
        argv += [*params["extra_args"], *params["packages"]]
        ctx.progress(message=f"installing {len(params['packages'])} packages")
        run_uv(ctx, argv, cwd=cwd, env=uv_env(ctx))

    def verify(self, ctx: StepContext) -> None:
        params = ctx.params
        names = [_parse(r)[0] for r in params["packages"]]
        data = {"dists": names, "exprs": params["verify"]}
        found = run_probe(
            ctx, python_of(_venv(ctx)), EXPRESSION_PROBE, data, cwd=ctx.path(params["cwd"])
        )
        failures = []
        for requirement in params["packages"]:
            name, pin = _parse(requirement)
            have = found["versions"].get(name)
            if have is None:
                failures.append(f"{name} is not installed")
            elif pin and not same_version(pin, have):
                failures.append(f"{name} is {have}, wanted {pin}")
        for expr, why in found["failures"].items():
            if why is None:
                ctx.log(f"verified: {expr}")
            else:
                failures.append(f"`{expr}` failed: {why}")
        if failures:
            raise StepFailed(
                "; ".join(failures),
                hint="`cwd` must be the project root so its [tool.uv] override-dependencies "
                "apply (RUNBOOK D: with tensorflow==2.15.0, ml_dtypes stays 0.4.1)",
            )
        write_json_atomic(ctx.workdir / _MARKER, found["versions"])


def _parse(requirement: str) -> tuple[str, str | None]:
    """(canonical name, pinned version or None for a range) of a validated requirement."""
    pin = _PIN.match(requirement)
    if pin:
        return canonical_name(pin.group(1)), pin.group(3)
    match = _NAME.match(requirement)
    assert match, requirement  # validate() rejected requirements without a name
    return canonical_name(match.group(1)), None


def _venv(ctx: StepContext) -> Path:
    return ctx.path(ctx.params["cwd"]) / ctx.path(ctx.params["venv"])


KIND = PipInstall()
