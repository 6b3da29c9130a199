"""Bytes `up` receives while it follows a long run, against sending a full snapshot per change.

A 2,000-step run once streamed 230 MB to `up`: every change of any step re-sent the whole run.
The stream now carries a snapshot, then only the records of the steps that changed, then a
final snapshot. Measured where `up` reads it: the box's `box_python` is a wrapper copying the
agent's stdout to a file on its way into ssh. The baseline is computed from the same stream:
each event replaced by the full snapshot it stands for (what the old protocol sent for the
same changes).

    python bench/follow_stream.py [--steps 2000] [--parallel 8]
"""

from __future__ import annotations

import argparse
import json

import harness
import yaml
from tools import Bootstrap

from provision.agent.report import apply_changes


def measure(steps: int, parallel: int) -> None:
    with harness.workspace() as work, harness.fleet(work, 1) as (box,):
        stream = box.home / "stream.jsonl"
        wrapper = box.home / "py" / "python"
        wrapper.parent.mkdir()
        wrapper.write_text(
            "#!/bin/bash\n"
            f'if [ "$1" = -c ]; then python3 "$@" | tee -a {stream}; '
            'exit "${PIPESTATUS[0]}"; fi\nexec python3 "$@"\n'
        )
        wrapper.chmod(0o755)
        project = work / "project"
        (project / "playbooks").mkdir(parents=True)
        entry = {**box.inventory_entry(), "vars": {"box_python": str(wrapper)}}
        (project / "inventory.yaml").write_text(yaml.safe_dump({"hosts": {"b1": entry}}))
        book = {
            "name": "long",
            "max_parallel": parallel,
            "steps": [
                {"id": f"s{i}", "kind": "shell", "run": "true"}
                | ({"needs": [f"s{i - parallel}"]} if i >= parallel else {})
                for i in range(steps)
            ],
        }
        playbook = project / "playbooks" / "long.yaml"
        playbook.write_text(yaml.safe_dump(book, sort_keys=False))
        bootstrap = Bootstrap(project, harness.controller_env(work))
        harness.check(bootstrap.cli("up", "b1", "-p", str(playbook), timeout=3600), "up")
        lines = [ln for ln in stream.read_bytes().splitlines() if ln.startswith(b"{")]
        sent = sum(len(ln) + 1 for ln in lines)
        full = 0
        current: dict[str, object] = {}
        for line in lines:
            event = json.loads(line)
            current = apply_changes(current, event) if event["event"] == "changes" else event
            full += len(json.dumps(dict(current, event=event["event"]), sort_keys=True)) + 1
        kinds = [json.loads(ln)["event"] for ln in lines]
        print(f"== follow stream: {steps} steps of `true`, {parallel} in parallel")
        print(f"  events: {len(lines)} ({kinds.count('changes')} changes)")
        print(f"  streamed:                       {sent / 1e6:10.2f} MB")
        print(f"  full snapshot per event (old):  {full / 1e6:10.2f} MB")
        print(f"  streamed / full snapshots:      {sent / full:10.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()
    measure(args.steps, args.parallel)


if __name__ == "__main__":
    main()
