"""`git_clone` against real git: local bare repos with a submodule, and a token-protected
repository served by `git http-backend` over HTTP on loopback."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest
from githttp import Repos, commit, git, make_repos, serve_git

from provision.errors import StepFailed
from provision.steps.base import ParamError, StepContext, validate_params
from provision.steps.git_clone import KIND, same_repo, strip_credentials

TOKEN = "ghp_" + "T0kenValue" * 4
FILE_OK = {"protocol.file.allow": "always"}


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Repos:
    return make_repos(tmp_path_factory.mktemp("git") / "srv")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty HOME, so no global git config or credential store of this machine applies."""
    path = tmp_path / "home"
    path.mkdir()
    return path


def _ctx(tmp_path: Path, home: Path, secrets: dict[str, str] | None = None, **raw: object):
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    return StepContext(
        step_id="clone",
        params=validate_params(KIND, raw),
        run_dir=tmp_path / "run",
        env=env,
        secrets=dict(secrets or {}),
        out=io.StringIO(),
    )


def _head(dest: Path) -> tuple[str, str]:
    branch = git("-C", str(dest), "rev-parse", "--abbrev-ref", "HEAD")
    return branch, git("-C", str(dest), "rev-parse", "HEAD")


@pytest.mark.slow
def test_clone_branch_with_submodule(tmp_path: Path, home: Path, repos: Repos) -> None:
    dest = tmp_path / "openpi"
    ctx = _ctx(
        tmp_path, home, repo=str(repos.app), dest=str(dest), branch="feature", config=FILE_OK
    )
    assert KIND.check(ctx).reason == f"{dest} is not a git checkout"
    KIND.run(ctx)
    KIND.verify(ctx)
    assert _head(dest) == ("feature", repos.feature_tip)
    assert (dest / "lib" / "lib.py").read_text() == "VERSION = 1\n"
    status = git("-C", str(dest), "submodule", "status", "--recursive")
    assert status and not status.startswith("-")
    result = KIND.check(ctx)
    assert result.done
    assert result.reason == f"{dest} is at feature, submodules initialised"


@pytest.mark.slow
def test_uninitialised_submodule_is_not_done(tmp_path: Path, home: Path, repos: Repos) -> None:
    dest = tmp_path / "openpi"
    raw = {"repo": str(repos.app), "dest": str(dest), "config": FILE_OK}
    git("clone", "-q", str(repos.app), str(dest))
    ctx = _ctx(tmp_path, home, **raw)
    assert KIND.check(ctx).reason == "submodules not initialised: lib"
    KIND.run(ctx)
    assert KIND.check(ctx).done
    assert not KIND.check(_ctx(tmp_path, home, **raw, submodules=False)).reason.endswith(
        "initialised"
    )


def test_file_submodules_are_refused_without_config(
    tmp_path: Path, home: Path, repos: Repos
) -> None:
    ctx = _ctx(tmp_path, home, repo=str(repos.app), dest=str(tmp_path / "x"))
    with pytest.raises(StepFailed, match="submodule"):
        KIND.run(ctx)


@pytest.mark.slow
def test_existing_checkout_switches_branch(tmp_path: Path, home: Path, repos: Repos) -> None:
    dest = tmp_path / "openpi"
    KIND.run(_ctx(tmp_path, home, repo=str(repos.app), dest=str(dest), depth=1, config=FILE_OK))
    assert _head(dest)[0] == "main"
    keep = dest / "notes.txt"
    keep.write_text("my untracked notes\n")
    ctx = _ctx(
        tmp_path,
        home,
        repo=str(repos.app) + "/",
        dest=str(dest),
        branch="feature",
        depth=1,
        config=FILE_OK,
    )
    assert KIND.check(ctx).reason == f"{dest} is on main, not feature"
    KIND.run(ctx)
    KIND.verify(ctx)
    assert _head(dest) == ("feature", repos.feature_tip)
    assert keep.read_text() == "my untracked notes\n"
    assert git("-C", str(dest), "rev-parse", "--is-shallow-repository") == "true"


def test_conflicting_local_changes_fail_and_are_kept(
    tmp_path: Path, home: Path, repos: Repos
) -> None:
    dest = tmp_path / "openpi"
    KIND.run(_ctx(tmp_path, home, repo=str(repos.app), dest=str(dest), config=FILE_OK))
    (dest / "feature.txt").write_text("untracked file the branch would overwrite\n")
    ctx = _ctx(
        tmp_path, home, repo=str(repos.app), dest=str(dest), branch="feature", config=FILE_OK
    )
    with pytest.raises(StepFailed) as info:
        KIND.run(ctx)
    assert "never discards" in (info.value.hint or "")
    assert (dest / "feature.txt").read_text().startswith("untracked file")
    assert _head(dest)[0] == "main"


