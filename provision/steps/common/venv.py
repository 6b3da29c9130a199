"""Looking into a Python virtual environment: its installed distributions read straight from
`site-packages` (no interpreter start, for done-checks), and probes run by its own interpreter
(one process for all modules or expressions, for verifications)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from provision.errors import StepFailed
from provision.steps.base import StepContext

#: Marks the probe's result line, so warnings a module prints on import cannot be mistaken for it.
_RESULT_MARK = "@@bootstrap-probe@@"


def python_of(venv: Path) -> Path:
    """The venv's interpreter."""
    return venv / "bin" / "python"


def canonical_name(name: str) -> str:
    """A distribution name normalised as PEP 503 does (`Ml_Dtypes` -> `ml-dtypes`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions(venv: Path) -> dict[str, str]:
    """Every distribution in the venv's site-packages: canonical name -> version, read from the
    `Name:`/`Version:` headers of each `*.dist-info/METADATA`."""
    found: dict[str, str] = {}
    for meta in sorted(venv.glob("lib/python*/site-packages/*.dist-info/METADATA")):
        headers = _metadata_headers(meta)
        if "name" in headers and "version" in headers:
            found[canonical_name(headers["name"])] = headers["version"]
    return found


def _metadata_headers(path: Path) -> dict[str, str]:
    headers: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break  # the headers end at the first blank line; the description follows
                key, sep, value = line.partition(":")
                if sep and key.lower() in ("name", "version") and key.lower() not in headers:
                    headers[key.lower()] = value.strip()
                if len(headers) == 2:
                    break
    except OSError:
        pass
    return headers


def same_version(wanted: str, installed: str) -> bool:
    """Whether `installed` satisfies `==wanted`: release parts compared with trailing zeros
    ignored, and a local label (`+cu126`) ignored unless `wanted` names one (PEP 440)."""
    want_public, _, want_local = wanted.strip().lower().lstrip("v").partition("+")
    have_public, _, have_local = installed.strip().lower().lstrip("v").partition("+")
    if want_local and want_local != have_local:
        return False
    return _release_key(want_public) == _release_key(have_public)


def _release_key(version: str) -> tuple[tuple[int, ...], str]:
    match = re.match(r"(\d+(?:\.\d+)*)(.*)$", version)
    if not match:
        return ((), version)
    parts = [int(p) for p in match.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return (tuple(parts), match.group(2))


def version_matches_prefix(version: str, prefix: str) -> bool:
    """Whether `version` starts with the release prefix `prefix` ("2.7" matches "2.7.1+cu126",
    not "2.70.0")."""
    return version == prefix or version.startswith((prefix + ".", prefix + "+"))


def run_probe(
    ctx: StepContext, python: Path, script: str, payload: Any, *, cwd: Path, timeout: float = 600
) -> Any:
    """Run `script` with `python` (payload as JSON in argv[1]); it must call `emit(result)`.

    Returns the emitted result; raises StepFailed when the interpreter cannot run it.
    """
    prelude = (
        "import json, sys\n"
        f"def emit(result):\n    print({_RESULT_MARK!r} + json.dumps(result), flush=True)\n"
    )
    proc = ctx.capture(
        [str(python), "-c", prelude + script, json.dumps(payload)], cwd=cwd, timeout=timeout
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    raise StepFailed(f"{python} could not run the check: {tail[0]}")


#: Imports each module of argv[1] and reports its version and file, or the error.
IMPORT_PROBE = """
import importlib
result = {}
for name in json.loads(sys.argv[1]):
    try:
        module = importlib.import_module(name)
    except BaseException as exc:  # a module may raise anything on import, SystemExit included
        result[name] = {"error": type(exc).__name__ + ": " + str(exc)}
        continue
    version = getattr(module, "__version__", None)
    result[name] = {
        "version": None if version is None else str(version),
        "file": getattr(module, "__file__", None),
    }
emit(result)
"""

#: Reports installed versions of argv[1]["dists"] (canonical names, via importlib.metadata) and
#: judges each expression of argv[1]["exprs"], importing the modules it names first; a false or
#: failing expression comes back with the values of its parts (`ml_dtypes.__version__ = '0.2.0'`).
EXPRESSION_PROBE = """
import ast, builtins, importlib, importlib.metadata as metadata, re

def describe(exc):
    return type(exc).__name__ + ": " + str(exc)

def evaluate(node, namespace):
    return eval(compile(ast.Expression(node), "<verify>", "eval"), namespace)

def import_names(tree, namespace, failed):
    # an expression names its modules without importing them: `ml_dtypes.__version__ == ...`
    for node in ast.walk(tree):
        name = node.id if isinstance(node, ast.Name) else None
        if name and name not in namespace and name not in failed and not hasattr(builtins, name):
            try:
                namespace[name] = importlib.import_module(name)
            except BaseException as exc:  # a module may raise anything on import
                failed[name] = describe(exc)

def judge(expr, namespace, failed):
    tree = ast.parse(expr, mode="eval")
    import_names(tree, namespace, failed)
    try:
        value = evaluate(tree.body, namespace)
    except BaseException as exc:
        names = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in failed]
        if isinstance(exc, NameError) and names:
            return "import " + names[0] + " failed: " + failed[names[0]]
        return describe(exc)
    if value:
        return None
    body = tree.body
    parts = [body.left, *body.comparators] if isinstance(body, ast.Compare) else [body]
    shown = []
    for part in parts:
        if isinstance(part, ast.Constant):
            continue
        try:
            shown.append(ast.unparse(part) + " = " + repr(evaluate(part, namespace)))
        except BaseException as exc:
            shown.append(ast.unparse(part) + " raised " + describe(exc))
    return "; ".join(shown) or "false"

data = json.loads(sys.argv[1])
installed = {}
for dist in metadata.distributions():  # names compared canonically, as on every python >= 3.9
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
    installed.setdefault(name, dist.version)
namespace, failed = {}, {}
emit({
    "versions": {name: installed.get(name) for name in data["dists"]},
    "failures": {expr: judge(expr, namespace, failed) for expr in data["exprs"]},
})
"""
