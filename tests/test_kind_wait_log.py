"""wait_log against real files written while it waits: the stand-in trainer's lines (derived from
the fork's train_waypoint.py, provision/data/fake_trainer.py), from 1 and 2 ranks (tests/fakes/
torchrun starts one process per rank, their lines interleaved as torchrun's are)."""

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
from provision.steps import wait_log
from provision.steps.base import ParamError, StepContext, validate_params
from provision.steps.wait_log import KIND

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "provision" / "data" / "fake_trainer.py"
TORCHRUN = ROOT / "tests" / "fakes" / "torchrun"

AE_MARKERS = [
    "WaypointAEDataset: 454 episodes, 8409 valid pairs",
    {
        "name": "weights",
        "regex": r"Loaded (?P<loaded>\d+) weight tensors, skipped (?P<skipped>\d+)",
        "ranges": {"loaded": [811, 811], "skipped": [1, 1]},
        "hint": "pi0.5 has 812 tensors",
    },
    "Constructing tf.data.Dataset libero_object",
    {"name": "wandb", "any_of": ["wandb: .*View run at https://", "syncing is set to `offline`"]},
    {"name": "model", "regex": r"Model: 3617\.8M total", "after": ["weights"]},
]
FIRST_STEP = {
    "name": "first step",
    "regex": r"\[AE\] step=0/\d+ loss=(?P<loss>[\d.]+)",
    "ranges": {"loss": [0.7, 1.0]},
    "hint": "the initial AE loss is 0.7-1.0",
}


def make_ctx(tmp_path: Path, log: Path, timeout: float = 20, **params: object) -> StepContext:
    raw = {"log": str(log), "markers": AE_MARKERS, "progress": FIRST_STEP, **params}
    return StepContext(
        step_id="wait",
        params=validate_params(KIND, raw),
        run_dir=tmp_path / "run",
        poll=1,
        deadline=time.time() + timeout,
    )


def trainer_output(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, ranks: int = 1
) -> str:
    """What the stand-in trainer prints under torchrun with `ranks` processes (stdout and
    stderr, as `2>&1 | tee` keeps them)."""
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "ae.yaml").write_text("exp_name: ae\nlog_interval: 1\n")
    done = subprocess.run(
        [sys.executable, str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}",
         str(TRAINER), "--mode", "ae", "--config", "configs/ae.yaml", "--step-sleep", "0",
         "--startup-sleep", "0.02", *args],
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


@pytest.mark.slow
def test_passes_on_the_trainer_lines_of_one_and_two_ranks(tmp_path: Path, writer) -> None:
    for ranks in (1, 2):
        log = tmp_path / f"train{ranks}.log"
        writer(log, trainer_output(tmp_path, "--steps", "3", ranks=ranks).splitlines(), 0.02)
        ctx = make_ctx(tmp_path, log)
        assert not KIND.check(ctx).done
        KIND.run(ctx)
        record = json.loads((ctx.workdir / "markers.json").read_text())
        assert [m["line"] is not None for m in record["markers"]] == [True] * 6
        assert record["progress"] == "first step"
        assert 0.7 <= record["values"]["loss"] <= 1.0
        assert record["values"]["loaded"] == 811
        progress = json.loads((ctx.workdir / "_progress.json").read_text())
        assert (progress["files_done"], progress["files_total"]) == (6, 6)
        assert "loss=0.8" in progress["message"]
        check = KIND.check(ctx)
        assert check.done, check.reason


