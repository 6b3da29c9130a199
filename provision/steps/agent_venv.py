"""`agent_venv`: the agent's private venv for kinds that need third-party libraries.

The controller adds this step by itself (id `agent-venv`) when a selected step's kind lists
`pip` requirements, and makes only those steps need it: the other tracks start at once. Set the
host var `agent_python` to use an existing interpreter instead, or `agent_base_python` (and
`agent_system_site_packages: true`) to build the venv on an interpreter that already has them.

The venv is made by uv (`uv venv`: no ensurepip needed, which Debian's python3 lacks without
python3-venv), and the requirements are installed with `uv pip install`; uv itself is provided
before this step by the engine (`tool-uv`). With `system_site_packages`, and a base interpreter
that already has every requirement, nothing is installed at all: the venv is made over the base
without pip, and a `.pth` file adds the base's own site-packages, so a base that is itself a
venv (`pip install -e ".[box]"` in a fresh venv) is seen too — `--system-site-packages` alone
would show the venv's *base* interpreter's packages, not the venv's.

Done means the venv's interpreter imports every requirement, in one call (not a marker file).

```yaml
- id: libs-venv   # (the implicit step is called agent-venv)
  kind: agent_venv
  requirements: [google-cloud-storage, rclone-python]
```
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from provision.agent.paths import venv_dir
from provision.errors import StepFailed
from provision.steps.base import Check, Kind, Param, StepContext
from provision.steps.common.uv import ensure_uv
from provision.steps.common.venv import python_of, run_probe

#: The file in the venv's site-packages that adds the base interpreter's site-packages.
BASE_PTH = "_bootstrap_base.pth"

#: Imports each distribution of argv[1] by its top-level packages (read from its RECORD: the
#: shallowest dirs holding `__init__.py`, so `google-cloud-storage` is `google.cloud.storage`,
#: not the namespace `google`; private `_x` ones left out); reports the error of each that fails,
#: None for those that import.
IMPORT_REQUIREMENTS = """
import importlib, importlib.metadata as metadata

def modules(dist):
    files = [str(f) for f in (dist.files or [])]
    packages = {f[: -len("/__init__.py")] for f in files if f.endswith("/__init__.py")}
    tops = sorted(p for p in packages if p.rpartition("/")[0] not in packages)
    tops = [p for p in tops if not p.startswith("..") and ".dist-info" not in p]
    # private packages may need optional extras (google-cloud-storage's `_storage_v2`)
    tops = [p for p in tops if not p.rpartition("/")[2].startswith("_")] or tops
    if not tops:
        tops = [f[:-3] for f in files if "/" not in f and f.endswith(".py")]
    if not tops:
        tops = (dist.read_text("top_level.txt") or "").split()
    return [p.replace("/", ".") for p in tops]

result = {}
for name in json.loads(sys.argv[1]):
    try:
        names = modules(metadata.distribution(name))
        if not names:
            raise ImportError("the distribution holds no module")
        for module in names:
            importlib.import_module(module)
        result[name] = None
    except BaseException as exc:  # a module may raise anything on import, SystemExit included
        result[name] = type(exc).__name__ + ": " + str(exc)
emit(result)
"""

#: The interpreter's site-packages dirs (a venv's own, plus its base's when it sees them).
SITE_DIRS = "import site\nemit(site.getsitepackages())\n"
#: Where packages go in a venv.
PURELIB = "import sysconfig\nemit(sysconfig.get_path('purelib'))\n"


def distribution_name(requirement: str) -> str:
    """`numpy>=1.24` -> `numpy`; `google-cloud-storage[grpc]` -> `google-cloud-storage`."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return match.group(1) if match else requirement.strip()


class AgentVenv(Kind):
    """Create the agent venv (`paths.venv_dir()`) and install the requirements of the library
    kinds."""

    name = "agent_venv"
    summary = "the agent's private venv for kinds that need libraries (added automatically)"
    tools = ("uv",)
    params = (
        Param("requirements", "list", "pip requirements", required=True, items="str"),
        Param("python", "str", "base interpreter for the venv", default="python3"),
        Param(
            "system_site_packages", "bool", "let the venv see the base's packages", default=False
        ),
    )

    def describe(self, params: dict[str, Any]) -> str:
        return f"the agent venv with {', '.join(params['requirements'])}"

    def check(self, ctx: StepContext) -> Check:
        python = python_of(venv_dir())
        if not python.exists():
            return Check(False, f"no venv at {venv_dir()}")
        try:
            failures = self._import_failures(ctx, python)
        except StepFailed as exc:
            return Check(False, exc.reason)
        if failures:
            return Check(
                False, "cannot import " + "; ".join(f"{k} ({v})" for k, v in failures.items())
            )
        return Check(True, f"{python} imports {', '.join(ctx.params['requirements'])}")

    def run(self, ctx: StepContext) -> None:
        venv = venv_dir()
        params = ctx.params
        base = params["python"]
        env = dict(ctx.env, UV_NATIVE_TLS="1", UV_PYTHON_DOWNLOADS="never")
        reuse = params["system_site_packages"] and self._base_has_all(ctx)
        # uv is found (or installed) the way the uv kinds find it: only a reused base needs none.
        uv = None if reuse else ensure_uv(ctx, None)
        if uv is None:
            # No ensurepip is needed without pip; nothing is installed into this venv then.
            cmd = [base, "-m", "venv", "--without-pip", str(venv)]
        else:
            cmd = [str(uv), "venv", "--allow-existing", "--python", base, str(venv)]
        if params["system_site_packages"]:
            cmd.insert(-1, "--system-site-packages")
        ctx.sh(cmd, env=env)
        if params["system_site_packages"]:
            self._add_base_site(ctx, venv)
        if uv is None:
            ctx.log(f"{base} has every requirement: the venv uses its packages, nothing installed")
            return
        requirements = params["requirements"]
        ctx.sh(
            [str(uv), "pip", "install", "--python", str(python_of(venv)), *requirements], env=env
        )

    def verify(self, ctx: StepContext) -> None:
        python = python_of(venv_dir())
        failures = self._import_failures(ctx, python)
        if failures:
            raise StepFailed(
                "the agent venv cannot import "
                + "; ".join(f"{k} ({v})" for k, v in failures.items())
            )
        ctx.log(f"{python} imports {', '.join(ctx.params['requirements'])}")

    def _import_failures(self, ctx: StepContext, python: Path) -> dict[str, str]:
        names = [distribution_name(r) for r in ctx.params["requirements"]]
        result = run_probe(ctx, python, IMPORT_REQUIREMENTS, names, cwd=ctx.path("~"), timeout=120)
        return {name: error for name, error in result.items() if error}

    def _base_has_all(self, ctx: StepContext) -> bool:
        """Whether the base interpreter already imports every requirement."""
        try:
            return not self._import_failures(ctx, Path(ctx.params["python"]))
        except StepFailed:
            return False

    def _add_base_site(self, ctx: StepContext, venv: Path) -> None:
        """Write BASE_PTH into the venv: the base interpreter's site-packages, in its order."""
        python = python_of(venv)
        if not python.exists():
            return
        home = ctx.path("~")
        base_dirs = run_probe(ctx, Path(ctx.params["python"]), SITE_DIRS, None, cwd=home)
        purelib = Path(run_probe(ctx, python, PURELIB, None, cwd=home))
        purelib.mkdir(parents=True, exist_ok=True)
        (purelib / BASE_PTH).write_text("".join(f"{d}\n" for d in base_dirs), encoding="utf-8")


KIND = AgentVenv()
