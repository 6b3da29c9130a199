"""How the CLI ends: a bug is one line, exit 3 and a traceback in the debug log; a usage
error is one line, exit 2; `-i/--inventory` is accepted by every command.

The bugs are injected in-process (a function made to raise what no code path expects), so the
CLI's real handling runs; usage errors go through a real subprocess.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import pytest
from boxes import run_cli
from project import one_line_error
from typer.main import get_command

from provision import cli, controller, dag

SMOKE = str(Path(__file__).resolve().parent.parent / "playbooks" / "smoke.yaml")


def _run(args: list[str]) -> int:
    """The CLI in this process, as `bootstrap ARGS`; its exit code."""
    with pytest.raises(SystemExit) as ended:
        cli.app(args, prog_name="bootstrap")
    code = ended.value.code
    assert isinstance(code, int)
    return code


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config"
    monkeypatch.setenv("BOOTSTRAP_CONFIG_DIR", str(path))
    monkeypatch.chdir(tmp_path)
    return path


def _bug_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a bug prints (nothing else: no traceback on the terminal)."""
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_a_bug_in_the_cli_is_one_line_exit_3_and_a_debug_log(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*_: Any) -> NoReturn:
        raise ZeroDivisionError("injected: division by zero in the critical path")

    monkeypatch.setattr(dag, "critical_path", broken)
    assert _run(["graph", "-p", SMOKE]) == 3
    line = _bug_line(capsys)
    log = config_dir / "debug.log"
    assert line == (
        "error: this is a bug in bootstrap: ZeroDivisionError: injected: division by zero in "
        f"the critical path (traceback in {log})"
    )
    text = log.read_text()
    assert "Traceback (most recent call last)" in text
    assert "in broken" in text and "ZeroDivisionError: injected" in text
    assert "where: the controller" in text


def test_a_bug_in_per_box_work_names_the_box_and_exits_3(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(box: Any, *_: Any) -> NoReturn:
        raise KeyError("steps")

    monkeypatch.setattr(controller, "status", broken)
    assert _run(["status", "local", "-p", SMOKE]) == 3
    line = _bug_line(capsys)
    assert line.startswith("error: local: this is a bug in bootstrap: KeyError: 'steps'")
    assert str(config_dir / "debug.log") in line
    text = (config_dir / "debug.log").read_text()
    assert "where: local" in text and "raise KeyError" in text


def test_the_debug_log_never_holds_a_secret(
    config_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bug whose message quotes a secret value: masked in the log and on the terminal."""
    secret = "s3cr3t-token-value-42"
    monkeypatch.setenv("TEST_TOKEN", secret)
    (tmp_path / "inventory.yaml").write_text("secrets:\n  TOKEN: {env: TEST_TOKEN}\n")
    book = tmp_path / "book.yaml"
    book.write_text("name: b\nsteps:\n  - {id: x, kind: shell, run: 'true', secrets: [TOKEN]}\n")

    def broken(box: Any, plan: Any, secrets: dict[str, str]) -> NoReturn:
        raise RuntimeError(f"could not use {secrets['TOKEN']}")

    monkeypatch.setattr(controller, "plan", broken)
    assert _run(["plan", "local", "-p", str(book)]) == 3
    line = _bug_line(capsys)
    assert secret not in line and "could not use ***" in line
    text = (config_dir / "debug.log").read_text()
    assert "could not use ***" in text and secret not in text


def test_the_debug_log_is_rotated_past_its_size(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from provision import bugs

    config_dir.mkdir()
    (config_dir / "debug.log").write_text("x" * (bugs.MAX_LOG_BYTES + 1))
    monkeypatch.setattr(dag, "critical_path", lambda *_: 1 / 0)
    assert _run(["graph", "-p", SMOKE]) == 3
    capsys.readouterr()
    assert (config_dir / "debug.log.1").stat().st_size == bugs.MAX_LOG_BYTES + 1
    assert "ZeroDivisionError" in (config_dir / "debug.log").read_text()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["status"], "bootstrap status: Missing argument"),
        (["up", "--bogus", "x"], "bootstrap up: No such option: --bogus"),
        (["status", "x", "--interval", "99"], "bootstrap status: Invalid value for '--interval'"),
        (["nosuch"], "bootstrap: No such command 'nosuch'"),
        (["rerun", "box1"], "rerun needs a target and a step"),
        (["graph", "-f", "png"], "--format must be tree, mermaid or dot"),
    ],
)
def test_a_usage_error_is_one_line_exit_2(
    args: list[str], says: str, controller_env: dict[str, str], tmp_path: Path
) -> None:
    line = one_line_error(run_cli(args, env=controller_env, cwd=tmp_path))
    assert line.startswith("error: ") and says in line
    assert "╭" not in line and "│" not in line  # no box around it


def test_every_command_accepts_an_inventory_option() -> None:
    group: Any = get_command(cli.app)
    for name, command in group.commands.items():
        opts = {opt for param in command.params for opt in getattr(param, "opts", [])}
        assert {"-i", "--inventory"} <= opts, name


@pytest.mark.parametrize(
    "args",
    [
        ["graph"],
        ["kinds"],
        ["diagnose", os.devnull],
        ["stats", "."],
        ["sample-data", "out"],
        ["status", "local"],
        ["plan", "local"],
        ["forget", "box1"],
    ],
)
@pytest.mark.slow
def test_a_missing_inventory_is_named_by_every_command(
    args: list[str], controller_env: dict[str, str], tmp_path: Path
) -> None:
    result = run_cli([*args, "-i", "nope.yaml"], env=controller_env, cwd=tmp_path)
    assert one_line_error(result) == "error: nope.yaml: no such inventory file"
    assert not (tmp_path / "out").exists()  # sample-data wrote nothing


@pytest.mark.slow
def test_graph_reads_the_inventory_given(controller_env: dict[str, str], tmp_path: Path) -> None:
    inventory = tmp_path / "inv.yaml"
    inventory.write_text("hosts: {box1: {host: 127.0.0.1}}\n")
    ok = run_cli(["graph", "-p", SMOKE, "-i", str(inventory)], env=controller_env, cwd=tmp_path)
    assert ok.returncode == 0 and "critical path" in ok.stdout, ok.stderr
    inventory.write_text("hostz: {}\n")
    bad = run_cli(["graph", "-p", SMOKE, "-i", str(inventory)], env=controller_env, cwd=tmp_path)
    assert "inv.yaml:1: unknown key 'hostz'" in one_line_error(bad)
