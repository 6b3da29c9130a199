"""The remote step cache (provision/cache/): keys, archives, the bucket, and whole runs on boxes.

Real rclone against a local remote (a directory) and the GCS emulator; real tar and zstd; real
sshd boxes for the runs. A "second box" is another box (its own HOME, agent, state) after the
cached outputs were removed: the boxes share this machine's filesystem, and a cached step's
outputs must be at the same absolute path on every box (the key holds the path).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from gcs_emulator import EmulatorProcess, client
from project import Project, count, one_line_error, wait_for

from provision.cache import archive, key, save
from provision.cache.restore import compute_key, objects_of, restore
from provision.cache.save import Saver, signature
from provision.errors import ConfigError
from provision.inventory import Host, Inventory
from provision.playbook import load_playbook, resolve


def _other_python() -> str | None:
    """An interpreter (3.9 or newer, as the agent needs) of another minor version than this
    one's, which is the boxes' python3: on PATH as python3.N, or under pyenv."""
    candidates = [shutil.which(f"python3.{minor}") for minor in range(9, 16)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    for path in filter(None, candidates):
        probe = subprocess.run(
            [path, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        version = tuple(int(v) for v in probe.stdout.split()) if probe.returncode == 0 else ()
        if version >= (3, 9) and version != sys.version_info[:2]:
            return path
    return None


# ----------------------------------------------------------------------------- helpers


def _tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello\n")
    (root / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "link").symlink_to("a.txt")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)


def _listing(root: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_file():
            found[rel] = (oct(path.stat().st_mode & 0o777), path.read_bytes())
        else:
            found[rel] = "dir"
    return found


def _step(out: Path, remote: str, **node: Any) -> dict[str, Any]:
    """A plan step with a cache object over one output, as provision.cache.plan makes it."""
    spec = {"facts": node.pop("facts", []), "inputs": node.pop("inputs", []), "with": []}
    graph = {
        "s": {
            "fingerprint": node.pop("fingerprint", "f1"),
            "outputs": [str(out)],
            "needs": list(node.get("upstream", {})),
            "cache": spec,
        },
        **node.pop("upstream", {}),
    }
    return {
        "id": "s",
        "outputs": [str(out)],
        "cache": {
            "remote": remote,
            "max_bytes": node.pop("max_bytes", None),
            "with": [],
            "graph": graph,
        },
    }


def _save(run: Path, step: dict[str, Any], secrets: list[str] | None = None) -> str:
    step_dir = run / "steps" / step["id"]
    step_dir.mkdir(parents=True, exist_ok=True)
    return Saver(step_dir, step, compute_key(run, step), dict(os.environ)).run(secrets or [])


def _entries(remote: Path) -> list[Path]:
    return sorted((remote / "entries").glob("*.json")) if (remote / "entries").exists() else []


def _objects(remote: Path) -> list[Path]:
    return sorted(p for p in (remote / "objects").rglob("*") if p.is_file())


# ------------------------------------------------------------------------- keys (no box)


def test_key_changes_with_what_shapes_the_outputs(tmp_path: Path) -> None:
    out, up = tmp_path / "out", tmp_path / "up"
    up.mkdir()
    (up / "uv.lock").write_text("v1\n")
    lock = str(up / "uv.lock")
    upstream = {"u": {"fingerprint": "fu", "outputs": [str(up)], "needs": [], "cache": None}}
    base = _step(out, "unused", inputs=[lock], upstream=upstream)
    probe = key.Probe(tmp_path / "memo.json")
    k1 = key.step_key("s", base["cache"]["graph"], probe)
    assert key.step_key("s", base["cache"]["graph"], key.Probe()) == k1  # stable
    # The input file (and with it the upstream step's output content) changes.
    (up / "uv.lock").write_text("v2\n")
    k2 = key.step_key("s", base["cache"]["graph"], key.Probe(tmp_path / "memo.json"))
    assert k2 != k1
    # Only the upstream output changes (a file that is not an input).
    (up / "other").write_text("x")
    assert key.step_key("s", base["cache"]["graph"], key.Probe()) not in (k1, k2)
    # The step itself, the place of its outputs, a box fact.
    changed = _step(out, "unused", inputs=[lock], upstream=upstream, fingerprint="f2")
    assert key.step_key("s", changed["cache"]["graph"], key.Probe()) != k2
    moved = _step(tmp_path / "elsewhere", "unused", inputs=[lock], upstream=upstream)
    assert key.step_key("s", moved["cache"]["graph"], key.Probe()) != k2
    with_fact = _step(out, "unused", inputs=[lock], upstream=upstream, facts=["python"])
    probe = key.Probe()
    k_fact = key.step_key("s", with_fact["cache"]["graph"], probe)
    probe._facts["python"] = "cpython-3.12.1"
    assert key.step_key("s", with_fact["cache"]["graph"], probe) != k_fact


def test_a_step_below_a_unit_keys_it_by_the_units_own_key(tmp_path: Path) -> None:
    # convert needs uv-sync, whose unit holds extra; convert does not need extra (the openpi
    # playbooks' shape: the conversion below the environment unit, beside TensorFlow).
    out = tmp_path / "o"
    book = _book(
        tmp_path,
        f"""\
        - id: uv-sync
          kind: shell
          run: x
          outputs: [{out}/venv]
          cache: {{with: [extra]}}
        - id: extra
          kind: shell
          run: y
          needs: [uv-sync]
        - id: convert
          kind: shell
          run: z
          needs: [uv-sync]
          outputs: [{out}/model]
          cache: true
        """,
        top=f"cache: {{remote: {tmp_path / 'remote'}}}\n",
    )
    plan = resolve(load_playbook(book), Inventory(path=None), Host(name="b", host="h"))
    steps = {step.id: step.to_json() for step in plan.steps}  # as plan.json holds them
    probe = key.Probe()
    unit_key = key.step_key("uv-sync", steps["uv-sync"]["cache"]["graph"], probe)
    material = key.material("convert", steps["convert"]["cache"]["graph"], probe)
    assert material["needs"] == {"uv-sync": "cache:" + unit_key}


def test_a_pycache_appearing_in_outputs_being_saved_is_no_change(tmp_path: Path) -> None:
    # A dependent importing from a venv while the saver reads it writes __pycache__ dirs into
    # the package directories (never archived): the outputs did not change.
    root = tmp_path / "venv"
    _tree(root)
    before = signature([str(root)])
    (root / "sub" / "__pycache__").mkdir()
    (root / "sub" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"x")
    assert signature([str(root)]) == before
    (root / "sub" / "new.py").write_text("")
    assert signature([str(root)]) != before
    (root / "sub" / "new.py").unlink()
    (root / "a.txt").write_text("changed\n")
    assert signature([str(root)]) != before


def test_box_facts_read_this_box() -> None:
    probe = key.Probe()
    assert probe.fact("python").startswith(f"{sys.implementation.name}-3.")
    assert probe.fact("arch") == os.uname().machine
    assert probe.fact("glibc").startswith("glibc ")
    assert probe.fact("cuda") == "none" or probe.fact("cuda").isdigit()


# --------------------------------------------------------------------- archives (no box)


@pytest.mark.parametrize("name", ["zstd", "gzip"])
def test_archive_round_trip_keeps_the_tree(tmp_path: Path, name: str) -> None:
    src = tmp_path / "src"
    _tree(src)
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"stale")
    codec = archive.codec_for(name)
    assert codec is not None
    chunks: list[bytes] = []
    packed = archive.pack([str(src)], chunks.append, codec)
    assert packed.packed_bytes == sum(map(len, chunks))
    dest = tmp_path / "dest"
    archive.unpack(iter(chunks), str(dest), codec, packed.sha256)
    restored = dest / str(src).lstrip("/")
    expected = _listing(src)
    del expected["__pycache__"], expected["__pycache__/m.cpython-311.pyc"]
    assert _listing(restored) == expected


def test_a_tampered_archive_is_refused_before_anything_is_placed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    codec = archive.codec_for("zstd")
    assert codec is not None
    chunks: list[bytes] = []
    packed = archive.pack([str(src)], chunks.append, codec)
    data = bytearray(b"".join(chunks))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(archive.ArchiveError, match="sha256"):
        archive.unpack(iter([bytes(data)]), str(tmp_path / "dest"), codec, packed.sha256)


def test_pack_stops_at_a_secret_and_at_the_size_limit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    (src / "sub" / "token").write_text("x" * 5000 + "hunter2-secret-value" + "y" * 10)
    codec = archive.codec_for("zstd")
    assert codec is not None
    with pytest.raises(archive.SecretInOutputs):
        archive.pack([str(src)], lambda _c: None, codec, secrets=["hunter2-secret-value"])
    with pytest.raises(archive.TooLarge):
        archive.pack([str(src)], lambda _c: None, codec, max_bytes=100_000)


def test_a_save_yields_the_cpu_to_the_steps_on_the_way_to_step_0(tmp_path: Path) -> None:
    """`agent cache-save` runs in a session of its own (the runner may end first): at the
    lowest weight of that session's autogroup and SCHED_IDLE, inherited by zstd, tar and
    rclone, or packing a venv would take as much CPU as the steps that come after it."""
    code = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        from provision.cache import save
        rc = save.main(Path(sys.argv[1]), "s", {})  # no step: refused, after yielding
        group = Path("/proc/self/autogroup")
        nice = group.read_text().split()[-1] if group.exists() else "19"
        print(rc, os.sched_getscheduler(0) == os.SCHED_IDLE, nice)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,  # the autogroup is the session's: not this test's
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert done.stdout.split() == ["3", "True", "19"], done.stdout + done.stderr


# ------------------------------------------------------------- the bucket (rclone, no box)


@pytest.mark.slow
def test_save_then_restore_through_a_local_remote(tmp_path: Path) -> None:
    out, remote, run = tmp_path / "out", tmp_path / "remote", tmp_path / "run"
    _tree(out)
    before = _listing(out)
    step = _step(out, str(remote))
    assert _save(run, step) == "saved"
    assert len(_entries(remote)) == 1 and len(_objects(remote)) == 1
    assert not list((remote / "tmp").glob("*")), "no partial object is left"
    entry = json.loads(_entries(remote)[0].read_text())
    assert entry["paths"] == [str(out)] and entry["codec"] == "zstd"
    # A second save of the same key is a no-op.
    assert _save(run, step) == "present"
    # "Another box": the outputs are gone, the run directory is new.
    subprocess.run(["rm", "-rf", str(out)], check=True)
    heard: list[tuple[int, int]] = []
    attempt = restore(
        tmp_path / "run2", step, dict(os.environ), lambda d, t, _s: heard.append((d, t))
    )
    assert attempt.restored, attempt.reason
    assert attempt.reason.startswith("restored from cache (key ")
    assert _listing(out) == before
    # The progress ends with every byte of the entry in (status's bar; the fetches ahead).
    assert heard and heard[-1] == (entry["packed_bytes"], entry["packed_bytes"]), heard
    assert not list(tmp_path.glob(".bootstrap-restore-*")), "the staging directory is removed"


def _sharded_tree(root: Path) -> None:
    """_tree and enough more files for four shards, a hard link between two of them, a
    name with a newline and a read-only directory (its mode is set after its files)."""
    _tree(root)
    for i in range(12):
        (root / "sub" / f"f{i:02d}.bin").write_bytes(os.urandom(100_000))
    os.link(root / "sub" / "f00.bin", root / "sub" / "z-hardlink.bin")
    (root / "odd\nname").write_text("newline\n")
    (root / "ro").mkdir()
    (root / "ro" / "x").write_text("x")
    (root / "ro").chmod(0o555)


@pytest.mark.slow
def test_large_outputs_are_saved_as_shards_and_restored_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past SHARD_BYTES the saver writes shards plus a directories archive; a restore unpacks
    them side by side and gives back the same tree (modes, links, hard links); one tampered
    shard is refused before anything is placed, and removing the entry's objects removes all."""
    monkeypatch.setattr(save, "SHARD_BYTES", 60_000)
    out, remote, run = tmp_path / "out", tmp_path / "remote", tmp_path / "run"
    _sharded_tree(out)
    before = _listing(out)
    dir_modes = {p: p.stat().st_mode for p in out.rglob("*") if p.is_dir()}
    step = _step(out, str(remote))
    assert _save(run, step) == "saved"
    entry = json.loads(_entries(remote)[0].read_text())
    assert len(entry["shards"]) == save.MAX_SHARDS and entry["object"] is None
    named = sorted(objects_of(entry))
    assert [str(p.relative_to(remote)) for p in _objects(remote)] == named
    assert entry["packed_bytes"] == sum(p.stat().st_size for p in _objects(remote))
    subprocess.run(["chmod", "-R", "u+w", str(out)], check=True)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    attempt = restore(tmp_path / "run2", step, dict(os.environ))
    assert attempt.restored, attempt.reason
    assert _listing(out) == before
    assert {p: p.stat().st_mode for p in out.rglob("*") if p.is_dir()} == dir_modes
    assert (out / "sub" / "f00.bin").stat().st_ino == (out / "sub" / "z-hardlink.bin").stat().st_ino
    # Tamper with one shard: the restore is refused and the outputs stay as they are.
    shard = remote / entry["shards"][2]["object"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = restore(tmp_path / "run3", step, dict(os.environ))
    assert not bad.restored and "corrupt or truncated" in bad.reason, bad.reason
    assert _listing(out) == before
    subprocess.run(["chmod", "-R", "u+w", str(out)], check=True)


def test_shards_cut_the_listing_by_bytes_and_keep_hard_links_together(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _sharded_tree(root)
    runs, dirs = archive.shards([str(root)], 4)
    assert len(runs) == 4
    files = [p for run in runs for p in run]
    assert sorted(files) == sorted(str(p) for p in root.rglob("*") if not p.is_dir())
    assert sorted(dirs) == sorted([str(root), *(str(p) for p in root.rglob("*") if p.is_dir())])
    link = str(root / "sub" / "z-hardlink.bin")
    (holder,) = [run for run in runs if link in run]
    assert str(root / "sub" / "f00.bin") in holder
    sizes = [sum(os.lstat(p).st_size for p in run) for run in runs]
    assert max(sizes) < 2.5 * min(sizes), sizes
    (root / "ro").chmod(0o755)


@pytest.mark.slow
def test_the_units_markers_travel_with_the_outputs(tmp_path: Path) -> None:
    """What the unit's kinds keep in their step directories (what their checks read) is
    restored into the other box's run, wherever that box keeps it; the runner's files not."""
    out, remote = tmp_path / "out", tmp_path / "remote"
    _tree(out)
    step = _step(out, str(remote))
    step["cache"]["with"] = ["m"]
    run = tmp_path / "box1" / "runs" / "r"
    for sid, name in (("s", "synced.json"), ("m", "installed.json")):
        (run / "steps" / sid).mkdir(parents=True)
        (run / "steps" / sid / name).write_text(json.dumps({"by": sid}))
        (run / "steps" / sid / "_result.json").write_text("{}")
    assert _save(run, step) == "saved"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    other = tmp_path / "box2" / "runs" / "r"
    assert restore(other, step, dict(os.environ)).restored
    assert json.loads((other / "steps" / "s" / "synced.json").read_text()) == {"by": "s"}
    assert json.loads((other / "steps" / "m" / "installed.json").read_text()) == {"by": "m"}
    assert not (other / "steps" / "m" / "_result.json").exists()
    assert not (tmp_path / "box2" / "runs" / "r" / "steps" / "s" / "_result.json").exists()


@pytest.mark.slow
def test_restore_says_miss_and_corrupt(tmp_path: Path) -> None:
    out, remote = tmp_path / "out", tmp_path / "remote"
    _tree(out)
    step = _step(out, str(remote))
    miss = restore(tmp_path / "run", step, dict(os.environ))
    assert not miss.restored and miss.reason == f"cache miss: key {miss.key[:16]}"
    assert _save(tmp_path / "run", step) == "saved"
    obj = _objects(remote)[0]
    data = bytearray(obj.read_bytes())
    data[100] ^= 0xFF
    obj.write_bytes(bytes(data))
    keep = _listing(out)
    bad = restore(tmp_path / "run", step, dict(os.environ))
    assert (
        not bad.restored and "corrupt or truncated" in bad.reason and bad.reason.endswith(": ran")
    )
    assert _listing(out) == keep, "a refused archive leaves the outputs as they were"


def test_an_unreachable_bucket_means_the_step_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _tree(out)
    env = {**os.environ, "RCLONE_CONFIG": str(tmp_path / "none.conf")}
    attempt = restore(tmp_path / "run", _step(out, "nosuchremote:cache"), env)
    assert not attempt.restored and attempt.reason.startswith("cache unreachable ("), attempt
    assert "didn't find section in config file" in attempt.reason
    assert attempt.reason.endswith(": ran")


def test_a_secret_never_reaches_the_bucket(tmp_path: Path) -> None:
    out, remote = tmp_path / "out", tmp_path / "remote"
    _tree(out)
    (out / "train.env").write_text("WANDB_API_KEY=wandb-0123456789abcdef\n")
    step = _step(out, str(remote))
    assert _save(tmp_path / "run", step, ["wandb-0123456789abcdef"]) == "failed"
    state = json.loads((tmp_path / "run" / "steps" / "s" / "_cache_save.json").read_text())
    assert "secret" in state["reason"]
    assert _entries(remote) == [] and _objects(remote) == []
    leftovers = [p for p in remote.rglob("*") if p.is_file()]
    assert all(b"wandb-0123456789abcdef" not in p.read_bytes() for p in leftovers)
    assert leftovers == []


def test_outputs_above_the_limit_are_skipped_with_a_warning(tmp_path: Path) -> None:
    out, remote = tmp_path / "out", tmp_path / "remote"
    _tree(out)
    step = _step(out, str(remote), max_bytes=1000)
    assert _save(tmp_path / "run", step) == "skipped"
    state = json.loads((tmp_path / "run" / "steps" / "s" / "_cache_save.json").read_text())
    assert "above the cache's limit" in state["reason"]
    assert _entries(remote) == []


@pytest.mark.slow
@pytest.mark.parametrize("shard_bytes", [None, 60_000], ids=["one-archive", "sharded"])
def test_two_boxes_filling_one_key_leave_one_valid_entry(
    tmp_path: Path, shard_bytes: int | None
) -> None:
    """Whichever box loses the race removes what it uploaded: every object of its entry (all
    shards and the directories archive, for a sharded one), and nothing of the winner's."""
    out, remote = tmp_path / "out", tmp_path / "remote"
    if shard_bytes is None:
        _tree(out)
        (out / "big").write_bytes(os.urandom(4_000_000))
    else:
        _sharded_tree(out)
    step = _step(out, str(remote))
    results: list[str] = []
    # Each saver is its own process, as on two boxes (the upload ids differ). Neither writes
    # its entry before both have uploaded (a file each in `meet`): the race is always run.
    meet = tmp_path / "meet"
    meet.mkdir()
    code = textwrap.dedent(
        """
        import json, os, sys, time
        from pathlib import Path
        from provision.cache import save
        s, run, k, shard_bytes, meet = json.loads(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]
        save.SHARD_BYTES = int(shard_bytes) or save.SHARD_BYTES
        commit = save.Saver._commit
        def _commit(self, *args):
            Path(meet, str(os.getpid())).touch()
            deadline = time.time() + 30
            while len(os.listdir(meet)) < 2 and time.time() < deadline:
                time.sleep(0.01)
            return commit(self, *args)
        save.Saver._commit = _commit
        d = run / "steps" / "s"
        d.mkdir(parents=True)
        print(save.Saver(d, s, k, dict(os.environ)).run([]))
        """
    )
    k = compute_key(tmp_path / "run0", step)

    def one(i: int) -> None:
        argv = [json.dumps(step), str(tmp_path / f"run{i}"), k, str(shard_bytes or 0), str(meet)]
        done = subprocess.run(
            [sys.executable, "-c", code, *argv],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
            check=True,
        )
        results.append(done.stdout.strip().splitlines()[-1])

    threads = [threading.Thread(target=one, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["present", "saved"], results
    assert len(os.listdir(meet)) == 2, "both boxes uploaded before either wrote its entry"
    assert len(_entries(remote)) == 1
    entry = json.loads(_entries(remote)[0].read_text())
    assert (entry["object"] is None) == (shard_bytes is not None)
    assert [str(p.relative_to(remote)) for p in _objects(remote)] == sorted(objects_of(entry))
    assert not list((remote / "tmp").glob("*")), "no partial object is left"
    subprocess.run(["chmod", "-R", "u+w", str(out)], check=True)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    assert restore(tmp_path / "run3", step, dict(os.environ)).restored


@pytest.mark.slow
def test_the_gcs_emulator_as_the_bucket(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _tree(out)
    before = _listing(out)
    emulator = EmulatorProcess()
    try:
        client(emulator.endpoint).create_bucket("cache-bucket")
        env = {**os.environ, "STORAGE_EMULATOR_HOST": emulator.endpoint}
        step = _step(out, "gs://cache-bucket/boxes")
        step_dir = tmp_path / "run" / "steps" / "s"
        step_dir.mkdir(parents=True)
        k = compute_key(tmp_path / "run", step)
        assert Saver(step_dir, step, k, env).run([]) == "saved"
        names = sorted(b.name for b in client(emulator.endpoint).list_blobs("cache-bucket"))
        assert names[0] == f"boxes/entries/{k}.json" and names[1].startswith(f"boxes/objects/{k}/")
        assert len(names) == 2
        subprocess.run(["rm", "-rf", str(out)], check=True)
        attempt = restore(tmp_path / "run2", step, env)
        assert attempt.restored, attempt.reason
    finally:
        emulator.stop()
    assert _listing(out) == before


# ------------------------------------------------------------------------ schema (no box)


def _book(tmp_path: Path, steps: str, top: str = "") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\n{top}steps:\n" + textwrap.indent(textwrap.dedent(steps), "  "))
    return path


@pytest.mark.parametrize(
    ("steps", "message", "line"),
    [
        ("- id: a\n  kind: shell\n  run: x\n  cache: true\n", "must declare its 'outputs'", 6),
        ("- id: a\n  kind: shell\n  run: x\n  outputs: 3\n", "'outputs' must be", 6),
        (
            "- id: a\n  kind: shell\n  run: x\n  outputs: [/o]\n  cache: {facts: [gpu]}\n",
            "unknown box fact 'gpu'",
            7,
        ),
        (
            "- id: a\n  kind: shell\n  run: x\n  outputs: [/o]\n  cache: {ttl: 3}\n",
            "unknown key 'ttl' in cache",
            7,
        ),
        (
            "- id: a\n  kind: shell\n  run: x\n  outputs: [/o]\n  secrets: [K]\n  cache: true\n",
            "a step given secrets cannot be cached",
            8,
        ),
        (
            "- id: a\n  kind: shell\n  run: x\n  outputs: [/o]\n  cache: {with: [b]}\n"
            "- id: b\n  kind: shell\n  run: y\n",
            "'b' does not depend on 'a'",
            7,
        ),
    ],
)
def test_bad_cache_declarations_name_file_line_and_step(
    tmp_path: Path, steps: str, message: str, line: int
) -> None:
    with pytest.raises(ConfigError) as info:
        load_playbook(_book(tmp_path, steps))
    text = str(info.value)
    assert message in text and f"p.yaml:{line}" in text and "step 'a'" in text, text


@pytest.mark.slow
def test_a_relative_output_path_is_bad_input(
    tmp_path: Path, controller_env: dict[str, str]
) -> None:
    proj = Project(tmp_path / "proj", controller_env)
    proj.playbook(
        """\
        name: rel
        steps:
          - id: a
            kind: shell
            run: "true"
            outputs: [out/dir]
            cache: true
        """
    )
    line = one_line_error(proj.cli("plan", "local", "-p", "playbooks/test.yaml"))
    assert "test.yaml:6" in line and "'a'" in line and "absolute or start with ~" in line, line


# ------------------------------------------------------------------------- runs on boxes

PLAYBOOK = """\
name: cachetest
vars:
  lock: v1
  shared: {shared}
cache: {{remote: "{{{{ cache_remote }}}}"}}
steps:
  - id: src
    kind: shell
    run: mkdir -p ~/src && echo "{{{{ lock }}}}" > ~/src/uv.lock && echo src >> ~/count-src
    done_when: grep -qx "{{{{ lock }}}}" ~/src/uv.lock
    outputs: [~/src]
  - id: build
    kind: shell
    needs: [src]
    run: |
      echo build >> ~/count-build
      mkdir -p {{{{ shared }}}}/out
      sha256sum ~/src/uv.lock | cut -c1-64 > {{{{ shared }}}}/out/lock-sha
      {{{{ verify_extra | default('') }}}}
    done_when: >-
      test "$(cat {{{{ shared }}}}/out/lock-sha)" = "$(sha256sum ~/src/uv.lock | cut -c1-64)"
    outputs: ["{{{{ shared }}}}/out"]
    cache: {{facts: [python, arch], inputs: [~/src/uv.lock], with: [finish]}}
  - id: finish
    kind: shell
    needs: [build]
    run: echo finish >> ~/count-finish && echo finished > {{{{ shared }}}}/out/finished
    creates: "{{{{ shared }}}}/out/finished"
  - id: use
    kind: shell
    needs: [finish]
    run: cat {{{{ shared }}}}/out/lock-sha {{{{ shared }}}}/out/finished && echo use >> ~/count-use
"""


@pytest.fixture
def cached(tmp_path: Path, controller_env: dict[str, str], box_factory: Any) -> Project:
    shared = tmp_path / "shared"
    shared.mkdir()
    proj = Project(tmp_path / "project", controller_env, box_factory(2))
    proj.host_vars = {"cache_remote": str(tmp_path / "bucket")}
    proj.playbook(PLAYBOOK.format(shared=shared))
    return proj


def _saved(proj: Project, target: str) -> dict[str, Any]:
    def state() -> Any:
        info = proj.steps(target)["build"].get("cache") or {}
        return info if info.get("state") in ("saved", "present", "failed", "skipped") else None

    return wait_for(state, timeout=60, what="the cache save")  # type: ignore[no-any-return]


def _plan(proj: Project, target: str, *extra: str) -> dict[str, str]:
    done = proj.cli("plan", target, "-p", "playbooks/test.yaml", "--json", *extra)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout.strip().splitlines()[0])
    return {s["id"]: s["reason"] for s in plan["steps"]}


def test_a_second_box_restores_and_verifies_instead_of_running(
    cached: Project, tmp_path: Path
) -> None:
    box1, box2 = cached.boxes
    out = tmp_path / "shared" / "out"
    assert _plan(cached, "box1")["build"] == "never ran; cache: the key is known once src ran"
    first = cached.up("box1")
    assert first.returncode == 0, first.stdout + first.stderr
    steps = cached.steps("box1")
    assert "cache miss: key " in steps["build"]["reason"], steps["build"]["reason"]
    saved = _saved(cached, "box1")
    assert saved["state"] == "saved", saved
    assert (count(box1, "build"), count(box1, "finish")) == (1, 1)
    made = _listing(out)
    subprocess.run(["rm", "-rf", str(out)], check=True)  # box2 is another machine
    # On box 1 the key is known now (src is done): the plan says it would restore.
    reason = _plan(cached, "box1")["build"]
    assert "done_when failed" in reason and "; cache hit: restores key " in reason, reason
    assert "the key is known once src ran" in _plan(cached, "box2")["build"]
    second = cached.up("box2")
    assert second.returncode == 0, second.stdout + second.stderr
    steps = cached.steps("box2")
    assert steps["build"]["reason"].startswith("restored from cache (key "), steps["build"]
    assert steps["finish"]["reason"].startswith("already satisfied"), steps["finish"]
    assert (count(box2, "build"), count(box2, "finish"), count(box2, "use")) == (0, 0, 1)
    assert count(box2, "src") == 1, "the upstream step ran: its output is part of the key"
    assert _listing(out) == made
    # Box 2 now holds what box 1 made: a second `up` there does nothing.
    again = cached.up("box2")
    assert again.returncode == 0 and count(box2, "build") == 0

    # The cached archive is truncated, and box 2's outputs are gone: it runs, and its own
    # outputs replace the broken entry.
    remote = Path(cached.host_vars["cache_remote"])
    obj = _objects(remote)[0]
    obj.write_bytes(obj.read_bytes()[:-100])
    subprocess.run(["rm", "-rf", str(out)], check=True)
    third = cached.up("box2")
    assert third.returncode == 0, third.stdout + third.stderr
    reason = cached.steps("box2")["build"]["reason"]
    assert "cached copy unusable" in reason and "corrupt or truncated" in reason, reason
    assert count(box2, "build") == 1
    saved = _saved(cached, "box2")
    assert saved["state"] == "saved", saved
    assert len(_entries(remote)) == 1 and _objects(remote) != [obj]
    assert [str(p.relative_to(remote)) for p in _objects(remote)] == [
        json.loads(_entries(remote)[0].read_text())["object"]
    ]


def test_a_changed_lock_file_or_python_misses_and_runs(cached: Project, tmp_path: Path) -> None:
    box1, box2 = cached.boxes
    out = tmp_path / "shared" / "out"
    assert cached.up("box1").returncode == 0
    assert _saved(cached, "box1")["state"] == "saved"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    # The lock file differs on box 2 (its upstream output too): a miss, and it runs.
    changed = cached.up("box2", extra=["-e", "lock=v2"])
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "cache miss: key " in cached.steps("box2")["build"]["reason"]
    assert count(box2, "build") == 1
    assert _saved(cached, "box2")["state"] == "saved"
    assert len(_entries(Path(cached.host_vars["cache_remote"]))) == 2
    # Another Python runs the agent (the host var box_python): a miss again.
    other_python = _other_python()
    if other_python is None:
        pytest.skip("no Python of another minor version on this machine")
    cached.host_vars["box_python"] = other_python
    subprocess.run(["rm", "-rf", str(out)], check=True)
    other = cached.up("box1")
    assert other.returncode == 0, other.stdout + other.stderr
    reason = cached.steps("box1")["build"]["reason"]
    assert "cache miss: key " in reason, reason
    assert count(box1, "build") == 2
    # `rerun` runs the step, whatever the cache holds.
    rerun = cached.cli("rerun", "box1", "build", "-p", "playbooks/test.yaml")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    reason = cached.steps("box1")["build"]["reason"]
    assert "(rerun: not restored from the cache, saved as key " in reason, reason
    assert count(box1, "build") == 3


def test_a_restored_copy_that_fails_verification_runs(cached: Project, tmp_path: Path) -> None:
    _, box2 = cached.boxes
    out = tmp_path / "shared" / "out"
    remote = Path(cached.host_vars["cache_remote"])
    assert cached.up("box1").returncode == 0
    assert _saved(cached, "box1")["state"] == "saved"
    # The bucket holds a whole archive of wrong outputs (a step that is not deterministic, a
    # bad upload): its hashes match its manifest, so only the verification can tell.
    (out / "lock-sha").write_text("0" * 64 + "\n")
    codec = archive.codec_for("zstd")
    assert codec is not None
    chunks: list[bytes] = []
    packed = archive.pack([str(out)], chunks.append, codec)
    entry_path = _entries(remote)[0]
    entry = json.loads(entry_path.read_text())
    (remote / entry["object"]).write_bytes(b"".join(chunks))
    entry.update(sha256=packed.sha256, md5=packed.md5, packed_bytes=packed.packed_bytes)
    entry_path.write_text(json.dumps(entry))
    subprocess.run(["rm", "-rf", str(out)], check=True)
    result = cached.up("box2")
    assert result.returncode == 0, result.stdout + result.stderr
    reason = cached.steps("box2")["build"]["reason"]
    assert "restored copy failed verification (done_when failed (rc=1)): ran" in reason, reason
    assert count(box2, "build") == 1
    assert (out / "lock-sha").read_text() != "0" * 64 + "\n"
