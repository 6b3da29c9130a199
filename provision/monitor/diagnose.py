"""`bootstrap diagnose LOGFILE|-`: match any log against the failure catalog and explain it.

The CLI reads the file (or stdin), calls `diagnose_command(text)`, prints
`render_diagnosis(matches, source)` (or `[m.to_dict() for m in matches]` with `--json`) and exits
0 when something matched, 1 when nothing did.
"""

from __future__ import annotations

import textwrap

from provision.monitor.catalog import Catalog, Match, default_catalog

WIDTH = 100


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
