"""Secrets: never in output, status, state, plans, logs, argv or git config; redacted by value.

The end-to-end test runs a playbook whose steps print a canary secret every way a tool might
(plainly, base64, URL-encoded, inside a Basic auth header git traces), write it through a
template, clone a private repository with it, and fail while quoting it; then it searches every
place a secret must not reach. The redactor itself is tested directly as well.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shlex
import stat
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

import pytest
from boxes import Box
from githttp import make_repos, serve_git
from project import Project

from provision.agent.redact import MASK, MIN_SECRET_LEN, Redactor

# --------------------------------------------------------------------------- the redactor


def _b64_runs(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9+/_-]{4,}=*", text)


def _decodes_to(text: str, secret: str) -> bool:
    """Whether any base64 run of `text`, read at any alignment, decodes to hold `secret`."""
    for run in _b64_runs(text):
        core = run.rstrip("=").replace("-", "+").replace("_", "/")
        for start in range(4):
            chunk = core[start:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            try:
                if secret.encode() in base64.b64decode(chunk):
                    return True
            except ValueError:
                continue
    return False


# Lengths 24, 25 and 26: each remainder mod 3, since base64 groups bytes in threes.
TOKENS = ["ghp_AbCdEfGhIj0123456789", "ghp_AbCdEfGhIj01234567890", "ghp_AbCdEfGhIj012345678901"]


@pytest.mark.parametrize("token", TOKENS)
@pytest.mark.parametrize("prefix", ["", "u:", "us:", "x-access-token:"])
@pytest.mark.parametrize("suffix", ["", "\n", ":y", "yz!"])
def test_base64_of_the_value_inside_a_longer_blob_is_masked(
    token: str, prefix: str, suffix: str
) -> None:
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        blob = encode((prefix + token + suffix).encode()).decode()
        line = f"> Authorization: Basic {blob}\n"
        out = Redactor([token])(line)
        assert MASK in out, (prefix, suffix, out)
        assert not _decodes_to(out, token), (prefix, suffix, out)


@pytest.mark.parametrize("token", TOKENS)
def test_base64_blob_at_offsets_0_1_2(token: str) -> None:
    # The value starting at byte offset 0, 1 and 2 of a 3-byte group, with data after it.
    for offset in range(3):
        blob = base64.b64encode(b"u" * offset + token.encode() + b"tail").decode()
        assert not _decodes_to(Redactor([token])(blob), token), offset


def test_plain_and_url_encoded_forms_are_masked() -> None:
    secret = "p@ss/w:rd+x y&z=1"
    redact = Redactor([secret])
    for form in (
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
        base64.b64encode(secret.encode()).decode(),
    ):
        out = redact(f"https://user:{form}@example.com/repo.git?x={form}&y=2")
        assert form not in out and out.count(MASK) == 2, out


def test_several_secrets_and_overlapping_values() -> None:
    redact = Redactor(["abcdef123456", "abcdef123456789", "zzzzzz999999"])
    out = redact("a=abcdef123456789 b=abcdef123456 c=zzzzzz999999")
    assert out == f"a={MASK} b={MASK} c={MASK}"


def test_short_values_are_not_redacted_and_empty_redactor_is_identity() -> None:
    short = "x" * (MIN_SECRET_LEN - 1)
    assert not Redactor([short, ""])
    assert Redactor([short])(f"value {short}") == f"value {short}"
    assert Redactor([])("anything") == "anything"


# --------------------------------------------------------------------------- end to end

CANARY_ENV = "Cnry+Env/9xQ7wLp=ZtUv3k8"  # base64/URL-special characters, length 24
CANARY_FILE = "cnryFILE-4d7b1e9a0c2f6b8e5"  # length 26: its base64 ends mid-group


def _forms(value: str) -> list[str]:
    """What a leak of `value` would look like in text (computed without the redactor)."""
    raw = value.encode()
    forms = {
        value,
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }
    return sorted(forms)


def _leaks(text: str, values: Iterable[str]) -> list[str]:
    found = [f for v in values for f in _forms(v) if f in text]
    found += [v for v in values if _decodes_to(text, v)]
    return found


class BoxSampler:
    """While running: every command line of the box's processes, and the secrets file's mode."""

    def __init__(self, box: Box, secrets_file: Path) -> None:
        self.box = box
        self.secrets_file = secrets_file
        self.cmdlines: set[str] = set()
        self.modes: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.cmdlines.update(cmd for _, cmd in self.box.processes())
            with contextlib.suppress(FileNotFoundError):
                self.modes.add(stat.S_IMODE(self.secrets_file.stat().st_mode))
            time.sleep(0.01)

    def __enter__(self) -> BoxSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


PLAYBOOK = """
name: canary
steps:
  - id: show
    kind: shell
    secrets: [ENV_TOKEN, FILE_TOKEN]
    run: |
      echo "plain: $ENV_TOKEN and $FILE_TOKEN"
      printf '%s' "$ENV_TOKEN" | base64
      printf 'user:%s' "$FILE_TOKEN" | base64 -w0; echo
      printf '%s:more' "$FILE_TOKEN" | base64 -w0; echo
      python3 -c 'import os, urllib.parse as u; print("url:", u.quote(os.environ["ENV_TOKEN"], safe=""))'
      echo "to stderr: $FILE_TOKEN" >&2
      sleep 2
  - id: render
    kind: template
    src: secret.conf
    dest: ~/secret.conf
  - id: render-plain
    kind: template
    src: plain.conf
    dest: ~/plain.conf
  - id: clone
    kind: git_clone
    repo: "{{ git_url }}/app.git"
    dest: ~/app
    token_secret: FILE_TOKEN
    env: {GIT_TRACE_CURL: "1", GIT_TRACE_REDACT: "0"}
  - id: quote-and-fail
    kind: shell
    needs: [show]
    secrets: [ENV_TOKEN]
    run: |
      echo "the token was $ENV_TOKEN"
      echo "config: wandb_key=$ENV_TOKEN" > ~/job.log
      exit 3
  - id: watch
    kind: wait_log
    needs: [quote-and-fail]
    log: ~/job.log
    markers: ['never printed']
    fail_on: ['wandb_key=']
    timeout: 20
