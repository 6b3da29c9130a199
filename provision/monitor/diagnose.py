"""`bootstrap diagnose LOGFILE|-`: match any log against the failure catalog and explain it.

The CLI reads the file (or stdin), calls `diagnose_command(text)`, prints
`render_diagnosis(matches, source)` (or `[m.to_dict() for m in matches]` with `--json`) and exits
0 when something matched, 1 when nothing did.

With `-p PLAYBOOK --step STEP` (a `wait_log` step, resolved offline: no inventory, no secrets)
it checks the log against that step's markers with the rules the step applies on the box
(`wait_log.check_params`): that gives the verdict, `render_step_verdict` the text, and
the CLI exits 0 when the markers are met, 1 when not (naming the first unmet marker, plus what
the catalog knows about the log).
"""

from __future__ import annotations

import textwrap
from typing import Any, Protocol

from provision.agent.catalog import Catalog, Match, default_catalog

WIDTH = 100


class StepVerdict(Protocol):
    """What `render_step_verdict` reads of a `wait_log` verdict (`wait_log.Verdict`; named by
    its shape so that the monitor does not import the step kinds, which import the monitor)."""

    @property
    def met(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def hint(self) -> str | None: ...
    @property
    def record(self) -> dict[str, Any]: ...


def diagnose_command(text: str, catalog: Catalog | None = None) -> list[Match]:
    """Known issues found in `text` (a log, a pasted terminal), earliest first."""
    return (catalog or default_catalog()).match(text)


def render_diagnosis(
    matches: list[Match], source: str = "the input", catalog: Catalog | None = None
) -> str:
    """Plain text: each issue with the line that shows it, the diagnosis and the fix."""
    if not matches:
        checked = len(catalog or default_catalog())
        return f"No known issue found in {source} ({checked} signatures checked).\n"
    noun = "issue" if len(matches) == 1 else "issues"
    out = [f"{len(matches)} known {noun} in {source}:"]
    for m in matches:
        out.append("")
        out.append(f"[{m.id}] {m.title}")
        out.append(f"  line {m.line_no}: {m.line}")
        out.extend(_field("diagnosis", m.diagnosis))
        out.extend(_field("fix", m.fix))
        if m.remediation:
            out.append(f"  remediation: {m.remediation} (steps may apply it once by themselves)")
    return "\n".join(out) + "\n"


def _field(name: str, text: str) -> list[str]:
    return textwrap.wrap(
        text, WIDTH, initial_indent=f"  {name}: ", subsequent_indent=" " * (len(name) + 4)
    )


def render_step_verdict(step_id: str, verdict: StepVerdict, matches: list[Match]) -> str:
    """Plain text: met or not (and why), each marker with the line that showed it, diagnoses."""
    head = f"{step_id}: markers met" if verdict.met else f"{step_id}: NOT met: {verdict.reason}"
    out = [head]
    if verdict.hint and not matches:  # a catalog issue's hint is its diagnosis, shown below
        out.extend(_field("hint", verdict.hint))
    for marker in verdict.record["markers"]:
        shown = marker["line"] if marker["line"] is not None else "-- not seen"
        out.append(f"  [{'x' if marker['line'] is not None else ' '}] {marker['name']}: {shown}")
    values = verdict.record.get("values") or {}
    if values:
        out.append("  values: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in values.items()))  # fmt: skip
    text = "\n".join(out) + "\n"
    if not verdict.met and matches:
        text += "\n" + render_diagnosis(matches, "the log")
    return text
