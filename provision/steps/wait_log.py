r"""`wait_log`: wait until a log proves a job really started: its setup lines, then progress.

Example (seed 003 §13.1 read against the fork's `scripts/train_waypoint.py`; RUNBOOK.md A):

```yaml
- id: train-ae-started
  kind: wait_log
  needs: [train-ae]
  log: /workspace/openpi/logs/waypoint_ae_libero.log
  timeout: 900
  poll: 10
  markers:                      # setup: every one must appear, in any order, from any rank
    - 'WaypointAEDataset: 454 episodes, 8409 valid pairs'
    - name: weights
      regex: 'Loaded (?P<loaded>\d+) weight tensors, skipped (?P<skipped>\d+)'
      ranges: {loaded: [811, 811], skipped: [1, 1]}
    - name: wandb
      any_of: ['wandb: .*View run at https://', 'W&B syncing is set to `offline`']
    - name: model
      regex: 'Model: 3617\.8M total'
      after: [weights]          # order that truly matters: rank 0 logs it after loading
  progress:                     # the line that proves training runs: after every marker
    name: first step
    regex: '\[AE\] step=0/\d+ loss=(?P<loss>[\d.]+)'
    ranges: {loss: [0.7, 1.0]}
    hint: the initial AE loss is 0.7-1.0; check the checkpoint and the norm stats
  fail_on: ['loss=nan']
```

Training logs do not arrive in one order: DDP ranks interleave (rank 1 may log a dataset line
long before rank 0's wandb banner), wandb may be slow, offline or disabled, a resumed run logs
extra lines. So `markers` are a set: each must be seen once, from whichever rank, in any order;
`after: [names]` on a marker asks that those markers were seen before it (use it only where one
process orders the lines). `progress` (optional) must come after every marker: it is the last
one, and the step is done when it is seen. Without `progress` the step is done when every
marker is seen.

A marker is a Python regex (searched in each line), or a mapping with `regex` (named groups are
captured; `ranges` bounds them: `[low, high]`, either may be null; `[811, 811]` asks for exactly
811), or with `any_of`: a list of such alternatives, any of which counts; `name` labels it in
messages (and in `after`), `hint` is given when its range check fails. The step fails, naming
the marker, when:

- the progress marker, or a marker with `after`, shows up before the markers it must follow;
- a captured value is outside its range (NaN always is): a first loss out of range, a wrong
  count of loaded weights;
- a line matches a known-issues catalog signature (`provision/known_issues.yaml`) that is not
  `transient` (wandb's network retries are: they warn, they do not fail; skip others with
  `ignore_issues`), or a `fail_on` regex, before the markers are all seen (the hint is the
  catalog's diagnosis and fix, e.g. CUDA out of memory);
- the job launched by `tmux_launch` logs that it exited before the markers are all seen;
- the step's `timeout` passes (one hour without one), naming the markers still missing.

The log is read incrementally, only new bytes each poll (1 s growing to `poll`, and at once when
a look at its size and inode, every 0.25 s, finds it changed: step 0 is seen within a quarter of
a second, not up to `poll` seconds late), following it across truncation and rotation like
`tail -F`. When `tmux_launch` relaunched a job into the same
log, only the latest launch counts: reading starts at its `[bootstrap] job … started` line.
Progress shows markers seen of all and the values captured; `markers.json` in the step's
directory records them. `check_text` applies the same rules to a finished log offline
(`bootstrap diagnose LOG -p PLAYBOOK --step STEP`).

Done-check: the last successful run recorded the log's identity — device and inode, the byte
offset just past the last marker, and a sha256 of the 64 KiB before that offset. The step is done
while the log is still that file, at least that long, with those bytes unchanged: a log that was
deleted, replaced or rewritten (a new run) makes it pending again, while one that merely grew (the
job kept logging) keeps it done. Reading 64 KiB keeps the check cheap however long the log gets.
"""

from __future__ import annotations

import graphlib
import hashlib
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.agent import catalog
from provision.agent.files import read_json, write_json_atomic
from provision.errors import ConfigError, StepFailed
from provision.steps.base import Check, Kind, Param, ParamError, StepContext, check_keys
from provision.steps.common import joblog

#: Without a step timeout, wait at most this long.
DEFAULT_TIMEOUT_S = 3600.0
#: Bytes hashed before the end of the last marker for the done-check.
_WINDOW = 65536
_BLOCK = 1 << 20
_LINE_END_RE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n)")