@pytest.mark.slow
def test_tag_and_commit_refs_check_out_detached(tmp_path: Path, home: Path, repos: Repos) -> None:
    tagged = tmp_path / "tagged"
    ctx = _ctx(tmp_path, home, repo=str(repos.app), dest=str(tagged), ref="v1", config=FILE_OK)
    KIND.run(ctx)
    KIND.verify(ctx)
    assert _head(tagged) == ("HEAD", repos.first)
    assert not (tagged / ".gitmodules").exists()
    assert KIND.check(ctx).reason == f"{tagged} is at v1"
    by_sha = _ctx(
        tmp_path, home, repo=str(repos.app), dest=str(tagged), ref=repos.feature_tip,
        config=FILE_OK,
    )  # fmt: skip
    assert (
        KIND.check(by_sha).reason == f"{tagged} is at {repos.first[:12]}, not {repos.feature_tip}"
    )
    KIND.run(by_sha)
    KIND.verify(by_sha)
    assert _head(tagged) == ("HEAD", repos.feature_tip)


def test_other_repository_in_dest_is_left_alone(tmp_path: Path, home: Path, repos: Repos) -> None:
    dest = tmp_path / "openpi"
    git("clone", "-q", str(repos.lib), str(dest))
    before = sorted(p.name for p in dest.iterdir())
    ctx = _ctx(tmp_path, home, repo=str(repos.app), dest=str(dest), config=FILE_OK)
    result = KIND.check(ctx)
    assert not result.done and f"is a checkout of {repos.lib}" in result.reason
    with pytest.raises(StepFailed, match="leaving it untouched"):
        KIND.run(ctx)
    assert sorted(p.name for p in dest.iterdir()) == before


@pytest.mark.box  # chown: root
def test_checkout_of_another_user_is_explained(tmp_path: Path, home: Path, repos: Repos) -> None:
    dest = tmp_path / "openpi"
    git("clone", "-q", str(repos.app), str(dest))
    for path in [dest, *dest.rglob("*")]:
        os.lchown(path, 12345, 12345)
    ctx = _ctx(tmp_path, home, repo=str(repos.app), dest=str(dest), config=FILE_OK)
    assert "belongs to another user" in KIND.check(ctx).reason
    with pytest.raises(StepFailed, match=r"safe\.directory"):
        KIND.run(ctx)


def test_non_checkout_in_dest_is_left_alone(tmp_path: Path, home: Path, repos: Repos) -> None:
    dest = tmp_path / "openpi"
    dest.mkdir()
    (dest / "data.bin").write_bytes(b"precious")
    ctx = _ctx(tmp_path, home, repo=str(repos.app), dest=str(dest), config=FILE_OK)
    with pytest.raises(StepFailed, match="not a git checkout; leaving it untouched"):
        KIND.run(ctx)
    assert (dest / "data.bin").read_bytes() == b"precious"


@pytest.mark.slow
def test_diverged_branch_keeps_local_commits(tmp_path: Path, home: Path, repos: Repos) -> None:
    dest = tmp_path / "openpi"
    raw = {"repo": str(repos.app), "dest": str(dest), "branch": "feature", "config": FILE_OK}
    KIND.run(_ctx(tmp_path, home, **raw))
    git("-C", str(dest), "checkout", "-q", "-b", "mine", "origin/main")
    local = commit(dest, "local.txt", "mine\n", "local work")
    git("-C", str(dest), "branch", "-q", "-f", "feature", "mine")
    ctx = _ctx(tmp_path, home, **raw)
    assert KIND.check(ctx).reason == f"{dest} is on mine, not feature"
    KIND.run(ctx)
    assert _head(dest) == ("feature", local)
    assert "WARNING: feature has diverged from origin/feature" in ctx.out.getvalue()


