"""The `bootstrap` command line (typer). The only module that exits.

Commands parse their arguments, build the objects the work needs and render through
`console.py`; what they return or raise becomes the exit code in one place (`exit_codes`):
0 every selected step done; 1 a step failed, errored or is blocked; 2 bad input (config, usage,
unknown target, unreachable host, refused key), printed as one line; 3 a bug in bootstrap, one
line naming the debug log that holds its traceback (see provision/bugs.py).
Heavy modules are imported inside the commands, so `bootstrap --version` starts fast.
"""

# No `from __future__ import annotations`: typer reads every command's annotations at each
# start-up (typing.get_type_hints), and postponed ones would be strings evaluated again each
# time (~25 ms of CPU per command, any command).
import contextlib
import functools
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from provision import __version__
from provision.errors import ProvisionError, TargetError, UsageError

#: The exceptions of the click typer runs on (typer 0.2x vendors its own copy of click).
click = importlib.import_module(typer.BadParameter.__module__)
#: Raised for a bare `bootstrap` by click >= 8.2 (earlier ones print the help and exit).
_NO_ARGS: Any = getattr(click, "NoArgsIsHelpError", ())


def _error(line: str) -> None:
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()


def _usage_line(exc: Any) -> str:
    """A click usage error as one line: what is wrong, and where the command's help is."""
    path = exc.ctx.command_path if exc.ctx is not None else "bootstrap"
    return f"{path}: {exc.format_message()} (see `{path} --help`)"


def exit_codes(body: Callable[[], int | None]) -> Callable[[], int]:
    """The one place where what a command returned or raised becomes its exit code.

    Bad input (a ProvisionError, a usage error) is one line and its code (2); Ctrl-C detaches
    (130); anything else is a bug: one line naming the debug log with its traceback, exit 3.
    """

    @functools.wraps(body)
    def code() -> int:
        try:
            result = body()
        except ProvisionError as exc:
            _error(str(exc))
            return exc.exit_code
        except _NO_ARGS as exc:
            exc.show()
            return int(exc.exit_code)
        except click.UsageError as exc:
            _error(_usage_line(exc))
            return 2
        except typer.Exit as exc:
            return int(exc.exit_code)
        except click.ClickException as exc:
            _error(exc.format_message())
            return int(exc.exit_code)
        except KeyboardInterrupt:
            sys.stderr.write(
                "\ndetached: the run goes on on the box; see `bootstrap status TARGET`\n"
            )
            return 130
        except typer.Abort:
            _error("aborted")
            return 1
        except BrokenPipeError:
            return 1  # the reader went away (`| head`): nothing more can be said to it
        except Exception as exc:
            from provision import bugs

            _error(bugs.report(exc))
            return 3
        return result or 0

    return code


