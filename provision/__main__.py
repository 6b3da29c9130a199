"""`bootstrap` (the console script) and `python -m provision`: remembered SSH masters start
first (provision/earlyssh.py), then the CLI is imported and run."""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Run the CLI, its known ssh handshakes already under way."""
    from provision import earlyssh

    earlyssh.start(sys.argv[1:], os.getcwd())
    from provision.cli import app

    app(prog_name="bootstrap")


if __name__ == "__main__":
    main()
