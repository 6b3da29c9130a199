"""The pure parts behind `uv_sync`/`pip_install`: the pyproject override editor, the uv.lock
reader and wheel matching, uv's progress lines, version comparisons."""

from __future__ import annotations

import pytest
import tomllib

from provision.steps.common.pyproject import (
    PyprojectError,
    ensure_overrides,
    read_overrides,
    requirement_name,
)
from provision.steps.common.uv import progress_message
from provision.steps.common.uvlock import (
    Interpreter,
    locked_packages,
    source_build_traps,
    wheel_fits,
)
from provision.steps.common.venv import same_version, version_matches_prefix

AV = "av>=13.1.0,<14.0.0"

# The shape of openpi's pyproject.toml (abridged): comments, a `]` inside a comment and inside a
# string, sub-tables after [tool.uv].
OPENPI = """\
[project]
name = "openpi"
requires-python = ">=3.11"
dependencies = [
    "jax[cuda12]==0.5.3",
    # "lerobot",  a comment holding ] and [
    "transformers==4.53.2",
]

[tool.uv]
override-dependencies = ["ml-dtypes==0.4.1", "tensorstore==0.1.74"]
extra-index-url = ["https://download.pytorch.org/whl/cu128"]

[tool.uv.sources]
openpi-client = { workspace = true }

[tool.ruff]
line-length = 120
"""


def overrides_of(text: str) -> list[str]:
    return tomllib.loads(text)["tool"]["uv"]["override-dependencies"]


def test_override_added_to_a_one_line_array_and_nothing_else_changes() -> None:
    text, changes = ensure_overrides(OPENPI, [AV])
    assert changes == [f"added {AV}"]
    assert overrides_of(text) == ["ml-dtypes==0.4.1", "tensorstore==0.1.74", AV]
    assert text.replace(f', "{AV}"', "") == OPENPI
    assert read_overrides(text) == overrides_of(text)


def test_override_is_idempotent() -> None:
    once, _ = ensure_overrides(OPENPI, [AV])
    twice, changes = ensure_overrides(once, [AV, " av >= 13.1.0, < 14.0.0 "])
    assert changes == []
    assert twice == once


def test_override_for_the_same_package_is_replaced() -> None:
    text = OPENPI.replace('"tensorstore==0.1.74"', '"tensorstore==0.1.74", "av==14.4.0"')
    new, changes = ensure_overrides(text, [AV])
    assert changes == [f"replaced av==14.4.0 with {AV}"]
    assert overrides_of(new) == ["ml-dtypes==0.4.1", "tensorstore==0.1.74", AV]


def test_override_appended_to_a_multi_line_array() -> None:
    text = (
        "[tool.uv]\noverride-dependencies = [\n"
        '    "pkg[extra]>=1",  # extras hold brackets ]\n'
        "    'ml-dtypes==0.4.1'\n"
        "]\n"
        "[tool.other]\nx = 1\n"
    )
    new, _ = ensure_overrides(text, [AV])
    assert overrides_of(new) == ["pkg[extra]>=1", "ml-dtypes==0.4.1", AV]
    assert f"    'ml-dtypes==0.4.1',\n    \"{AV}\"\n]" in new
    with_comma, _ = ensure_overrides(text.replace("0.4.1'\n", "0.4.1',\n"), [AV])
    assert overrides_of(with_comma)[-1] == AV
    assert tomllib.loads(with_comma)["tool"]["other"] == {"x": 1}


def test_override_key_added_under_an_existing_table() -> None:
    text = '[project]\nname = "x"\n\n[tool.uv]\nfind-links = ["/w"]\n\n[tool.uv.sources]\n'
    new, changes = ensure_overrides(text, [AV])
    assert changes == [f"added {AV}"]
    data = tomllib.loads(new)
    assert data["tool"]["uv"] == {
        "find-links": ["/w"],
        "override-dependencies": [AV],
        "sources": {},
    }


def test_override_table_appended_when_there_is_none() -> None:
    text = '[project]\nname = "x"\n\n[tool.uv.sources]\na = { path = "a" }\n'
    new, _ = ensure_overrides(text, [AV, "ml-dtypes==0.4.1"])
    assert new.startswith(text)
    assert overrides_of(new) == [AV, "ml-dtypes==0.4.1"]


def test_override_edit_that_would_break_the_file_is_refused() -> None:
    # tool.uv set by dotted keys: appending a [tool.uv] table would define it twice.
    text = '[tool]\nuv.find-links = ["/w"]\n'
    with pytest.raises(PyprojectError, match="would break"):
        ensure_overrides(text, [AV])


def test_requirement_names() -> None:
    assert requirement_name("ML_Dtypes==0.4.1") == "ml-dtypes"
    assert requirement_name("av>=13.1.0,<14.0.0") == "av"
    assert requirement_name("==1.0") is None