class _Bootstrap(TyperGroup):
    """Runs a command line through `exit_codes` (click's own error boxes never show)."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **_: Any
    ) -> NoReturn:
        argv = list(sys.argv[1:] if args is None else args)

        @exit_codes
        def run() -> int | None:
            with self.make_context(prog_name or "bootstrap", argv) as ctx:
                result = self.invoke(ctx)
            return result if isinstance(result, int) else None

        sys.exit(run())


if TYPE_CHECKING:
    from provision.model import Plan, PlannedStep, Snapshot

app = typer.Typer(
    cls=_Bootstrap,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Take a rented GPU box from nothing to a running, verified training job.",
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PLAYBOOK = Path("playbooks/smoke.yaml")
DEFAULT_INVENTORY = Path("inventory.yaml")

PlaybookOpt = Annotated[
    Path | None,
    typer.Option("-p", "--playbook", help="playbook file [default: playbooks/smoke.yaml]"),
]
InventoryOpt = Annotated[
    Path | None,
    typer.Option("-i", "--inventory", help="inventory file [default: ./inventory.yaml]"),
]
TargetsArg = Annotated[
    list[str], typer.Argument(help="host, group, local, user@host[:port], or a pasted ssh command")
]
TagsOpt = Annotated[
    list[str] | None,
    typer.Option("--tags", "-t", help="run only steps with these tags (and what they need)"),
]
VarsOpt = Annotated[
    list[str] | None, typer.Option("--var", "-e", help="extra var NAME=VALUE (highest precedence)")
]
AuthWaitOpt = Annotated[
    float,
    typer.Option(
        "--auth-wait",
        min=0,
        help="seconds to keep retrying a refused ssh key (a new vast.ai box installs it late)",
    ),
]
KeyOpt = Annotated[
    bool,
    typer.Option("--accept-new-host-key", help="forget a changed host key and trust the new one"),
]
# Renting on vast.ai (`rent`, `up --rent`).
CountOpt = Annotated[int, typer.Option("--count", "-n", min=1, help="boxes to rent")]
MaxPriceOpt = Annotated[
    float | None, typer.Option("--max-price", help="highest $/h per box (disk included)")
]
InterruptibleOpt = Annotated[
    bool, typer.Option("--interruptible", help="rent interruptible (spot) boxes; needs --bid")
]
BidOpt = Annotated[float | None, typer.Option("--bid", help="bid $/h per box (interruptible)")]
DiskOpt = Annotated[float, typer.Option("--disk", min=1, help="disk GB per box")]
ImageOpt = Annotated[
    str | None, typer.Option("--image", help="docker image [default: vastai/base-image]")
]
LabelOpt = Annotated[
    str | None, typer.Option("--label", help="target name (NAME-1.. with --count) [vast-ID]")
]
BudgetOpt = Annotated[
    float | None,
    typer.Option(
        "--budget", help="stop renting once $ spent (all boxes rented here) would pass it"
    ),
]
CheckEveryOpt = Annotated[
    float, typer.Option("--check-every", min=1, help="seconds between keep-alive checks")
]
SshKeyOpt = Annotated[
    Path | None,
    typer.Option("--key", help="private ssh key whose .pub is attached [~/.ssh/id_ed25519]"),
]


def _version(value: bool) -> None:
    if value:
        print(f"bootstrap {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="show the version")
    ] = False,
) -> None:
    """Take a rented GPU box from nothing to a running, verified training job."""


def _playbook_path(path: Path | None) -> Path:
    if path is not None:
        return path
    if DEFAULT_PLAYBOOK.exists():
        return DEFAULT_PLAYBOOK
    return REPO / DEFAULT_PLAYBOOK


def _extra_vars(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        # A name jinja cannot reference (empty, `a-b`, `1x`) would be silently unused.
        if not eq or not name.strip().isidentifier():
            raise ProvisionError(f"--var expects NAME=VALUE with NAME an identifier, got '{item}'")
        out[name.strip()] = value
    return out


def _load_inventory(path: Path | None) -> Any:
    """The inventory named by -i (it must exist), else ./inventory.yaml when there is one."""
    from provision.inventory import load_inventory

    if path is not None and not path.exists():
        raise ProvisionError(f"{path}: no such inventory file")
    return load_inventory(path if path is not None else DEFAULT_INVENTORY)


def _inventory_given(path: Path | None) -> None:
    """`-i` on a command that reads nothing from an inventory: the file must still be valid
    (so one `-i` works on every command, and a wrong one is not silently ignored)."""
    if path is not None:
        _load_inventory(path)


class Loaded:
    """Playbook, inventory and hosts for a command."""

    def __init__(
        self,
        playbook: Path | None,
        inventory: Path | None,
        targets: list[str] | None,
        on_hosts: Callable[[list[Any]], None] | None = None,
    ) -> None:
        """`on_hosts` gets the targets as soon as they are known, before the playbook loads
        (`up` starts their ssh handshakes there)."""
        from provision.inventory import resolve_targets

        self.inventory = _load_inventory(inventory)
        _add_rented(self.inventory)
        self.playbook_path = _playbook_path(playbook)
        if not self.playbook_path.exists():
            raise ProvisionError(f"{self.playbook_path}: no such playbook file")
        self.hosts = resolve_targets(targets, self.inventory) if targets is not None else []
        if on_hosts is not None:
            on_hosts(self.hosts)
        from provision.playbook import load_playbook

        self.book = load_playbook(self.playbook_path)

    def plans(self, tags: list[str] | None, extra: dict[str, Any]) -> "dict[str, Plan]":
        from provision.playbook import resolve

        return {
            h.name: resolve(self.book, self.inventory, h, tags=tags, extra_vars=extra)
            for h in self.hosts
        }


def _add_rented(inventory: Any) -> None:
    """Boxes rented by `bootstrap rent` are targets by name (an inventory host wins)."""
    from provision.inventory import Host
    from provision.rent.store import rented

    for name, box in rented().items():
        inventory.hosts.setdefault(name, Host(name=name, **box.host_entry()))


def _redactor(values: list[str]) -> Any:
    """What hides the command's secret values on the terminal (and in the debug log)."""
    from provision import bugs
    from provision.agent.redact import Redactor

    bugs.register_secrets(values)
    return Redactor(values)


def _open_early(
    opened: dict[str, Any], accept_new: bool, auth_wait: float
) -> Callable[[list[Any]], None]:
    """A `Loaded` hook that starts each target's ssh handshake at once (its Box into
    `opened`)."""
    from provision import controller

    def start(hosts: list[Any]) -> None:
        for host in hosts:
            opened[host.name] = controller.connect_early(host, accept_new, auth_wait)

    return start


@dataclass
class Boxes:
    """What per-box work gave: each box's result, or its one-line error (`bugs`: the boxes
    whose error is a bug, its traceback in the debug log)."""

    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    bugs: set[str] = field(default_factory=set)

    @property
    def code(self) -> int:
        """3 if a box hit a bug, 2 if one could not do the work (bad input, unreachable)."""
        return 3 if self.bugs else 2 if self.errors else 0


def _each_box(
    hosts: list[Any],
    work: Any,
    accept_new: bool = False,
    auth_wait: float = 0.0,
    opened: dict[str, Any] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> Boxes:
    """Run `work(box)` for every host in parallel (on the boxes `opened` early, when given).
    `meanwhile` runs here once the boxes' threads started.

    Each box is on its own: whatever goes wrong with one is reported for it, and the others
    carry on (a bug hit by one box included, rather than dropping it from the summary).
    """
    from provision import bugs
    from provision.controller import connect

    done = Boxes()
    early = opened or {}

    def one(host: Any) -> None:
        try:
            box = early.get(host.name) or connect(host, accept_new, auth_wait)
            done.results[host.name] = work(box)
        except ProvisionError as exc:
            done.errors[host.name] = str(exc)
        except Exception as exc:
            done.errors[host.name] = bugs.report(exc, box=host.name)
            done.bugs.add(host.name)

    threads = [threading.Thread(target=one, args=(h,), daemon=True) for h in hosts]
    for t in threads:
        t.start()
    if meanwhile is not None:
        meanwhile()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.2)
    return done


def _exit_for(finals: "dict[str, Snapshot]", boxes: Boxes | None = None) -> int:
    from provision.model import StepStatus

    if boxes is not None and boxes.code:
        return boxes.code
    if any(snap.runner_error for snap in finals.values()):
        return 3  # a bug in bootstrap: the runner on the box crashed
    for snap in finals.values():
        for step in snap.steps:
            if step.status not in (StepStatus.DONE, StepStatus.SKIPPED):
                return 1
    return 0


