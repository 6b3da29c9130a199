r"""`wait_log`: wait until a log shows an ordered list of markers (proof a job really started).

Example (seed 003 §13.1, the AE run of RUNBOOK.md A):

```yaml
- id: train-ae-started
  kind: wait_log
  needs: [train-ae]
  log: /workspace/openpi/logs/waypoint_ae_libero.log
  timeout: 900
  poll: 10
  markers:
    - 'WaypointAEDataset: 454 episodes, 8409 valid pairs'
    - 'Loaded 811 weight tensors, skipped 1'
    - 'Constructing tf.data.Dataset libero_object'
    - name: wandb
      any_of:
        - 'wandb: .*View run at https://'
        - 'W&B syncing is set to `offline`'
    - 'Model: 3617\.8M total'
    - name: first step
      regex: '\[AE\] step=0/\d+ loss=(?P<loss>[\d.]+)'
      ranges: {loss: [0.7, 1.0]}
      hint: the initial AE loss is 0.7–1.0; check the checkpoint and the norm stats
  fail_on: ['loss=nan']
```

A marker is a Python regex (searched in each line), or a mapping with `regex` (named groups are
captured; `ranges` bounds them: `[low, high]`, either may be null), or with `any_of`: a list of
such alternatives, any of which counts; `name` labels it in messages, `hint` is given when its
range check fails. The step fails, saying which markers it saw and which it waits for, when:

- a marker shows up before an earlier one (a marker already seen may repeat: DDP ranks log twice);
- a captured value is outside its range (NaN always is);
- a line matches a known-issues catalog signature (`provision/known_issues.yaml`; skip some with
  `ignore_issues`, e.g. `wandb-network`, which wandb often survives), or a `fail_on` regex, before
  the last marker (the hint is the catalog's diagnosis and fix, e.g. CUDA out of memory);
- the job launched by `tmux_launch` logs that it exited before the last marker;
- the step's `timeout` passes (one hour without one).

The log is read incrementally, only new bytes each poll (1 s growing to `poll`), following it
across truncation and rotation like `tail -F`. When `tmux_launch` relaunched a job into the same
log, only the latest launch counts: reading starts at its `[bootstrap] job … started` line.
Progress shows markers seen of all and the values captured; `markers.json` in the step's
directory records them.

Done-check: the last successful run recorded the log's identity — device and inode, the byte
offset just past the last marker, and a sha256 of the 64 KiB before that offset. The step is done
while the log is still that file, at least that long, with those bytes unchanged: a log that was
deleted, replaced or rewritten (a new run) makes it pending again, while one that merely grew (the
job kept logging) keeps it done. Reading 64 KiB keeps the check cheap however long the log gets.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import StepFailed
from provision.monitor import catalog
from provision.steps import _joblog
from provision.steps.base import (
    Check,
    Kind,
    Param,
    ParamError,
    StepContext,
    read_json,
    write_json_atomic,
)

#: Without a step timeout, wait at most this long.
DEFAULT_TIMEOUT_S = 3600.0
#: Bytes hashed before the end of the last marker for the done-check.
_WINDOW = 65536
_BLOCK = 1 << 20
_LINE_END_RE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n)")

SUCCESS_FILE = "success.json"
MARKERS_FILE = "markers.json"


@dataclass
class _Alternative:
    regex: re.Pattern[str]
    ranges: dict[str, tuple[float | None, float | None]]


@dataclass
class Marker:
    """One expected line: any of its alternatives matches."""

    name: str
    alternatives: list[_Alternative]
    hint: str | None = None

    def search(self, line: str) -> tuple[_Alternative, re.Match[str]] | None:
        for alt in self.alternatives:
            found = alt.regex.search(line)
            if found:
                return alt, found
        return None


def parse_markers(raw: Any) -> list[Marker]:
    """The `markers` param as Marker objects; raises ParamError (key `markers`) when malformed."""
    if not isinstance(raw, list) or not raw:
        raise ParamError("'markers' must be a non-empty list", "markers")
    return [_parse_marker(item, i) for i, item in enumerate(raw, 1)]


def _parse_marker(item: Any, index: int) -> Marker:
    where = f"marker {index}"
    if isinstance(item, str):
        return Marker(item, [_parse_alternative(item, where)])
    if not isinstance(item, dict):
        raise ParamError(f"{where} must be a regex or a mapping", "markers")
    unknown = set(item) - {"name", "regex", "ranges", "any_of", "hint"}
    if unknown:
        raise ParamError(f"{where}: unknown keys {sorted(unknown)}", "markers")
    if ("regex" in item) == ("any_of" in item):
        raise ParamError(f"{where} needs either 'regex' or 'any_of'", "markers")
    if "any_of" in item:
        if "ranges" in item:
            raise ParamError(f"{where}: put 'ranges' on the 'any_of' alternatives", "markers")
        options = item["any_of"]
        if not isinstance(options, list) or not options:
            raise ParamError(f"{where}: 'any_of' must be a non-empty list", "markers")
        alternatives = [
            _parse_alternative(o, f"{where}, alternative {j}") for j, o in enumerate(options, 1)
        ]
        default_name = " | ".join(a.regex.pattern for a in alternatives)
    else:
        alternatives = [
            _parse_alternative({k: item[k] for k in ("regex", "ranges") if k in item}, where)
        ]
        default_name = item["regex"]
    name = item.get("name", default_name)
    hint = item.get("hint")
    if not isinstance(name, str) or (hint is not None and not isinstance(hint, str)):
        raise ParamError(f"{where}: 'name' and 'hint' must be strings", "markers")
    return Marker(name, alternatives, hint)


def _parse_alternative(item: Any, where: str) -> _Alternative:
    if isinstance(item, str):
        item = {"regex": item}
    if not isinstance(item, dict) or not isinstance(item.get("regex"), str):
        raise ParamError(f"{where}: expected a regex string or {{regex, ranges}}", "markers")
    unknown = set(item) - {"regex", "ranges"}
    if unknown:
        raise ParamError(f"{where}: unknown keys {sorted(unknown)}", "markers")
    try:
        regex = re.compile(item["regex"])
    except re.error as exc:
        raise ParamError(f"{where}: bad regex {item['regex']!r}: {exc}", "markers") from exc
    ranges = item.get("ranges") or {}
    if not isinstance(ranges, dict):
        raise ParamError(f"{where}: 'ranges' must map group names to [low, high]", "markers")
    parsed: dict[str, tuple[float | None, float | None]] = {}
    for group, bounds in ranges.items():
        if group not in regex.groupindex:
            raise ParamError(f"{where}: no group (?P<{group}>...) in {regex.pattern!r}", "markers")
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(_bound(b) for b in bounds)):
            raise ParamError(f"{where}: range of '{group}' must be [low, high]", "markers")
        low, high = bounds
        if low is not None and high is not None and low > high:
            raise ParamError(f"{where}: range of '{group}' has low > high", "markers")
        parsed[group] = (low, high)
    return _Alternative(regex, parsed)


def _bound(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


class WaitLog(Kind):
    """Wait for ordered markers in a log; see the module doc."""

    name = "wait_log"
    summary = "wait until a log shows the expected lines, in order"
    params = (
        Param("log", "path", "the log file to watch (absolute or ~/...)", required=True),
        Param("markers", "list", "expected lines in order (regex, or mapping)", required=True),
        Param(
            "fail_on", "list", "regexes that fail the step when seen first", default=[], items="str"
        ),
        Param("ignore_issues", "list", "catalog issue ids not to fail on", default=[], items="str"),
    )

    def validate(self, params: dict[str, Any]) -> None:
        if not params["log"].startswith(("/", "~")):
            raise ParamError("'log' must be an absolute path or start with ~", "log")
        parse_markers(params["markers"])
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
        markers = parse_markers(params["markers"])
        return f"wait for {len(markers)} markers in {params['log']}, last: {markers[-1].name}"

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
        watch = _Watch(
            log,
            parse_markers(ctx.params["markers"]),
            ctx.workdir,
            fail_res=[re.compile(p) for p in ctx.params["fail_on"]],
            ignore=ctx.params["ignore_issues"],
        )
        if ctx.deadline is None:
            ctx.deadline = time.time() + DEFAULT_TIMEOUT_S
        started = time.monotonic()
        watch.report(ctx)
        try:
            ctx.wait_until(lambda: watch.poll(ctx), f"markers in {log}")
        except StepFailed as exc:
            if watch.failed:
                raise
            reason = watch.timeout_reason(time.monotonic() - started)
            raise StepFailed(reason, watch.timeout_hint()) from exc
        finally:
            watch.close()
        ctx.log(f"all {len(watch.markers)} markers seen in {log}; values: {watch.values}")
        assert watch.end is not None and watch.ident is not None
        write_json_atomic(
            ctx.workdir / SUCCESS_FILE,
            {
                "log": str(log),
                "dev": watch.ident[0],
                "ino": watch.ident[1],
                "end": watch.end,
                "sha256": watch.digest,
                "count": len(watch.markers),
                "values": watch.values,
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
            if _joblog.STARTED_RE.match(line):
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
    """Marker progress over one log."""

    log: Path
    markers: list[Marker]
    workdir: Path
    fail_res: list[re.Pattern[str]] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    seen: list[str | None] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    failed: bool = False
    end: int | None = None
    ident: tuple[int, int] | None = None
    digest: str = ""
    last_line: str = ""

    def __post_init__(self) -> None:
        self.follower = _Follower(self.log)
        self.seen = [None] * len(self.markers)

    @property
    def count(self) -> int:
        return sum(1 for s in self.seen if s is not None)

    def poll(self, ctx: StepContext) -> bool | None:
        """Read what is new; True when every marker is seen, None to poll again."""
        before = (self.count, len(self.values))
        for line, end in self.follower.lines():
            if line.strip():
                self.last_line = line
            if self._feed(line, ctx):
                self.end, self.ident = end, self.follower.ident
                self.digest = _window_digest(self.follower.fh, end)
                self.report(ctx)
                return True
        if (self.count, len(self.values)) != before:
            self.report(ctx)
        return None

    def _feed(self, line: str, ctx: StepContext) -> bool:
        """Take one line; True when it completes the markers. Raises StepFailed on a failure."""
        if _joblog.STARTED_RE.match(line):
            self.seen = [None] * len(self.markers)
            self.values = {}
            return False
        exited = _joblog.EXITED_RE.match(line)
        if exited:
            self._fail(f"the job exited with status {exited.group('rc')} before {self._waiting()}")
        index = self.count
        for j in range(index, len(self.markers)):
            hit = self.markers[j].search(line)
            if hit is None:
                continue
            if j > index:
                self._fail(
                    f"marker {j + 1} `{self.markers[j].name}` appeared before marker "
                    f"{index + 1} `{self.markers[index].name}`: {line.strip()}"
                )
            self._take(j, hit, line)
            return self.count == len(self.markers)
        self._check_failure(line)
        return False

    def _take(self, j: int, hit: tuple[_Alternative, re.Match[str]], line: str) -> None:
        alt, found = hit
        captured = {k: _number(v) for k, v in found.groupdict().items() if v is not None}
        self.seen[j] = line.strip()
        self.values.update(captured)
        for group, (low, high) in alt.ranges.items():
            value = captured.get(group)
            ok = isinstance(value, float) and not math.isnan(value)
            ok = ok and (low is None or value >= low) and (high is None or value <= high)
            if not ok:
                bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
                self._fail(
                    f"{group}={value} at marker {j + 1} `{self.markers[j].name}` is outside "
                    f"{bounds}: {line.strip()}",
                    self.markers[j].hint,
                )

    def _check_failure(self, line: str) -> None:
        found = _joblog.diagnose(line, self.ignore)
        if found is not None:
            self._fail(
                f"known failure in {self.log} before {self._waiting()}: {line.strip()}",
                found.hint,
            )
        for regex in self.fail_res:
            if regex.search(line):
                self._fail(
                    f"`{regex.pattern}` in {self.log} before {self._waiting()}: {line.strip()}"
                )

    def _fail(self, reason: str, hint: str | None = None) -> None:
        self.failed = True
        self._write()
        raise StepFailed(reason, hint)

    def _waiting(self) -> str:
        index = self.count
        return (
            f"marker {index + 1} `{self.markers[index].name}` ({self.count} of "
            f"{len(self.markers)} seen)"
        )

    def timeout_reason(self, elapsed: float) -> str:
        if self.follower.ident is None and not self.log.exists():
            return f"timed out after {elapsed:.0f}s: {self.log} never appeared"
        seen = ", ".join(f"`{m.name}`" for i, m in enumerate(self.markers) if self.seen[i])
        missing = self.markers[self.count]
        after = len(self.markers) - self.count - 1
        text = (
            f"timed out after {elapsed:.0f}s waiting for marker {self.count + 1} `{missing.name}`"
            + (f" (and {after} after it)" if after else "")
            + f" in {self.log}; seen {self.count}/{len(self.markers)}"
            + (f": {seen}" if seen else "")
        )
        return text + (f"; last line: {self.last_line.strip()}" if self.last_line else "")

    def timeout_hint(self) -> str:
        return f"read the job's output: tail -50 {self.log}"

    def report(self, ctx: StepContext) -> None:
        self._write()
        shown = ", ".join(f"{k}={v}" for k, v in self.values.items())
        index = self.count
        waiting = (
            f"waiting for `{self.markers[index].name}`" if index < len(self.markers) else "done"
        )
        ctx.progress(
            files_done=self.count,
            files_total=len(self.markers),
            message=f"{self.count}/{len(self.markers)} markers; {waiting}"
            + (f"; {shown}" if shown else ""),
        )

    def _write(self) -> None:
        write_json_atomic(
            self.workdir / MARKERS_FILE,
            {
                "log": str(self.log),
                "markers": [
                    {"name": m.name, "line": self.seen[i]} for i, m in enumerate(self.markers)
                ],
                "values": self.values,
            },
        )

    def close(self) -> None:
        self.follower.close()


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


KIND = WaitLog()
