"""Terminal rendering of runs, status, plans and graphs: the only module that imports rich.

Everything printed passes the controller's redactor (secret values and their encodings).
On a terminal `up` shows a live table per box; elsewhere (CI, pipes) it prints one line per
status change, so logs stay readable.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from provision import eta
from provision.agent.units import human_bytes
from provision.model import Snapshot, StepSnapshot, StepStatus

STYLE = {
    "pending": "dim",
    "running": "bold cyan",
    "done": "green",
    "failed": "bold red",
    "error": "bold magenta",
    "blocked": "yellow",
    "skipped": "dim",
}
ICON = {
    "pending": "·",
    "running": "▶",
    "done": "✓",
    "failed": "✗",
    "error": "!",
    "blocked": "⊘",
    "skipped": "-",
}


class Out:
    """Console output with redaction."""

    def __init__(self, redact: Callable[[str], str] = lambda s: s) -> None:
        self.redact = redact
        self.console = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def line(self, text: str, style: str | None = None) -> None:
        self.console.print(escape(self.redact(text)), style=style)

    def cut(self, text: str, style: str | None = None) -> None:
        """One line cut to the terminal's width (a log line in a summary of many steps)."""
        self.console.print(
            escape(self.redact(text)), style=style, no_wrap=True, overflow="ellipsis",
            soft_wrap=False, crop=True,
        )  # fmt: skip

    def error(self, text: str) -> None:
        self.err.print(f"[bold red]error:[/] {escape(self.redact(text))}")

    def raw(self, text: str) -> None:
        sys.stdout.write(self.redact(text))
        sys.stdout.flush()


def _duration(step: StepSnapshot) -> str:
    if step.duration_s is None:
        return ""
    value = float(step.duration_s)
    if value < 60:
        return f"{value:.1f}s"
    return f"{int(value // 60)}m{int(value % 60):02d}s"


def _progress(step: StepSnapshot) -> str:
    p = step.progress or {}
    if not p:
        return ""
    parts = []
    if p.get("percent") is not None:
        parts.append(f"{p['percent']:.0f}%")
    if p.get("done") is not None and p.get("unit") == "B":
        total = f"/{human_bytes(p['total'], sep='')}" if p.get("total") else ""
        parts.append(f"{human_bytes(p['done'], sep='')}{total}")
    if p.get("files_total"):
        parts.append(f"{p.get('files_done', 0)}/{p['files_total']} files")
    if p.get("speed"):
        parts.append(
            f"{human_bytes(p['speed'], sep='')}/s"
            if p.get("unit") == "B"
            else f"{p['speed']:.1f}/s"
        )
    if p.get("message"):
        parts.append(str(p["message"]))
    return " ".join(parts)


def _detail(step: StepSnapshot) -> str:
    if step.status is StepStatus.RUNNING:
        return _progress(step) or (step.log_tail or [""])[-1]
    if step.status.bad:
        return step.reason or ""
    if step.status is StepStatus.DONE and step.warnings:
        return f"{len(step.warnings)} warning(s): {step.warnings[0]}"
    return ""


#: Width of a running step's bar, in cells.
BAR_WIDTH = 20


def _timing(step: StepSnapshot, fallback: Mapping[str, float]) -> eta.StepTiming:
    """What the ETA knows of a snapshot's step: the box's own measure of it first, then what
    this controller saw on other boxes (`fallback`), then the playbook's `estimate:`."""
    expected = step.expected_s
    if step.expected_from != "measured":
        expected = fallback.get(step.id, expected)
    running = step.status is StepStatus.RUNNING
    return eta.StepTiming(
        status=step.status.value,
        elapsed=step.duration_s if running else None,
        expected=None if expected is None else float(expected),
        progress=step.progress,
    )


def eta_line(snap: Snapshot, fallback: Mapping[str, float] | None = None) -> str | None:
    """The run's one line, `step 0 expected in ~4m10s (...)`, from the critical path of what is
    left (None once it is reached, or when a step on the way failed)."""
    steps = snap.steps
    needs = {s.id: list(s.needs) for s in steps}
    timings = {s.id: _timing(s, fallback or {}) for s in steps}
    kinds = {s.id: s.kind for s in steps if s.status is not StepStatus.SKIPPED}
    targets = eta.targets_of(kinds)
    step0 = any(kind == "wait_log" for kind in kinds.values())
    return eta.line(eta.eta(needs, timings, targets), step0)


