"""The guard watches a launched job for its whole life and tells a local HTTP endpoint, through
real apprise (`json://`), exactly once per event: training runs, stalled, crashed, finished,
on_finish; checkpoints not leaving the box are reported loudly and repeatedly."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from ckpt_remotes import TRAINER, no_process_outlives, rclone_config, serve
from project import wait_for

from provision.steps.base import ParamError, StepContext, validate_params
from provision.steps.tmux_launch import KIND as TMUX_LAUNCH
from provision.watch import guard
from provision.watch import watcher as watcher_module
from provision.watch.notify import Notifier
from provision.watch.record import read_watch
from provision.watch.spec import WatchSpec, parse_on_finish, parse_watch
from provision.watch.watcher import Watcher


@pytest.fixture(autouse=True)
def _no_process_outlives_the_test(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """Guards, their rclone and trainers a test started end with it, whatever happened."""
    with no_process_outlives(request, tmp_path):
        yield


class Inbox:
    """A local HTTP endpoint that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        inbox = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                inbox.messages.append(json.loads(self.rfile.read(length) or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"json://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def titles(self) -> list[str]:
        """Titles of the messages about the job (the host's own alerts, such as CPU load on
        this shared machine or no nvidia-smi, left out)."""
        titles = [m.get("title", "").split(": ", 1)[-1] for m in self.messages]
        return [t for t in titles if t != "alert"]

    def alerts(self) -> list[str]:
        return [m["message"] for m in self.messages if m.get("title", "").endswith(": alert")]


@pytest.fixture
def inbox() -> Iterator[Inbox]:
    box = Inbox()
    yield box
    box.server.shutdown()


def launch(
    tmp_path: Path, socket: str, inbox: Inbox, command: str, **params: object
) -> StepContext:
    raw = {"session": "train", "socket": socket, "cwd": str(tmp_path), "command": command,
           "log": "train.log", "notify": "NOTIFY_URL",
           "watch": {"poll": 1, "stall_factor": 3, "stall_min_s": 3}}  # fmt: skip
    raw.update(params)
    secrets = {"NOTIFY_URL": inbox.url}
    ctx = StepContext(
        step_id="train",
        params=validate_params(TMUX_LAUNCH, raw),
        run_dir=tmp_path / "run",
        env={**os.environ, **secrets},
        secrets=secrets,
        out=io.StringIO(),
    )
    TMUX_LAUNCH.run(ctx)
    return ctx


def trainer(*args: str) -> str:
    return " ".join([sys.executable, str(TRAINER), "--mode", "ae", "--startup-sleep", "0",
                     "--wandb", "offline", *args])  # fmt: skip


@pytest.mark.slow
def test_stalled_then_crashed_is_one_message_each(
    tmp_path: Path, socket: str, inbox: Inbox
) -> None:
    # Steps come every 0.2 s, then none: the trainer holds (a hung data loader).
    ctx = launch(tmp_path, socket, inbox, trainer("--steps", "15", "--step-sleep", "0.2", "--hold"))
    wait_for(lambda: "training stalled" in inbox.titles(), timeout=60, what="stalled message")
    time.sleep(3)  # more looks while it stays stalled: no second message
    assert inbox.titles() == ["training runs", "training stalled"]
    # kill -9 of the guard mid-run: the one started again tells nothing it told before.
    os.kill(guard.guard_pid(ctx.workdir) or 0, signal.SIGKILL)
    wait_for(lambda: guard.guard_pid(ctx.workdir) is None, timeout=10, what="the guard dead")
    assert guard.revive(ctx.workdir, {**os.environ, "NOTIFY_URL": inbox.url}) is not None
    time.sleep(4)
    assert inbox.titles() == ["training runs", "training stalled"]
    watch = read_watch(ctx.workdir)
    assert watch and watch["state"] == "training"
    assert [f["kind"] for f in watch["findings"] if f["kind"] != "alert"] == ["stalled"]
    assert watch["progress"]["step"] == 14
    # Now it dies: OOM-killed, as the kernel does it.
    pid = int((ctx.workdir / "job.pid").read_text().split()[0])
    for proc in Path("/proc").iterdir():
        ours = proc.name.isdigit() and str(TRAINER).encode() in _cmdline(proc)
        if ours and os.getsid(int(proc.name)) == pid:
            os.kill(int(proc.name), signal.SIGKILL)
    wait_for(lambda: guard.guard_pid(ctx.workdir) is None, timeout=60, what="guard ends")
    assert inbox.titles() == ["training runs", "training stalled", "training crashed"]
    assert len(inbox.alerts()) == len(set(inbox.alerts()))  # each alert once
    crashed = next(m["message"] for m in inbox.messages if "crashed" in m["title"])
    assert "exited with status 137" in crashed
    assert "bootstrap rerun" in crashed and "train" in crashed
    assert inbox.url.split("//")[1] not in (ctx.workdir / guard.LOG_FILE).read_text()
    # A guard started again for the same launch sends nothing it sent before.
    (ctx.workdir / guard.DONE_FILE).unlink()
    guard.revive(ctx.workdir, {**os.environ, "NOTIFY_URL": inbox.url})
    before = len(inbox.messages)
    wait_for(lambda: guard.guard_pid(ctx.workdir) is None, timeout=60, what="second guard ends")
    assert len(inbox.messages) == before


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
def test_finished_then_on_finish_runs_once(tmp_path: Path, socket: str, inbox: Inbox) -> None:
    hook = "echo $BOOTSTRAP_OUTCOME $BOOTSTRAP_RC $BOOTSTRAP_LAST_STEP >> finish.txt"
    ctx = launch(
        tmp_path, socket, inbox, trainer("--steps", "30", "--total", "30", "--step-sleep", "0.05"),
        on_finish={"run": hook},
    )  # fmt: skip
    wait_for(lambda: guard.guard_pid(ctx.workdir) is None, timeout=60, what="guard ends")
    assert inbox.titles() == ["training runs", "training finished", "on_finish ran"]
    assert (tmp_path / "finish.txt").read_text() == "finished 0 29\n"
    watch = read_watch(ctx.workdir)
    assert watch and watch["state"] == "finished" and watch["on_finish"]["rc"] == 0


@pytest.mark.slow
def test_stop_ends_a_job_that_lingers_after_its_last_step(
    tmp_path: Path, socket: str, inbox: Inbox
) -> None:
    command = trainer("--steps", "10", "--total", "10", "--step-sleep", "0.05", "--hold")
    ctx = launch(tmp_path, socket, inbox, command, on_finish="stop",
                 watch={"poll": 1, "finish_grace_s": 2})  # fmt: skip
    wait_for(lambda: guard.guard_pid(ctx.workdir) is None, timeout=60, what="guard ends")
    finish = json.loads((ctx.workdir / guard.FINISH_FILE).read_text())
    assert finish["outcome"] == "finished" and finish["stopped"]
    assert TMUX_LAUNCH.check(ctx).done is False  # the session is gone
    assert inbox.titles().count("training finished") == 1


@pytest.mark.parametrize("remote_kind", ["good", "rejects_writes"])
@pytest.mark.slow
def test_destroy_says_whether_the_box_may_go(
    tmp_path: Path, socket: str, inbox: Inbox, remote_kind: str
) -> None:
    command = trainer("--steps", "30", "--total", "30", "--step-sleep", "0.05", "--save-dir",
                      "ck", "--save-interval", "10", "--hold")  # fmt: skip
    with contextlib.ExitStack() as stack:
        if remote_kind == "good":
            remote = f"store:{tmp_path / 'remote'}"
            conf = rclone_config(tmp_path / "rclone.conf", store={"type": "local"})
        else:
            remote, conf = stack.enter_context(_bad_remote("rejects_writes", tmp_path))
        ckpts = {"dir": "ck", "complete": "metadata.pt", "remote": remote, "poll": 1,
                 "rclone_config": str(conf)}  # fmt: skip
        ctx = launch(tmp_path, socket, inbox, command, checkpoints=ckpts, on_finish="destroy",
                     watch={"poll": 1, "finish_grace_s": 2})  # fmt: skip
        wait_for(lambda: guard.guard_pid(ctx.workdir) is None, timeout=180, what="guard ends")
    finish = json.loads((ctx.workdir / guard.FINISH_FILE).read_text())
    assert finish["action"] == "destroy" and finish["outcome"] == "finished"
    assert finish["stopped"] and TMUX_LAUNCH.check(ctx).done is False  # the job was ended
    told = [m["message"] for m in inbox.messages if m["title"].endswith(": on_finish ran")]
    assert len(told) == 1, inbox.titles()
    if remote_kind == "good":
        assert finish["ready"] is True and finish["why_not"] == ""
        assert "the box may be destroyed: every complete checkpoint is verified on" in told[0]
        assert "(newest 30)" in told[0]  # the trainer saves after steps 10, 20 and 30
    else:
        assert finish["ready"] is False
        assert finish["why_not"].startswith("checkpoint uploads are failing: ")
        assert "not ready to be destroyed: checkpoint uploads are failing" in told[0]
    watch = read_watch(ctx.workdir)
    assert watch and watch["on_finish"]["ready"] is finish["ready"]  # what the controller reads


@contextmanager
def _bad_remote(kind: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(remote, rclone.conf) of a remote that rejects writes (`rclone serve webdav
    --read-only`) or that does not exist (no such section in the config)."""
    served = tmp_path / "served"
    served.mkdir()
    if kind == "missing":
        yield "nosuch:runs", rclone_config(tmp_path / "rclone.conf", other={"type": "local"})
        return
    with serve("webdav", served, "--read-only") as url:
        yield "ro:runs", rclone_config(tmp_path / "rclone.conf", ro={"type": "webdav", "url": url})


@pytest.mark.parametrize("kind", ["rejects_writes", "missing"])
@pytest.mark.slow
def test_a_bad_remote_is_loud_and_the_job_runs(
    tmp_path: Path, socket: str, inbox: Inbox, kind: str
) -> None:
    with _bad_remote(kind, tmp_path) as (remote, conf):
        ckpts = {"dir": "ck", "complete": "metadata.pt", "remote": remote, "poll": 1,
                 "rclone_config": str(conf)}  # fmt: skip
        command = trainer("--steps", "100000", "--step-sleep", "0.05", "--save-dir", "ck",
                          "--save-interval", "10")  # fmt: skip
        ctx = launch(tmp_path, socket, inbox, command, checkpoints=ckpts,
                     watch={"poll": 1, "stall_min_s": 60})  # fmt: skip
        title = "checkpoints are not leaving the box"
        wait_for(lambda: title in inbox.titles(), timeout=60, what="upload failing message")
        assert TMUX_LAUNCH.check(ctx).done  # training goes on
        time.sleep(3)
        assert inbox.titles().count(title) == 1  # once per event (and again each repeat_s)
        watch = read_watch(ctx.workdir)
        assert watch and any(f["kind"] == "upload_failing" for f in watch["findings"])
        log = (ctx.workdir / guard.LOG_FILE).read_text()
        assert log.count("LOUD: checkpoints are not leaving the box") >= 2
        guard.stop(ctx.workdir)
        assert list((tmp_path / "served").iterdir()) == []  # the read-only one took nothing
        assert len(list((tmp_path / "ck").glob("[0-9]*"))) >= 1  # nothing pruned, nothing lost


@pytest.mark.slow
def test_a_failing_upload_is_told_again_each_repeat_s_while_it_lasts(
    tmp_path: Path, inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [time.time()]
    monkeypatch.setattr(watcher_module, "time", SimpleNamespace(time=lambda: clock[0]))
    (tmp_path / "train.log").write_text("")
    spec = WatchSpec(repeat_s=60)
    watcher = Watcher(tmp_path, str(tmp_path / "train.log"), "l1", "train", spec)
    notifier = Notifier(inbox.url, tmp_path, "b1 · train", print)
    failing = {"failing": {"since": 0, "error": "403 Forbidden", "attempts": 1},
               "pending": ["10"]}  # fmt: skip
    title = "checkpoints are not leaving the box"
    for step_s, uploads in ((0, failing), (30, failing), (31, failing), (10, failing),
                            (50, failing), (1, {}), (1, failing)):  # fmt: skip
        clock[0] += step_s
        notifier.tell_findings(watcher.observe(None, False, uploads), "rerun", spec.repeat_s)
    # Told at t=0, 61 (a second period), 121 (a third); cleared at 122; failing anew at 123.
    assert inbox.titles().count(title) == 4, inbox.titles()


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"poll": 0}, "watch.poll"),
        ({"stall_factor": 1}, "watch.stall_factor"),
        ({"thresholds": {"gpu_memroy_pct": 9}}, "watch.thresholds"),
        ({"pol": 3}, "watch.pol"),
    ],
)
def test_bad_watch_blocks(raw: dict, key: str) -> None:
    with pytest.raises(ParamError) as err:
        parse_watch(raw)
    assert err.value.key == key


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("destroy-box", "on_finish"),
        ({"run": ""}, "on_finish.run"),
        ({"run": "x", "when": "sometimes"}, "on_finish.when"),
        ({"run": "x", "destroy": True}, "on_finish"),
        ({"destroy": "yes"}, "on_finish.destroy"),
        (3, "on_finish"),
    ],
)
def test_bad_on_finish(raw: object, key: str) -> None:
    with pytest.raises(ParamError) as err:
        parse_on_finish(raw)
    assert err.value.key == key


def test_destroy_is_for_a_finished_run_unless_told() -> None:
    assert parse_on_finish("destroy").when == ("finished",)  # a crashed box stays for a look
    assert parse_on_finish({"destroy": True, "when": "crashed"}).when == ("crashed",)
    assert parse_on_finish({"stop": True}).when == ("finished", "crashed")


# ---- the runner's news: setup failed, training verified (over a test box) ---------------------

NEWS_PLAYBOOK = """\
name: news
steps:
  - id: fetch-weights
    kind: shell
    retries: 1
    run: test -e ~/weights-ready || rclone lsf nosuch:weights
  - id: train
    kind: tmux_launch
    needs: [fetch-weights]
    session: news
    command: {trainer}
    log: train.log
    notify: NOTIFY_URL
    watch: {{poll: 1}}
  - id: train-started
    kind: wait_log
    needs: [train]
    log: ~/train.log
    timeout: 60
    poll: 1
    markers: ['Model: 3617\\.8M total']
    progress:
      name: first step
      regex: '\\[AE\\] step=0/\\d+ loss=(?P<loss>[\\d.]+)'
"""


@pytest.mark.slow
def test_setup_failed_is_told_once_per_failure_then_training_verified(
    project, box, inbox: Inbox
) -> None:  # type: ignore[no-untyped-def]
    project.host_vars = {"agent_python": sys.executable}
    project.secrets = {"NOTIFY_URL": {"value": inbox.url}}
    project.playbook(NEWS_PLAYBOOK.format(trainer=trainer("--steps", "100000", "--step-sleep",
                                                          "0.05")))  # fmt: skip
    run_dir = box.home / ".bootstrap/runs/news"
    first = project.up("box1")
    assert first.returncode != 0
    # The runner tells once the run has ended (`up` may have returned a moment before).
    wait_for(lambda: inbox.messages, timeout=30, what=f"news; {_runner_log(run_dir)}")
    time.sleep(1)
    assert inbox.titles() == ["setup failed"]  # two attempts (retries: 1), one event
    (message,) = inbox.messages
    assert message["title"] == "box1 · news: setup failed"
    body = message["message"]
    assert body.startswith("step fetch-weights failed after 2 attempts: ")
    assert "diagnosis: The rclone remote (gg1) is not in rclone.conf" in body
    assert "fix: Run the rclone-config step" in body
    assert "didn't find section in config file" in body  # the log's last lines
    assert "blocked: train, train-started" in body
    assert body.endswith("rerun: bootstrap rerun box1 fetch-weights")
    secret = inbox.url.split("//")[1]
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path

    again = project.up("box1")  # it runs again and fails again: a new event
    assert again.returncode != 0
    wait_for(lambda: len(inbox.messages) == 2, timeout=30, what="the second failure's news")

    (box.home / "weights-ready").touch()
    fixed = project.cli("rerun", "box1", "fetch-weights", "-p", "playbooks/test.yaml")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    steps = project.steps("box1")
    assert {s["status"] for s in steps.values()} == {"done"}, steps
    # Training verified at step 0: one message, from the runner or the guard, whichever first.
    wait_for(lambda: len(inbox.titles()) == 3, timeout=30, what="training news")
    time.sleep(3)  # the guard's looks meanwhile: nothing more
    news = inbox.titles()
    assert news[:2] == ["setup failed", "setup failed"] and len(news) == 3, news
    assert news[2] in ("training verified", "training runs")
    if news[2] == "training verified":  # the last message may be a host alert titles() skips
        told = [m for m in inbox.messages if m.get("title", "").endswith(": training verified")]
        # its marker and its progress line: the wait_log's 2 markers, then the values captured
        assert told[0]["message"].startswith("train-started: all 2 markers seen; loss "), told
    noop = project.up("box1")
    assert noop.returncode == 0
    time.sleep(2)
    assert inbox.titles() == news
    box.ssh("tmux kill-server", check=False)


def _runner_log(run_dir: Path) -> str:
    path = run_dir / "runner.log"
    return path.read_text(errors="replace")[-2000:] if path.exists() else "no runner.log"


@pytest.mark.slow
def test_a_process_without_apprise_sends_through_the_venv_python(
    tmp_path: Path, inbox: Inbox
) -> None:
    plain = shutil.which("python3", path="/usr/bin")
    probe = subprocess.run([plain or "python3", "-c", "import apprise"], capture_output=True)
    if plain is None or probe.returncode == 0:
        pytest.skip("needs a python3 without apprise (the box's, as the runner runs on)")
    script = (
        "import sys; from pathlib import Path; from provision.watch.notify import Notifier\n"
        "n = Notifier(sys.stdin.read(), Path(sys.argv[1]), 'b1 · news', print, sys.argv[2])\n"
        "print(n.tell('setup_failed:x@1', 'setup_failed', 'step x failed', 'rerun: r'))\n"
    )
    done = subprocess.run(
        [plain, "-c", script, str(tmp_path), sys.executable],
        input=inbox.url,  # the URL is a secret: stdin, never argv
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        timeout=60,
    )
    assert done.stdout.strip().endswith("True"), done.stdout + done.stderr
    assert [m["title"] for m in inbox.messages] == ["b1 · news: setup failed"]
    assert inbox.messages[0]["message"] == "step x failed\nrerun: r"
    assert inbox.url.split("//")[1] not in done.stdout + done.stderr


@pytest.mark.slow
def test_two_processes_telling_one_event_send_one_message(tmp_path: Path, inbox: Inbox) -> None:
    from provision.watch.notify import Notifier

    # The runner and the guard each hold their own notifier over the step's notified.json.
    notifiers = [Notifier(inbox.url, tmp_path, "b1 · train", print) for _ in range(4)]
    threads = [
        threading.Thread(target=n.tell, args=("training@l1", "training", "step 0"))
        for n in notifiers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert inbox.titles() == ["training runs"]
    assert Notifier(inbox.url, tmp_path, "b1 · train", print).tell("training@l1", "t", "x")
    assert len(inbox.messages) == 1