class _LateView:
    """`up`'s live view, made once the plans are on their way: the console imports rich (~30 ms
    of CPU), which the boxes' answer would otherwise wait for. A snapshot that comes first
    waits for the view."""

    def __init__(self, redact: Any, expected: dict[str, dict[str, float]]) -> None:
        self.redact = redact
        self.expected = expected
        self.out: Any = None
        self._view: Any = None
        self._ready = threading.Event()
        self._stack = contextlib.ExitStack()

    def open(self) -> None:
        """Make the view (in the main thread, while the boxes' threads wait on the network)."""
        try:
            from provision import console

            self.out = console.Out(self.redact)
            self._view = self._stack.enter_context(
                console.RunView(self.out, expected=self.expected)
            )
        finally:
            self._ready.set()

    def update(self, host: str, snap: "Snapshot") -> None:
        """Take a box's snapshot (from its thread)."""
        self._ready.wait()
        if self._view is not None:
            self._view.update(host, snap)

    def close(self) -> None:
        """End the live view (its last frame stays on the terminal)."""
        self._stack.close()


def _run_up(
    targets: list[str],
    playbook: Path | None,
    inventory: Path | None,
    tags: list[str] | None,
    variables: list[str] | None,
    detach: bool,
    accept_new: bool,
    auth_wait: float,
    reset: dict[str, Any] | None = None,
) -> int:
    opened: dict[str, Any] = {}
    loaded = Loaded(playbook, inventory, targets, _open_early(opened, accept_new, auth_wait))
    from provision import controller, timings

    if reset is not None:
        loaded.book.step(reset["step"])
    plans = loaded.plans(tags, _extra_vars(variables))
    secrets = {name: controller.secrets_for(plan, loaded.inventory) for name, plan in plans.items()}
    names = {plan.name for plan in plans.values()}
    view = _LateView(
        _redactor([v for s in secrets.values() for v in s.values()]),
        {n: timings.expected(n) for n in names},
    )
    try:
        boxes = _each_box(
            loaded.hosts,
            lambda box: controller.up(
                box,
                plans[box.name],
                secrets[box.name],
                reset=reset,
                detach=detach,
                on_snapshot=view.update,
                on_notice=_notice,
            ),
            accept_new,
            auth_wait,
            opened,
            meanwhile=view.open,
        )
    finally:
        view.close()
    from provision import console

    out = view.out
    finals = boxes.results
    for snap in finals.values():
        timings.record(snap.run, snap.steps)
    if detach:
        for host in finals:
            console.wait_hint(
                out, f"{host}: running on the box; follow with: bootstrap status {host} --watch"
            )
        console.print_summary(out, {}, boxes.errors)
        return boxes.code
    console.print_summary(out, finals, boxes.errors)
    _crashes(out, finals)
    return _exit_for(finals, boxes)


def _notice(host: str, text: str) -> None:
    """What a box says about the run itself (it waits for another plan's run to end)."""
    sys.stderr.write(f"{host}: {text}\n")


def _crashes(out: Any, snaps: "dict[str, Snapshot]") -> None:
    """One line per box whose runner crashed, naming the log that holds the traceback, and
    one per notice about the run itself (a damaged state kept aside)."""
    for host, snap in snaps.items():
        for notice in snap.notices:
            sys.stderr.write(f"warning: {host}: {notice}\n")
        if snap.runner_error:
            out.error(f"{host}: {snap.runner_error}")


def _up_and_end(*args: Any) -> NoReturn:
    """`_run_up`, then end the process without the interpreter's teardown: freeing typer's,
    rich's and jinja2's modules costs tens of ms of CPU a no-op `up` would wait for, and `up`
    has nothing left to clean up by then (its threads ended, its files are written, its
    output is flushed here). An exception goes on to `exit_codes` as from any command."""
    code = _run_up(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


@app.command()
def up(
    targets: Annotated[
        list[str] | None,
        typer.Argument(help="host, group, local, user@host[:port], or a pasted ssh command"),
    ] = None,
    playbook: PlaybookOpt = None,
    inventory: InventoryOpt = None,
    tags: TagsOpt = None,
    var: VarsOpt = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="start and return at once")
    ] = False,
    accept_new_host_key: KeyOpt = False,
    auth_wait: AuthWaitOpt = 60.0,
    rent: Annotated[
        str | None,
        typer.Option("--rent", help="rent box(es) on vast.ai matching this query, then run there"),
    ] = None,
    count: CountOpt = 1,
    max_price: MaxPriceOpt = None,
    interruptible: InterruptibleOpt = False,
    bid: BidOpt = None,
    disk: DiskOpt = 50.0,
    image: ImageOpt = None,
    label: LabelOpt = None,
    budget: BudgetOpt = None,
    key: SshKeyOpt = None,
    keep_alive: Annotated[
        bool,
        typer.Option(
            "--keep-alive", help="with --rent: replace a rented box stopped or offline, rerun there"
        ),
    ] = False,
    check_every: CheckEveryOpt = 60.0,
) -> int:
    """Run the playbook on the targets (on the box: closing the laptop does not stop it)."""
    if rent is None and not targets:
        raise UsageError("up needs a target (or --rent QUERY to rent one on vast.ai)")
    if keep_alive and rent is None:
        raise UsageError(
            "--keep-alive is for rented boxes: add --rent QUERY (or use monitor TARGET --watch)"
        )
    if rent is not None:
        options = dict(count=count, max_price=max_price, interruptible=interruptible, bid=bid,
                       disk_gb=disk, image=image, label=label, budget=budget, key=key)  # fmt: skip
        watch = check_every if keep_alive else None
        return _rent_up(
            rent, options, targets or [], playbook, inventory, tags, var, detach,
            auth_wait, watch,
        )  # fmt: skip
    _up_and_end(
        targets or [], playbook, inventory, tags, var, detach, accept_new_host_key, auth_wait
    )