SUCCESS_FILE = "success.json"
MARKERS_FILE = "markers.json"
_MARKER_KEYS = ("name", "regex", "ranges", "any_of", "hint", "after")


@dataclass
class _Alternative:
    regex: re.Pattern[str]
    ranges: dict[str, tuple[float | None, float | None]]


@dataclass
class Marker:
    """One expected line: any of its alternatives matches; `after` names markers it follows."""

    name: str
    alternatives: list[_Alternative]
    hint: str | None = None
    after: tuple[str, ...] = ()

    def search(self, line: str) -> tuple[_Alternative, re.Match[str]] | None:
        """The first alternative found in `line`, with its match; None if none is."""
        for alt in self.alternatives:
            found = alt.regex.search(line)
            if found:
                return alt, found
        return None


@dataclass
class MarkerSpec:
    """A step's expectations: setup markers (a set, with `after` edges) and a progress marker."""

    markers: list[Marker]
    progress: Marker | None = None

    @property
    def every(self) -> list[Marker]:
        """All markers, the progress marker last."""
        return self.markers + ([self.progress] if self.progress else [])


def parse_spec(markers: Any, progress: Any = None) -> MarkerSpec:
    """The `markers` and `progress` params as a MarkerSpec; raises ParamError when malformed."""
    if not isinstance(markers, list) or not markers:
        raise ParamError("'markers' must be a non-empty list", "markers")
    parsed = [_parse_marker(item, f"marker {i}", "markers") for i, item in enumerate(markers, 1)]
    names = [m.name for m in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ParamError(f"two markers are named {dupes[0]!r}: give them distinct names", "markers")
    graph: dict[str, tuple[str, ...]] = {}
    for marker in parsed:
        for other in marker.after:
            if other not in names or other == marker.name:
                raise ParamError(
                    f"marker {marker.name!r}: 'after' names {other!r}, not another marker "
                    f"(markers: {', '.join(repr(n) for n in names)})",
                    "markers",
                )
        graph[marker.name] = marker.after
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        raise ParamError(f"'after' makes a cycle: {' -> '.join(exc.args[1])}", "markers") from None
    tail = None
    if progress is not None:
        tail = _parse_marker(progress, "progress", "progress")
        if tail.after:
            raise ParamError("progress comes after every marker: it takes no 'after'", "progress")
    return MarkerSpec(parsed, tail)


def parse_markers(raw: Any) -> list[Marker]:
    """The `markers` param as Marker objects; raises ParamError (key `markers`) when malformed."""
    return parse_spec(raw).markers


def _parse_marker(item: Any, where: str, key: str) -> Marker:
    if isinstance(item, str):
        return Marker(item, [_parse_alternative(item, where, key)])
    if not isinstance(item, dict):
        raise ParamError(f"{where} must be a regex or a mapping", key)
    check_keys(item, _MARKER_KEYS, where, key)
    if ("regex" in item) == ("any_of" in item):
        raise ParamError(f"{where} needs either 'regex' or 'any_of'", key)
    if "any_of" in item:
        if "ranges" in item:
            raise ParamError(f"{where}: put 'ranges' on the 'any_of' alternatives", key)
        options = item["any_of"]
        if not isinstance(options, list) or not options:
            raise ParamError(f"{where}: 'any_of' must be a non-empty list", key)
        alternatives = [
            _parse_alternative(o, f"{where}, alternative {j}", key)
            for j, o in enumerate(options, 1)
        ]
        default_name = " | ".join(a.regex.pattern for a in alternatives)
    else:
        picked = {k: item[k] for k in ("regex", "ranges") if k in item}
        alternatives = [_parse_alternative(picked, where, key)]
        default_name = item["regex"]
    name = item.get("name", default_name)
    hint = item.get("hint")
    if not isinstance(name, str) or (hint is not None and not isinstance(hint, str)):
        raise ParamError(f"{where}: 'name' and 'hint' must be strings", key)
    after = item.get("after") or []
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        raise ParamError(f"{where}: 'after' must be a list of marker names", key)
    return Marker(name, alternatives, hint, tuple(after))


def _parse_alternative(item: Any, where: str, key: str) -> _Alternative:
    if isinstance(item, str):
        item = {"regex": item}
    if not isinstance(item, dict) or not isinstance(item.get("regex"), str):
        raise ParamError(f"{where}: expected a regex string or {{regex, ranges}}", key)
    check_keys(item, ("regex", "ranges"), where, key)
    try:
        regex = re.compile(item["regex"])
    except re.error as exc:
        raise ParamError(f"{where}: bad regex {item['regex']!r}: {exc}", key) from exc
    ranges = item.get("ranges") or {}
    if not isinstance(ranges, dict):
        raise ParamError(f"{where}: 'ranges' must map group names to [low, high]", key)
    parsed: dict[str, tuple[float | None, float | None]] = {}
    for group, bounds in ranges.items():
        if group not in regex.groupindex:
            raise ParamError(f"{where}: no group (?P<{group}>...) in {regex.pattern!r}", key)
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(_bound(b) for b in bounds)):
            raise ParamError(f"{where}: range of '{group}' must be [low, high]", key)
        low, high = bounds
        if low is not None and high is not None and low > high:
            raise ParamError(f"{where}: range of '{group}' has low > high", key)
        parsed[group] = (low, high)
    return _Alternative(regex, parsed)


