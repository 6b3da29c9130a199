"""The controller's side of every command: ship the agent and the plan, start, follow, read.

One box costs one SSH round trip per command: a small stdlib prelude (`python3 -c`) reads a
header line on stdin, installs the agent zipapp that follows it when the box lacks that version
(the controller remembers what each box has, so usually nothing follows), then hands the rest
of stdin (plan and secrets) to the agent. Versions sit side by side, named by their sha256
(`~/.bootstrap/agents/<sha256>.pyz`; `current.pyz` links the newest): a runner in progress
keeps importing from its own file while a newer controller installs another. `up` keeps that
channel open to stream snapshots; closing it (Ctrl-C, a dropped link) does not stop the run,
which belongs to the box.

Every command reaches the agent that way (`agent_run`, `agent_stream`; the `box_python` host
var names the interpreter), and every agent verb answers as `provision/agent/protocol.py`
says: JSON lines and an exit code; a refusal becomes a TargetError (one line, exit 2), a crash
a BoxBug (a bug: exit 3, the box's traceback in the debug log).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from provision.agent import blobs as agent_blobs
from provision.agent import protocol
from provision.bugs import BoxBug
from provision.bundle import Agent, build_agent
from provision.errors import TargetError
from provision.home import config_dir
from provision.inventory import Host, Inventory
from provision.model import Plan, PlannedStep, Snapshot
from provision.transport import Transport, for_host

_PRELUDE = r"""
import sys,os,json
if sys.version_info<(3,9):
    sys.stdout.write("BOOTSTRAP_OLD_PYTHON %s\n"%sys.version.split()[0]);sys.exit(4)
r=os.environ.get("BOOTSTRAP_AGENT_DIR") or os.path.expanduser("~/.bootstrap")
i=sys.stdin.buffer;h=json.loads(i.readline())
n=os.path.join("agents",h["sha"]+".pyz");p=os.path.join(r,n);have=os.path.exists(p)
if h["len"]:
    d=i.read(h["len"])
    import hashlib
    if hashlib.sha256(d).hexdigest()!=h["sha"]:
        sys.stdout.write("BOOTSTRAP_CUT_AGENT %d %d\n"%(len(d),h["len"]));sys.exit(5)
    if not have and h["ephemeral"]:
        import tempfile;f=tempfile.NamedTemporaryFile(suffix=".pyz");f.write(d);f.flush();p=f.name
    elif not have:
        t=".%d.tmp"%os.getpid();c=os.path.join(r,"current.pyz")
        try:
            os.makedirs(os.path.dirname(p),exist_ok=True)
            f=open(p+t,"wb");f.write(d);f.flush();os.fsync(f.fileno());f.close();os.replace(p+t,p)
            os.symlink(n,c+t);os.replace(c+t,c)
        except OSError as e:
            for x in (p+t,c+t):
                try:
                    os.unlink(x)
                except OSError:
                    pass
            sys.stdout.write("BOOTSTRAP_INSTALL_FAILED %s\n"%e.strerror);sys.exit(6)
elif not have:
    sys.stdout.write("BOOTSTRAP_NEED_AGENT\n");sys.stdout.flush();sys.exit(3)