class CmdlineSampler:
    """Snapshots every process's argv from /proc while running, as `ps` would show them."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = str(os.getpid())
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == me:
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        argv = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
                except OSError:
                    continue
                if "git" in argv:
                    self.seen.add(argv)
            time.sleep(0.002)

    def __enter__(self) -> CmdlineSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _all_git_config(dest: Path) -> str:
    return "".join(p.read_text() for p in dest.joinpath(".git").rglob("config") if p.is_file())


@pytest.mark.slow
def test_token_never_leaks(tmp_path: Path, home: Path, repos: Repos) -> None:
    dest = tmp_path / "private"
    with serve_git(repos.root, "x-access-token", TOKEN) as server:
        repo = f"{server.url}/app.git"
        ctx = _ctx(
            tmp_path, home, {"GITHUB_TOKEN": TOKEN}, repo=repo, dest=str(dest),
            branch="feature", token_secret="GITHUB_TOKEN",
        )  # fmt: skip
        with CmdlineSampler() as sampler:
            KIND.run(ctx)
            KIND.verify(ctx)
        assert server.authorized > 0 and server.refused > 0
    assert _head(dest) == ("feature", repos.feature_tip)
    assert (dest / "lib" / "lib.py").exists(), "the submodule came through askpass too"
    assert any("clone" in argv for argv in sampler.seen), "the sampler saw no git process"
    assert not [argv for argv in sampler.seen if TOKEN in argv]
    assert TOKEN not in _all_git_config(dest)
    assert git("-C", str(dest), "config", "--get", "remote.origin.url") == repo
    assert TOKEN not in ctx.out.getvalue()
    assert not list(ctx.workdir.glob("askpass*"))
    assert not (home / ".git-credentials").exists()
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.slow
def test_token_protected_switch_and_wrong_token(tmp_path: Path, home: Path, repos: Repos) -> None:
    dest = tmp_path / "private"
    with serve_git(repos.root, "x-access-token", TOKEN) as server:
        repo = f"{server.url}/app.git"
        good = {"GITHUB_TOKEN": TOKEN}
        raw = {"repo": repo, "dest": str(dest), "token_secret": "GITHUB_TOKEN"}
        KIND.run(_ctx(tmp_path, home, good, **raw))
        ctx = _ctx(tmp_path, home, good, **raw, branch="feature")
        KIND.run(ctx)
        assert _head(dest) == ("feature", repos.feature_tip)
        wrong = "ghp_wrong" + "x" * 30
        bad = _ctx(tmp_path, home, {"GITHUB_TOKEN": wrong}, **{**raw, "dest": str(tmp_path / "b")})
        started = time.monotonic()
        with pytest.raises(StepFailed, match="Authentication failed"):
            KIND.run(bad)
        assert time.monotonic() - started < 30
        assert wrong not in bad.out.getvalue()
        none = _ctx(tmp_path, home, repo=repo, dest=str(tmp_path / "anon"))
        with pytest.raises(StepFailed, match=r"terminal prompts disabled|could not read"):
            KIND.run(none)
    assert not list(ctx.workdir.glob("askpass*"))


def test_missing_secret_is_named(tmp_path: Path, home: Path) -> None:
    ctx = _ctx(
        tmp_path, home, repo="https://example.invalid/x.git", dest=str(tmp_path / "x"),
        token_secret="GITHUB_TOKEN",
    )  # fmt: skip
    with pytest.raises(StepFailed, match="secret GITHUB_TOKEN not given") as info:
        KIND.run(ctx)
    assert "secrets: [GITHUB_TOKEN]" in (info.value.hint or "")


def test_url_helpers() -> None:
    assert same_repo("https://github.com/a/b.git", "https://GitHub.com/a/b/")
    assert same_repo("https://user:pw@github.com/a/b.git", "https://github.com/a/b")
    assert not same_repo("https://github.com/a/b.git", "https://github.com/a/c.git")
    assert same_repo("/srv/x.git", "file:///srv/x.git")
    assert strip_credentials("https://tok@github.com:8443/a.git") == "https://github.com:8443/a.git"
    assert strip_credentials("git@github.com:a/b.git") == "git@github.com:a/b.git"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"repo": f"https://{TOKEN}@github.com/a/b.git", "dest": "/d"}, "repo"),
        ({"repo": "https://me:secret@github.com/a/b.git", "dest": "/d"}, "repo"),
        ({"repo": "/r", "dest": "/d", "branch": "main", "ref": "v1"}, "ref"),
        ({"repo": "/r", "dest": "/d", "depth": 0}, "depth"),
        ({"repo": "git@github.com:a/b.git", "dest": "/d", "token_secret": "T"}, "token_secret"),
        ({"repo": "/r", "dest": "/d", "config": {"bad key": "x"}}, "config"),
        ({"repo": "/r", "dest": "/d", "config": {"a.b": 1}}, "config"),
        ({"repo": "/r"}, "dest"),
    ],
)
def test_bad_params_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ParamError) as info:
        validate_params(KIND, raw)
    assert info.value.key == key


def test_describe_names_no_secret_value() -> None:
    params = validate_params(
        KIND,
        {"repo": "https://github.com/a/b.git", "dest": "/w/b", "branch": "dev", "depth": 1,
         "token_secret": "GITHUB_TOKEN"},
    )  # fmt: skip
    assert KIND.describe(params) == (
        "git clone https://github.com/a/b.git @ dev into /w/b "
        "(submodules, depth 1, token GITHUB_TOKEN)"
    )
