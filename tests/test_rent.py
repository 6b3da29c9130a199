"""`bootstrap rent`, `up --rent`, `instances`, `down` against the fake vast.ai API.

The fake (tests/fake_vast.py) validates every request and response against Vast's pinned
OpenAPI spec and is driven by the real `vastai==1.9.1` client inside the CLI; its instances are
sshd boxes. Each test ends with no violation of the spec and nothing left billing unless it
says otherwise.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from boxes import run_cli
from fake_vast import FakeVast, spec_path

from provision.rent import fitness

pytestmark = pytest.mark.slow

PLAYBOOK = """\
name: smoke-rent
steps:
  - id: hello
    kind: shell
    run: echo hello from $(hostname) > ~/hello.txt
    creates: ~/hello.txt
  - id: gpus
    kind: preflight
    min_gpus: 2
    tools: [python3]
    base_ram_gb: 0
    needs: [hello]
  - id: checkpoint
    kind: shell
    run: mkdir -p ~/ckpt && echo weights > ~/ckpt/step_100
    creates: ~/ckpt/step_100
    needs: [gpus]
"""


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeVast]:
    """The fake API, held to the pinned spec when it is there (see test_fake_is_held_to_the_spec)."""
    # Keys reach a box a second after it runs, as on vast.ai (later there, at times).
    with FakeVast(tmp_path / "vast", spec_path(), key_delay=1.0) as server:
        yield server
    assert server.violations == []


@pytest.fixture
def env(controller_env: dict[str, str], fake: FakeVast, tmp_path: Path) -> dict[str, str]:
    """The controller's environment: the fake's URL and key, a HOME with no vast key file."""
    home = tmp_path / "controller-home"
    home.mkdir()
    return dict(
        controller_env, VAST_URL=fake.url, VAST_API_KEY=fake.api_key, HOME=str(home),
        # never the real pypi.org and GCS from here; the JSON one is followed to its largest file
        BOOTSTRAP_SPEED_URLS=f"{fake.url}/blob.json {fake.url}/blob",
    )  # fmt: skip


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "playbooks").mkdir(parents=True)
    (root / "playbooks" / "smoke-rent.yaml").write_text(PLAYBOOK)
    return root


def cli(project: Path, env: dict[str, str], *args: str, timeout: float = 180) -> Any:
    return run_cli(list(args), env=env, cwd=project, timeout=timeout)


def rent_args(fake: FakeVast, key: Path, *extra: str) -> list[str]:
    return ["--key", str(key), "--disk", "2", "--ssh-timeout", "20", *extra]


def store(env: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (Path(env["BOOTSTRAP_CONFIG_DIR"]) / "instances.json").read_text()
    )
    return data


def one_line_error(result: Any) -> str:
    """The one `error:` line, last on stderr (progress lines may come before it)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return str(errors[0])