@app.command()
def rerun(
    targets_and_step: Annotated[
        list[str], typer.Argument(metavar="TARGET... STEP", help="hosts or groups, then a step id")
    ],
    only: Annotated[
        bool, typer.Option("--only", help="rerun just STEP, not what depends on it")
    ] = False,
    playbook: PlaybookOpt = None,
    inventory: InventoryOpt = None,
    tags: TagsOpt = None,
    var: VarsOpt = None,
    detach: Annotated[bool, typer.Option("--detach", "-d")] = False,
    accept_new_host_key: KeyOpt = False,
    auth_wait: AuthWaitOpt = 60.0,
) -> int:
    """Mark STEP (and everything downstream) pending on each target and run again."""
    if len(targets_and_step) < 2:
        raise UsageError("rerun needs a target and a step: bootstrap rerun TARGET... STEP")
    *targets, step = targets_and_step
    reset = {"step": step, "only": only}
    return _run_up(
        targets, playbook, inventory, tags, var, detach, accept_new_host_key, auth_wait,
        reset,
    )  # fmt: skip


def _status(
    targets: list[str],
    playbook: Path | None,
    inventory: Path | None,
    as_json: bool,
    watch: bool,
    interval: float,
    lines: int,
    auth_wait: float,
) -> int:
    import time

    from provision import console, controller

    loaded = Loaded(playbook, inventory, targets)
    run = loaded.book.name if playbook is not None else None
    out = console.Out()
    while True:
        boxes = _each_box(
            loaded.hosts, lambda box: controller.status(box, run, lines), auth_wait=auth_wait
        )
        snaps = boxes.results
        ordered = [snaps[h.name] for h in loaded.hosts if h.name in snaps]
        if as_json:
            for snap in ordered:
                print(json.dumps(snap.to_json()), flush=True)
        else:
            if watch:
                out.console.clear()
            console.print_status(out, ordered, verbose_tail=3)
        for message in boxes.errors.values():
            out.error(message)
        _crashes(out, snaps)
        if not watch:
            return _exit_for(snaps, boxes)
        time.sleep(interval)


@app.command()
def status(
    targets: TargetsArg,
    playbook: PlaybookOpt = None,
    inventory: InventoryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per host")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="refresh until interrupted")] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=1, max=30, help="seconds between refreshes")
    ] = 2.0,
    lines: Annotated[int, typer.Option("--lines", "-n", help="log lines per step")] = 10,
    auth_wait: AuthWaitOpt = 0.0,
) -> int:
    """Show every step of the run on the targets (one SSH round trip each)."""
    return _status(targets, playbook, inventory, as_json, watch, interval, lines, auth_wait)


def _logs(
    target: str, step: str, playbook: Path | None, inventory: Path | None, lines: int, follow: bool
) -> int:
    from provision import console, controller

    loaded = Loaded(playbook, inventory, [target])
    run = loaded.book.name if playbook is not None else None
    out = console.Out()
    for text in controller.logs(controller.connect(loaded.hosts[0]), run, step, lines, follow):
        out.raw(text)
    return 0


@app.command()
def logs(
    target: Annotated[str, typer.Argument(help="host")],
    step: Annotated[str, typer.Argument(help="step id")],
    playbook: PlaybookOpt = None,
    inventory: InventoryOpt = None,
    lines: Annotated[int, typer.Option("--lines", "-n")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
) -> int:
    """Print or follow a step's log."""
    return _logs(target, step, playbook, inventory, lines, follow)


def _plan(
    targets: list[str],
    playbook: Path | None,
    inventory: Path | None,
    tags: list[str] | None,
    variables: list[str] | None,
    as_json: bool,
) -> int:
    from provision import console, controller

    loaded = Loaded(playbook, inventory, targets)
    plans = loaded.plans(tags, _extra_vars(variables))
    secrets = {name: controller.secrets_for(plan, loaded.inventory) for name, plan in plans.items()}
    out = console.Out(_redactor([v for s in secrets.values() for v in s.values()]))
    boxes = _each_box(
        loaded.hosts, lambda box: controller.plan(box, plans[box.name], secrets[box.name])
    )
    results = boxes.results
    for host in loaded.hosts:
        if host.name in results:
            if as_json:
                print(json.dumps(dict(results[host.name], host=host.name)))
            else:
                console.print_plan(out, host.name, results[host.name])
    for message in boxes.errors.values():
        out.error(message)
    return boxes.code


@app.command()
def plan(
    targets: TargetsArg,
    playbook: PlaybookOpt = None,
    inventory: InventoryOpt = None,
    tags: TagsOpt = None,
    var: VarsOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> int:
    """Say, step by step, what `up` would do and why; change nothing on the box."""
    return _plan(targets, playbook, inventory, tags, var, as_json)


def _graph(playbook: Path | None, inventory: Path | None, fmt: str) -> int:
    from provision import console, dag, timings

    book = Loaded(playbook, inventory, None).book
    ids = {s.id for s in book.steps}
    needs = {k: [n for n in v if n in ids] for k, v in book.needs.items()}
    # Measured on earlier runs of this playbook (the boxes `up` followed), else `estimate:`.
    measured = timings.expected(book.name)
    estimate = {s.id: measured.get(s.id, float(s.raw.get("estimate") or 0)) for s in book.steps}
    steps = [(s.id, s.kind) for s in book.steps]
    critical = dag.critical_path(needs, estimate)
    lines = console.graph_lines(book.name, steps, needs, estimate, critical, fmt)
    console.print_tree(console.Out(), lines)
    return 0


@app.command()
def graph(
    playbook: PlaybookOpt = None,
    inventory: InventoryOpt = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="tree | mermaid | dot")] = "tree",
) -> int:
    """Draw the playbook's DAG with its critical path (measured durations, else `estimate:`)."""
    if fmt not in ("tree", "mermaid", "dot"):
        raise UsageError("--format must be tree, mermaid or dot")
    return _graph(playbook, inventory, fmt)


