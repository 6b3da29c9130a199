"""The `mypy --strict` configuration (pyproject `[tool.mypy]`) covers the whole package: strict,
and only the few libraries without hints let off.

`mypy` itself runs as its own step of `.ci/run` (`python3 -m mypy --strict provision/`, about
75 s cold): run it in the repository root for the report.
"""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_the_configuration_is_strict_for_all_of_the_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    assert config["strict"] is True and config["files"] == ["provision"]
    for override in config.get("overrides", []):
        # only libraries without hints may be let off, never a module of ours
        assert set(override) == {"module", "ignore_missing_imports"}, override
        assert not any(m.startswith("provision") for m in override["module"]), override


def test_ci_runs_mypy_strict_on_the_package() -> None:
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "python3 -m mypy --strict provision/" in steps