LOCK = """\
version = 1
revision = 2
requires-python = ">=3.11"

[[package]]
name = "av"
version = "{version}"
source = {{ registry = "https://pypi.org/simple" }}
sdist = {{ url = "https://files.pythonhosted.org/packages/86/f6/av-{version}.tar.gz", hash = "sha256:0", size = 3929386 }}
wheels = [
{wheels}]

[[package]]
name = "lerobot"
version = "0.1.0"
source = {{ git = "https://github.com/huggingface/lerobot?rev=0cf8" }}
dependencies = [
    {{ name = "av" }},
]

[package.metadata]
requires-dist = [{{ name = "av", specifier = ">=14.2.0" }}]
"""

BOX = Interpreter("cpython", (3, 11), "x86_64", (2, 35))


def lock(version: str, *wheel_tags: str) -> str:
    url = "https://files.pythonhosted.org/packages/aa/bb/"
    rows = "".join(
        f'    {{ url = "{url}av-{version}-{tag}.whl", hash = "sha256:1", size = 35052146 }},\n'
        for tag in wheel_tags
    )
    return LOCK.format(version=version, wheels=rows)


def test_lock_reader_finds_version_wheels_and_sdist() -> None:
    text = lock(
        "14.2.0", "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64", "cp312-abi3-any"
    )
    (pkg,) = locked_packages(text, "AV")
    assert pkg.version == "14.2.0"
    assert pkg.has_sdist
    assert pkg.wheels == (
        "av-14.2.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "av-14.2.0-cp312-abi3-any.whl",
    )
    assert locked_packages(text, "lerobot")[0].wheels == ()


def test_traps_of_av() -> None:
    fitting = "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64"
    assert source_build_traps(lock("14.2.0", fitting), BOX) == []
    assert source_build_traps(lock("13.1.0"), BOX) == []  # av 13 builds against ffmpeg 6
    (removed,) = source_build_traps(lock("14.4.0", fitting), BOX)
    assert "av 14.4.0, whose wheels were removed" in removed
    (sdist_only,) = source_build_traps(lock("14.3.0"), None)
    assert "with only an sdist" in sdist_only
    (no_fit,) = source_build_traps(lock("14.2.0", "cp312-cp312-manylinux_2_17_x86_64"), BOX)
    assert "none of its 1 wheels fits this box (cp311, x86_64, glibc 2.35)" in no_fit
    assert source_build_traps(lock("14.2.0", "cp312-cp312-manylinux_2_17_x86_64"), None) == []


@pytest.mark.parametrize(
    ("filename", "fits"),
    [
        ("x-1-py3-none-any.whl", True),
        ("x-1-py2.py3-none-any.whl", True),
        ("x-1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", True),
        ("x-1-cp311-cp311-manylinux_2_35_x86_64.whl", True),
        ("x-1-cp311-cp311-manylinux_2_39_x86_64.whl", False),  # needs a newer glibc
        ("x-1-cp311-cp311-manylinux1_x86_64.whl", True),
        ("x-1-cp311-cp311-linux_x86_64.whl", True),
        ("x-1-cp311-cp311-manylinux_2_17_aarch64.whl", False),
        ("x-1-cp312-cp312-manylinux_2_17_x86_64.whl", False),
        ("x-1-cp39-abi3-manylinux_2_17_x86_64.whl", True),
        ("x-1-cp312-abi3-manylinux_2_17_x86_64.whl", False),
        ("x-1-cp311-cp311-macosx_11_0_arm64.whl", False),
        ("x-1-cp311-cp311-win_amd64.whl", False),
        ("x-1-1build-cp311-cp311-linux_x86_64.whl", True),
        ("not-a-wheel.tar.gz", False),
    ],
)
def test_wheel_fits(filename: str, fits: bool) -> None:
    assert wheel_fits(filename, BOX) is fits


def test_progress_messages_from_uv_output() -> None:
    lines = {
        "Resolved 250 packages in 1.20s": ("resolved 250 packages", False),
        "Downloading torch (846.8MiB)": ("downloading torch (846.8MiB)", False),
        " Downloaded torch": ("downloaded torch", False),
        "Building evdev==1.9.0": ("building evdev==1.9.0", False),
        "      Built evdev==1.9.0": ("built evdev==1.9.0", False),
        # every wheel is in once uv says it prepared them: the link is free for others
        "Prepared 1 package in 3ms": ("prepared 1 packages", True),
        "Installed 240 packages in 2.31s": ("installed 240 packages", True),
        "Uninstalled 1 package in 0.67ms": ("uninstalled 1 packages", True),
        " + tinypkg==1.0": None,
        "Using CPython 3.11.7 interpreter at: /usr/bin/python3": None,
    }
    for line, message in lines.items():
        assert progress_message(line) == message, line


def test_versions() -> None:
    assert same_version("2.15.0", "2.15.0")
    assert same_version("2.15", "2.15.0")
    assert same_version("2.7.0", "2.7.0+cu126")
    assert not same_version("2.7.0+cu128", "2.7.0+cu126")
    assert not same_version("2.15.0", "2.16.1")
    assert not same_version("1.0", "1.0rc1")
    assert version_matches_prefix("2.7.1+cu126", "2.7")
    assert version_matches_prefix("4.53", "4.53")
    assert not version_matches_prefix("2.70.0", "2.7")