def _kinds(name: str | None) -> int:
    from provision import console
    from provision.steps.registry import get_kind, kind_example, kind_names

    out = console.Out()
    if name is None:
        kinds = [(n, get_kind(n)) for n in kind_names()]
        console.print_kinds(out, [(n, kind.summary) for n, kind in kinds if kind is not None])
        return 0
    kind = get_kind(name)
    if kind is None:
        raise ProvisionError(f"no kind '{name}' (kinds: {', '.join(kind_names())})")
    console.print_kind(out, name, kind, kind_example(name))
    return 0


@app.command()
def kinds(
    name: Annotated[str | None, typer.Argument(help="a kind to describe")] = None,
    inventory: InventoryOpt = None,
) -> int:
    """List step kinds, or describe one with its params and an example."""
    _inventory_given(inventory)
    return _kinds(name)


def _forget(target: str, inventory: Path | None) -> int:
    from provision import console, controller

    out = console.Out()
    for label, forgot in controller.forget_host_keys(target, _load_inventory(inventory)):
        out.line(f"{'forgot' if forgot else 'no key stored for'} {label}")
    return 0


@app.command()
def forget(
    target: Annotated[
        str, typer.Argument(help="HOST[:PORT], or an inventory host or group, to forget")
    ],
    inventory: InventoryOpt = None,
) -> int:
    """Forget a host's trusted key (after vast.ai gave its address to a new box)."""
    return _forget(target, inventory)


def _check(targets: list[str], playbook: Path | None, inventory: Path | None, as_json: bool) -> int:
    from provision import console, controller
    from provision.launches import preflight_step

    loaded = Loaded(playbook, inventory, targets)
    plans = loaded.plans(None, {})

    def preflight(name: str) -> "PlannedStep":
        return preflight_step(plans[name])

    out = console.Out()
    boxes = _each_box(
        loaded.hosts,
        lambda box: controller.check(
            box,
            preflight(box.name).params,
            preflight(box.name).env,
            plans[box.name].name,
        ),
    )
    reports = boxes.results
    for host in loaded.hosts:
        if host.name not in reports:
            continue
        report = reports[host.name]
        if as_json:
            print(json.dumps(dict(report, host=host.name)))
        else:
            console.print_check(out, host.name, report)
    for message in boxes.errors.values():
        _error(message)
    if boxes.code:
        return boxes.code
    return 0 if all(r["ok"] for r in reports.values()) else 1


