"""The lowest CPU and disk priority, for work beside what the box is for: the checkpoint
guard and the step cache's saves (and everything they start).

Two layers, because either alone leaves the job paying:
- `nice_prefix`: `nice -n 19` and `ionice -c 3` in front of a command line.
- `yield_to_the_job`, called by such a process first: its Unix session's autogroup at nice 19
  and the `SCHED_IDLE` policy, both inherited by what it starts. With autogroups (Linux's
  default on most distributions: `kernel.sched_autogroup_enabled`) the scheduler shares the
  CPU between sessions first, each at the same weight whatever its processes' nice values: a
  process in a session of its own would get as much CPU as the whole training, or as the
  runner's session with the steps still on the way to step 0 (without autogroups the file is
  absent and nice alone does it). And nice 19 alone still cost a CPU-bound trainer ~7% on a
  loaded 2-core machine (bench/README.md): the scheduler counts a CPU running a nice-19 task
  as busy and puts the processes it wakes beside the job instead; a CPU running only
  `SCHED_IDLE` tasks counts as idle, and they yield it at once.

Both are allowed to any user (they only lower priority).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def nice_prefix() -> list[str]:
    """`nice -n 19 ionice -c 3`, as far as this box has them."""
    prefix = ["nice", "-n", "19"] if shutil.which("nice") else []
    if shutil.which("ionice"):
        prefix += ["ionice", "-c", "3"]
    return prefix


def yield_to_the_job() -> None:
    """This process, and what it starts from now on, get the CPU only when nothing else wants
    it (see the module doc)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text("19", encoding="utf-8")
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
