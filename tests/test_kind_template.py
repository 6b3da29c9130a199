"""`template`: atomic writes, modes, secret filling, and done-checks on a real filesystem."""

from __future__ import annotations

import io
import os
import stat
import threading
from pathlib import Path

import jinja2
import pytest

from provision.errors import StepFailed
from provision.steps.base import SECRET_MARK, ParamError, StepContext, validate_params
from provision.steps.template import KIND

#: A new-format wandb key: 86 characters, which `wandb login` rejects.
WANDB_KEY = "wandb_v1_" + "aB3" * 25 + "Q1"
NETRC = "machine api.wandb.ai\n  login user\n  password {{ secrets.WANDB_API_KEY }}\n"


class Marks:
    def __getattr__(self, name: str) -> str:
        return SECRET_MARK.format(name)


class Tools:
    """Renders templates/NAME as `provision.playbook` does: `secrets.X` become placeholders."""

    def __init__(self, root: Path) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(root),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
        )

    def render_template(self, name: str) -> str:
        return self.env.get_template(name).render(secrets=Marks())

    def read_local(self, path: str) -> bytes:
        raise AssertionError("not used")


def _ctx(tmp_path: Path, raw: dict, secrets: dict[str, str] | None = None) -> StepContext:
    params = validate_params(KIND, raw)
    templates = tmp_path / "templates"
    templates.mkdir(exist_ok=True)
    (templates / "netrc").write_text(NETRC)
    params = KIND.resolve(params, Tools(templates))
    return StepContext(
        step_id="wandb-netrc",
        params=params,
        run_dir=tmp_path / "run",
        secrets=dict(secrets or {}),
        out=io.StringIO(),
    )


def test_netrc_with_an_86_character_key(tmp_path: Path) -> None:
    assert len(WANDB_KEY) == 86
    dest = tmp_path / "home" / ".netrc"
    ctx = _ctx(tmp_path, {"src": "netrc", "dest": str(dest)}, {"WANDB_API_KEY": WANDB_KEY})
    assert WANDB_KEY not in repr(ctx.params)
    assert not KIND.check(ctx).done
    KIND.run(ctx)
    KIND.verify(ctx)
    assert dest.read_text() == f"machine api.wandb.ai\n  login user\n  password {WANDB_KEY}\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert KIND.check(ctx).done
    assert WANDB_KEY not in ctx.out.getvalue()
    leftovers = [p.name for p in dest.parent.iterdir() if p.name != ".netrc"]
    assert leftovers == []
    for marker in ctx.workdir.iterdir():
        assert WANDB_KEY not in marker.read_text()


def test_check_without_secret_values_trusts_its_last_write(tmp_path: Path) -> None:
    dest = tmp_path / ".netrc"
    raw = {"src": "netrc", "dest": str(dest)}
    KIND.run(_ctx(tmp_path, raw, {"WANDB_API_KEY": WANDB_KEY}))
    blind = _ctx(tmp_path, raw)
    assert KIND.check(blind).done
    dest.write_text("machine api.wandb.ai login user password old\n")
    os.chmod(dest, 0o600)
    assert not KIND.check(blind).done


def test_rotated_secret_is_rewritten(tmp_path: Path) -> None:
    dest = tmp_path / ".netrc"
    raw = {"src": "netrc", "dest": str(dest)}
    KIND.run(_ctx(tmp_path, raw, {"WANDB_API_KEY": WANDB_KEY}))
    rotated = _ctx(tmp_path, raw, {"WANDB_API_KEY": "wandb_v1_" + "z" * 77})
    result = KIND.check(rotated)
    assert not result.done and "differs" in result.reason


def test_missing_secret_fails_naming_it(tmp_path: Path) -> None:
    dest = tmp_path / ".netrc"
    ctx = _ctx(tmp_path, {"src": "netrc", "dest": str(dest)})
    with pytest.raises(StepFailed, match="WANDB_API_KEY not given") as info:
        KIND.run(ctx)
    assert "secrets:" in (info.value.hint or "")
    assert not dest.exists()


def test_inline_content_mode_and_drift(tmp_path: Path) -> None:
    dest = tmp_path / "configs" / "ae.yaml"
    ctx = _ctx(tmp_path, {"content": "batch_size: 8\n", "dest": str(dest)})
    KIND.run(ctx)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert KIND.check(ctx).done
    os.chmod(dest, 0o666)
    assert "mode 0666, want 0644" in KIND.check(ctx).reason
    KIND.run(ctx)
    dest.write_text("batch_size: 12\n")
    os.chmod(dest, 0o644)
    assert "differs" in KIND.check(ctx).reason


def test_explicit_mode_beats_the_default_and_the_umask(tmp_path: Path) -> None:
    dest = tmp_path / "launch.sh"
    old = os.umask(0o077)
    try:
        ctx = _ctx(tmp_path, {"content": "#!/bin/sh\n", "dest": str(dest), "mode": "0755"})
        KIND.run(ctx)
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert KIND.check(ctx).done


def test_inline_secret_defaults_to_0600(tmp_path: Path) -> None:
    dest = tmp_path / "env"
    content = f"WANDB_API_KEY={SECRET_MARK.format('WANDB_API_KEY')}\n"
    ctx = _ctx(tmp_path, {"content": content, "dest": str(dest)}, {"WANDB_API_KEY": WANDB_KEY})
    assert "mode 0600" in KIND.describe(ctx.params)
    KIND.run(ctx)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


@pytest.mark.slow
def test_readers_never_see_a_partial_or_loose_file(tmp_path: Path) -> None:
    """A reader polling dest while it is rewritten sees the old or the new file, never a mix."""
    dest = tmp_path / "conf"
    old, new = "a" * 200_000, "b" * 300_000
    dest.write_text(old)
    os.chmod(dest, 0o600)
    seen: set[tuple[int, int]] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                with open(dest) as fh:
                    text = fh.read()
                    mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            except FileNotFoundError:
                seen.add((-1, 0))
                continue
            seen.add((len(set(text)) if text else 0, mode))
            assert text in (old, new)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(20):
            KIND.run(_ctx(tmp_path, {"content": new, "dest": str(dest), "mode": "0600"}))
    finally:
        stop.set()
        watcher.join()
    assert seen <= {(1, 0o600)}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"dest": "/x"}, "src"),
        ({"src": "netrc", "content": "x", "dest": "/x"}, "src"),
        ({"src": "../etc/passwd", "dest": "/x"}, "src"),
        ({"src": "/etc/passwd", "dest": "/x"}, "src"),
        ({"content": "x", "dest": "/x", "mode": 384}, "mode"),
        ({"content": "x", "dest": "/x", "mode": "rw-------"}, "mode"),
        ({"content": "x"}, "dest"),
    ],
)
def test_bad_params_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ParamError) as info:
        validate_params(KIND, raw)
    assert info.value.key == key


def test_unresolved_template_fails_clearly(tmp_path: Path) -> None:
    params = validate_params(KIND, {"src": "netrc", "dest": str(tmp_path / "x")})
    ctx = StepContext(step_id="t", params=params, run_dir=tmp_path, out=io.StringIO())
    assert not KIND.check(ctx).done
    with pytest.raises(StepFailed, match="not rendered"):
        KIND.run(ctx)