@pytest.mark.slow
def test_two_ranks_really_interleave(tmp_path: Path) -> None:
    # Rank 1 builds its data pipeline while rank 0 is still in wandb.init: the order the old
    # ordered markers (and seed 003 §13.1) assumed does not hold.
    # Rank 0 pauses in wandb.init for --startup-sleep: long enough here that rank 1's process
    # has started and run ahead even on a loaded machine (0.02 s lost the race at load 17).
    lines = trainer_output(tmp_path, "--steps", "1", "--startup-sleep", "3", ranks=2).splitlines()
    tfds = [i for i, line in enumerate(lines) if "Constructing tf.data.Dataset" in line]
    wandb = next(i for i, line in enumerate(lines) if "View run at" in line)
    model = next(i for i, line in enumerate(lines) if "Model: 3617.8M" in line)
    assert len(tfds) == 2 and tfds[0] < wandb < model < tfds[1]
    assert sum("Loaded 811 weight tensors" in line for line in lines) == 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_offline_wandb_alternative(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text(trainer_output(tmp_path, "--steps", "1", env={"WANDB_MODE": "offline"}))
    assert "View run at" not in log.read_text()
    ctx = make_ctx(tmp_path, log)
    KIND.run(ctx)
    seen = json.loads((ctx.workdir / "markers.json").read_text())["markers"][3]["line"]
    assert "offline" in seen


@pytest.fixture(scope="module")
def one_step(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What the stand-in trainer prints for one step: run once for the module (torchrun and the
    trainer are two Python starts, ~0.3 s); each test edits its own copy."""
    return trainer_output(tmp_path_factory.mktemp("one-step"), "--steps", "1")


def _index(lines: list[str], text: str) -> int:
    return next(i for i, line in enumerate(lines) if text in line)


def test_setup_markers_in_any_order(tmp_path: Path, one_step: str) -> None:
    lines = one_step.splitlines()
    lines.insert(0, lines.pop(_index(lines, "Constructing tf.data")))
    lines.insert(0, lines.pop(_index(lines, "View run at")))
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines) + "\n")
    KIND.run(make_ctx(tmp_path, log))


def test_progress_before_a_setup_marker_fails_naming_it(tmp_path: Path, one_step: str) -> None:
    lines = one_step.splitlines()
    lines.append(lines.pop(_index(lines, "Constructing tf.data")))
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines) + "\n")
    ctx = make_ctx(tmp_path, log)
    with pytest.raises(StepFailed) as err:
        KIND.run(ctx)
    reason = err.value.reason
    assert "progress marker `first step` appeared before `Constructing tf.data.Dataset" in reason
    assert "(4 of 6 markers seen)" in reason
    assert not KIND.check(ctx).done


def test_after_is_enforced(tmp_path: Path, one_step: str) -> None:
    lines = one_step.splitlines()
    lines.insert(0, lines.pop(_index(lines, "Model: 3617.8M")))  # Model: before the weights
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log))
    assert "marker `model` appeared before `weights`, which it must follow" in err.value.reason


def test_repeated_marker_is_fine(tmp_path: Path, one_step: str) -> None:
    lines = one_step.splitlines()
    lines.insert(4, lines[_index(lines, "WaypointAEDataset")])  # a second rank logs it again
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines) + "\n")
    KIND.run(make_ctx(tmp_path, log))


@pytest.mark.slow
def test_fails_on_loss_out_of_range(tmp_path: Path) -> None:
    text = trainer_output(tmp_path, "--steps", "2").replace(
        "step=0/10000 loss=0.", "step=0/10000 loss=1."
    )
    log = tmp_path / "train.log"
    log.write_text(text)
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log))
    assert "loss=1.8" in err.value.reason and "outside [0.7, 1.0]" in err.value.reason
    assert "marker `first step`" in err.value.reason
    assert err.value.hint == "the initial AE loss is 0.7-1.0"


def test_fails_on_a_wrong_weight_count(tmp_path: Path, one_step: str) -> None:
    text = one_step.replace(
        "Loaded 811 weight tensors, skipped 1", "Loaded 603 weight tensors, skipped 209"
    )
    log = tmp_path / "train.log"
    log.write_text(text)
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log))
    assert "loaded=603.0 at marker `weights` is outside [811, 811]" in err.value.reason
    assert err.value.hint == "pi0.5 has 812 tensors"


@pytest.mark.slow
def test_timeout_says_what_was_seen_and_what_is_missing(
    tmp_path: Path, writer, one_step: str
) -> None:
    lines = one_step.splitlines()
    log = tmp_path / "train.log"
    writer(log, lines[: _index(lines, "Model: 3617.8M")], 0.01)
    started = time.monotonic()
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log, timeout=3))
    assert time.monotonic() - started < 6
    reason = err.value.reason
    assert reason.startswith("timed out after")
    # One rank: its data pipeline starts after `Model:`, so three markers are missing.
    assert (
        "waiting for marker `Constructing tf.data.Dataset libero_object` (and 2 after it)" in reason
    )
    assert "seen 3/6" in reason and "`wandb`" in reason
    assert "last line: wandb: 🚀 View run at" in reason


@pytest.mark.slow
def test_timeout_when_the_log_never_appears(tmp_path: Path) -> None:
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, tmp_path / "missing.log", timeout=2))
    assert "never appeared" in err.value.reason


@pytest.mark.slow
def test_fails_on_cuda_oom_with_the_catalog_hint(tmp_path: Path, writer) -> None:
    log = tmp_path / "train.log"
    writer(log, trainer_output(tmp_path, "--fail", "oom").splitlines(), 0.02)
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log))
    assert "known failure [cuda-oom]" in err.value.reason
    assert "CUDA out of memory" in err.value.reason
    assert "before marker `first step` (5 of 6 seen)" in err.value.reason
    assert "expandable_segments:True" in (err.value.hint or "")


def test_wandb_network_retries_are_transient(tmp_path: Path, one_step: str) -> None:
    lines = one_step.splitlines()
    lines.insert(
        _index(lines, "Model: 3617.8M"),
        "wandb: Network error (ConnectionError), entering retry loop.",
    )
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines) + "\n")
    KIND.run(make_ctx(tmp_path, log))  # wandb retries in the background: not a failure
    lines.insert(
        _index(lines, "Model: 3617.8M"),
        "wandb: ERROR Run initialization has timed out after 90.0 sec.",
    )
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log))
    assert "[wandb-init-timeout]" in err.value.reason  # wandb.init gave up: the script stops


@pytest.mark.slow
def test_ignored_issue_and_fail_on(tmp_path: Path) -> None:
    lines = trainer_output(tmp_path, "--steps", "3", "--fail", "nan", "--fail-at", "0").splitlines()
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(StepFailed) as err:  # the catalog's loss-nan entry
        KIND.run(make_ctx(tmp_path, log))
    assert "loss=nan" in err.value.reason and "NaN" in (err.value.hint or "")
    nan_ok = {"regex": r"\[AE\] step=0/\d+ loss=(?P<loss>\S+)", "ranges": {"loss": [0.7, 1.0]}}
    with pytest.raises(StepFailed) as err:  # NaN is outside every range anyway
        KIND.run(make_ctx(tmp_path, log, timeout=5, progress=nan_ok, ignore_issues=["loss-nan"]))
    assert "loss=nan at marker" in err.value.reason
    lines.insert(2, "RuntimeError: dataloader worker died")
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log, fail_on=["worker died"]))
    assert "`worker died`" in err.value.reason and "before marker" in err.value.reason


def test_without_progress_every_marker_is_enough(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("b\na\n")
    ctx = make_ctx(tmp_path, log, markers=["a", "b"], progress=None)
    KIND.run(ctx)
    assert KIND.check(ctx).done


def test_check_text_names_the_first_unmet_marker() -> None:
    spec = wait_log.parse_spec(AE_MARKERS, FIRST_STEP)
    verdict = wait_log.check_text("WaypointAEDataset: 454 episodes, 8409 valid pairs\n", spec)
    assert not verdict.met
    assert verdict.reason.startswith("marker `weights` (and 4 after it) never appeared")
    started = "[bootstrap] job aa started in tmux session t\n"
    old = (
        started + "Loaded 811 weight tensors, skipped 1\n[bootstrap] job aa exited with status 1\n"
    )
    verdict = wait_log.check_text(old + started.replace("aa", "bb"), spec)
    assert "never appeared" in verdict.reason  # the latest launch only: no exit, no weights


@pytest.mark.slow
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


@pytest.mark.slow
def test_fails_when_the_job_exits_first(tmp_path: Path, writer) -> None:
    lines = trainer_output(tmp_path, "--steps", "1").splitlines()[:2]
    log = tmp_path / "train.log"
    log.write_text("[bootstrap] job cccc started in tmux session t\n")
    writer(log, [*lines, "[bootstrap] job cccc exited with status 0"], 0.02)
    with pytest.raises(StepFailed) as err:
        KIND.run(make_ctx(tmp_path, log))
    assert "the job exited with status 0 before marker `weights`" in err.value.reason


@pytest.mark.slow
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
        time.sleep(1.2)
        log.write_text("\n".join(lines[6:]) + "\n")

    thread = threading.Thread(target=later)
    thread.start()
    try:
        KIND.run(ctx)
    finally:
        thread.join()
    seen = json.loads((ctx.workdir / "markers.json").read_text())["markers"]
    assert "Loaded 811 weight tensors, skipped 1" in seen[1]["line"]
    assert KIND.check(ctx).done


def test_carriage_returns_end_lines(tmp_path: Path, one_step: str) -> None:
    lines = one_step.splitlines()
    step = _index(lines, "[AE] step=0/")
    lines[step] = "AE Training:   0%|          | 0/10000 [00:05<?, ?it/s]\r" + lines[step]
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines) + "\n")
    KIND.run(make_ctx(tmp_path, log, progress=r"^\d\d:\d\d:\d\d\.\d+ \[I\] \[AE\] step=0/"))


@pytest.mark.parametrize(
    ("markers", "message"),
    [
        ([], "non-empty list"),
        (["("], "bad regex"),
        ([{"regex": "a", "any_of": ["b"]}], "either 'regex' or 'any_of'"),
        ([{"regex": "loss=(?P<loss>.*)", "ranges": {"lr": [0, 1]}}], "no group (?P<lr>"),
        ([{"regex": "loss=(?P<loss>.*)", "ranges": {"loss": [2, 1]}}], "low > high"),
        ([{"regex": "loss=(?P<loss>.*)", "ranges": {"loss": [1]}}], "[low, high]"),
        (
            [{"regex": "a", "rangez": {}}],
            "unknown key 'rangez' in marker 1 (did you mean 'ranges'?)",
        ),
        ([{"any_of": ["a", 3]}], "alternative 2"),
        ([7], "regex or a mapping"),
        ([{"name": "a", "regex": "a", "after": ["b"]}], "'after' names 'b', not another marker"),
        (
            [
                {"name": "a", "regex": "a", "after": ["b"]},
                {"name": "b", "regex": "b", "after": "a"},
            ],
            "'after' makes a cycle",
        ),
        (["a", "a"], "two markers are named 'a'"),
        ([{"regex": "a", "after": 3}], "'after' must be a list"),
    ],
)
def test_bad_markers_are_rejected_at_validation(markers: list, message: str) -> None:
    with pytest.raises(ParamError) as err:
        validate_params(KIND, {"log": "/x.log", "markers": markers})
    assert err.value.key == "markers" and message in str(err.value)


def test_progress_takes_no_after() -> None:
    with pytest.raises(ParamError) as err:
        validate_params(
            KIND, {"log": "/x", "markers": ["a"], "progress": {"regex": "b", "after": ["a"]}}
        )
    assert err.value.key == "progress" and "takes no 'after'" in str(err.value)


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


class _Clock:
    """The `time` of provision.steps.base (sleep, monotonic, time), without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


@pytest.mark.parametrize("grows_after", [None, 3])
def test_a_log_that_changes_is_read_at_the_next_glance_not_the_next_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grows_after: int | None
) -> None:
    """Between polls (1 s growing to `poll`) the log's stat is looked at every GLANCE_S: a
    marker written meanwhile is seen within a glance, not up to `poll` seconds late."""
    from provision.steps import base

    clock = _Clock()
    monkeypatch.setattr(base, "time", clock)  # base's name only: other threads keep real time
    ctx = StepContext(step_id="w", params={}, run_dir=tmp_path, poll=10, deadline=None)
    probes: list[float] = []
    looks = iter(range(1, 1000))

    def probe() -> str | None:
        probes.append(clock.now)
        return "seen" if len(probes) == 2 else None

    def changed() -> bool:
        return next(looks) == grows_after

    assert ctx.wait_until(probe, "a marker", changed if grows_after else None) == "seen"
    waited = probes[1] - probes[0]
    if grows_after is None:
        assert clock.sleeps == [1.0] and waited == 1.0  # no stat to look at: the poll's pace
    else:
        assert clock.sleeps == [base.GLANCE_S] * 3 and waited == 3 * base.GLANCE_S


def test_changed_is_true_once_per_change_of_the_log(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    watch = wait_log._Watch(log, wait_log.Tracker(wait_log.parse_spec(["x"])), tmp_path)
    assert watch.changed() is False  # absent, as at the start
    log.write_text("one\n")
    assert watch.changed() is True and watch.changed() is False
    with open(log, "a") as fh:
        fh.write("two\n")
    assert watch.changed() is True and watch.changed() is False
    log.unlink()
    assert watch.changed() is True