@app.command()
def check(
    targets: TargetsArg,
    playbook: PlaybookOpt = None,
    inventory: InventoryOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> int:
    """Preflight the boxes: GPUs (ERR! rows fail), disk, RAM and cores, python, tmux."""
    return _check(targets, playbook, inventory, as_json)


def _monitor(
    target: str,
    playbook: Path | None,
    inventory: Path | None,
    step_id: str | None,
    batch_size: int | None,
    as_json: bool,
    watch: bool,
    interval: float,
) -> int:
    import time

    from provision import console, controller
    from provision.launches import launch_step, preflight_checkpoints
    from provision.monitor.alerts import expectation_alerts, monitor_settings

    loaded = Loaded(playbook, inventory, [target])
    host = loaded.hosts[0]
    plan = loaded.plans(None, {})[host.name]
    step = launch_step(plan, step_id)
    context_vars = {**loaded.book.vars, **loaded.inventory.vars, **host.vars}
    try:
        expect, thresholds = monitor_settings(context_vars, step.id)
    except ValueError as exc:
        raise ProvisionError(f"{loaded.playbook_path}: {exc}") from None
    batch = batch_size or context_vars.get("global_batch_size")
    box = controller.connect(host)
    keep = _keeper(target, loaded.playbook_path, inventory) if watch else None
    release = _releaser(target, inventory) if watch else None
    checkpoints = preflight_checkpoints(plan)
    while True:
        try:
            snap = controller.monitor(
                box, plan.name, step, batch, thresholds, step.env, checkpoints
            )
        except TargetError:
            if keep is None or not keep():
                raise
            box = controller.connect(Loaded(playbook, inventory, [target]).hosts[0])
            continue
        snap["alerts"] = snap.get("alerts", []) + [
            a.to_dict() for a in expectation_alerts(snap, expect)
        ]
        if as_json:
            print(json.dumps(dict(snap, host=host.name, step=step.id)), flush=True)
        else:
            console.print_monitor(console.Out(), host.name, step.id, snap)
        if not watch:
            return 1 if snap.get("alerts") else 0
        if release is not None and release(snap.get("watch")):
            return 0  # on_finish: destroy, and it was: nothing left to watch
        time.sleep(interval)
        if keep is not None and keep():
            box = controller.connect(Loaded(playbook, inventory, [target]).hosts[0])


def _releaser(target: str, inventory: Path | None) -> Any:
    """For a rented target: a check that destroys its box once its job's guard, told
    `on_finish: destroy`, says it may go (keepalive.release), True then; None otherwise."""
    from provision.rent import keepalive, store

    if target not in store.rented():
        return None
    vast, say = _vast(inventory), keepalive.say_once(_say)
    return lambda watch: keepalive.release(vast, target, watch, say)


def _keeper(target: str, playbook: Path, inventory: Path | None) -> Any:
    """For a rented target: a check that replaces its box when lost (stopped, offline) and
    runs the playbook on the new one, True then; None for any other target."""
    from provision.rent import keepalive, store

    if target not in store.rented():
        return None
    vast = _vast(inventory)

    def keep() -> bool:
        if keepalive.check(vast, target, _say) is None:
            return False
        _run_up([target], playbook, inventory, None, None, False, False, 60.0)
        return True

    return keep


@app.command()
def monitor(
    target: Annotated[str, typer.Argument(help="host")],
    playbook: PlaybookOpt = None,
    inventory: InventoryOpt = None,
    step: Annotated[
        str | None, typer.Option("--step", help="the tmux_launch step to watch")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="global batch, for samples/s")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w")] = False,
    interval: Annotated[float, typer.Option("--interval", min=1, max=30)] = 10.0,
) -> int:
    """Training progress (step, loss, s/step, ETA), GPUs, host, and alerts (exit 1 if any)."""
    return _monitor(target, playbook, inventory, step, batch_size, as_json, watch, interval)


def _checkpoints(
    target: str,
    step_id: str | None,
    playbook: Path | None,
    inventory: Path | None,
    only: int | None,
    as_json: bool,
) -> int:
    from provision import console, controller
    from provision.launches import checkpoint_steps

    loaded = Loaded(playbook, inventory, [target])
    host = loaded.hosts[0]
    plan = loaded.plans(None, {})[host.name]
    launches = checkpoint_steps(plan, step_id)
    if not launches:
        which = f"step '{step_id}'" if step_id else "no tmux_launch step"
        raise ProvisionError(f"{loaded.playbook_path}: {which} declares checkpoints")
    step = launches[0]
    env = controller.step_env(step, loaded.inventory)
    report = controller.checkpoints(controller.connect(host), plan.name, step, env)
    if as_json:
        print(json.dumps(dict(report, host=host.name, step=step.id)))
    else:
        console.print_checkpoints(console.Out(), host.name, step.id, report, only)
    failing = (report.get("uploader") or {}).get("failing")
    return 1 if failing or report.get("remote_error") else 0


@app.command()
def checkpoints(
    target: Annotated[str, typer.Argument(help="host")],
    step: Annotated[
        str | None,
        typer.Argument(help="the tmux_launch step (default: the first with checkpoints)"),
    ] = None,
    playbook: PlaybookOpt = None,
    inventory: InventoryOpt = None,
    only: Annotated[
        int | None, typer.Option("--at", help="only the checkpoint of this step")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> int:
    """A job's checkpoints on the box and on its remote: uploaded, partial, verified, broken."""
    return _checkpoints(target, step, playbook, inventory, only, as_json)


def _diagnose(
    source: str,
    as_json: bool,
    playbook: Path | None,
    step_id: str | None,
    variables: list[str] | None,
) -> int:
    from provision.monitor.diagnose import diagnose_command, render_diagnosis

    if step_id is None and (playbook is not None or variables):
        raise ProvisionError("-p/--playbook and -e/--var go with --step STEP (a wait_log step)")
    if source == "-":
        text, name = sys.stdin.read(), "stdin"
    else:
        try:
            text, name = Path(source).read_text(encoding="utf-8", errors="replace"), source
        except OSError as exc:
            raise ProvisionError(f"{source}: {exc.strerror}") from None
    if step_id is not None:
        return _diagnose_step(text, name, as_json, playbook, step_id, variables)
    matches = diagnose_command(text)
    if as_json:
        print(json.dumps([m.to_dict() for m in matches]))
    else:
        sys.stdout.write(render_diagnosis(matches, name))
    return 0 if matches else 1


def _diagnose_step(
    text: str,
    name: str,
    as_json: bool,
    playbook: Path | None,
    step_id: str,
    variables: list[str] | None,
) -> int:
    """The log against a wait_log step's markers, the playbook resolved offline."""
    from provision.monitor.diagnose import diagnose_command, render_step_verdict
    from provision.playbook import load_playbook, resolve_step
    from provision.steps.wait_log import check_params

    path = _playbook_path(playbook)
    if not path.exists():
        raise ProvisionError(f"{path}: no such playbook file")
    book = load_playbook(path)
    step = resolve_step(book, step_id, _extra_vars(variables))
    if step.kind != "wait_log":
        waits = ", ".join(s.id for s in book.steps if s.kind == "wait_log") or "none"
        raise ProvisionError(
            f"{path}:{step.line}: step '{step_id}' is a {step.kind} step; --step takes a "
            f"wait_log step ({waits})"
        )
    verdict = check_params(text, step.params, name)
    matches = [] if verdict.met else diagnose_command(text)
    if as_json:
        out = {
            "step": step_id,
            "met": verdict.met,
            "reason": verdict.reason,
            "hint": verdict.hint,
            **verdict.record,
            "known_issues": [m.to_dict() for m in matches],
        }
        print(json.dumps(out))
    else:
        sys.stdout.write(render_step_verdict(step_id, verdict, matches))
    return 0 if verdict.met else 1


@app.command()
def diagnose(
    source: Annotated[str, typer.Argument(help="a log file, or - for stdin")],
    playbook: PlaybookOpt = None,
    step: Annotated[
        str | None,
        typer.Option("--step", help="check the log against this wait_log step's markers"),
    ] = None,
    var: VarsOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    inventory: InventoryOpt = None,
) -> int:
    """Explain a log: the known-issues catalog (exit 1: nothing known), or with --step whether it
    shows that wait_log step's markers (exit 0 met, 1 not met)."""
    _inventory_given(inventory)
    return _diagnose(source, as_json, playbook, step, var)


def _attach(target: str, session: str | None, playbook: Path | None, inventory: Path | None) -> int:
    from provision import controller
    from provision.launches import launch_step
    from provision.steps.tmux_launch import tmux_attach_command

    loaded = Loaded(playbook, inventory, [target])
    host = loaded.hosts[0]
    box = controller.connect(host)
    socket = None
    if session is None:
        # The session the job runs in, as its launch recorded it (the box knows).
        plan = loaded.plans(None, {})[host.name]
        job = controller.launch(box, plan.name, launch_step(plan, None))
        session, socket = str(job["session"]), job.get("socket")
    return controller.interactive(box, tmux_attach_command(session, socket))


@app.command()
def attach(
    target: Annotated[str, typer.Argument(help="host")],
    session: Annotated[
        str | None, typer.Argument(help="tmux session (default: the playbook's)")
    ] = None,
    playbook: PlaybookOpt = None,
    inventory: InventoryOpt = None,
) -> int:
    """Open a training's tmux session interactively over SSH (detach with Ctrl-B D)."""
    return _attach(target, session, playbook, inventory)


def _stats(
    path: str,
    fmt: str,
    schema: str,
    output: str | None,
    action_key: str | None,
    state_key: str | None,
) -> int:
    from provision.stats.command import describe_result, stats_command

    result = stats_command(path, fmt, schema, output, action_key, state_key)
    for line in describe_result(result):
        print(line)
    if output is None:
        print(json.dumps(result["document"], indent=1))
    return 0


@app.command()
def stats(
    path: Annotated[str, typer.Argument(help="an RLDS version dir or a LeRobot dataset root")],
    fmt: Annotated[str, typer.Option("--format", help="rlds | lerobot | auto")] = "auto",
    schema: Annotated[str, typer.Option("--schema", help="ae | vlm | openpi")] = "ae",
    output: Annotated[
        str | None, typer.Option("-o", "--output", help="write the statistics here")
    ] = None,
    action_key: Annotated[str | None, typer.Option("--action-key")] = None,
    state_key: Annotated[str | None, typer.Option("--state-key")] = None,
    inventory: InventoryOpt = None,
) -> int:
    """Dataset statistics without TensorFlow: exact mean/std/min/max/q01/q99 per dimension."""
    _inventory_given(inventory)
    return _stats(path, fmt, schema, output, action_key, state_key)


def _sample_data(output: str, preset: str, episodes: int | None, steps: int | None) -> int:
    from provision.stats.command import sample_data_command

    result = sample_data_command(output, preset, episodes=episodes, steps=steps)
    print(json.dumps(result, default=str, indent=1))
    return 0


@app.command("sample-data")
def sample_data(
    output: Annotated[str, typer.Argument(help="directory to write the dataset into")],
    preset: Annotated[
        str, typer.Option("--preset", help="libero_object | libero_wp | lerobot | lerobot_v3")
    ] = "libero_object",
    episodes: Annotated[int | None, typer.Option("--episodes")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="steps (RLDS) or frames (LeRobot) per episode")
    ] = None,
    inventory: InventoryOpt = None,
) -> int:
    """Write a generated dataset in the runbook's on-disk layout (for trying things out)."""
    _inventory_given(inventory)
    return _sample_data(output, preset, episodes, steps)


# ------------------------------------------------------------------------------ vast.ai


def _vast(inventory: Path | None) -> Any:
    """The vast.ai account, its key from the inventory secret, the environment or vast's file."""
    from provision.rent.vast import Vast, api_key

    inv = _load_inventory(inventory)
    key, _source = api_key(inv.secret)
    return Vast(key)


def _default_key(key: Path | None) -> Path:
    if key is not None:
        return key.expanduser()
    for name in ("id_ed25519", "id_rsa", "id_ecdsa"):
        path = Path.home() / ".ssh" / name
        if path.is_file():
            return path
    return Path.home() / ".ssh" / "id_ed25519"


def _rent_request(query: str, options: dict[str, Any], playbook: str | None = None) -> Any:
    from provision.rent.renter import DEFAULT_IMAGE, Request

    fields = {k: v for k, v in options.items() if k not in ("key", "image", "speed_urls")}
    extra: dict[str, Any] = (
        {"speed_urls": tuple(options["speed_urls"])} if options.get("speed_urls") else {}
    )
    return Request(
        query=query, key=_default_key(options.get("key")), image=options.get("image") or DEFAULT_IMAGE,
        playbook=playbook, **fields, **extra,
    )  # fmt: skip


def _rent(query: str, options: dict[str, Any], inventory: Path | None) -> int:
    from provision.rent.renter import rent as rent_boxes

    boxes = rent_boxes(_vast(inventory), _rent_request(query, options), _say)
    for box in boxes:
        print(f"{box.name}\t{box.user}@{box.host}:{box.port}\tinstance {box.id}\t${box.dph:.3f}/h")
    return 0


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _rent_up(
    query: str,
    options: dict[str, Any],
    targets: list[str],
    playbook: Path | None,
    inventory: Path | None,
    tags: list[str] | None,
    variables: list[str] | None,
    detach: bool,
    auth_wait: float,
    keep_alive: float | None = None,
) -> int:
    from provision.rent.renter import rent as rent_boxes

    book = str(_playbook_path(playbook))
    Loaded(playbook, inventory, None)  # a bad playbook or inventory fails before renting
    boxes = rent_boxes(_vast(inventory), _rent_request(query, options, book), _say)
    names = [b.name for b in boxes]
    _say(f"rented {', '.join(names)}; running {book}")
    code = _run_up(
        [*targets, *names], playbook, inventory, tags, variables, detach, False, auth_wait
    )
    if keep_alive is None:
        return code
    return _keep_alive(names, playbook, inventory, tags, variables, auth_wait, keep_alive)


def _keep_alive(
    names: list[str],
    playbook: Path | None,
    inventory: Path | None,
    tags: list[str] | None,
    variables: list[str] | None,
    auth_wait: float,
    every: float,
) -> int:
    """Until interrupted: replace each rented box that is lost and run the playbook there."""
    import time

    from provision.rent import keepalive

    vast = _vast(inventory)
    _say(f"keeping {', '.join(names)} alive: checking every {every:g}s (Ctrl-C stops watching)")
    say = keepalive.say_once(_say)
    left = list(names)
    while left:
        for name in list(left):
            if keepalive.check(vast, name, _say) is not None:
                _run_up([name], playbook, inventory, tags, variables, False, False, auth_wait)
            elif keepalive.release_when_asked(vast, name, say):  # on_finish: destroy
                left.remove(name)
        if left:
            time.sleep(every)
    return 0


@app.command("rent")
def rent_command(
    query: Annotated[
        str, typer.Argument(help="vast.ai offer filters, e.g. 'gpu_name=RTX_4090 num_gpus>=2'")
    ],
    count: CountOpt = 1,
    max_price: MaxPriceOpt = None,
    interruptible: InterruptibleOpt = False,
    bid: BidOpt = None,
    disk: DiskOpt = 50.0,
    image: ImageOpt = None,
    label: LabelOpt = None,
    budget: BudgetOpt = None,
    key: SshKeyOpt = None,
    order: Annotated[str, typer.Option("--order", help="sort offers, vastai style")] = "dph_total",
    ssh_timeout: Annotated[
        float, typer.Option("--ssh-timeout", min=1, help="seconds for a box to answer SSH")
    ] = 600.0,
    speed_url: Annotated[
        list[str] | None,
        typer.Option("--speed-url", help="URL the download probe reads [pypi.org, GCS]"),
    ] = None,
    min_speed: Annotated[
        float, typer.Option("--min-speed", min=0, help="lowest download Mbit/s")
    ] = 50.0,
    inventory: InventoryOpt = None,
) -> int:
    """Rent vast.ai box(es): best offers, SSH, a fitness check; a bad box is swapped."""
    options = dict(
        count=count, max_price=max_price, interruptible=interruptible, bid=bid, disk_gb=disk,
        image=image, label=label, budget=budget, key=key, order=order, ssh_timeout=ssh_timeout,
        speed_urls=speed_url, min_speed_mbps=min_speed,
    )  # fmt: skip
    return _rent(query, options, inventory)


def _instances(inventory: Path | None, as_json: bool, key: Path | None) -> int:
    from provision import console
    from provision.rent.manage import listing, runs, stopped_warning

    items = listing(_vast(inventory), _default_key(key))
    on_box = runs(items)
    rows = [dict(item.to_dict(), run=on_box.get(item.name)) for item in items]
    if as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        console.print_instances(console.Out(), rows)
    for item in items:
        warning = stopped_warning(item)
        if warning:
            _say(f"warning: {warning}")
    return 0


@app.command()
def instances(
    inventory: InventoryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per instance")] = False,
    key: SshKeyOpt = None,
) -> int:
    """bootstrap's vast.ai instances (from the API: also those rented elsewhere), cost so far."""
    return _instances(inventory, as_json, key)


def _down(target: str, force: bool, playbook: Path | None, inventory: Path | None) -> int:
    from provision.rent import manage, store

    rented = store.rented().get(target)
    book = playbook or (Path(rented.playbook) if rented and rented.playbook else None)

    def unsafe(box: Any) -> str:
        if book is None or not book.exists():
            return manage.run_finished(box)
        why = _checkpoints_unsafe(target, book, inventory)
        return manage.run_finished(box) if why is None else why

    _rented, messages = manage.down(_vast(inventory), target, force, unsafe)
    for message in messages:
        print(message)
    return 0


def _checkpoints_unsafe(target: str, playbook: Path, inventory: Path | None) -> str | None:
    """Why the checkpoints of `target`'s run are not all verified on their remote ('' when
    they are; None when its playbook declares none: then its run must be finished)."""
    from provision import controller
    from provision.launches import checkpoint_steps
    from provision.rent.manage import checkpoints_unsafe

    loaded = Loaded(playbook, inventory, [target])
    host = loaded.hosts[0]
    plan = loaded.plans(None, {})[host.name]
    box = controller.connect(host)
    launches = checkpoint_steps(plan)
    if not launches:
        return None
    for step in launches:
        env = controller.step_env(step, loaded.inventory)
        try:
            why = checkpoints_unsafe(controller.checkpoints(box, plan.name, step, env))
        except ProvisionError as exc:
            why = f"cannot read its checkpoints: {exc}"
        if why:
            return f"step '{step.id}': {why}"
    return ""


@app.command()
def down(
    target: Annotated[str, typer.Argument(help="a rented box's name")],
    force: Annotated[
        bool, typer.Option("--force", help="destroy even if its work is not known to be safe")
    ] = False,
    playbook: PlaybookOpt = None,
    inventory: InventoryOpt = None,
) -> int:
    """Destroy a rented box once its checkpoints are verified on the remote (or, with none
    declared, its run finished); billing stops."""
    return _down(target, force, playbook, inventory)


if __name__ == "__main__":
    app()