sys.path.insert(0,p)
from provision.agent.__main__ import main
sys.exit(main(h["argv"]))
"""
_NEED_AGENT = b"BOOTSTRAP_NEED_AGENT"
_OLD_PYTHON = b"BOOTSTRAP_OLD_PYTHON"
_CUT_AGENT = b"BOOTSTRAP_CUT_AGENT"
_NEED_BLOBS = agent_blobs.NEED_BLOBS.encode()
_INSTALL_FAILED = b"BOOTSTRAP_INSTALL_FAILED"


@dataclass
class Box:
    """A host and the transport that reaches it."""

    host: Host
    transport: Transport

    @property
    def name(self) -> str:
        return self.host.name


def connect(host: Host, accept_new_host_key: bool = False, auth_wait: float = 0.0) -> Box:
    """The Box for a host (no connection is made yet); `auth_wait`: seconds to keep retrying
    a refused key (a new vast.ai box installs it a little after it answers)."""
    return Box(host, for_host(host, accept_new_host_key, auth_wait))


def connect_early(host: Host, accept_new_host_key: bool = False, auth_wait: float = 0.0) -> Box:
    """The Box for a host, its connection started now in the background (the handshake
    overlaps the controller's own work; the first command waits for it)."""
    box = connect(host, accept_new_host_key, auth_wait)
    box.transport.open_early()
    return box


# ------------------------------------------------------------------------------ agent shipping


def _cache_file(box: Box) -> Path:
    key = hashlib.sha256(box.host.address.encode()).hexdigest()[:16]
    return config_dir() / "hosts" / f"{key}.agent"


def _box_has(box: Box, agent: Agent) -> bool:
    try:
        return _cache_file(box).read_text().strip() == agent.sha256
    except OSError:
        return False


def _remember(box: Box, agent: Agent) -> None:
    path = _cache_file(box)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(agent.sha256 + "\n")


def _python(box: Box) -> str:
    """The box's interpreter for the agent, shell-quoted (the host var `box_python`)."""
    return shlex.quote(str(box.host.vars.get("box_python", "python3")))


def _blob_cache(box: Box) -> Path:
    return _cache_file(box).with_suffix(".blobs")


def _blobs_sent(box: Box) -> set[str]:
    """The blobs this controller has given the box (see `provision.agent.blobs`)."""
    try:
        return set(_blob_cache(box).read_text().split())
    except OSError:
        return set()


@dataclass
class PlanPayload:
    """A payload that holds a plan: its large params (a rendered 50 MB template) travel by
    sha256 and their bytes only to a box that was not given them before."""

    document: dict[str, Any]
    blobs: dict[str, bytes]

    @classmethod
    def of(cls, plan: Plan, **rest: Any) -> PlanPayload:
        refs, found = agent_blobs.split(plan.to_json())
        return cls({"plan": refs, **rest}, found)

    def encode(self, box: Box, everything: bool) -> bytes:
        sent = set() if everything else _blobs_sent(box)
        return agent_blobs.encode(
            self.document, {sha: data for sha, data in self.blobs.items() if sha not in sent}
        )

    def remember(self, box: Box) -> None:
        """The box holds every blob of this payload now (its agent took the plan)."""
        new = set(self.blobs) - _blobs_sent(box)
        if new:
            path = _blob_cache(box)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("".join(f"{sha}\n" for sha in sorted(new)))


def _payload_bytes(box: Box, payload: bytes | PlanPayload, everything: bool) -> bytes:
    return payload.encode(box, everything) if isinstance(payload, PlanPayload) else payload


def _command(box: Box) -> str:
    # -S: no `site`. The prelude and the agent core import only the standard library, and a
    # no-op pays every millisecond of the box's start-up after the handshake (Debian's python3
    # starts in ~6 ms without site, ~13 with it). The runner and the steps' processes it starts
    # are ordinary interpreters (`sys.executable`, the agent venv's python).
    return f"{_python(box)} -S -c {shlex.quote(_PRELUDE)}"


def _stdin(agent: Agent, argv: list[str], payload: bytes, ship: bool, ephemeral: bool) -> bytes:
    """The header line, the agent when shipped, and the payload."""
    header = {
        "sha": agent.sha256,
        "len": len(agent.data) if ship else 0,
        "argv": argv,
        "ephemeral": ephemeral,
    }
    return json.dumps(header).encode() + b"\n" + (agent.data if ship else b"") + payload


class _Shipment:
    """Ship-and-retry, for both ways of calling the agent: the agent zipapp goes with the
    call only when the box lacks it (a first call says so: NEED_AGENT), and a plan's blobs
    all go when the box lacks some (NEED_BLOBS); each at most once per call."""

    def __init__(self, box: Box, argv: list[str], payload: bytes | PlanPayload, ephemeral: bool):
        self.box, self.argv, self.payload, self.ephemeral = box, argv, payload, ephemeral
        self.agent = build_agent()
        self.ship = not _box_has(box, self.agent)
        self.everything = False

    def stdin(self) -> bytes:
        """What the prelude reads: see `_stdin`."""
        data = _payload_bytes(self.box, self.payload, self.everything)
        return _stdin(self.agent, self.argv, data, self.ship, self.ephemeral)

    def again(self, first_line: bytes) -> bool:
        """Whether the call must be made again with more (the box asked for it)."""
        if first_line.startswith(_NEED_AGENT) and not self.ship:
            self.ship = True
            return True
        if first_line.startswith(_NEED_BLOBS) and not self.everything:
            self.everything = True
            return True
        return False

    def done(self) -> None:
        """The call succeeded: the box holds this agent and the payload's blobs now."""
        if self.ship and not self.ephemeral:
            _remember(self.box, self.agent)
        if isinstance(self.payload, PlanPayload):
            self.payload.remember(self.box)


def _agent_failed(box: Box, verb: str, out: bytes, err: str, step: str | None = None) -> Exception:
    """What a failed agent call is: the agent's refusal or crash (its last JSON line), the
    prelude's own message, or what the shell said."""
    answer = protocol.last_answer(out)
    if answer is not None and answer.get("bug"):
        return BoxBug(box.name, f"{verb}: {answer.get('error')}", err, step)
    if answer is not None and answer.get("error"):
        return TargetError(f"{box.name}: {answer['error']}")
    if out.startswith(_OLD_PYTHON):
        version = out.split()[1].decode() if len(out.split()) > 1 else "?"
        return TargetError(f"{box.name}: python3 on the box is {version}; bootstrap needs >= 3.9")
    if out.startswith(_INSTALL_FAILED):
        why = out[len(_INSTALL_FAILED) :].decode("utf-8", "replace").strip()
        return TargetError(f"{box.name}: cannot install the agent on the box: {why}")
    if out.startswith(_CUT_AGENT):
        # The prelude installs nothing it cannot verify: a dropped link leaves the old agent.
        return TargetError(f"{box.name}: the agent upload was cut short; run the command again")
    # The shell's own words (bash, dash), not any traceback's FileNotFoundError.
    if re.search(r"python[\d.]*: (command not found|not found|No such file or directory)", err):
        return TargetError(
            f"{box.name}: no python3 on the box (install python3, or set the host var box_python)"
        )
    if "Traceback (most recent call last)" in err:
        # Crashed before its answer could be written (an import in the zipapp).
        last = err.strip().splitlines()[-1]
        return BoxBug(box.name, f"{verb}: {last}", err, step)
    tail = " | ".join(err.strip().splitlines()[-3:]) or out.decode("utf-8", "replace")[-300:]
    return TargetError(f"{box.name}: the agent failed: {tail}")


def agent_run(
    box: Box,
    argv: list[str],
    payload: bytes | PlanPayload = b"",
    *,
    ephemeral: bool = False,
    timeout: float = 120,
    step: str | None = None,
) -> dict[str, Any]:
    """Run an agent verb to completion; its answer (the last JSON line it printed). Raises
    TargetError when it refused, BoxBug when it crashed (naming `step`, the step it was
    asked about)."""
    call = _Shipment(box, argv, payload, ephemeral)
    while True:
        result = box.transport.run(_command(box), call.stdin(), timeout)
        if not call.again(result.stdout):
            break
    answer = protocol.last_answer(result.stdout)
    if result.rc != protocol.ANSWERED or answer is None:
        raise _agent_failed(box, argv[0], result.stdout, result.stderr, step)
    call.done()
    return answer


def agent_stream(
    box: Box, argv: list[str], payload: bytes | PlanPayload = b"", step: str | None = None
) -> Iterator[dict[str, Any]]:
    """Run an agent verb and yield the JSON lines it prints, as they come; a refusal or a
    crash raises (TargetError, BoxBug) once the lines before it were yielded."""
    call = _Shipment(box, argv, payload, False)
    while True:
        proc = box.transport.stream(_command(box), call.stdin())
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if call.again(first):
            proc.wait()
            continue
        break
    last = first  # the prelude's message, or the agent's last line (a refusal, a crash)
    ended = False
    try:
        raw = first
        while raw:
            last = raw
            if raw.startswith(b"{"):
                event = json.loads(raw)
                if not _is_failure(event):
                    yield event
            raw = proc.stdout.readline()
        ended = True
    finally:
        # At EOF ssh is about to exit with the remote status: wait for it. Terminating it
        # then would turn a finished command into ssh's 255, read as a dropped connection.
        if not ended and proc.poll() is None:
            proc.terminate()
        proc.wait()
    stderr = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
    box.transport.check_stream(proc, stderr)
    if proc.returncode != protocol.ANSWERED:
        raise _agent_failed(box, argv[0], last, stderr, step)
    call.done()


def _is_failure(event: dict[str, Any]) -> bool:
    """A refusal's or a crash's line (raised at the end), not an event of the answer."""
    return "error" in event and "event" not in event


# ------------------------------------------------------------------------------ commands


def secrets_for(plan: Plan, inv: Inventory) -> dict[str, str]:
    """Values of the secrets the plan's selected steps name (resolved now, on the controller)."""
    names = {n for s in plan.selected for n in s.secrets}
    return {n: inv.secret(n) for n in sorted(names)}


def step_env(step: PlannedStep, inv: Inventory) -> dict[str, str]:
    """A step's environment with the values of the secrets it names (for a command that runs
    on the box on the step's behalf, as `checkpoints` reads its remote)."""
    return {**step.env, **{n: inv.secret(n) for n in step.secrets}}


def up(
    box: Box,
    plan: Plan,
    secrets: dict[str, str],
    *,
    reset: dict[str, Any] | None = None,
    detach: bool = False,
    on_snapshot: Callable[[str, Snapshot], None] | None = None,
    on_notice: Callable[[str, str], None] | None = None,
) -> Snapshot:
    """Ship the plan, start (or attach to) the run, follow it; returns the final snapshot.

    `on_notice` gets what the box says about the run itself (e.g. that it waits for a run of
    another plan to end); a refusal (that run with `detach`, a full disk) raises TargetError.
    """
    payload = PlanPayload.of(plan, secrets=secrets, reset=reset)
    argv = ["up", "--detach"] if detach else ["up"]
    final: Snapshot | None = None
    current: Snapshot | None = None
    for event in agent_stream(box, argv, payload):
        if event.get("event") == "refused":
            raise TargetError(f"{box.name}: {event.get('error')}")
        if event.get("event") == "notice":
            if on_notice is not None:
                on_notice(box.name, str(event.get("message")))
            continue
        # The box sends a snapshot, then only what changes (a 2,000-step run: kilobytes per
        # change, not the whole run each time).
        if event.get("event") == "changes" and current is not None:
            current = current.patched(event)
        else:
            current = Snapshot.from_json(event)
        snap = replace(current, host=box.name, event=event.get("event"))
        if on_snapshot is not None:
            on_snapshot(box.name, snap)
        if event.get("event") == "final" or detach:
            final = snap
    if final is None:
        raise TargetError(f"{box.name}: the connection ended before the run reported its end")
    return final


def status(box: Box, run: str | None, lines: int = 10) -> Snapshot:
    """The run's status on the box, in one round trip."""
    argv = ["status", "-n", str(int(lines)), *(["--run", run] if run else [])]
    return Snapshot.from_json(dict(agent_run(box, argv, timeout=30), host=box.name))


def plan(box: Box, plan: Plan, secrets: dict[str, str]) -> dict[str, Any]:
    """What `up` would do on the box and why; changes nothing there."""
    return agent_run(box, ["plan"], PlanPayload.of(plan, secrets=secrets), ephemeral=True)


def logs(box: Box, run: str | None, step: str, lines: int, follow: bool) -> Iterator[str]:
    """A step's log tail, then (with `follow`) what is appended until its run ends."""
    argv = ["logs", step, "-n", str(int(lines)), *(["--run", run] if run else [])]
    for event in agent_stream(box, argv + (["-f"] if follow else []), step=step):
        yield str(event.get("text", ""))


def check(
    box: Box, params: dict[str, Any], env: dict[str, str], run: str | None = None
) -> dict[str, Any]:
    """Preflight the box (GPUs, disk, RAM, tools, GPU leases of runs other than `run`) with a
    preflight step's params and env."""
    payload = json.dumps({"params": params, "env": env, "run": run}).encode()
    return agent_run(box, ["check"], payload, timeout=60)


def _step_ref(run: str, step: PlannedStep) -> dict[str, Any]:
    """What the agent needs to find a step's job: its run and the step (id, params)."""
    return {"run": run, "step": {"id": step.id, "params": step.params}}


def monitor(
    box: Box,
    run: str,
    step: PlannedStep,
    batch_size: int | None,
    thresholds: dict[str, Any] | None,
    env: dict[str, str],
    checkpoints: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Training progress, GPUs, host and alerts of a tmux_launch step's job in `run`, the disk
    forecast of its checkpoint directory and what its guard saw (`watch`). The box says where
    the job logs (`launch`: from its launch record); `checkpoints` is the plan's preflight
    checkpoint directory, used when the step declares none (see provision/monitor/snapshot.py).
    """
    payload = dict(_step_ref(run, step), batch_size=batch_size, thresholds=thresholds, env=env)
    payload["checkpoints"] = checkpoints
    return agent_run(box, ["monitor"], json.dumps(payload).encode(), timeout=60, step=step.id)


def launch(box: Box, run: str, step: PlannedStep) -> dict[str, Any]:
    """Where a tmux_launch step's job is on the box: log, tmux session and socket, as its
    launch recorded them (`launched`), else where its next launch will put them."""
    payload = json.dumps(_step_ref(run, step)).encode()
    return agent_run(box, ["launch"], payload, timeout=30, step=step.id)


def checkpoints(
    box: Box, run: str | None, step: PlannedStep, env: dict[str, str]
) -> dict[str, Any]:
    """A tmux_launch step's checkpoints on the box and on its remote (see checkpoints/listing)."""
    payload = {"run": run, "step": step.to_json(), "env": env}
    data = json.dumps(payload).encode()
    return agent_run(box, ["checkpoints"], data, timeout=300, step=step.id)


def forget_host_keys(target: str, inv: Inventory) -> list[tuple[str, bool]]:
    """Forget the trusted key of `target` (HOST[:PORT], or an inventory host or group: its
    keys are stored under the host and port it names); (what, whether a key was stored)."""
    from provision.inventory import resolve_targets
    from provision.transport.ssh import parse_forget_target

    if target not in inv.hosts and target not in inv.groups:
        return [(target, for_host(parse_forget_target(target)).forget_host_key())]
    hosts = [h for h in resolve_targets([target], inv) if h.connection != "local"]
    return [(f"{h.name} ({h.address})", for_host(h).forget_host_key()) for h in hosts]


def interactive(box: Box, command: str) -> int:
    """Run a command on the box attached to this terminal (e.g. `tmux attach`)."""
    return box.transport.interactive(command)
