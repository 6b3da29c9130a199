"""The failure catalog: every entry is triggered by its own test log, and only by it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.agent import catalog
from provision.agent.files import tail_text
from provision.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "provision" / "known_issues.yaml"
LOGS = Path(__file__).parent / "data" / "known_issues"
CAT = catalog.load_catalog(YAML)


@pytest.mark.parametrize("entry", CAT.entries, ids=[e.id for e in CAT.entries])
def test_each_entry_matches_its_log_alone(entry: catalog.Entry) -> None:
    log = LOGS / f"{entry.id}.log"
    assert log.is_file(), f"entry {entry.id} has no test log {log}"
    found = CAT.match(log.read_text(encoding="utf-8"))
    assert [m.id for m in found] == [entry.id]
    assert found[0].line.strip(".") in log.read_text(encoding="utf-8")
    assert found[0].diagnosis == entry.diagnosis and found[0].fix == entry.fix


def test_no_orphan_logs() -> None:
    assert {p.stem for p in LOGS.glob("*.log")} == {e.id for e in CAT.entries}


def test_runbook_section_d_is_covered() -> None:
    # One signature of every row of RUNBOOK.md section D, as the seed quotes it.
    rows = {
        "You are REQUIRED to use ffmpeg 7": "av-ffmpeg7",
        "src/av/x.c:1: error: 'AVCodecContext' has no member named 'ch_layout'": "av-ffmpeg7",
        "git-lfs filter-process: git-lfs: not found": "git-lfs-missing",
        "operands could not be broadcast together with shapes (148,7) (15,)": (
            "stats-shape-mismatch"
        ),
        "proprio q99 dims: 7": "proprio-joint-state",
        "AttributeError: module 'ml_dtypes' has no attribute 'int2'": "ml-dtypes-mismatch",
        "ValueError: API key must be 40 characters long, yours was 86": "wandb-key-length",
        "-bash: export: `--standalone': not a valid identifier": "tmux-glued-command",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 15.68 GiB.": "cuda-oom",
        "ModuleNotFoundError: No module named 'safetensors'": "system-torchrun",
        "timed out waiting for \\[AE\\] step=0/\\d+ loss=": "first-step-slow",
        "timed out after 300s waiting for marker 6 `\\[AE\\] step=0/(\\d+)` in logs/ae.log": (
            "first-step-slow"
        ),
        "timed out after 900s waiting for marker `first AE step` in /w/logs/ae.log": (
            "first-step-slow"
        ),
        "ValueError: transformers_replace is not installed correctly.": "transformers-patch",
        "ValueError: Normalization stats not found.": "norm-stats-missing",
    }
    for line, issue in rows.items():
        assert [m.id for m in CAT.match(line)] == [issue], line


def test_remediations_of_section_d() -> None:
    assert CAT.get("av-ffmpeg7").remediation == "av_override"
    assert CAT.get("system-torchrun").remediation == "venv_torchrun"
    assert CAT.get("cuda-oom").remediation == "expandable_segments"


def test_match_reports_line_and_order() -> None:
    text = "\x1b[31mok\x1b[0m\nstep 1\r  0%|  | 0/9 [00:01<?, ?it/s]\rOSError: [Errno 28] No space"
    text += " left on device\nwandb: Network error (ConnectionError), entering retry loop.\n"
    found = CAT.match("CUDA out of memory. Tried\n" + text)
    assert [m.id for m in found] == ["cuda-oom", "disk-full", "wandb-network"]
    assert found[1].line == "OSError: [Errno 28] No space left on device"
    assert found[1].line_no == 5  # \r counts as a line break
    assert found[0].to_dict()["line_no"] == 1


def test_fallback_only_when_nothing_else() -> None:
    wrapper = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
    assert [m.id for m in CAT.match(wrapper)] == ["torchrun-child-failed"]
    assert [m.id for m in CAT.match("Killed\n" + wrapper)] == ["oom-killed"]


def test_hint_for_uses_the_packaged_catalog() -> None:
    hint = catalog.hint_for(
        "RuntimeError: CUDA error: no kernel image is available for execution on the device"
    )
    assert hint is not None and "sm_120" in hint and "fix:" in hint
    assert catalog.hint_for("all good\n") is None


def test_json_copy_round_trips(tmp_path: Path) -> None:
    text = catalog.catalog_to_json()
    path = tmp_path / "known_issues.json"
    path.write_text(text, encoding="utf-8")
    again = catalog.load_catalog(path)
    assert again.entries == CAT.entries
    assert catalog.load_catalog(json.loads(text)).entries == CAT.entries


def test_box_python_loads_the_json_without_yaml(tmp_path: Path) -> None:
    # On the box: no PyYAML; the agent zipapp ships provision/known_issues.json.
    pkg = tmp_path / "provision"
    (pkg / "agent").mkdir(parents=True)
    for name in ("__init__.py", "errors.py", "agent/__init__.py", "agent/catalog.py"):
        (pkg / name).write_text((ROOT / "provision" / name).read_text())
    (pkg / "known_issues.json").write_text(catalog.catalog_to_json())
    code = (
        "import sys; sys.modules['yaml'] = None\n"
        "from provision.agent import catalog\n"
        "print(catalog.default_catalog().origin)\n"
        "print(catalog.hint_for('ModuleNotFoundError: No module named \\'safetensors\\''))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    origin, hint = out.stdout.splitlines()
    assert origin == "provision/known_issues.json"
    assert ".venv/bin/torchrun" in hint


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {
                "issues": [
                    {"id": "x", "title": "t", "patterns": ["("], "diagnosis": "d", "fix": "f"}
                ]
            },
            "issue 'x': bad regex",
        ),
        (
            {"issues": [{"id": "x", "title": "t", "patterns": ["a"], "diagnosis": "d"}]},
            "issue 'x': 'fix' is required",
        ),
        (
            {
                "issues": [
                    {"id": "X!", "title": "t", "patterns": ["a"], "diagnosis": "d", "fix": "f"}
                ]
            },
            "id must match",
        ),
        (
            {
                "issues": [
                    {
                        "id": "x",
                        "title": "t",
                        "patterns": ["a"],
                        "diagnosis": "d",
                        "fix": "f",
                        "remediation": "reboot",
                    }
                ]
            },
            "unknown remediation 'reboot'",
        ),
        (
            {
                "issues": [
                    {
                        "id": "x",
                        "title": "t",
                        "patterns": ["a"],
                        "diagnosis": "d",
                        "fix": "f",
                        "supersedes": ["y"],
                    }
                ]
            },
            "supersedes unknown issue 'y'",
        ),
        (
            {
                "issues": [
                    {
                        "id": "x",
                        "title": "t",
                        "patterns": ["a"],
                        "diagnosis": "d",
                        "fix": "f",
                        "regex": "a",
                    }
                ]
            },
            "unknown key 'regex'",
        ),
        (
            {
                "issues": [
                    {"id": "x", "title": "t", "patterns": ["a"], "diagnosis": "d", "fix": "f"}
                ]
                * 2
            },
            "defined twice",
        ),
        ({"entries": []}, "'issues' list"),
    ],
)
def test_bad_catalogs_are_rejected(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        catalog.load_catalog(data)


def test_bad_yaml_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("issues: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        catalog.load_catalog(bad)


def test_tail_text_cuts_at_a_line(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("first line\n" + "x" * 100 + "\nlast line: No space left on device\n")
    assert tail_text(log, 60) == "last line: No space left on device\n"
    assert tail_text(tmp_path / "missing.log", 60) == ""


@pytest.mark.slow
def test_matching_a_big_log_is_fast() -> None:
    # ~8 MB of training output with the failure at the end.
    line = "12:58:30.101 [I] [AE] step=350/10000 loss=0.4410 lr=3.51e-05 gnorm=2.91 sps=0.1\n"
    text = line * 100_000 + "OSError: [Errno 28] No space left on device\n"
    started = time.perf_counter()
    found = CAT.match(text)
    elapsed = time.perf_counter() - started
    assert [m.id for m in found] == ["disk-full"]
    assert found[0].line_no == 100_001
    assert elapsed < 10, elapsed


def test_a_long_line_is_cut_around_the_match() -> None:
    text = "x" * 5000 + " OSError: [Errno 28] No space left on device " + "y" * 5000
    (found,) = CAT.match(text)
    assert found.line.startswith("...") and found.line.endswith("...")
    assert "No space left on device" in found.line
    assert len(found.line) <= catalog.MAX_LINE + 6
