"""`template`: write a rendered file (config, rclone.conf, ~/.netrc) with a mode, atomically.

`src` names a file under `templates/` next to the playbook; the controller renders it with
jinja2 and the host's vars (secrets become placeholders, never values), or `content` gives the
text inline. On the box the step fills in the secrets it was given, then writes `dest` through a
temporary file created with the final mode, fsynced and renamed, so no reader ever sees half a
file or a secret file with loose permissions. `mode` defaults to 0600 when the text holds a
secret, else 0644. The content is never printed.

Done when `dest` has the filled content and the mode: its bytes compared with the content when
the step has its secrets' values (a no-op needs no hashlib), else its sha256 with the last write's. New 86-character `wandb_v1_...`
keys work, as the key is written to `~/.netrc` instead of going through `wandb login`.

Example:

```yaml
- id: wandb-netrc
  kind: template
  src: netrc
  dest: ~/.netrc
  secrets: [WANDB_API_KEY]
- id: ae-config
  kind: template
  content: |
    run_name: waypoint_ae
    batch_size: 8
  dest: /workspace/openpi/configs/waypoint_ae_libero.yaml
  mode: "0644"
```
"""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

from provision.agent.files import atomic_writer, file_sha256, read_json, write_json_atomic
from provision.errors import StepFailed
from provision.steps.base import (
    SECRET_MARK,
    Check,
    Kind,
    Param,
    ParamError,
    ResolveTools,
    StepContext,
)

#: Matches a secret placeholder and captures the secret's name.
_PLACEHOLDER = re.compile(re.escape(SECRET_MARK).replace(re.escape("{}"), r"([A-Za-z0-9_.-]+)"))
_MODE = re.compile(r"0?[0-7]{3}")
#: Remembers the last write, for when the check runs without the secrets' values.
_MARKER = "written.json"


class Template(Kind):
    """Write `dest` from a controller-rendered template or inline text, secrets filled in."""

    name = "template"
    summary = "write a rendered template or inline text to a file with a mode (atomic)"
    params = (
        Param("src", "str", "template name under templates/ (rendered on the controller)"),
        Param("content", "str", "inline text instead of `src`"),
        Param("dest", "path", "file to write on the box", required=True),
        Param(
            "mode",
            "any",
            'quoted octal mode, "0600" (default: 0600 with secrets, else 0644)',
        ),
    )

    def validate(self, params: dict[str, Any]) -> None:
        if (params["src"] is None) == (params["content"] is None):
            raise ParamError("give exactly one of 'src' (a template) or 'content'", "src")
        src = params["src"]
        if src is not None and (not src or src.startswith("/") or ".." in Path(src).parts):
            raise ParamError(f"'src' must be a name under templates/, got {src!r}", "src")
        mode = params["mode"]
        if isinstance(mode, int):
            raise ParamError(
                f"'mode' must be a quoted octal string such as \"0600\" (YAML reads an "
                f"unquoted 0600 as the number 384), got {mode!r}",
                "mode",
            )
        if mode is not None and not (isinstance(mode, str) and _MODE.fullmatch(mode)):
            raise ParamError(
                f"'mode' must be an octal string such as \"0600\", got {mode!r}", "mode"
            )

    def resolve(self, params: dict[str, Any], tools: ResolveTools) -> dict[str, Any]:
        if params["src"] is None:
            return params
        return {**params, "_content": tools.render_template(params["src"])}

    def describe(self, params: dict[str, Any]) -> str:
        origin = f"templates/{params['src']}" if params["src"] else "inline content"
        return f"write {params['dest']} from {origin} (mode {_mode(params):04o})"

    def check(self, ctx: StepContext) -> Check:
        dest = ctx.path(ctx.params["dest"])
        try:
            st = dest.stat()
        except OSError:
            return Check(False, f"{dest} does not exist")
        mode = _mode(ctx.params)
        if stat.S_IMODE(st.st_mode) != mode:
            return Check(False, f"{dest} has mode {stat.S_IMODE(st.st_mode):04o}, want {mode:04o}")
        same = _holds_content(ctx, dest)
        if same is None:
            return Check(False, f"{dest} not written by this step yet")
        if not same:
            return Check(False, f"{dest} differs from the rendered content")
        return Check(True, f"{dest} has the rendered content, mode {mode:04o}")

    def run(self, ctx: StepContext) -> None:
        text = _text(ctx.params)
        data = _fill(ctx, text).encode("utf-8")
        dest = ctx.path(ctx.params["dest"])
        mode = _mode(ctx.params)
        with atomic_writer(dest, binary=True, mode=mode, parents=True, sync_dir=True) as fh:
            fh.write(data)
        write_json_atomic(
            ctx.workdir / _MARKER,
            {"source": _digest(text.encode()), "written": _digest(data), "mode": mode},
        )
        ctx.log(f"wrote {dest} ({len(data)} bytes, mode {mode:04o})")

    def verify(self, ctx: StepContext) -> None:
        result = self.check(ctx)
        if not result.done:
            raise StepFailed(result.reason)


def _text(params: dict[str, Any]) -> str:
    if params.get("src") is None:
        return str(params["content"])
    if params.get("_content") is None:
        raise StepFailed(f"template {params['src']!r} was not rendered by the controller")
    return str(params["_content"])


def _fill(ctx: StepContext, text: str) -> str:
    filled = ctx.fill_secrets(text)
    missing = sorted(set(_PLACEHOLDER.findall(filled)))
    if missing:
        raise StepFailed(
            f"secret(s) {', '.join(missing)} not given to this step",
            f"add `secrets: [{', '.join(missing)}]` to the step and define them in the inventory",
        )
    return filled


def _holds_content(ctx: StepContext, dest: Path) -> bool | None:
    """Whether `dest` holds the content it should; None when that cannot be known."""
    try:
        text = _text(ctx.params)
    except StepFailed:
        return None
    names = set(_PLACEHOLDER.findall(text))
    if names <= set(ctx.secrets):
        # The bytes themselves (a config, a netrc: small files), not their digests.
        try:
            return dest.read_bytes() == ctx.fill_secrets(text).encode("utf-8")
        except OSError:
            return False
    # Without the secrets' values here, trust the last write of this very text.
    marker = read_json(ctx.workdir / _MARKER, {})
    if marker.get("source") != _digest(text.encode()):
        return None
    return bool(file_sha256(dest) == marker.get("written"))


def _mode(params: dict[str, Any]) -> int:
    if params.get("mode"):
        return int(params["mode"], 8)
    text = params.get("content") or params.get("_content") or ""
    # A template's text is only known after resolve; a template is assumed to hold a secret
    # until it is known not to (a too-strict mode is the safe mistake).
    if params.get("src") is not None and params.get("_content") is None:
        return 0o600
    return 0o600 if _PLACEHOLDER.search(text) else 0o644


def _digest(data: bytes) -> str:
    import hashlib  # only to write, or to check without the secrets: OpenSSL costs ~5 ms

    return hashlib.sha256(data).hexdigest()


KIND = Template()
