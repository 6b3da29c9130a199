"""Notifications from the box through apprise, one message per event.

The URLs (apprise's: `json://host/path`, `slack://...`, `ntfy://...`, `tgram://...`,
`mailto://...`; several separated by spaces or commas) are a secret: they come from the
inventory secret that `watch.notify` names, live only in the guard's environment, and never
reach a log (apprise's own logging is silenced, since it can print a URL; a failure is reported
without it). `notified.json` in the step's directory holds the events already sent, so neither
a second look nor a guard restarted after `kill -9` sends one twice; an event whose message
could not be sent is tried again at the next look. apprise runs in the agent's venv (the `[box]`
extra); it is imported only when there is something to send.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provision.steps.base import read_json, write_json_atomic

SENT_FILE = "notified.json"
#: Kinds of finding worth a message (info ones included: training started, finished).
_TITLES = {
    "training": "training runs",
    "stalled": "training stalled",
    "alert": "alert",
    "upload_failing": "checkpoints are not leaving the box",
    "crashed": "training crashed",
    "finished": "training finished",
    "on_finish": "on_finish ran",
}


class Notifier:
    """Sends each event once to the apprise URLs (see the module doc)."""

    def __init__(
        self, urls: str | None, workdir: Path, where: str, log: Callable[[str], None]
    ) -> None:
        self.urls = [u for u in re.split(r"[\s,]+", urls or "") if u]
        self.path = workdir / SENT_FILE
        self.where = where
        self.log = log
        sent = read_json(self.path, {})
        sent = sent if isinstance(sent, dict) else {}
        self.sent: list[str] = list(sent.get("events") or [])
        self.last: dict[str, float] = dict(sent.get("last") or {})

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
        now = time.time()
        if quiet_key is not None and now - self.last.get(quiet_key, -1e18) < quiet_s:
            return True
        if not self.urls:
            return False
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
            import apprise
        except ImportError:
            self.log("notifications need apprise in the agent's venv (pip install apprise)")
            return False
        quiet = logging.getLogger("apprise")
        quiet.setLevel(logging.CRITICAL + 1)
        quiet.propagate = False
        sender = apprise.Apprise()
        for url in self.urls:
            if not sender.add(url):
                self.log("a notify URL is not one apprise understands (not shown: it is a secret)")
        try:
            return bool(sender.notify(title=title, body=body)) if len(sender) else False
        except Exception as exc:  # apprise plugins may raise anything
            self.log(f"notification failed: {type(exc).__name__}")
            return False