def test_up_rent_runs_the_playbook_then_down_from_another_controller(
    fake: FakeVast, env: dict[str, str], project: Path, client_key: Path, tmp_path: Path
) -> None:
    fake.add_offer(101, 11, gpu_name="RTX PRO 6000 WS", dph_total=0.95)
    fake.add_offer(102, 12, gpu_name="RTX 4090", dph_total=0.4)  # filtered out by the query
    result = cli(
        project, env, "up", "--rent", "gpu_name=RTX_PRO_6000_WS num_gpus>=2 reliability>0.99",
        "-p", "playbooks/smoke-rent.yaml", "--label", "t1", "--key", str(client_key), "--disk", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (instance,) = fake.live()
    assert instance.offer.row["id"] == 101 and instance.label == "bootstrap:t1"
    assert instance.price is None  # on demand, as asked
    assert instance.box is not None and (instance.box.home / ".no_auto_tmux").exists()
    assert Path(f"{client_key}.pub").read_text().strip() in instance.keys
    assert "ok   gpu health" in result.stderr and "FAIL" not in result.stderr
    assert result.stderr.count("ok   download 127.0.0.1") == 2
    checked = re.search(r"fitness checked in ([\d.]+)s", result.stderr)
    assert checked and float(checked.group(1)) < 60  # within the box's first minute
    assert (instance.box.home / "ckpt" / "step_100").exists()
    assert store(env)["instances"]["t1"]["playbook"].endswith("smoke-rent.yaml")

    up = cli(project, env, "up", "t1", "-p", "playbooks/smoke-rent.yaml")
    assert up.returncode == 0, up.stdout + up.stderr
    logs = cli(project, env, "logs", "t1", "hello")
    assert logs.returncode == 0, logs.stderr

    # Another controller (its own config dir) finds it by label through the API.
    other = dict(env, BOOTSTRAP_CONFIG_DIR=str(tmp_path / "other-controller"))
    listed = cli(project, other, "instances", "--json", "--key", str(client_key))
    assert listed.returncode == 0, listed.stderr
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["name"] == "t1" and row["state"] == "running" and row["id"] == instance.id
    assert row["dph"] == pytest.approx(0.95) and row["cost"] > 0
    assert row["run"].endswith("smoke-rent.yaml: 3/3 done, runner idle")  # asked of the box
    status = cli(project, other, "status", "t1", "--json")
    assert status.returncode == 0, status.stderr
    down = cli(project, other, "down", "t1")
    assert down.returncode == 0, down.stderr
    assert fake.live() == []
    assert cli(project, env, "instances").stdout.count("\n") == 1  # the header alone


def test_err_gpu_and_silent_box_destroyed_and_never_rented_again(
    fake: FakeVast, env: dict[str, str], project: Path, client_key: Path
) -> None:
    fake.add_offer(
        201, 21, behaviour="healthy", nvidia="err", gpu_name="RTX PRO 6000 WS", dph_total=0.3
    )
    fake.add_offer(202, 22, behaviour="no_ssh", dph_total=0.4)
    fake.add_offer(203, 23, behaviour="exits", dph_total=0.45)
    fake.add_offer(204, 24, gpu_name="RTX PRO 6000 WS", dph_total=0.5)
    args = rent_args(fake, client_key)
    args[args.index("--ssh-timeout") + 1] = "4"
    result = cli(project, env, "rent", "num_gpus=2", "--label", "good", *args)
    assert result.returncode == 0, result.stderr
    assert [i.offer.row["id"] for i in fake.live()] == [204]
    created = [i.offer.row["id"] for i in fake.instances.values()]
    assert created == [201, 202, 203, 204]
    bad = store(env)["bad_machines"]
    assert set(bad) == {"21", "22", "23"}
    assert "ERR!" in bad["21"]["reason"]
    assert "SSH did not answer" in bad["22"]["reason"]
    assert "exited" in bad["23"]["reason"]

    # The same offers come back on the market: the bad machines are not rented again.
    fake.add_offer(205, 25, gpu_name="RTX PRO 6000 WS", dph_total=0.6)
    fake.add_offer(206, 26, gpu_name="RTX PRO 6000 WS", dph_total=0.7)
    before = len(fake.instances)
    again = cli(project, env, "rent", "num_gpus=2", "--label", "second", "--count", "2", *args)
    assert again.returncode == 0, again.stderr
    # The two slots rent in parallel: either may ask first.
    assert sorted(i.offer.row["id"] for i in list(fake.instances.values())[before:]) == [205, 206]
    searches = fake.calls("POST", "/api/v0/bundles")
    assert searches[-1]["machine_id"] == {"notin": [21, 22, 23]}
    assert [line.split("\t")[0] for line in again.stdout.splitlines()] == ["second-1", "second-2"]

    # No run on it yet: down refuses (nothing proves its checkpoints are safe), --force does it.
    refused = cli(project, env, "down", "second-1")
    assert refused.returncode == 2
    assert "not destroying" in one_line_error(refused)
    for name in ("second-1", "second-2", "good"):
        assert cli(project, env, "down", name, "--force").returncode == 0
    assert fake.live() == []


def test_budget_bid_and_bad_options_rent_nothing(
    fake: FakeVast, env: dict[str, str], project: Path, client_key: Path
) -> None:
    fake.add_offer(301, 31, behaviour="exits", dph_total=0.62, min_bid=0.2)
    args = rent_args(fake, client_key)
    capped = cli(project, env, "rent", "num_gpus=2", "--budget", "0.5", *args)
    assert capped.returncode == 1 and "budget" in one_line_error(capped)
    no_bid = cli(project, env, "rent", "num_gpus=2", "--interruptible", *args)
    assert no_bid.returncode == 2 and "--bid" in one_line_error(no_bid)
    unknown = cli(project, env, "rent", "gpu_nam=RTX_4090", *args)
    assert unknown.returncode == 2 and "unknown field 'gpu_nam'" in one_line_error(unknown)
    assert fake.calls("PUT", "/api/v0/asks") == []

    # An interruptible rent sends its bid (without one vast.ai rents on demand: vast-cli#403).
    # The cheapest offer is taken by someone else between the search and the create.
    fake.add_offer(300, 30, dph_total=0.5, min_bid=0.1)
    fake.taken.add(300)
    spot = cli(project, env, "rent", "num_gpus=2", "--interruptible", "--bid", "0.25", *args)
    assert spot.returncode == 1, spot.stderr  # the only offer left: its box exits while loading
    assert "offer 300 not rented" in spot.stderr and "no longer available" in spot.stderr
    assert fake.calls("POST", "/api/v0/bundles")[-1]["type"] == "bid"
    taken, body = fake.calls("PUT", "/api/v0/asks")
    assert taken["price"] == body["price"] == 0.25
    assert fake.live() == []
    # What that box cost counts against the budget from now on.
    assert store(env)["ledger"][0]["dph"] == 0.25 and store(env)["ledger"][0]["ended"]


def test_wrong_api_key_is_one_line_and_never_printed(
    fake: FakeVast, env: dict[str, str], project: Path, client_key: Path
) -> None:
    fake.add_offer(401, 41)
    wrong = "wrong-key-abcdef123456"
    result = cli(
        project, dict(env, VAST_API_KEY=wrong), "rent", "num_gpus=2", *rent_args(fake, client_key)
    )
    assert result.returncode == 2
    assert "refused the API key" in one_line_error(result)
    assert wrong not in result.stdout + result.stderr
    assert fake.calls("PUT", "/api/v0/asks") == [] and fake.calls("POST", "/api/v0/bundles") == []

    # The key may live in the inventory instead (a secret) or in vast's own key file.
    (project / "inventory.yaml").write_text("secrets:\n  VAST_API_KEY: {env: MY_VAST_KEY}\n")
    listed = cli(project, dict(env, VAST_API_KEY=wrong, MY_VAST_KEY=fake.api_key), "instances")
    assert listed.returncode == 0, listed.stderr
    (project / "inventory.yaml").unlink()
    key_file = Path(env["HOME"]) / ".config" / "vastai" / "vast_api_key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text(fake.api_key + "\n")
    no_env = {k: v for k, v in env.items() if k != "VAST_API_KEY"}
    assert cli(project, no_env, "instances").returncode == 0


def test_api_down_says_so_and_rents_nothing(
    controller_env: dict[str, str], project: Path, client_key: Path, tmp_path: Path
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(controller_env, VAST_URL=f"http://127.0.0.1:{port}", VAST_API_KEY="k" * 20)
    result = run_cli(["rent", "num_gpus=2", "--key", str(client_key)], env=env, cwd=project)
    assert result.returncode == 2
    line = one_line_error(result)
    assert "cannot reach the vast.ai API" in line and "nothing was rented" in line
    assert not (Path(env["BOOTSTRAP_CONFIG_DIR"]) / "instances.json").exists()


def test_rate_limit_is_waited_out(
    fake: FakeVast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from provision.rent.vast import Vast, VastError, parse_query

    fake.add_offer(501, 51, behaviour="exits")
    fake.rate_limited = 4  # more than vastai's own 3 tries
    vast = Vast(fake.api_key, url=fake.url, backoff=(0.1, 0.1))
    (offer,) = vast.search(parse_query("num_gpus=2"))
    instance_id = vast.create(
        offer, image="img", disk_gb=2, label="bootstrap:x", onstart="", bid=None
    )
    assert fake.rate_limited == 0 and instance_id in fake.instances
    vast.destroy(instance_id)
    (spot,) = vast.search(parse_query("num_gpus=2"), interruptible=True)
    with pytest.raises(VastError, match="a bid is needed"):
        vast.create(spot, image="img", disk_gb=2, label="bootstrap:x", onstart="", bid=None)


def test_download_speed_rows() -> None:
    rows = fitness.speed_rows(
        [
            {
                "url": "https://pypi.org/simple/torch/",
                "bytes": 200_000_000,
                "seconds": 4.0,
                "error": "",
            },
            {
                "url": "https://storage.googleapis.com/x",
                "bytes": 2_000_000,
                "seconds": 4.0,
                "error": "",
            },
            {
                "url": "https://storage.googleapis.com/y",
                "bytes": 0,
                "seconds": 10.0,
                "error": "URLError: timed out",
            },
        ],
        listed_mbps=800,
        min_ratio=0.2,
        min_mbps=50,
    )
    assert [r["ok"] for r in rows] == [True, False, False]
    assert rows[0]["check"] == "download pypi.org" and rows[1]["value"].startswith("4 Mbit/s")
    assert rows[1]["expected"] == ">= 160 Mbit/s (listed 800)"


@pytest.mark.parametrize(
    ("listed", "smi", "ok"),
    [("RTX 4090", "NVIDIA GeForce RTX 4090", True), ("H100 SXM", "NVIDIA H100 80GB HBM3", True),
     ("RTX PRO 6000 WS", "NVIDIA RTX PRO 6000 Blackwell Workstation Edition", True),
     ("RTX 4090", "NVIDIA GeForce RTX 3090", False)],
)  # fmt: skip
def test_gpu_pattern(listed: str, smi: str, ok: bool) -> None:
    import re

    assert bool(re.search(fitness.gpu_pattern(listed), smi)) is ok


CKPT_PLAYBOOK = """\
name: ckpt-rent
steps:
  - id: train
    kind: tmux_launch
    session: train
    command: >-
      {python} {trainer} --mode ae --steps 100000 --total 100000 --step-sleep 0.08
      --startup-sleep 0 --wandb offline --save-dir ck --save-interval 10
      --ckpt-bytes 200000 --ckpt-chunks 4 --ckpt-sleep 0.1
    log: train.log
    resume_args: --resume
    env: {{RCLONE_CONFIG_STORE_TYPE: local}}
    checkpoints:
      dir: ck
      complete: metadata.pt
      keep: 2
      remote: "store:{remote}"
      restore: true
      poll: 1
"""


def test_interruptible_outbid_is_replaced_and_resumes_from_the_remote(
    fake: FakeVast, env: dict[str, str], project: Path, client_key: Path, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    from ckpt_remotes import TRAINER
    from project import wait_for

    remote = tmp_path / "remote"
    book = project / "playbooks" / "ckpt-rent.yaml"
    book.write_text(CKPT_PLAYBOOK.format(python=sys.executable, trainer=TRAINER, remote=remote))
    for offer_id, machine in ((601, 61), (602, 62)):
        fake.add_offer(offer_id, machine, gpu_name="RTX PRO 6000 WS", min_bid=0.2, dph_total=0.8)
    argv = [
        sys.executable, "-m", "provision.cli", "up", "--rent", "num_gpus=2", "--interruptible",
        "--bid", "0.3", "--label", "job", "--keep-alive", "--check-every", "1",
        "-p", "playbooks/ckpt-rent.yaml", "--var", f"agent_python={sys.executable}",
        "--key", str(client_key), "--disk", "2",
    ]  # fmt: skip
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(argv, env=env, cwd=project, stdout=out, stderr=subprocess.STDOUT)
    try:
        manifest = remote / ".bootstrap" / "manifest"
        wait_for(lambda: len(list(manifest.glob("*.json"))) >= 2, timeout=120, what="2 uploads")
        (first,) = fake.live()
        fake.outbid(first.id)
        second: list[Any] = []

        def resumed() -> bool:
            others = [i for i in fake.live() if i.id != first.id and i.box is not None]
            second[:] = others
            train_log = others[0].box.home / "train.log" if others else None
            return bool(
                train_log and train_log.exists() and "Resumed from step" in train_log.read_text()
            )

        wait_for(resumed, timeout=120, what="the replacement resuming")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- bootstrap up:\n{log.read_text()}") from None
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=30)
    output = log.read_text()
    assert "was stopped (outbid)" in output and "replaced by instance" in output, output
    (new,) = second
    assert fake.instances[first.id].ended  # the lost one destroyed: its disk no longer bills
    assert new.price == 0.3 and new.label == "bootstrap:job" and new.offer.row["id"] == 602
    assert store(env)["instances"]["job"]["id"] == new.id
    newest = max(int(p.stem) for p in manifest.glob("*.json") if p.stem.isdigit())
    assert newest >= 10

    # Training stopped there, every complete checkpoint uploaded: `down` lets it go.
    trainer = [pid for pid, cmd in new.box.processes() if "fake_trainer" in cmd]
    for pid in trainer:
        os.kill(pid, signal.SIGKILL)

    def safe() -> bool:
        report = cli(project, env, "checkpoints", "job", "-p", "playbooks/ckpt-rent.yaml", "--json")
        rows = json.loads(report.stdout)["local"] if report.returncode == 0 else [{"state": "?"}]
        return all(r["state"] != "complete" for r in rows)

    wait_for(safe, timeout=60, what="every complete checkpoint uploaded")
    down = cli(project, env, "down", "job")
    assert down.returncode == 0, down.stdout + down.stderr
    assert fake.live() == []


FINISH_PLAYBOOK = """\
name: finish-rent
steps:
  - id: train
    kind: tmux_launch
    session: train
    command: >-
      {python} {trainer} --mode ae --steps 30 --total 30 --step-sleep 0.05 --startup-sleep 0
      --wandb offline --save-dir ck --save-interval 10 --hold
    log: train.log
    env: {{RCLONE_CONFIG_STORE_TYPE: local}}
    checkpoints: {{dir: ck, complete: metadata.pt, remote: "store:{remote}", poll: 1}}
    watch: {{poll: 1, finish_grace_s: 2}}
    on_finish: destroy
"""


def test_on_finish_destroy_is_done_here_once_the_box_says_its_work_is_safe(
    fake: FakeVast,
    env: dict[str, str],
    project: Path,
    client_key: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from ckpt_remotes import TRAINER
    from project import wait_for

    from provision.rent import keepalive
    from provision.rent.vast import Vast

    remote = tmp_path / "remote"
    book = project / "playbooks" / "finish-rent.yaml"
    book.write_text(FINISH_PLAYBOOK.format(python=sys.executable, trainer=TRAINER, remote=remote))
    fake.add_offer(801, 81, gpu_name="RTX PRO 6000 WS")
    up = cli(project, env, "up", "--rent", "num_gpus=2", "--label", "fin", "--key",
             str(client_key), "--disk", "2", "-p", "playbooks/finish-rent.yaml", "--var",
             f"agent_python={sys.executable}")  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr
    (instance,) = fake.live()
    for name in ("BOOTSTRAP_CONFIG_DIR", "HOME"):
        monkeypatch.setenv(name, env[name])  # this process is the controller that rented it
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    vast = Vast(fake.api_key, url=fake.url)
    said: list[str] = []

    def watch() -> dict[str, Any]:
        shown = cli(project, env, "monitor", "fin", "-p", "playbooks/finish-rent.yaml", "--json")
        doc: dict[str, Any] = json.loads(shown.stdout.splitlines()[-1])["watch"] or {}
        return doc

    # While it trains, and once its guard says it may not go: the box stays.
    assert keepalive.release(vast, "fin", watch(), said.append) is False
    assert keepalive.release_when_asked(vast, "fin", said.append) is False
    not_ready = {"on_finish": {"action": "destroy", "ready": False, "why_not": "pending: 30"}}
    assert keepalive.release(vast, "fin", not_ready, said.append) is False
    assert said == ["fin: on_finish destroy: not destroying: pending: 30"]
    assert keepalive.release(vast, "elsewhere", {"on_finish": {"action": "destroy",
                                                               "ready": True}}, said.append) is False  # fmt: skip
    assert [i.id for i in fake.live()] == [instance.id]

    seen: list[dict[str, Any]] = []

    def ready() -> bool:
        seen[:] = [watch()]
        return bool((seen[0].get("on_finish") or {}).get("ready"))

    wait_for(ready, timeout=120, what="the guard's on_finish: ready")
    (finished,) = seen
    assert finished["state"] == "finished"
    assert sorted(p.stem for p in (remote / ".bootstrap" / "manifest").glob("*.json")) == [
        "10", "20", "30"
    ]  # fmt: skip
    # What `up --keep-alive` polls: the box's status, its guarded step's watch record in it.
    once = keepalive.say_once(said.append)
    assert keepalive.release_when_asked(vast, "fin", once) is True
    assert fake.live() == [] and fake.instances[instance.id].ended
    assert "fin" not in store(env)["instances"]
    assert said[-1].startswith(f"fin: destroyed instance {instance.id} after ")


LAUNCH_PLAYBOOK = """\
name: launch-rent
steps:
  - id: train
    kind: tmux_launch
    session: train
    command: "echo step 1 loss 0.5; sleep 600"
    log: train.log
"""


def test_monitor_watch_replaces_a_box_gone_offline(
    fake: FakeVast, env: dict[str, str], project: Path, client_key: Path, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    from project import wait_for

    (project / "playbooks" / "launch-rent.yaml").write_text(LAUNCH_PLAYBOOK)
    for offer_id, machine in ((701, 71), (702, 72)):
        fake.add_offer(offer_id, machine, gpu_name="RTX PRO 6000 WS")
    book = ["-p", "playbooks/launch-rent.yaml", "--var", f"agent_python={sys.executable}"]
    first_up = cli(project, env, "up", "--rent", "num_gpus=2", "--label", "w", "--key",
                   str(client_key), "--disk", "2", *book)  # fmt: skip
    assert first_up.returncode == 0, first_up.stdout + first_up.stderr
    (first,) = fake.live()
    log = tmp_path / "monitor.log"
    argv = [sys.executable, "-m", "provision.cli", "monitor", "w", "--watch", "--interval", "1",
            "-p", "playbooks/launch-rent.yaml"]  # fmt: skip
    with log.open("w") as out:
        watcher = subprocess.Popen(argv, env=env, cwd=project, stdout=out, stderr=subprocess.STDOUT)
    try:
        fake.offline(first.id)

        def relaunched() -> bool:
            others = [i for i in fake.live() if i.id != first.id and i.box is not None]
            train = others[0].box.home / "train.log" if others else None
            return bool(train and train.exists() and "loss 0.5" in train.read_text())

        wait_for(relaunched, timeout=120, what="the job relaunched on a replacement")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- monitor:\n{log.read_text()}") from None
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(timeout=30)
    assert "went offline: renting a replacement" in log.read_text()
    assert fake.instances[first.id].ended
    assert cli(project, env, "down", "w", "--force").returncode == 0
    assert fake.live() == []


def test_lost_states() -> None:
    from provision.rent.keepalive import lost
    from provision.rent.vast import _instance

    def row(**over: Any) -> dict[str, Any]:
        base = {
            "id": 1,
            "actual_status": "running",
            "cur_state": "running",
            "intended_status": "running",
        }
        return {**base, **over}

    assert lost(_instance(row())) == ""
    assert lost(_instance(row(actual_status="loading"))) == ""
    assert lost(_instance(row(actual_status="offline"))) == "went offline"
    assert (
        lost(_instance(row(actual_status="exited", cur_state="stopped"))) == "was stopped (outbid)"
    )
    assert lost(_instance(row(cur_state="stopped", intended_status="stopped"))) == "was stopped"
    assert lost(None) == "is gone from the account"


def test_fake_is_held_to_the_spec(tmp_path: Path) -> None:
    """Every request and response of the fake goes through the pinned spec: what the real
    client sends passes, and what the spec forbids is refused (here: vastai's own unset fields,
    null, which bootstrap strips before sending)."""
    import requests
    from vastai.api.instances import build_create_instance_payload

    from provision.rent.vast import Vast, parse_query

    path = spec_path()
    assert path is not None, "tests/data/vast/openapi.yaml is missing"
    with FakeVast(tmp_path / "vast", path) as fake:
        assert fake.validated
        fake.add_offer(801, 81, behaviour="exits")
        vast = Vast(fake.api_key, url=fake.url)
        (offer,) = vast.search(parse_query("num_gpus=2"))
        vast.destroy(
            vast.create(offer, image="i", disk_gb=2, label="bootstrap:x", onstart="", bid=None)
        )
        assert fake.violations == []
        raw = build_create_instance_payload(image="i", disk=2, label=None)  # nulls, env {}
        answer = requests.put(
            f"{fake.url}/api/v0/asks/801/", json=raw,
            headers={"Authorization": f"Bearer {fake.api_key}"}, timeout=10,
        )  # fmt: skip
        assert answer.status_code == 599 and "request PUT /api/v0/asks/801" in fake.violations[0]
        assert len(fake.instances) == 1  # the refused request created nothing


def test_instances_are_read_across_pages(fake: FakeVast) -> None:
    """show_instances follows next_token (pages of 25): a 27th instance is not lost."""
    from provision.rent.vast import Vast, parse_query

    for n in range(27):
        fake.add_offer(900 + n, 90 + n, behaviour="exits")
    vast = Vast(fake.api_key, url=fake.url)
    for offer in vast.search(parse_query("num_gpus=2")):
        vast.create(
            offer, image="i", disk_gb=2, label=f"bootstrap:p{offer.id}", onstart="", bid=None
        )
    listed = vast.instances()
    assert len(listed) == 27 and len({i.id for i in listed}) == 27
    assert len(fake.calls("GET", "/api/v1/instances")) == 2
    for instance in listed:
        vast.destroy(instance.id)
    assert fake.live() == []


def test_ctrl_c_while_renting_leaves_nothing_billing(
    fake: FakeVast, env: dict[str, str], project: Path, client_key: Path
) -> None:
    import signal
    import subprocess
    import sys

    from project import wait_for

    fake.created_s = 600.0  # stuck in `created`, as a box waiting for its image can be
    fake.add_offer(1001, 101)
    argv = [
        sys.executable,
        "-m",
        "provision.cli",
        "rent",
        "num_gpus=2",
        *rent_args(fake, client_key),
    ]
    rent = subprocess.Popen(
        argv, env=env, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: fake.instances, timeout=60, what="an instance created")
    rent.send_signal(signal.SIGINT)
    _out, err = rent.communicate(timeout=60)
    assert rent.returncode == 1, err
    assert "interrupted: the instance being rented was destroyed" in err.strip().splitlines()[-1]
    assert fake.live() == [] and store(env)["ledger"][0]["ended"], err


def test_count_rents_the_boxes_at_once_and_ctrl_c_destroys_each(
    fake: FakeVast, env: dict[str, str], project: Path, client_key: Path
) -> None:
    import signal
    import subprocess
    import sys

    from project import wait_for

    # Each box is stuck in `created` (its image loading) for ten minutes: rented one after
    # another, the second would not even be created before the first gave up.
    fake.created_s = 600.0
    fake.add_offer(1101, 111, dph_total=0.3)
    fake.add_offer(1102, 112, dph_total=0.4)
    argv = [sys.executable, "-m", "provision.cli", "rent", "num_gpus=2", "--count", "2"]
    rent = subprocess.Popen(
        argv + rent_args(fake, client_key),
        env=env,
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(fake.instances) == 2, timeout=60, what="two instances created")
    rent.send_signal(signal.SIGINT)
    _out, err = rent.communicate(timeout=60)
    assert rent.returncode == 1, err
    assert "interrupted: the instances being rented were destroyed" in err.strip().splitlines()[-1]
    assert "[1/2] renting offer" in err and "[2/2] renting offer" in err
    assert fake.live() == []
    ledger = store(env)["ledger"]
    assert len(ledger) == 2 and all(entry["ended"] for entry in ledger), ledger


def test_budget_counts_an_hour_of_every_box_billing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_key: Path
) -> None:
    from provision.rent import renter
    from provision.rent import store as rent_store

    monkeypatch.setenv("BOOTSTRAP_CONFIG_DIR", str(tmp_path / "config"))
    req = renter.Request(query="num_gpus=1", key=client_key, budget=1.0)
    renter._check_budget(req, 0.6, 0.0, "none")  # nothing billing: an hour at 0.6 fits
    rent_store.open_ledger(7, "a", 0.5)  # a box billing now: 0.5 + 0.6 passes 1.0 within the hour
    with pytest.raises(renter.RentError, match=r"\$0\.500/h billing"):
        renter._check_budget(req, 0.6, 0.0, "a")
    rent_store.close_ledger(7)
    renter._check_budget(req, 0.6, 0.0, "none")
    with pytest.raises(renter.RentError):  # a create in flight in another slot counts too
        renter._check_budget(req, 0.6, 0.5, "none")
