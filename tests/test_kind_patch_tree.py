"""`patch_tree` against a real venv whose package uv installed as hardlinks into its cache."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from provision.errors import StepFailed
from provision.steps.base import ParamError, StepContext, validate_params
from provision.steps.patch_tree import KIND

ORIGINAL = {
    "fakeformers/__init__.py": "__version__ = '4.53.2'\n",
    "fakeformers/models/siglip/__init__.py": "",
    "fakeformers/models/siglip/check.py": (
        "def check_whether_transformers_replace_is_installed_correctly():\n    return False\n"
    ),
    "fakeformers/models/gemma/modeling_gemma.py": "PATCHED = False\n",
}
PATCH = {
    "models/siglip/check.py": (
        "def check_whether_transformers_replace_is_installed_correctly():\n    return True\n"
    ),
    "models/gemma/modeling_gemma.py": "PATCHED = True\n",
    "models/gemma/new_module.py": "ADDED = True\n",
}
VERIFY = (
    "from fakeformers.models.siglip import check\n"
    "import fakeformers.models.gemma.modeling_gemma as g\n"
    "assert check.check_whether_transformers_replace_is_installed_correctly()\n"
    "assert g.PATCHED\n"
)


def _wheel(path: Path, files: dict[str, str]) -> Path:
    """A minimal valid wheel holding `files`."""
    wheel = path / "fakeformers-4.53.2-py3-none-any.whl"
    info = "fakeformers-4.53.2.dist-info"
    members = {
        **files,
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: fakeformers\nVersion: 4.53.2\n",
        f"{info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in members.items():
            data = text.encode()
            zf.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{name},sha256={digest.decode()},{len(data)}")
        record.append(f"{info}/RECORD,,")
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


@pytest.fixture
def venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv with `fakeformers` installed by uv as hardlinks into a private uv cache."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv not installed")
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_CONFIG": "1"}
    env.pop("UV_LINK_MODE", None)
    root = tmp_path / "openpi"
    cache = tmp_path / "uv-cache"
    subprocess.run(
        [uv, "venv", "-q", "--python", sys.executable, str(root / ".venv")], env=env, check=True
    )
    python = root / ".venv" / "bin" / "python"
    wheel = _wheel(tmp_path, ORIGINAL)
    subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(python), "--cache-dir", str(cache),
         "--link-mode", "hardlink", "--no-index", str(wheel)],
        env=env,
        check=True,
    )  # fmt: skip
    src = root / "src" / "openpi" / "models_pytorch" / "transformers_replace"
    for rel, text in PATCH.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    return python, src


def _ctx(tmp_path: Path, **raw: object) -> StepContext:
    return StepContext(
        step_id="patch-transformers",
        params=validate_params(KIND, raw),
        run_dir=tmp_path / "run",
        out=io.StringIO(),
    )


def _site_file(python: Path, rel: str) -> Path:
    found = list(python.parent.parent.glob(f"lib/python*/site-packages/fakeformers/{rel}"))
    assert len(found) == 1
    return found[0]


def test_patches_hardlinked_files_without_touching_uv_cache(
    tmp_path: Path, venv: tuple[Path, Path]
) -> None:
    python, src = venv
    target = _site_file(python, "models/gemma/modeling_gemma.py")
    assert target.stat().st_nlink > 1, "uv did not hardlink: the test would prove nothing"
    cache_copies = [
        p
        for p in (tmp_path / "uv-cache").rglob("modeling_gemma.py")
        if p.stat().st_ino == target.stat().st_ino
    ]
    assert cache_copies
    ctx = _ctx(tmp_path, src=str(src), python=str(python), package="fakeformers", verify=VERIFY)
    first = KIND.check(ctx)
    assert not first.done and "files differ" in first.reason
    KIND.run(ctx)
    KIND.verify(ctx)
    assert "(2 were hardlinks, now separate files)" in ctx.out.getvalue()
    for rel, text in PATCH.items():
        assert _site_file(python, rel).read_text() == text
    assert target.stat().st_nlink == 1
    for cached in cache_copies:
        assert cached.read_text() == "PATCHED = False\n"
    assert KIND.check(ctx).done


@pytest.mark.slow
def test_check_reuses_the_located_dir_without_running_python(
    tmp_path: Path, venv: tuple[Path, Path]
) -> None:
    python, src = venv
    ctx = _ctx(tmp_path, src=str(src), python=str(python), package="fakeformers")
    KIND.run(ctx)
    real = python.resolve()
    python.unlink()
    python.write_text("#!/bin/sh\necho python was run >&2\nexit 1\n")
    python.chmod(0o755)
    try:
        result = KIND.check(ctx)
        assert result.done, result.reason
    finally:
        python.unlink()
        python.symlink_to(real)
    (ctx.workdir / "package_dir.json").unlink()
    assert KIND.check(ctx).done
    assert (ctx.workdir / "package_dir.json").exists()


def test_drift_is_detected_and_repaired(tmp_path: Path, venv: tuple[Path, Path]) -> None:
    python, src = venv
    ctx = _ctx(tmp_path, src=str(src), python=str(python), package="fakeformers")
    KIND.run(ctx)
    (src / "models" / "siglip" / "check.py").write_text("# new upstream version\n")
    result = KIND.check(ctx)
    assert not result.done and "1 of 3 files differ" in result.reason
    assert "models/siglip/check.py" in result.reason
    KIND.run(ctx)
    assert KIND.check(ctx).done


def test_failing_verify_snippet_fails_the_step(tmp_path: Path, venv: tuple[Path, Path]) -> None:
    python, src = venv
    ctx = _ctx(
        tmp_path,
        src=str(src),
        python=str(python),
        package="fakeformers",
        verify="import fakeformers.models.gemma.modeling_gemma as g\nassert not g.PATCHED",
    )
    KIND.run(ctx)
    with pytest.raises(StepFailed, match="verify snippet failed") as info:
        KIND.verify(ctx)
    assert "this venv's python" in (info.value.hint or "")
    assert "AssertionError" in ctx.out.getvalue()


def test_missing_venv_and_missing_package(tmp_path: Path, venv: tuple[Path, Path]) -> None:
    python, src = venv
    gone = _ctx(tmp_path, src=str(src), python=str(tmp_path / "nope/python"), package="x")
    assert "does not exist" in KIND.check(gone).reason
    ctx = _ctx(tmp_path, src=str(src), python=str(python), package="transformerz")
    result = KIND.check(ctx)
    assert not result.done and "cannot find package 'transformerz'" in result.reason
    with pytest.raises(StepFailed, match="cannot find package"):
        KIND.run(ctx)


def test_explicit_dest_with_a_hardlink_elsewhere(tmp_path: Path) -> None:
    src = tmp_path / "patch"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.py").write_text("new\n")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    dest = tmp_path / "pkg"
    (dest / "sub").mkdir(parents=True)
    other = tmp_path / "cache-a.py"
    other.write_text("old\n")
    os.link(other, dest / "sub" / "a.py")
    ctx = _ctx(tmp_path, src=str(src), dest=str(dest))
    KIND.run(ctx)
    KIND.verify(ctx)
    assert (dest / "sub" / "a.py").read_text() == "new\n"
    assert other.read_text() == "old\n"
    assert not (dest / "__pycache__").exists()
    assert [p.name for p in (dest / "sub").iterdir()] == ["a.py"]


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"src": "/s"}, "package"),
        ({"src": "/s", "package": "transformers"}, "python"),
        ({"src": "/s", "dest": "/d", "verify": "import x"}, "python"),
        ({"src": "/s", "python": "/p", "package": "transformers", "dest": "/d"}, "dest"),
        ({"src": "/s", "python": "/p", "package": "transformers; rm"}, "package"),
        ({"python": "/p", "package": "transformers"}, "src"),
    ],
)
def test_bad_params_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ParamError) as info:
        validate_params(KIND, raw)
    assert info.value.key == key
