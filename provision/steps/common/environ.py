"""The process environment swapped for a block, for libraries that take no `env` argument.

libtmux and rclone-python spawn their binaries with `os.environ`; a step must run them with its
own environment (its PATH, its secrets, or no secrets at all), so the kind swaps it in around
the calls and puts the agent's own back afterwards, whatever happens inside.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def swapped_environ(env: Mapping[str, str]) -> Iterator[None]:
    """Run the block with `os.environ` holding exactly `env`; restore the old one after."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
