"""`mypy --strict` accepts the whole package (pyproject `[tool.mypy]`: strict, the few libraries
without hints listed there).

Run `mypy` in the repository root for the report alone (it reads the same configuration).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("mypy", reason="mypy is in the test extras (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parent.parent
#: Outside the checkout (a clean clone stays clean), kept between runs: a warm run takes seconds.
CACHE = Path.home() / ".cache" / "bootstrap-tests" / "mypy"


def test_the_configuration_is_strict_for_all_of_the_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    assert config["strict"] is True and config["files"] == ["provision"]
    for override in config.get("overrides", []):
        # only libraries without hints may be let off, never a module of ours
        assert set(override) == {"module", "ignore_missing_imports"}, override
        assert not any(m.startswith("provision") for m in override["module"]), override


def test_mypy_strict_accepts_the_package() -> None:
    result = subprocess.run(
        # The configuration names the files (provision/) and the strictness.
        [sys.executable, "-m", "mypy", "--cache-dir", str(CACHE)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert result.stdout.startswith("Success: no issues found"), result.stdout