"""


@pytest.mark.slow
def test_canary_secret_appears_nowhere(project: Project, box: Box, tmp_path: Path) -> None:
    token_file = tmp_path / "token.txt"
    token_file.write_text(CANARY_FILE + "\n")
    project.env["BT_CANARY_ENV"] = CANARY_ENV
    project.secrets = {
        "ENV_TOKEN": {"env": "BT_CANARY_ENV"},
        "FILE_TOKEN": {"file": str(token_file)},
    }
    project.template("secret.conf", "token = {{ secrets.ENV_TOKEN }}\nhost = {{ host }}\n")
    project.template("plain.conf", "host = {{ host }}\n")
    project.playbook(PLAYBOOK)
    canaries = [CANARY_ENV, CANARY_FILE]
    repos = make_repos(tmp_path / "repos")
    run_dir = box.home / ".bootstrap" / "runs" / "canary"
    outputs: list[str] = []
    with serve_git(repos.root, "x-access-token", CANARY_FILE) as server:
        project.host_vars = {"git_url": server.url}
        with BoxSampler(box, run_dir / "secrets.json") as sampler:
            up = project.up("box1")
        assert server.authorized > 0
    outputs += [up.stdout, up.stderr]
    assert up.returncode == 1, up.stdout + up.stderr
    steps = project.steps("box1")
    assert [steps[s]["status"] for s in ("show", "render", "render-plain", "clone")] == ["done"] * 4
    assert steps["quote-and-fail"]["status"] == "failed"
    assert steps["watch"]["status"] == "blocked"
    # A watcher that quotes the job's log line in its reason (the job printed the secret).
    project.playbook(PLAYBOOK.replace("needs: [quote-and-fail]", "needs: [show]"))
    outputs += [project.up("box1").stderr]
    watch = project.steps("box1")["watch"]
    assert watch["status"] == "failed" and f"wandb_key={MASK}" in watch["reason"], watch

    # The secret reached the step: the log shows it was printed, masked.
    show_log = (run_dir / "logs" / "show.log").read_text()
    assert show_log.count(MASK) >= 4 and "to stderr: ***" in show_log
    clone_log = (run_dir / "logs" / "clone.log").read_text()
    assert re.search(r"Authorization: Basic [A-Za-z0-9+/]*\*\*\*", clone_log), "git traced it"

    # Every way the controller shows things.
    args = ["-p", "playbooks/test.yaml"]
    for command in (
        ["status", "box1", *args],
        ["status", "box1", *args, "--json"],
        ["status", "box1", "--json", "-n", "50"],
        ["plan", "box1", *args],
        ["plan", "box1", *args, "--json"],
        *[["logs", "box1", step, *args, "-n", "200"] for step in steps],
        ["up", "box1", *args],
    ):
        result = project.cli(*command)
        assert "Traceback" not in result.stderr, result.stderr
        outputs += [result.stdout, result.stderr]
    assert _leaks("\n".join(outputs), canaries) == []

    # On the box: state, plan, logs, step dirs; the secrets file was 0600 and is gone.
    assert not (run_dir / "secrets.json").exists()
    assert sampler.modes == {0o600}, sampler.modes
    for path in (box.home / ".bootstrap").rglob("*"):
        if path.is_file() and path.suffix != ".pyz":
            assert _leaks(path.read_text(errors="replace"), canaries) == [], path
    plan = json.loads((run_dir / "plan.json").read_text())
    assert "@@bootstrap-secret:ENV_TOKEN@@" in json.dumps(plan), (
        "templates travel with placeholders"
    )

    # No process on the box ever had it in its argv (the show step ran for 2 s meanwhile).
    assert any("sleep 2" in cmd or "bash -e" in cmd for cmd in sampler.cmdlines)
    assert [cmd for cmd in sampler.cmdlines if _leaks(cmd, canaries)] == []

    # The template with the secret holds it at 0600; the one without has none and is 0644.
    secret_conf = box.home / "secret.conf"
    assert secret_conf.read_text().startswith(f"token = {CANARY_ENV}\n")
    assert stat.S_IMODE(secret_conf.stat().st_mode) == 0o600
    plain_conf = box.home / "plain.conf"
    assert _leaks(plain_conf.read_text(), canaries) == []
    assert stat.S_IMODE(plain_conf.stat().st_mode) == 0o644

    # git kept no credential anywhere, and the askpass script is gone.
    git_files = [p for p in (box.home / "app" / ".git").rglob("*") if p.is_file()]
    assert [p for p in git_files if CANARY_FILE.encode() in p.read_bytes()] == []
    assert not list(run_dir.rglob("askpass*"))
    assert not (box.home / ".git-credentials").exists()

    # The controller's own files (agent cache, known_hosts) hold nothing either.
    config = Path(project.env["BOOTSTRAP_CONFIG_DIR"])
    for path in config.rglob("*"):
        if path.is_file() and path.suffix != ".pyz":
            assert _leaks(path.read_text(errors="replace"), canaries) == [], path


# --------------------------------------------------------------------------- escaped forms

#: Shaped like the token `rclone authorize "drive"` prints; the access token holds `<>&"\`,
#: which Go's encoding/json (rclone) escapes as \u003c \u003e \u0026 \" \\.
DRIVE_TOKEN = {
    "access_token": 'ya29.a0AfB_by<Cnry>&"x\\ACCESS-9f2k',
    "token_type": "Bearer",
    "refresh_token": "1//0gCnryREFRESH-Lq7wz_p3",
    "expiry": "2026-12-02T18:06:41.123456789Z",
}
SHELL_SECRET = "Cnry p@ss$w0rd'x!y&z"  # every kind of character printf %q escapes


def _escaped_leaks(text: str, values: Iterable[str]) -> list[str]:
    """Escaped forms of `values` found in `text`, computed without the redactor: JSON (Python,
    and Go's HTML-safe escaping as rclone prints), JSON inside JSON, bash's printf %q."""
    found = []
    for value in values:
        once = json.dumps(value)[1:-1]
        go = once.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        quoted = subprocess.run(
            ["bash", "-c", 'printf %q "$0"', value], capture_output=True, text=True, check=True
        ).stdout
        for form in {value, once, go, json.dumps(once)[1:-1], json.dumps(go)[1:-1], quoted}:
            if form in text:
                found.append(form)
    return found


def _token_fields() -> list[str]:
    return [DRIVE_TOKEN["access_token"], DRIVE_TOKEN["refresh_token"]]


def test_json_escaped_and_shell_quoted_forms_are_masked() -> None:
    redact = Redactor([SHELL_SECRET, json.dumps(DRIVE_TOKEN)])
    token = json.dumps(DRIVE_TOKEN)
    printed = [
        json.dumps({"password": SHELL_SECRET}),
        json.dumps({"conf": json.dumps({"password": SHELL_SECRET})}),
        json.dumps(DRIVE_TOKEN, indent=2),
        json.dumps({"gdrive": {"token": token, "type": "drive"}}, indent=4),
        json.dumps({"outer": json.dumps({"token": token})}),
        repr(SHELL_SECRET),
        shlex.quote(SHELL_SECRET),
        subprocess.run(
            ["bash", "-c", 'printf %q "$0"', SHELL_SECRET], capture_output=True, text=True
        ).stdout,
    ]
    for text in printed:
        out = redact(text)
        assert MASK in out, text
        assert _escaped_leaks(out, [SHELL_SECRET, *_token_fields()]) == [], (text, out)
    # Fields too short to be secrets stay readable; so does everything that is not a secret.
    assert '"token_type": "Bearer"' in redact(json.dumps(DRIVE_TOKEN, indent=2))
    assert redact('{"a": "b\\"c", "path": "C:\\\\x"}') == '{"a": "b\\"c", "path": "C:\\\\x"}'


def test_a_json_secret_that_is_not_an_object_is_one_value() -> None:
    redact = Redactor(["{not json at all}"])
    assert redact("x {not json at all} y") == f"x {MASK} y"


ESCAPE_PLAYBOOK = """
name: escapes
steps:
  - id: print
    kind: shell
    secrets: [SHELL_SECRET, RCLONE_DRIVE_TOKEN]
    run: |
      printf 'quoted: %q\\n' "$SHELL_SECRET"
      python3 -c 'import json, os; print("json:", json.dumps({"p": os.environ["SHELL_SECRET"]}))'
      python3 -c 'import json, os; print(json.dumps(json.loads(os.environ["RCLONE_DRIVE_TOKEN"]), indent=2))'
      python3 -c 'import json, os; print(json.dumps({"doc": os.environ["RCLONE_DRIVE_TOKEN"]}))'
      mkdir -p ~/rc
      printf '[gdrive]\\ntype = drive\\ntoken = %s\\n' "$RCLONE_DRIVE_TOKEN" > ~/rc/rclone.conf
      rclone --config ~/rc/rclone.conf config dump
      echo "fail: $(printf %q "$SHELL_SECRET")" >&2
      exit 1
"""


@pytest.mark.slow
def test_escaped_secret_forms_appear_nowhere(project: Project, box: Box, tmp_path: Path) -> None:
    token_file = tmp_path / "drive-token.json"
    token_file.write_text(json.dumps(DRIVE_TOKEN) + "\n")
    project.env["BT_SHELL_SECRET"] = SHELL_SECRET
    project.secrets = {
        "SHELL_SECRET": {"env": "BT_SHELL_SECRET"},
        "RCLONE_DRIVE_TOKEN": {"file": str(token_file)},
    }
    project.playbook(ESCAPE_PLAYBOOK)
    secrets = [SHELL_SECRET, *_token_fields()]
    up = project.up("box1")
    assert up.returncode == 1, up.stdout + up.stderr
    run_dir = box.home / ".bootstrap" / "runs" / "escapes"
    log = (run_dir / "logs" / "print.log").read_text()
    # The step printed every form (masked), and rclone really dumped the config.
    assert log.count(MASK) >= 9 and '"type": "drive"' in log and "Bearer" in log, log
    outputs = [up.stdout, up.stderr]
    args = ["-p", "playbooks/test.yaml"]
    for command in (
        ["logs", "box1", "print", *args, "-n", "200"],
        ["status", "box1", *args, "--json", "-n", "200"],
        ["status", "box1", *args, "-n", "50"],
        ["up", "box1", *args],
    ):
        result = project.cli(*command)
        assert "Traceback" not in result.stderr, result.stderr
        outputs += [result.stdout, result.stderr]
    assert _escaped_leaks("\n".join(outputs), secrets) == []
    assert MASK in outputs[2], "logs shows the masked lines"
    for path in (box.home / ".bootstrap").rglob("*"):
        if path.is_file() and path.suffix != ".pyz":
            assert _escaped_leaks(path.read_text(errors="replace"), secrets) == [], path