def _fraction(step: StepSnapshot, timing: eta.StepTiming) -> float | None:
    """How far a running step is, 0..1: bytes, else files, else time against its expected."""
    p = step.progress or {}
    if p.get("total") and p.get("done") is not None:
        return min(float(p["done"]) / float(p["total"]), 1.0)
    if p.get("files_total"):
        return min(float(p.get("files_done") or 0) / float(p["files_total"]), 1.0)
    if timing.expected and timing.elapsed is not None:
        # Time-based: never full before the step says it is done.
        return min(float(timing.elapsed) / timing.expected, 0.99)
    return None


def _running_detail(step: StepSnapshot, fallback: Mapping[str, float], text: str) -> RenderableType:
    """A running step's bar (bytes, rate, time left) beside its progress or last log line."""
    timing = _timing(step, fallback)
    fraction = _fraction(step, timing)
    if fraction is None:
        return text
    left = eta.remaining(timing)
    # The time left first: a narrow terminal cuts the end of the cell.
    words = (f"{eta.human(left)} left · " if left is not None else "") + text
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, width=BAR_WIDTH)
    grid.add_column(overflow="ellipsis", no_wrap=True, ratio=1)
    grid.add_row(ProgressBar(total=1.0, completed=fraction, width=BAR_WIDTH), escape(words))
    return grid