def _bound(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


class Tracker:
    """Which markers one launch's lines have shown; pure (no I/O), fed line by line.

    `feed` raises StepFailed (and sets `failed`) on an order violation, an out-of-range value,
    a job exit, a non-transient catalog issue or a `fail_on` match before the markers are met.
    """

    def __init__(
        self,
        spec: MarkerSpec,
        fail_res: Iterable[re.Pattern[str]] = (),
        ignore: Iterable[str] = (),
        source: str = "the log",
    ) -> None:
        self.spec = spec
        self.every = spec.every
        self.fail_res = list(fail_res)
        self.ignore = set(ignore)
        self.source = source
        self.failed = False
        self.seen: list[str | None] = [None] * len(self.every)
        self.values: dict[str, Any] = {}

    @property
    def count(self) -> int:
        """Markers seen so far."""
        return sum(1 for s in self.seen if s is not None)

    @property
    def complete(self) -> bool:
        """Every marker seen."""
        return self.count == len(self.every)

    def pairs(self) -> list[tuple[Marker, str | None]]:
        """Each marker with the line that showed it (None: not yet)."""
        return [(m, self.seen[i]) for i, m in enumerate(self.every)]

    def missing(self) -> list[Marker]:
        """The markers not seen yet, in the order they are listed (progress last)."""
        return [m for m, s in self.pairs() if s is None]

    def reset(self) -> None:
        """A new launch begins: forget what the previous one showed."""
        self.seen = [None] * len(self.every)
        self.values = {}

    def feed(self, line: str) -> bool:
        """Take one line; True when it completes the markers."""
        if joblog.STARTED_RE.match(line):
            self.reset()
            return False
        exited = joblog.EXITED_RE.match(line)
        if exited:
            self.fail(f"the job exited with status {exited.group('rc')} before {self.waiting()}")
        hit_any = False
        for j, marker in enumerate(self.every):
            if self.seen[j] is not None:
                continue
            hit = marker.search(line)
            if hit is None:
                continue
            hit_any = True
            self._check_order(j, marker, line)
            self._take(j, hit, line)
        if not hit_any:
            self._check_failure(line)
        return self.complete

    def _check_order(self, j: int, marker: Marker, line: str) -> None:
        seen = {m.name for m, s in self.pairs() if s is not None}
        if marker is self.spec.progress:
            early = [m.name for m in self.spec.markers if m.name not in seen]
            what = "progress marker"
        else:
            early = [name for name in marker.after if name not in seen]
            what = "marker"
        if early:
            names = ", ".join(f"`{n}`" for n in early)
            self.fail(
                f"{what} `{marker.name}` appeared before {names}, which it must follow "
                f"({self.count} of {len(self.every)} markers seen): {line.strip()}",
                marker.hint,
            )

    def _take(self, j: int, hit: tuple[_Alternative, re.Match[str]], line: str) -> None:
        alt, found = hit
        captured = {k: _number(v) for k, v in found.groupdict().items() if v is not None}
        self.seen[j] = line.strip()
        self.values.update(captured)
        for group, (low, high) in alt.ranges.items():
            value = captured.get(group)
            if not _within(value, low, high):
                bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
                self.fail(
                    f"{group}={value} at marker `{self.every[j].name}` is outside "
                    f"{bounds}: {line.strip()}",
                    self.every[j].hint,
                )

    def _check_failure(self, line: str) -> None:
        found = _fatal_issue(line, self.ignore)
        if found is not None:
            self.fail(
                f"known failure [{found.id}] in {self.source} before {self.waiting()}: "
                f"{line.strip()}",
                found.hint,
            )
        for regex in self.fail_res:
            if regex.search(line):
                self.fail(
                    f"`{regex.pattern}` in {self.source} before {self.waiting()}: {line.strip()}"
                )

    def fail(self, reason: str, hint: str | None = None) -> None:
        """Mark the tracker failed and raise StepFailed."""
        self.failed = True
        raise StepFailed(reason, hint)

    def waiting(self) -> str:
        """The first marker not seen yet, for messages: "marker `X` (3 of 6 seen)"."""
        missing = self.missing()
        if not missing:
            return "the end"
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"marker `{missing[0].name}`{more} ({self.count} of {len(self.every)} seen)"

    def record(self) -> dict[str, Any]:
        """What `markers.json` holds: each marker's name and the line that showed it."""
        return {
            "markers": [{"name": m.name, "line": s} for m, s in self.pairs()],
            "progress": self.spec.progress.name if self.spec.progress else None,
            "values": self.values,
        }


def _fatal_issue(line: str, ignore: set[str]) -> catalog.Match | None:
    """The catalog's first non-transient issue in `line` not in `ignore`, or None."""
    try:
        found = catalog.default_catalog().match(line)
    except ConfigError:
        return None
    return next((m for m in found if m.id not in ignore and not m.transient), None)


@dataclass(frozen=True)
class Verdict:
    """`check_text`'s answer: met, or the reason and hint of the first problem."""

    met: bool
    reason: str
    hint: str | None
    record: dict[str, Any]


def check_params(text: str, params: dict[str, Any], source: str) -> Verdict:
    """`text` judged by a resolved `wait_log` step's params (markers, progress, fail_on, ...),
    as the step judges its log on the box (`bootstrap diagnose --step`)."""
    spec = parse_spec(params["markers"], params.get("progress"))
    return check_text(
        text, spec, params.get("fail_on") or [], params.get("ignore_issues") or [], source
    )


def check_text(
    text: str,
    spec: MarkerSpec,
    fail_on: Iterable[str] = (),
    ignore: Iterable[str] = (),
    source: str = "the log",
) -> Verdict:
    """A finished log's verdict under `wait_log`'s rules (the latest launch only); offline."""
    lines = re.split(r"\r\n|\r|\n", text)
    starts = [i for i, line in enumerate(lines) if joblog.STARTED_RE.match(line)]
    tracker = Tracker(spec, [re.compile(p) for p in fail_on], ignore, source)
    try:
        for line in lines[starts[-1] if starts else 0 :]:
            if tracker.feed(line):
                return Verdict(
                    True, f"all {len(tracker.every)} markers seen", None, tracker.record()
                )
    except StepFailed as exc:
        return Verdict(False, exc.reason, exc.hint, tracker.record())
    missing = tracker.missing()
    after = f" (and {len(missing) - 1} after it)" if len(missing) > 1 else ""
    return Verdict(
        False,
        f"marker `{missing[0].name}`{after} never appeared in {source}; "
        f"seen {tracker.count}/{len(tracker.every)}",
        missing[0].hint,
        tracker.record(),
    )


class WaitLog(Kind):
    """Wait for setup markers and a progress marker in a log; see the module doc."""

    name = "wait_log"
    summary = "wait until a log shows the expected setup lines, then progress"
    params = (
        Param("log", "path", "the log file to watch (absolute or ~/...)", required=True),
        Param(
            "markers", "list", "expected setup lines, any order (regex, or mapping)", required=True
        ),
        Param("progress", "any", "the line proving progress, after every marker"),
        Param(
            "fail_on", "list", "regexes that fail the step when seen first", default=[], items="str"
        ),
        Param("ignore_issues", "list", "catalog issue ids not to fail on", default=[], items="str"),
    )

    def validate(self, params: dict[str, Any]) -> None:
        if not params["log"].startswith(("/", "~")):
            raise ParamError("'log' must be an absolute path or start with ~", "log")
        parse_spec(params["markers"], params.get("progress"))
        for pattern in params["fail_on"]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ParamError(f"'fail_on': bad regex {pattern!r}: {exc}", "fail_on") from exc
        known = catalog.default_catalog()
        for issue in params["ignore_issues"]:
            if known.get(issue) is None:
                raise ParamError(
                    f"'ignore_issues': no issue '{issue}' in the catalog", "ignore_issues"
                )

    def describe(self, params: dict[str, Any]) -> str:
        spec = parse_spec(params["markers"], params.get("progress"))
        last = f", then {spec.progress.name}" if spec.progress else ""
        return f"wait for {len(spec.markers)} markers in {params['log']}{last}"

    def check(self, ctx: StepContext) -> Check:
        record = read_json(ctx.workdir / SUCCESS_FILE, None)
        log = ctx.path(ctx.params["log"])
        if not isinstance(record, dict) or record.get("log") != str(log):
            return Check(False, "markers not seen yet")
        try:
            with open(log, "rb") as fh:
                st = os.fstat(fh.fileno())
                if (st.st_dev, st.st_ino) != (record["dev"], record["ino"]):
                    return Check(False, f"{log} is another file than the one that showed markers")
                if st.st_size < record["end"]:
                    return Check(False, f"{log} is shorter than when it showed the markers")
                digest = _window_digest(fh, record["end"])
        except OSError:
            return Check(False, f"{log} is gone")
        if digest != record["sha256"]:
            return Check(False, f"{log} was rewritten since it showed the markers")
        return Check(True, f"all {record['count']} markers seen in {log}")

    def run(self, ctx: StepContext) -> None:
        log = ctx.path(ctx.params["log"])
        (ctx.workdir / SUCCESS_FILE).unlink(missing_ok=True)
        spec = parse_spec(ctx.params["markers"], ctx.params.get("progress"))
        tracker = Tracker(
            spec,
            [re.compile(p) for p in ctx.params["fail_on"]],
            ctx.params["ignore_issues"],
            str(log),
        )
        watch = _Watch(log, tracker, ctx.workdir)
        if ctx.deadline is None:
            ctx.deadline = time.time() + DEFAULT_TIMEOUT_S
        started = time.monotonic()
        watch.report(ctx)
        try:
            ctx.wait_until(lambda: watch.poll(ctx), f"markers in {log}", watch.changed)
        except StepFailed as exc:
            if tracker.failed:
                raise
            reason = watch.timeout_reason(time.monotonic() - started)
            raise StepFailed(reason, watch.timeout_hint()) from exc
        finally:
            watch.close()
        ctx.log(f"all {len(tracker.every)} markers seen in {log}; values: {tracker.values}")
        assert watch.end is not None and watch.ident is not None
        write_json_atomic(
            ctx.workdir / SUCCESS_FILE,
            {
                "log": str(log),
                "dev": watch.ident[0],
                "ino": watch.ident[1],
                "end": watch.end,
                "sha256": watch.digest,
                "count": len(tracker.every),
                "values": tracker.values,
            },
        )


def _window_digest(fh: Any, end: int) -> str:
    start = max(0, end - _WINDOW)
    fh.seek(start)
    return hashlib.sha256(fh.read(end - start)).hexdigest()


class _Follower:
    """Reads a growing file's new complete lines, following truncation and rotation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh: Any = None
        self.ident: tuple[int, int] | None = None
        self.pos = 0
        self.partial = b""

    def lines(self) -> Iterator[tuple[str, int]]:
        """New complete lines with the offset just past each; `\\r` ends a line too (tqdm)."""
        if self.fh is None and not self._open():
            return
        if os.fstat(self.fh.fileno()).st_size < self.pos:
            self._seek(0)  # truncated in place: start over
        for line, _start, end in self._drain():
            yield line, end
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) != self.ident:
            # Rotated: the old file is drained; its unfinished last line is finished.
            if self.partial:
                yield self.partial.decode("utf-8", "replace"), self.pos
            self.close()
            if self._open():
                for line, _start, end in self._drain():
                    yield line, end

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        self.fh, self.ident = None, None

    def _open(self) -> bool:
        """Open the file and position at the latest `tmux_launch` start line, if it has one."""
        try:
            self.fh = open(self.path, "rb")  # noqa: SIM115 (kept open across polls)
        except FileNotFoundError:
            return False
        st = os.fstat(self.fh.fileno())
        self.ident = (st.st_dev, st.st_ino)
        self._seek(0)
        start = 0
        for line, begin, _end in self._drain():
            if joblog.STARTED_RE.match(line):
                start = begin
        self._seek(start)
        return True

    def _seek(self, pos: int) -> None:
        self.fh.seek(pos)
        self.pos, self.partial = pos, b""

    def _drain(self) -> Iterator[tuple[str, int, int]]:
        """Complete lines from the current position: (text, start offset, end offset)."""
        while True:
            block = self.fh.read(_BLOCK)
            if not block:
                return
            data = self.partial + block
            base = self.pos - len(self.partial)
            self.pos += len(block)
            last = 0
            for found in _LINE_END_RE.finditer(data):
                yield found.group(1).decode("utf-8", "replace"), base + last, base + found.end()
                last = found.end()
            self.partial = data[last:]


@dataclass
class _Watch:
    """A Tracker fed from a followed log, reporting progress and writing markers.json."""

    log: Path
    tracker: Tracker
    workdir: Path
    end: int | None = None
    ident: tuple[int, int] | None = None
    digest: str = ""
    last_line: str = ""
    #: The log's (dev, inode, size, mtime) at the last `changed` (None: absent).
    seen: tuple[int, ...] | None = None
    follower: _Follower = field(init=False)

    def __post_init__(self) -> None:
        self.follower = _Follower(self.log)

    def changed(self) -> bool:
        """Whether the log is another file, or another size, than at the last look (a stat)."""
        try:
            st = os.stat(self.log)
            seen: tuple[int, ...] | None = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None
        if seen == self.seen:
            return False
        self.seen = seen
        return True

    def poll(self, ctx: StepContext) -> bool | None:
        """Read what is new; True when every marker is seen, None to poll again."""
        before = (self.tracker.count, len(self.tracker.values))
        try:
            for line, end in self.follower.lines():
                if line.strip():
                    self.last_line = line
                if self.tracker.feed(line):
                    self.end, self.ident = end, self.follower.ident
                    self.digest = _window_digest(self.follower.fh, end)
                    self.report(ctx)
                    return True
        except StepFailed:
            self._write()
            raise
        if (self.tracker.count, len(self.tracker.values)) != before:
            self.report(ctx)
        return None

    def timeout_reason(self, elapsed: float) -> str:
        """Why the wait timed out: what never came, what did, and the log's last line."""
        if self.follower.ident is None and not self.log.exists():
            return f"timed out after {elapsed:.0f}s: {self.log} never appeared"
        tracker = self.tracker
        seen = ", ".join(f"`{m.name}`" for m, s in tracker.pairs() if s)
        missing = tracker.missing()
        text = (
            f"timed out after {elapsed:.0f}s waiting for marker `{missing[0].name}`"
            + (f" (and {len(missing) - 1} after it)" if len(missing) > 1 else "")
            + f" in {self.log}; seen {tracker.count}/{len(tracker.every)}"
            + (f": {seen}" if seen else "")
        )
        return text + (f"; last line: {self.last_line.strip()}" if self.last_line else "")

    def timeout_hint(self) -> str:
        """Where to look after a timeout."""
        return f"read the job's output: tail -50 {self.log}"

    def report(self, ctx: StepContext) -> None:
        """Progress for `status`: markers seen of all, what comes next, the values captured."""
        self._write()
        tracker = self.tracker
        shown = ", ".join(f"{k}={v}" for k, v in tracker.values.items())
        missing = tracker.missing()
        waiting = f"waiting for `{missing[0].name}`" if missing else "done"
        ctx.progress(
            files_done=tracker.count,
            files_total=len(tracker.every),
            message=f"{tracker.count}/{len(tracker.every)} markers; {waiting}"
            + (f"; {shown}" if shown else ""),
        )

    def _write(self) -> None:
        write_json_atomic(
            self.workdir / MARKERS_FILE, {"log": str(self.log), **self.tracker.record()}
        )

    def close(self) -> None:
        """Close the followed file."""
        self.follower.close()


def _within(value: Any, low: float | None, high: float | None) -> bool:
    """A captured number inside [low, high] (None: unbounded); NaN and text never are."""
    if not isinstance(value, float) or math.isnan(value):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


KIND = WaitLog()
