"""wait_log against real files written while it waits (and the stand-in trainer's real lines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from provision.errors import StepFailed
from provision.steps.base import ParamError, StepContext, validate_params
from provision.steps.wait_log import KIND

TRAINER = Path(__file__).resolve().parents[1] / "provision" / "data" / "fake_trainer.py"

AE_MARKERS = [
    "WaypointAEDataset: 454 episodes, 8409 valid pairs",
    "Loaded 811 weight tensors, skipped 1",
    "Constructing tf.data.Dataset libero_object",
    {"name": "wandb", "any_of": ["wandb: .*View run at https://", "syncing is set to `offline`"]},
    r"Model: 3617\.8M total",
    {
        "name": "first step",
        "regex": r"\[AE\] step=0/\d+ loss=(?P<loss>[\d.]+)",
        "ranges": {"loss": [0.7, 1.0]},
        "hint": "the initial AE loss is 0.7-1.0",
    },
]


def make_ctx(tmp_path: Path, log: Path, timeout: float = 20, **params: object) -> StepContext:
    raw = {"log": str(log), "markers": AE_MARKERS, **params}
    return StepContext(
        step_id="wait",
        params=validate_params(KIND, raw),
        run_dir=tmp_path / "run",
        poll=1,
        deadline=time.time() + timeout,
    )


def trainer_output(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """What the stand-in trainer prints (stdout and stderr, as `2>&1 | tee` keeps them)."""
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "ae.yaml").write_text("mode: ae\n")
    done = subprocess.run(
        [sys.executable, str(TRAINER), "--config", "configs/ae.yaml", "--step-sleep", "0",
         "--startup-sleep", "0", *args],
        cwd=tmp_path,
        env={**os.environ, "WANDB_API_KEY": "k" * 40, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )  # fmt: skip
    return done.stdout


@pytest.fixture
def writer() -> Iterator[Callable[..., None]]:
    """`write(path, lines, delay)`: append lines to a file from a thread, one per `delay` s."""
    threads: list[threading.Thread] = []

    def write(path: Path, lines: list[str], delay: float = 0.05) -> None:
        def body() -> None:
            for line in lines:
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
                time.sleep(delay)

        thread = threading.Thread(target=body, daemon=True)
        threads.append(thread)
        thread.start()

    yield write
    for thread in threads:
        thread.join(timeout=30)


def test_passes_on_the_trainer_lines_in_order(tmp_path: Path, writer) -> None:
    log = tmp_path / "train.log"
    writer(log, trainer_output(tmp_path, "--steps", "3").splitlines(), 0.05)
    ctx = make_ctx(tmp_path, log)
    assert not KIND.check(ctx).done
    KIND.run(ctx)
    record = json.loads((ctx.workdir / "markers.json").read_text())
    assert [m["line"] is not None for m in record["markers"]] == [True] * 6
    assert 0.7 <= record["values"]["loss"] <= 1.0
    progress = json.loads((ctx.workdir / "_progress.json").read_text())
    assert (progress["files_done"], progress["files_total"]) == (6, 6)
    assert "loss=0.8" in progress["message"]
    check = KIND.check(ctx)
    assert check.done, check.reason


def test_done_check_follows_the_file(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text(trainer_output(tmp_path, "--steps", "2"))
    ctx = make_ctx(tmp_path, log)
    KIND.run(ctx)
    with open(log, "a") as fh:  # the job keeps logging: still done
        fh.write("[AE] step=2/10000 loss=0.8000\n")
    assert KIND.check(ctx).done
    log.write_text(log.read_text().replace("454 episodes", "455 episodes"))  # rewritten in place
    assert "rewritten" in KIND.check(ctx).reason
    log.unlink()
    log.write_text(trainer_output(tmp_path, "--steps", "2"))  # a new file: a new run
    assert not KIND.check(ctx).done


def test_offline_wandb_alternative(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text(trainer_output(tmp_path, "--steps", "1", env={"WANDB_MODE": "offline"}))
    assert "View run at" not in log.read_text()
    ctx = make_ctx(tmp_path, log)
    KIND.run(ctx)
    seen = json.loads((ctx.workdir / "markers.json").read_text())["markers"][3]["line"]
    assert "offline" in seen


def test_fails_on_wrong_order(tmp_path: Path) -> None:
    lines = trainer_output(tmp_path, "--steps", "1").splitlines()
    model = next(i for i, line in enumerate(lines) if line.startswith("Model:"))
    lines.insert(1, lines.pop(model))  # Model: before the weights line
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines) + "\n")
    ctx = make_ctx(tmp_path, log)
    with pytest.raises(StepFailed) as err:
        KIND.run(ctx)
    assert "marker 5 `Model: 3617\\.8M total` appeared before marker 2" in err.value.reason
    assert not KIND.check(ctx).done


def test_repeated_earlier_marker_is_not_an_order_error(tmp_path: Path) -> None:
    lines = trainer_output(tmp_path, "--steps", "1").splitlines()
    lines.insert(4, lines[0])  # a second rank logs the dataset line again
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines) + "\n")
    KIND.run(make_ctx(tmp_path, log))


def test_fails_on_loss_out_of_range(tmp_path: Path) -> None:
    text = trainer_output(tmp_path, "--steps", "2").replace(
        "step=0/10000 loss=0.", "step=0/10000 loss=1."
    )
    log = tmp_path / "train.log"
    log.write_text(text)
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log))
    assert "loss=1.8" in err.value.reason and "outside [0.7, 1.0]" in err.value.reason
    assert err.value.hint == "the initial AE loss is 0.7-1.0"


def test_timeout_says_what_was_seen_and_what_is_missing(tmp_path: Path, writer) -> None:
    lines = trainer_output(tmp_path, "--steps", "1").splitlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith("Model:"))
    log = tmp_path / "train.log"
    writer(log, lines[:cut], 0.01)
    started = time.monotonic()
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log, timeout=3))
    assert time.monotonic() - started < 6
    reason = err.value.reason
    assert reason.startswith("timed out after")
    assert "waiting for marker 5 `Model: 3617\\.8M total` (and 1 after it)" in reason
    assert "seen 4/6" in reason and "`wandb`" in reason
    assert "last line: wandb: 🚀 View run at" in reason


def test_timeout_when_the_log_never_appears(tmp_path: Path) -> None:
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, tmp_path / "missing.log", timeout=2))
    assert "never appeared" in err.value.reason


def test_fails_on_cuda_oom_with_the_catalog_hint(tmp_path: Path, writer) -> None:
    log = tmp_path / "train.log"
    writer(log, trainer_output(tmp_path, "--fail", "oom").splitlines(), 0.02)
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log))
    assert "known failure" in err.value.reason and "CUDA out of memory" in err.value.reason
    assert "before marker 6 `first step`" in err.value.reason
    assert "expandable_segments:True" in (err.value.hint or "")


def test_ignored_issue_and_fail_on(tmp_path: Path) -> None:
    lines = trainer_output(tmp_path, "--steps", "3", "--fail", "nan", "--fail-at", "0").splitlines()
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(StepFailed) as err:  # the catalog's loss-nan entry
        KIND.run(make_ctx(tmp_path, log))
    assert "loss=nan" in err.value.reason and "NaN" in (err.value.hint or "")
    nan_ok = {"regex": r"\[AE\] step=0/\d+ loss=(?P<loss>\S+)", "ranges": {"loss": [0.7, 1.0]}}
    markers = [*AE_MARKERS[:5], nan_ok]
    with pytest.raises(StepFailed) as err:  # NaN is outside every range anyway
        KIND.run(make_ctx(tmp_path, log, timeout=5, markers=markers, ignore_issues=["loss-nan"]))
    assert "loss=nan at marker 6" in err.value.reason
    lines.insert(2, "RuntimeError: dataloader worker died")
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log, fail_on=["worker died"]))
    assert "`worker died`" in err.value.reason and "before marker 3" in err.value.reason


def test_only_the_latest_launch_counts(tmp_path: Path, writer) -> None:
    good = trainer_output(tmp_path, "--steps", "1")
    log = tmp_path / "train.log"
    log.write_text(
        "[bootstrap] job aaaa started in tmux session t\n" + good.replace("Model: 3617.8M total", "Model: gone")
        + "[bootstrap] job aaaa exited with status 1\n"
        + "[bootstrap] job bbbb started in tmux session t\n"
    )  # fmt: skip
    writer(log, good.splitlines(), 0.02)
    KIND.run(make_ctx(tmp_path, log))


def test_fails_when_the_job_exits_first(tmp_path: Path, writer) -> None:
    lines = trainer_output(tmp_path, "--steps", "1").splitlines()[:2]
    log = tmp_path / "train.log"
    log.write_text("[bootstrap] job cccc started in tmux session t\n")
    writer(log, [*lines, "[bootstrap] job cccc exited with status 0"], 0.02)
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log))
    assert "the job exited with status 0 before marker 3" in err.value.reason


def test_follows_rotation_and_truncation(tmp_path: Path) -> None:
    lines = trainer_output(tmp_path, "--steps", "1").splitlines()
    log = tmp_path / "train.log"
    log.write_text(lines[0] + "\n" + lines[1][:10])  # an unfinished line
    ctx = make_ctx(tmp_path, log)

    def later() -> None:
        time.sleep(1.2)
        with open(log, "a") as fh:
            fh.write(lines[1][10:] + "\n")
        time.sleep(1.2)
        log.rename(tmp_path / "train.log.1")  # rotated: a new file continues
        (tmp_path / "train.log").write_text("\n".join(lines[2:6]) + "\n")
        time.sleep(1.2)
        with open(log, "r+") as fh:  # truncated in place, then rewritten from the start
            fh.truncate(0)
        log.write_text("\n".join(lines[6:]) + "\n")

    thread = threading.Thread(target=later)
    thread.start()
    try:
        KIND.run(ctx)
    finally:
        thread.join()
    seen = json.loads((ctx.workdir / "markers.json").read_text())["markers"]
    assert seen[1]["line"] == "Loaded 811 weight tensors, skipped 1"
    assert KIND.check(ctx).done


def test_carriage_returns_end_lines(tmp_path: Path) -> None:
    text = trainer_output(tmp_path, "--steps", "1").replace(
        "[AE] step=0", "  0%|          | 0/10000 [00:05<?, ?it/s]\r[AE] step=0"
    )
    log = tmp_path / "train.log"
    log.write_text(text)
    ctx = make_ctx(tmp_path, log, markers=[*AE_MARKERS[:5], r"^\[AE\] step=0/"])
    KIND.run(ctx)


@pytest.mark.parametrize(
    ("markers", "message"),
    [
        ([], "non-empty list"),
        (["("], "bad regex"),
        ([{"regex": "a", "any_of": ["b"]}], "either 'regex' or 'any_of'"),
        ([{"regex": "loss=(?P<loss>.*)", "ranges": {"lr": [0, 1]}}], "no group (?P<lr>"),
        ([{"regex": "loss=(?P<loss>.*)", "ranges": {"loss": [2, 1]}}], "low > high"),
        ([{"regex": "loss=(?P<loss>.*)", "ranges": {"loss": [1]}}], "[low, high]"),
        ([{"regex": "a", "rangez": {}}], "unknown keys"),
        ([{"any_of": ["a", 3]}], "alternative 2"),
        ([7], "regex or a mapping"),
    ],
)
def test_bad_markers_are_rejected_at_validation(markers: list, message: str) -> None:
    with pytest.raises(ParamError) as err:
        validate_params(KIND, {"log": "/x.log", "markers": markers})
    assert err.value.key == "markers" and message in str(err.value)


def test_bad_log_fail_on_and_ignore_issues_are_rejected() -> None:
    with pytest.raises(ParamError) as err:
        validate_params(KIND, {"log": "logs/x.log", "markers": ["a"]})
    assert err.value.key == "log"
    with pytest.raises(ParamError) as err:
        validate_params(KIND, {"log": "~/x", "markers": ["a"], "fail_on": ["("]})
    assert err.value.key == "fail_on"
    with pytest.raises(ParamError) as err:
        validate_params(KIND, {"log": "/x", "markers": ["a"], "ignore_issues": ["no-such-issue"]})
    assert err.value.key == "ignore_issues"
