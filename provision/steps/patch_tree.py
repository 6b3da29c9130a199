"""`patch_tree`: copy a source tree over an installed package, breaking hardlinks first.

The package directory is found by asking the target venv's own interpreter (`python:` and
`package:` give `dirname(package.__file__)`, without importing the package), or given as `dest`.
Each destination file is replaced by a new file (written beside it, then renamed over it) rather
than written in place: uv hardlinks installed files from its cache by default, and an in-place copy
would patch the cache too, and every venv that shares it (RUNBOOK E).

Done when every file of `src` has the same sha256 in the package directory. That directory is
remembered in the step's work dir, so the check runs the interpreter only the first time. After
patching, the optional `verify:` snippet runs with the same interpreter training will use.

Example (RUNBOOK A, patch):

```yaml
- id: patch-transformers
  kind: patch_tree
  needs: [uv-sync]
  src: /workspace/openpi/src/openpi/models_pytorch/transformers_replace
  python: /workspace/openpi/.venv/bin/python
  package: transformers
  verify: |
    from transformers.models.siglip import check
    assert check.check_whether_transformers_replace_is_installed_correctly()
```
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from provision.agent.files import file_sha256, read_json, write_json_atomic
from provision.errors import StepFailed
from provision.steps.base import Check, Kind, Param, ParamError, StepContext

_PACKAGE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_MARKER = "package_dir.json"
#: Prints where a package lives without importing it (transformers takes seconds to import).
_LOCATE = """
import importlib.util, os, sys
spec = importlib.util.find_spec(sys.argv[1])
if spec is None:
    sys.exit("no module named " + sys.argv[1])
locations = list(spec.submodule_search_locations or [])
print(locations[0] if locations else os.path.dirname(spec.origin))
"""


class PatchTree(Kind):
    """Replace files of an installed package with those of a source tree."""

    name = "patch_tree"
    summary = "copy a source tree over an installed package (breaking uv's hardlinks)"
    params = (
        Param("src", "path", "directory whose files are copied", required=True),
        Param("python", "path", "interpreter of the target venv (finds `package`, runs `verify`)"),
        Param("package", "str", "importable package whose directory receives the files"),
        Param("dest", "path", "target directory, instead of `python` + `package`"),
        Param("verify", "str", "python code run with `python` afterwards; fails if it raises"),
    )

    def validate(self, params: dict[str, Any]) -> None:
        if params["dest"] is None and params["package"] is None:
            raise ParamError("give 'package' (with 'python') or 'dest'", "package")
        if params["dest"] is not None and params["package"] is not None:
            raise ParamError("give either 'package' or 'dest', not both", "dest")
        if params["package"] is not None and not _PACKAGE.fullmatch(params["package"]):
            raise ParamError(f"'package': {params['package']!r} is not a module name", "package")
        if params["python"] is None and (params["package"] or params["verify"]):
            key = "package" if params["package"] else "verify"
            raise ParamError(f"'{key}' needs 'python' (the target venv's interpreter)", "python")

    def describe(self, params: dict[str, Any]) -> str:
        where = params["dest"] or f"the {params['package']} package of {params['python']}"
        return f"copy {params['src']}/ into {where}" + (" and verify" if params["verify"] else "")

    def check(self, ctx: StepContext) -> Check:
        src = ctx.path(ctx.params["src"])
        if not src.is_dir():
            return Check(False, f"{src} is not a directory")
        try:
            target = package_dir(ctx, cached=True)
        except StepFailed as exc:
            return Check(False, exc.reason)
        files = source_files(src)
        differ = [rel for rel in files if file_sha256(src / rel) != file_sha256(target / rel)]
        if differ:
            return Check(
                False, f"{len(differ)} of {len(files)} files differ in {target}: {differ[0]}"
            )
        return Check(True, f"{len(files)} files in {target} match {src}")

    def run(self, ctx: StepContext) -> None:
        src = ctx.path(ctx.params["src"])
        if not src.is_dir():
            raise StepFailed(
                f"{src} is not a directory", "does the step that creates it come first?"
            )
        target = package_dir(ctx, cached=False)
        files = source_files(src)
        unlinked = 0
        for done, rel in enumerate(files, 1):
            try:
                unlinked += replace_file(src / rel, target / rel)
            except OSError as exc:
                raise StepFailed(f"cannot replace {target / rel}: {exc.strerror or exc}") from None
            ctx.progress(files_done=done, files_total=len(files))
        ctx.log(
            f"replaced {len(files)} files in {target}"
            + (f" ({unlinked} were hardlinks, now separate files)" if unlinked else "")
        )

    def verify(self, ctx: StepContext) -> None:
        result = self.check(ctx)
        if not result.done:
            raise StepFailed(result.reason)
        snippet = ctx.params["verify"]
        if not snippet:
            return
        # Run outside the repo so its source dirs cannot shadow the installed package.
        python = str(ctx.path(ctx.params["python"]))
        rc = ctx.sh([python, "-c", snippet], cwd=ctx.workdir, check=False)
        if rc != 0:
            raise StepFailed(
                f"verify snippet failed with {ctx.params['python']} (exit {rc})",
                "the patch is missing or another interpreter is in use: training must use "
                "this venv's python",
            )


def package_dir(ctx: StepContext, *, cached: bool) -> Path:
    """The directory receiving the files; asks the venv's interpreter unless cached."""
    if ctx.params["dest"]:
        return ctx.path(ctx.params["dest"])
    python, package = ctx.params["python"], ctx.params["package"]
    marker_path = ctx.workdir / _MARKER
    marker = read_json(marker_path, {})
    if (
        cached
        and marker.get("python") == python
        and marker.get("package") == package
        and Path(marker.get("dir", "")).is_dir()
    ):
        return Path(marker["dir"])
    if not os.access(ctx.path(python), os.X_OK):
        raise StepFailed(f"{python} does not exist", "does the step creating the venv come first?")
    result = ctx.capture([str(ctx.path(python)), "-c", _LOCATE, package])
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise StepFailed(f"{python} cannot find package {package!r}: {last}")
    found = Path(result.stdout.strip())
    write_json_atomic(marker_path, {"python": python, "package": package, "dir": str(found)})
    return found


def source_files(src: Path) -> list[str]:
    """Relative paths of the files under `src`, sorted; bytecode caches are left out."""
    files: list[str] = []
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        base = Path(root).relative_to(src)
        files.extend(str(base / n) for n in names if not n.endswith(".pyc"))
    return sorted(files)


def replace_file(src: Path, dest: Path) -> bool:
    """Put a copy of `src` at `dest` as a new inode; True when `dest` was a hardlink before."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        was_linked = dest.lstat().st_nlink > 1
    except FileNotFoundError:
        was_linked = False
    tmp = dest.with_name(f".{dest.name}.bootstrap-{os.getpid()}.tmp")
    try:
        # copyfile (not copy2): a fresh mtime invalidates stale __pycache__ entries.
        shutil.copyfile(src, tmp)
        shutil.copymode(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return was_linked


KIND = PatchTree()