def status_table(
    snap: Snapshot,
    redact: Callable[[str], str],
    fallback: Mapping[str, float] | None = None,
) -> Table:
    """One box's steps as a table (a running step with progress or an expected time: a bar)."""
    title = f"{snap.host} · {snap.run} · runner {snap.runner}"
    # The detail (a log line, a reason) takes the width the other columns leave and is cut
    # with an ellipsis: a long log line never squeezes the step's id and status away.
    table = Table(title=escape(title), title_justify="left", expand=True, show_edge=False)
    table.add_column("step", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("tries", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("detail", overflow="ellipsis", no_wrap=True, ratio=1)
    for step in snap.steps:
        status = step.status.value
        detail: RenderableType = escape(redact(_detail(step)))
        if step.status is StepStatus.RUNNING:
            detail = _running_detail(step, fallback or {}, redact(_detail(step)))
        table.add_row(
            escape(step.id),
            Text(f"{ICON.get(status, '?')} {status}", style=STYLE.get(status, "")),
            str(step.attempts or ""),
            _duration(step),
            detail,
        )
    return table


class RunView:
    """Live progress of `up` over one or more boxes."""

    def __init__(
        self,
        out: Out,
        live: bool | None = None,
        expected: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        """`expected`: per playbook (run) name, the step durations this controller saw on
        other boxes, for the ETA where the box has measured nothing yet."""
        self.out = out
        self.expected = expected or {}
        self.etas: dict[str, str | None] = {}
        self.live_mode = out.console.is_terminal if live is None else live
        self.snaps: dict[str, Snapshot] = {}
        self.seen: dict[tuple[str, str], StepStatus] = {}
        self.lock = threading.Lock()
        self.live: Live | None = None

    def __enter__(self) -> RunView:
        if self.live_mode:
            self.live = Live(
                Group(), console=self.out.console, refresh_per_second=8, transient=False
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(None, None, None)

    def _fallback(self, snap: Snapshot) -> Mapping[str, float]:
        return self.expected.get(snap.run, {})

    def _render(self) -> Group:
        parts: list[RenderableType] = []
        for snap in self.snaps.values():
            parts.append(status_table(snap, self.out.redact, self._fallback(snap)))
            line = eta_line(snap, self._fallback(snap))
            if line:
                parts.append(Text(self.out.redact(line), style="bold"))
        return Group(*parts)

    def update(self, host: str, snap: Snapshot) -> None:
        """Take a snapshot from a box (called from the box's thread)."""
        with self.lock:
            self.snaps[host] = snap
            if self.live is not None:
                self.live.update(self._render())
                return
            changed = False
            for step in snap.steps:
                key = (host, step.id)
                previous = self.seen.get(key)
                if previous != step.status:
                    self.seen[key] = step.status
                    if previous is None and step.status in (StepStatus.PENDING, StepStatus.SKIPPED):
                        continue
                    extra = _duration(step)
                    reason = step.reason or ""
                    suffix = (
                        f" ({extra}{', ' if extra and reason else ''}{reason})"
                        if extra or reason
                        else ""
                    )
                    self.out.line(f"[{host}] {step.id}: {step.status}{suffix}")
                    changed = True
            line = eta_line(snap, self._fallback(snap)) if changed else None
            if line and line != self.etas.get(host):
                self.etas[host] = line
                self.out.line(f"[{host}] {line}")


def print_summary(out: Out, finals: Mapping[str, Snapshot], errors: dict[str, str]) -> None:
    """After `up`: per box, what ended badly, with log tail and hint."""
    for host, snap in finals.items():
        counts: dict[str, int] = {}
        for step in snap.steps:
            counts[step.status.value] = counts.get(step.status.value, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        out.line(f"{host}: {summary}", style="bold")
        for step in snap.steps:
            if step.status in (StepStatus.FAILED, StepStatus.ERROR):
                out.line(
                    f"  {step.status}: {step.id} — {step.reason or ''}",
                    style=STYLE[step.status.value],
                )
                for line in step.log_tail:
                    out.line(f"    | {line}", style="dim")
                if step.hint:
                    out.line(f"    hint: {step.hint}", style="yellow")
                out.line(f"    rerun: bootstrap rerun {host} {step.id}", style="dim")
            for warning in step.warnings:
                out.line(f"  warning: {step.id}: {warning}", style="yellow")
    for host, message in errors.items():
        out.error(f"{host}: {message}" if not message.startswith(host) else message)


def print_status(out: Out, snaps: list[Snapshot], verbose_tail: int = 0) -> None:
    """`bootstrap status` output."""
    shown = (StepStatus.FAILED, StepStatus.ERROR, StepStatus.RUNNING)
    for snap in snaps:
        out.console.print(status_table(snap, out.redact))
        line = eta_line(snap)
        if line:
            out.line(line, style="bold")
        for lease in snap.gpu_leases or []:
            out.line(f"  {_lease_line(lease)}", style="cyan")
        for step in snap.steps:
            print_watch(out, step.id, step.watch)
        for step in snap.steps:
            if step.hint:
                out.line(f"  hint for {step.id}: {step.hint}", style="yellow")
            if verbose_tail and step.status in shown:
                for line in step.log_tail[-verbose_tail:]:
                    out.cut(f"  {step.id} | {line}", style="dim")


#: A guard that has not looked at its running job for this long is probably dead (its poll is
#: at most 30 s; the next `up` revives it).
WATCH_STALE_S = 300.0


def print_monitor(out: Out, host: str, step_id: str, snap: Mapping[str, Any]) -> None:
    """`bootstrap monitor` for one job: its training, GPUs, host and alerts, then what its
    guard saw (`print_watch`)."""
    from provision.monitor.render import render_snapshot

    out.line(f"{host} · {step_id}")
    out.line(render_snapshot(dict(snap)))
    print_watch(out, step_id, snap.get("watch"))


def print_checkpoints(
    out: Out, host: str, step_id: str, report: Mapping[str, Any], only: int | None
) -> None:
    """`bootstrap checkpoints` for one job: its checkpoints here and on the remote."""
    from provision.checkpoints.listing import render_report

    out.line(f"{host} · {step_id}")
    out.line(render_report(dict(report), only))


def print_watch(
    out: Out, step_id: str, watch: Mapping[str, Any] | None, now: float | None = None
) -> None:
    """What a launched job's guard saw last (`watch.json`, provision/watch/watcher.py): its
    state and progress, each finding that holds now (stalled, NaN and the other alerts, a
    crash with its diagnosis, the finish), and where its checkpoints are, with a remote that
    refuses them said loudly."""
    if not watch:
        return
    now = time.time() if now is None else now

    def ago(when: Any) -> str:
        return eta.human(max(0.0, now - float(when))).lstrip("~")

    progress = watch.get("progress") or {}
    state = str(watch.get("state") or "?")
    parts = [f"{step_id}: {state}"]
    if progress.get("step") is not None:
        total = f"/{progress['total']}" if progress.get("total") else ""
        parts.append(f"step {progress['step']}{total}")
    if progress.get("steps_per_s"):
        parts.append(f"{float(progress['steps_per_s']):.3g} steps/s")
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']}")
    if progress.get("last_step_at"):
        parts.append(f"last step {ago(progress['last_step_at'])} ago")
    style = {"crashed": "bold red", "finished": "green", "training": "cyan"}.get(state)
    out.line("  " + " · ".join(parts), style=style)
    updated = float(watch.get("updated") or now)
    if state in ("starting", "training") and now - updated > WATCH_STALE_S:
        out.line(
            f"    the guard has not looked for {ago(updated)} (dead? the next `up` starts it "
            "again)",
            style="yellow",
        )
    job = watch.get("job") or {}
    for finding in watch.get("findings") or []:
        kind, message = finding.get("kind"), str(finding.get("message") or "")
        since = finding.get("since")
        age = f" (for {ago(since)})" if since else ""
        if kind == "upload_failing":
            out.line(f"    !!! {message}{age}", style="bold red")
        elif kind == "finished":
            out.line(f"    {message}", style="green")
        elif kind == "crashed":
            out.line(f"    ✗ {message}", style="bold red")
            if job.get("hint"):
                out.line(f"      fix: {job['hint']}", style="yellow")
        else:
            severity = finding.get("severity")
            out.line(
                f"    ! {message}{age}", style="bold red" if severity == "critical" else "yellow"
            )
    uploads = watch.get("checkpoints") or {}
    if uploads.get("remote"):
        verified = list(uploads.get("verified") or [])
        words = [f"checkpoints -> {uploads['remote']}: {len(verified)} verified"]
        if verified:
            words[0] += f" (newest {verified[-1]})"
        sending = uploads.get("uploading")
        if sending:
            words.append(f"uploading {sending if isinstance(sending, str) else ', '.join(sending)}")
        if uploads.get("pending"):
            words.append(f"pending {', '.join(uploads['pending'])}")
        if uploads.get("last_upload"):
            words.append(f"last upload {ago(uploads['last_upload'])} ago")
        out.line("    " + " · ".join(words), style="dim" if not uploads.get("failing") else "red")
    finish = watch.get("on_finish")
    if isinstance(finish, dict) and finish.get("action") not in (None, "nothing"):
        result = f"rc {finish['rc']}" if "rc" in finish else f"stopped {finish.get('stopped')}"
        if finish["action"] == "destroy":  # the controller destroys it (rent/keepalive.release)
            why = finish.get("why_not") or "not ready"
            result += ": may be destroyed" if finish.get("ready") else f": kept ({why})"
        out.line(
            f"    on_finish {finish['action']} after the run {finish.get('outcome')}: {result}"
        )


def _lease_line(data: dict[str, Any]) -> str:
    """`GPUs 0,1: tmux session ae (playbook P, step S, since T, pid N)` of one GPU lease."""
    from provision.agent.gpus import Lease, gpus_text

    lease = Lease.from_dict(data)
    return f"{gpus_text(lease.gpus)}: {lease.describe()}" if lease else str(data)


def print_plan(out: Out, host: str, result: dict[str, Any]) -> None:
    """`bootstrap plan` output: what would run and why."""
    table = Table(title=escape(f"{host}: plan"), title_justify="left", show_edge=False)
    table.add_column("step")
    table.add_column("action")
    table.add_column("why")
    table.add_column("does", overflow="ellipsis", no_wrap=True, max_width=70)
    for step in result["steps"]:
        action = Text("run", style="bold cyan") if step["run"] else Text("ok", style="green")
        table.add_row(
            escape(step["id"]), action, escape(step["reason"]), escape(out.redact(step["does"]))
        )
    for step_id in result.get("skipped", []):
        table.add_row(escape(step_id), Text("skip", style="dim"), "not selected", "")
    out.console.print(table)
    todo = sum(1 for s in result["steps"] if s["run"])
    out.line(f"{host}: {todo} step(s) would run, {len(result['steps']) - todo} already done")


def print_tree(out: Out, lines: list[str]) -> None:
    """Print pre-formatted graph lines."""
    for line in lines:
        out.console.print(escape(line))


def wait_hint(out: Out, text: str) -> None:
    """A dim one-liner (e.g. how to reattach)."""
    out.line(text, style="dim")


def elapsed(start: float) -> str:
    return f"{time.time() - start:.1f}s"


# ------------------------------------------------------------------------------ graph, kinds, check


def _node(step_id: str) -> str:
    """A step id as a mermaid node name (mermaid reads `-` as an edge)."""
    return step_id.replace("-", "_")


def graph_lines(
    name: str,
    steps: list[tuple[str, str]],
    needs: Mapping[str, list[str]],
    estimate: Mapping[str, float],
    critical: tuple[list[str], float],
    fmt: str,
) -> list[str]:
    """A playbook's DAG as text: `tree` (depth first, `*` on the critical path), `mermaid` or
    `dot`. `steps` are (id, kind) in playbook order; `critical` is (path, its seconds)."""
    path, total = critical
    if fmt == "mermaid":
        lines = _mermaid(steps, needs, estimate, set(path))
    elif fmt == "dot":
        lines = _dot(name, steps, needs, set(path))
    else:
        lines = [name, *_tree(steps, needs, estimate, set(path))]
    if fmt == "tree" or total:
        lines.append(
            f"critical path ({total:.0f}s): {' -> '.join(path)}"
            if total
            else "no estimates: critical path unknown"
        )
    return lines


def _mermaid(
    steps: list[tuple[str, str]],
    needs: Mapping[str, list[str]],
    estimate: Mapping[str, float],
    on_path: set[str],
) -> list[str]:
    lines = ["graph LR"]
    for step_id, _kind in steps:
        label = step_id + (f" ({estimate[step_id]:.0f}s)" if estimate[step_id] else "")
        lines.append(f'  {_node(step_id)}["{label}"]')
        for need in needs[step_id]:
            arrow = "==>" if need in on_path and step_id in on_path else "-->"
            lines.append(f"  {_node(need)} {arrow} {_node(step_id)}")
    return lines


def _dot(
    name: str, steps: list[tuple[str, str]], needs: Mapping[str, list[str]], on_path: set[str]
) -> list[str]:
    lines = [f'digraph "{name}" {{', "  rankdir=LR;"]
    for step_id, kind in steps:
        style = " style=bold color=red" if step_id in on_path else ""
        lines.append(f'  "{step_id}" [label="{step_id}\\n{kind}"{style}];')
        lines += [f'  "{need}" -> "{step_id}";' for need in needs[step_id]]
    return [*lines, "}"]


def _tree(
    steps: list[tuple[str, str]],
    needs: Mapping[str, list[str]],
    estimate: Mapping[str, float],
    on_path: set[str],
) -> list[str]:
    from provision import dag

    children = dag.dependents(dict(needs))
    roots = [step_id for step_id, _ in steps if not needs[step_id]]
    kinds = dict(steps)
    position = {step_id: i for i, (step_id, _) in enumerate(steps)}
    lines: list[str] = []
    seen: set[str] = set()
    # Depth first with a stack, not recursion: a 1,000-step chain is 1,000 levels deep.
    stack = [(root, "", i == len(roots) - 1) for i, root in enumerate(roots)][::-1]
    while stack:
        node, prefix, last = stack.pop()
        mark = "*" if node in on_path else " "
        est = f" ~{estimate[node]:.0f}s" if estimate[node] else ""
        branch = "└─ " if last else "├─ "
        again = " (see above)" if node in seen else ""
        lines.append(f"{prefix}{branch}{mark}{node} [{kinds[node]}]{est}{again}")
        if node in seen:
            continue
        seen.add(node)
        kids = sorted(children.get(node, ()), key=position.__getitem__)
        inner = prefix + ("   " if last else "│  ")
        stack += [(kid, inner, i == len(kids) - 1) for i, kid in enumerate(kids)][::-1]
    return lines


def print_kinds(out: Out, summaries: list[tuple[str, str]]) -> None:
    """`bootstrap kinds`: one line per step kind, its name and summary."""
    for name, summary in summaries:
        out.line(f"{name:<18} {summary}")


def print_kind(out: Out, name: str, kind: Any, example: str) -> None:
    """`bootstrap kinds NAME`: its summary, its params (type, required or default, help) and
    the YAML example of its module docstring."""
    out.line(f"{name}: {kind.summary}\n")
    out.line("params:")
    for p in kind.params:
        need = "required" if p.required else f"default {p.default!r}"
        out.line(f"  {p.name:<20} {p.type:<6} {need:<24} {p.help}")
    if example:
        out.line("\nexample:\n" + example)


def print_check(out: Out, host: str, report: Mapping[str, Any]) -> None:
    """`bootstrap check` for one box: ready or what failed, then the preflight rows."""
    from provision.monitor.render import render_rows

    verdict = "ready" if report["ok"] else f"NOT ready: {', '.join(report['failed'])}"
    out.line(f"{host}: {verdict}")
    out.line(render_rows(report["rows"]))


def print_instances(out: Out, rows: list[dict[str, Any]]) -> None:
    """`bootstrap instances`: one line per vast.ai instance, its cost so far and its run."""
    from provision.monitor.render import duration

    out.line(
        f"{'name':<16} {'id':>9} {'state':<17} {'$/h':>7} {'uptime':>11} {'cost':>8}  gpus, run"
    )
    for d in rows:
        out.line(
            f"{d['name']:<16} {d['id']:>9} {d['state']:<17} {d['dph']:>7.3f} "
            f"{duration(d['uptime_s']):>11} {d['cost']:>8.2f}  {d['gpu']}, {d['run'] or '-'}"
        )
