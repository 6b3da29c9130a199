"""Notifications from the box through apprise, one message per event.

The URLs (apprise's: `json://host/path`, `slack://...`, `ntfy://...`, `tgram://...`,
`mailto://...`; several separated by spaces or commas) are a secret: they come from the
inventory secret that `watch.notify` names, live only in the guard's environment, and never
reach a log (apprise's own logging is silenced, since it can print a URL; a failure is reported
without it). `notified.json` in the step's directory holds the events already sent, so neither
a second look nor a guard restarted after `kill -9` sends one twice; an event whose message
could not be sent is tried again at the next look. The guard and the runner (which tells a
failed setup and training verified, provision/watch/run_news.py) share a step's file: each event
is decided and sent under a lock on it (`notified.lock`), the file read again each time, so one
event is one message whichever process sees it first.

apprise runs in the agent's venv (the `[box]` extra), imported only when there is something to
send; a process without it (the runner, on the box's plain python3) hands the message to that
venv's interpreter (`python -m provision.watch.notify`, the URLs and the message on its stdin,
never in its argv).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import provision
from provision.agent.files import read_json, write_json_atomic

SENT_FILE = "notified.json"
LOCK_FILE = "notified.lock"
#: Seconds the venv's interpreter may take to deliver one message (apprise's own timeouts are
#: a few seconds per service).
DELIVER_TIMEOUT_S = 60.0
#: Kinds of finding worth a message (info ones included: training started, finished).
_TITLES = {
    "training": "training runs",
    "stalled": "training stalled",
    "alert": "alert",
    "upload_failing": "checkpoints are not leaving the box",
    "crashed": "training crashed",
    "finished": "training finished",
    "on_finish": "on_finish ran",
    "setup_failed": "setup failed",
    "verified": "training verified",
}


class Notifier:
    """Sends each event once to the apprise URLs (see the module doc)."""

    def __init__(
        self,
        urls: str | None,
        workdir: Path,
        where: str,
        log: Callable[[str], None],
        python: str | None = None,
    ) -> None:
        """`python`: an interpreter with apprise, for a process that lacks it."""
        self.urls = [u for u in re.split(r"[\s,]+", urls or "") if u]
        self.workdir = workdir
        self.path = workdir / SENT_FILE
        self.where = where
        self.log = log
        self.python = python
        self.sent: list[str] = []
        self.last: dict[str, float] = {}
        self._load()

    def _load(self) -> None:
        sent = read_json(self.path, {})
        sent = sent if isinstance(sent, dict) else {}
        self.sent = list(sent.get("events") or [])
        self.last = dict(sent.get("last") or {})

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The step's notifications to itself (another process may tell the same event)."""
        self.workdir.mkdir(parents=True, exist_ok=True)  # a step that never ran has none yet
        with open(self.workdir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._load()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def tell(
        self,
        event: str,
        kind: str,
        message: str,
        extra: str = "",
        quiet_key: str | None = None,
        quiet_s: float = 0.0,
    ) -> bool:
        """Send `message` for `event` unless it was sent before, or unless `quiet_key` was told
        less than `quiet_s` ago (an alert that flaps is one message per `quiet_s`); True once
        it is sent or needs no sending."""
        if event in self.sent:
            return True
        if not self.urls:
            return False
        with self._locked():
            return self._tell(event, kind, message, extra, quiet_key, quiet_s)

    def _tell(
        self,
        event: str,
        kind: str,
        message: str,
        extra: str,
        quiet_key: str | None,
        quiet_s: float,
    ) -> bool:
        if event in self.sent:
            return True
        now = time.time()
        if quiet_key is not None and now - self.last.get(quiet_key, -1e18) < quiet_s:
            return True
        title = f"{self.where}: {_TITLES.get(kind, kind)}"
        body = message + (f"\n{extra}" if extra else "")
        if not self._send(title, body):
            self.log(f"notification for {event} could not be sent; trying again at the next look")
            return False
        self.sent.append(event)
        if quiet_key is not None:
            self.last[quiet_key] = now
        write_json_atomic(self.path, {"events": self.sent, "last": self.last})
        self.log(f"notified: {title}: {message}")
        return True

    def tell_findings(self, doc: dict[str, Any], rerun: str, repeat_s: float) -> None:
        """One message per new event of a `watch.json` document; an alert of the monitor's
        rules at most once per `repeat_s` for the same rule and subject."""
        if doc.get("first_step") is not None:
            loss = (doc.get("progress") or {}).get("loss")
            text = f"step {doc['first_step']}" + (f", loss {loss}" if loss is not None else "")
            self.tell(f"training@{doc.get('launch')}", "training", text)
        for finding in doc.get("findings") or []:
            extra = ""
            if finding["kind"] == "crashed":
                hint = (doc.get("job") or {}).get("hint")
                extra = (f"fix: {hint}\n" if hint else "") + f"then: {rerun}"
            quiet = finding["key"] if finding["kind"] == "alert" else None
            self.tell(finding["event"], finding["kind"], finding["message"], extra, quiet, repeat_s)

    def _send(self, title: str, body: str) -> bool:
        try:
            import apprise  # noqa: F401
        except ImportError:
            if self.python is None:
                self.log("notifications need apprise in the agent's venv (pip install apprise)")
                return False
            return self._send_through(self.python, title, body)
        return deliver(self.urls, title, body, self.log)

    def _send_through(self, python: str, title: str, body: str) -> bool:
        """Deliver with another interpreter (the agent venv's, which has apprise)."""
        root = str(Path(provision.__file__).resolve().parent.parent)  # this package (or .pyz)
        env = dict(os.environ, PYTHONPATH=root)
        message = json.dumps({"urls": self.urls, "title": title, "body": body})
        try:
            done = subprocess.run(
                [python, "-m", "provision.watch.notify"],
                input=message,
                capture_output=True,
                text=True,
                timeout=DELIVER_TIMEOUT_S,
                env=env,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.log(f"notification failed: {python} could not deliver it ({type(exc).__name__})")
            return False
        for line in done.stderr.splitlines():
            self.log(line)
        return done.returncode == 0


def deliver(urls: list[str], title: str, body: str, log: Callable[[str], None]) -> bool:
    """Send one message to every URL through apprise (imported here); True when it went."""
    import apprise

    quiet = logging.getLogger("apprise")
    quiet.setLevel(logging.CRITICAL + 1)
    quiet.propagate = False
    sender = apprise.Apprise()
    for url in urls:
        if not sender.add(url):
            log("a notify URL is not one apprise understands (not shown: it is a secret)")
    try:
        return bool(sender.notify(title=title, body=body)) if len(sender) else False
    except Exception as exc:  # apprise plugins may raise anything
        log(f"notification failed: {type(exc).__name__}")
        return False


def main() -> int:
    """`python -m provision.watch.notify`: deliver the message on stdin ({urls, title, body});
    what goes wrong goes to stderr, without the URLs."""
    try:
        message = json.load(sys.stdin)
    except ValueError:
        sys.stderr.write("notify: expected a JSON message on stdin\n")
        return 2
    try:
        import apprise  # noqa: F401
    except ImportError:
        sys.stderr.write(f"notifications need apprise in {sys.executable}'s environment\n")
        return 1

    def say(line: str) -> None:
        sys.stderr.write(line + "\n")

    sent = deliver(
        list(message.get("urls") or []),
        str(message.get("title") or ""),
        str(message.get("body") or ""),
        say,
    )
    return 0 if sent else 1


if __name__ == "__main__":
    sys.exit(main())
