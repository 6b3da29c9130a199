"""`git_clone`: a checkout at the wanted branch or ref, with its submodules initialised.

Clones into `dest`, or brings an existing checkout of the same repository to the wanted branch
(fetch + checkout, fast-forward when possible) or ref (tag or commit, detached). A `dest` that
holds something else — another repository, or files that are no checkout — fails the step and is
left untouched: bootstrap never deletes user data.

A token for a private HTTPS repository is an inventory secret named by `token_secret`. It never
appears in argv, in `.git/config` or in the log: git asks for it through a `GIT_ASKPASS` script
in the step's work dir that reads it from its environment (the script holds no secret and is
removed afterwards), credential helpers are switched off for these commands so no helper stores
it, and the remote URL is stored as given, without credentials. Prompts are disabled
(`GIT_TERMINAL_PROMPT=0`, ssh `BatchMode`), so a refused login fails instead of hanging.

Done when `dest` is a checkout of `repo` with HEAD on `branch` (or at `ref`) and no submodule
left uninitialised (`git submodule status` shows no leading `-`).

Example (RUNBOOK A, clone):

```yaml
- id: clone
  kind: git_clone
  repo: https://github.com/CharlieXie/openpi.git
  branch: pytorch_lora_blackwell
  dest: /workspace/openpi
  submodules: true
  token_secret: GITHUB_TOKEN
  secrets: [GITHUB_TOKEN]
```
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from provision.errors import StepFailed
from provision.steps.base import Check, Kind, Param, ParamError, StepContext

_ASKPASS = """#!/bin/sh
# git calls this with its prompt; the values come from the environment, never from this file.
case "$1" in
  Username*) printf '%s\\n' "$BOOTSTRAP_GIT_USER" ;;
  *) printf '%s\\n' "$BOOTSTRAP_GIT_TOKEN" ;;
esac
"""
#: User names that are tokens pasted into the URL (`https://<PAT>@github.com/...`).
_TOKEN_LIKE = re.compile(r"(ghp_|gho_|ghs_|github_pat_|glpat-)|[A-Za-z0-9_-]{30,}")
_CONFIG_KEY = re.compile(r"[A-Za-z][A-Za-z0-9-]*(\.[^=\s]+)*\.[A-Za-z][A-Za-z0-9-]*")
_DIRTY_HINT = "commit or stash the changes in the checkout; bootstrap never discards them"


class GitClone(Kind):
    """Clone or update a git checkout; tokens through GIT_ASKPASS, never argv or config."""

    name = "git_clone"
    tools = ("git",)
    summary = "clone a git repository at a branch or ref, with submodules (token as a secret)"
    receives = True
    params = (
        Param(
            "repo", "str", "clone URL (https, ssh or a path), without credentials", required=True
        ),
        Param("dest", "path", "directory of the checkout", required=True),
        Param("branch", "str", "branch to be on (default: the remote's default branch)"),
        Param("ref", "str", "tag or commit to check out detached, instead of a branch"),
        Param("submodules", "bool", "initialise submodules recursively", default=True),
        Param("depth", "int", "shallow clone with this many commits"),
        Param("token_secret", "str", "inventory secret holding an HTTPS token", secret_ref=True),
        Param("token_user", "str", "user name sent with the token", default="x-access-token"),
        Param(
            "config",
            "dict",
            "git config for these commands only, e.g. {protocol.file.allow: always}",
            items="str",
            default={},
        ),
    )

    def validate(self, params: dict[str, Any]) -> None:
        repo = params["repo"]
        parts = urlsplit(repo) if "://" in repo else None
        if parts is not None and (
            parts.password or (parts.username and _TOKEN_LIKE.search(parts.username))
        ):
            raise ParamError(
                "'repo' holds credentials: put the token in an inventory secret and name it "
                "in 'token_secret'",
                "repo",
            )
        if params["branch"] and params["ref"]:
            raise ParamError("give either 'branch' or 'ref', not both", "ref")
        if params["depth"] is not None and params["depth"] < 1:
            raise ParamError("'depth' must be >= 1", "depth")
        if params["token_secret"] and (parts is None or parts.scheme not in ("http", "https")):
            raise ParamError("'token_secret' works with http(s) URLs only", "token_secret")
        for key in params["config"]:
            if not _CONFIG_KEY.fullmatch(key):
                raise ParamError(f"'config': {key!r} is not a git config key", "config")

    def describe(self, params: dict[str, Any]) -> str:
        at = f" @ {params['branch'] or params['ref']}" if params["branch"] or params["ref"] else ""
        extras = ["submodules"] if params["submodules"] else []
        if params["depth"]:
            extras.append(f"depth {params['depth']}")
        if params["token_secret"]:
            extras.append(f"token {params['token_secret']}")
        tail = f" ({', '.join(extras)})" if extras else ""
        return f"git clone {params['repo']}{at} into {params['dest']}{tail}"

    def check(self, ctx: StepContext) -> Check:
        dest = ctx.path(ctx.params["dest"])
        if not (dest / ".git").exists():
            return Check(False, f"{dest} is not a git checkout")
        problem = _foreign(ctx, dest) or _position(ctx, dest) or _submodule_problem(ctx, dest)
        if problem:
            return Check(False, problem)
        at = ctx.params["branch"] or ctx.params["ref"] or "the default branch"
        return Check(True, f"{dest} is at {at}" + _submodule_note(ctx, dest))

    def run(self, ctx: StepContext) -> None:
        dest = ctx.path(ctx.params["dest"])
        with _git_env(ctx) as env:
            git = _Git(ctx, env)
            if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
                _clone(ctx, git, dest)
            elif not (dest / ".git").exists():
                raise StepFailed(
                    f"{dest} exists and is not a git checkout; leaving it untouched",
                    "choose another dest, or move it away yourself",
                )
            else:
                foreign = _foreign(ctx, dest)
                if foreign:
                    raise StepFailed(
                        foreign + "; leaving it untouched",
                        "choose another dest, or move the checkout away yourself",
                    )
                _update(ctx, git, dest)
            if ctx.params["ref"]:
                _checkout_ref(ctx, git, dest)
            if ctx.params["submodules"] and (dest / ".gitmodules").exists():
                ctx.progress(message="submodules")
                git.run("-C", str(dest), "submodule", "update", "--init", "--recursive")

    def verify(self, ctx: StepContext) -> None:
        result = self.check(ctx)
        if not result.done:
            raise StepFailed(result.reason)


class _Git:
    """git with this step's environment and one-off config; output goes to the step log."""

    def __init__(self, ctx: StepContext, env: dict[str, str]) -> None:
        self.ctx = ctx
        self.env = env
        self.prefix = ["git"]
        if ctx.params["token_secret"]:
            # An empty value resets the helper list: no helper may store the token.
            self.prefix += ["-c", "credential.helper="]
        for key, value in ctx.params["config"].items():
            self.prefix += ["-c", f"{key}={value}"]

    def run(self, *args: str, check: bool = True, hint: str | None = None) -> int:
        try:
            return self.ctx.sh([*self.prefix, *args], env=self.env, check=check)
        except StepFailed as exc:
            raise StepFailed(exc.reason, hint or exc.hint) from None


@contextlib.contextmanager
def _git_env(ctx: StepContext) -> Iterator[dict[str, str]]:
    """Environment for git: no prompts; with a token, an askpass script removed afterwards."""
    env = dict(ctx.env)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new")
    name = ctx.params["token_secret"]
    if not name:
        yield env
        return
    token = ctx.secrets.get(name)
    if not token:
        raise StepFailed(
            f"secret {name} not given to this step",
            f"add `secrets: [{name}]` to the step and define {name} in the inventory",
        )
    script = ctx.workdir / "askpass.sh"
    script.unlink(missing_ok=True)
    fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
    with os.fdopen(fd, "w") as fh:
        fh.write(_ASKPASS)
    env.update(
        GIT_ASKPASS=str(script),
        BOOTSTRAP_GIT_USER=ctx.params["token_user"],
        BOOTSTRAP_GIT_TOKEN=token,
    )
    try:
        yield env
    finally:
        script.unlink(missing_ok=True)


def _clone(ctx: StepContext, git: _Git, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    args = ["clone"]
    if ctx.params["branch"]:
        args += ["--branch", ctx.params["branch"]]
    if ctx.params["ref"]:
        args.append("--no-checkout")
    if ctx.params["depth"]:
        args += ["--depth", str(ctx.params["depth"])]
    ctx.progress(message="cloning")
    repo = ctx.params["repo"]
    if repo.startswith("~"):
        repo = os.path.expanduser(repo)  # a path on the box; git itself does not expand ~
    git.run(*args, "--", repo, str(dest))


def _update(ctx: StepContext, git: _Git, dest: Path) -> None:
    """Bring an existing checkout of the right repo to the wanted branch."""
    branch = ctx.params["branch"]
    if not branch:
        return
    depth = ["--depth", str(ctx.params["depth"])] if ctx.params["depth"] else []
    fetched = _git_out(ctx, dest, "config", "--get-all", "remote.origin.fetch") or ""
    refspec = f"+refs/heads/{branch}:refs/remotes/origin/{branch}"
    if "refs/heads/*:" not in fetched and refspec not in fetched.split():
        # A shallow (single-branch) clone tracks only the branch it was cloned at.
        git.run("-C", str(dest), "remote", "set-branches", "--add", "origin", branch)
    ctx.progress(message=f"fetching {branch}")
    git.run("-C", str(dest), "fetch", *depth, "origin", refspec)
    has_local = _git_out(ctx, dest, "rev-parse", "--verify", "-q", f"refs/heads/{branch}")
    if has_local is None:
        track = ["checkout", "-b", branch, "--track", f"origin/{branch}"]
        git.run("-C", str(dest), *track, hint=_DIRTY_HINT)
        return
    git.run("-C", str(dest), "checkout", branch, hint=_DIRTY_HINT)
    if git.run("-C", str(dest), "merge", "--ff-only", f"origin/{branch}", check=False) != 0:
        ctx.warn(f"{branch} has diverged from origin/{branch}; kept the local commits")


def _checkout_ref(ctx: StepContext, git: _Git, dest: Path) -> None:
    ref = ctx.params["ref"]
    if _git_out(ctx, dest, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}") is None:
        depth = ["--depth", str(ctx.params["depth"])] if ctx.params["depth"] else []
        ctx.progress(message=f"fetching {ref}")
        # A tag is stored as one; anything else (a commit) is fetched by name.
        if git.run("-C", str(dest), "fetch", *depth, "origin", "tag", ref, check=False) != 0:
            git.run("-C", str(dest), "fetch", *depth, "origin", ref)
    git.run("-C", str(dest), "checkout", "--detach", ref, hint=_DIRTY_HINT)


def _foreign(ctx: StepContext, dest: Path) -> str | None:
    """Why `dest` is a checkout of another repository, or None when it is of `repo`."""
    probe = ctx.capture(["git", "-C", str(dest), "rev-parse", "--git-dir"])
    if "dubious ownership" in probe.stderr:
        return (
            f"git refuses {dest}: it belongs to another user (run `git config --global --add "
            f"safe.directory {dest}` if you trust it)"
        )
    origin = _git_out(ctx, dest, "config", "--get", "remote.origin.url")
    if origin is None:
        return f"{dest} is a git checkout without an 'origin' remote"
    if same_repo(origin, ctx.params["repo"]):
        return None
    return f"{dest} is a checkout of {strip_credentials(origin)}, not {ctx.params['repo']}"


def _position(ctx: StepContext, dest: Path) -> str | None:
    """Why HEAD is not where it should be, or None."""
    head = _git_out(ctx, dest, "rev-parse", "--verify", "-q", "HEAD")
    if head is None:
        return f"{dest} has no commit checked out"
    branch, ref = ctx.params["branch"], ctx.params["ref"]
    if branch:
        current = _git_out(ctx, dest, "symbolic-ref", "-q", "--short", "HEAD")
        if current != branch:
            return f"{dest} is on {current or 'a detached HEAD'}, not {branch}"
    if ref:
        wanted = _git_out(ctx, dest, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}")
        if wanted != head:
            return f"{dest} is at {head[:12]}, not {ref}"
    return None


def _submodule_problem(ctx: StepContext, dest: Path) -> str | None:
    if not ctx.params["submodules"] or not (dest / ".gitmodules").exists():
        return None
    status = ctx.capture(["git", "-C", str(dest), "submodule", "status", "--recursive"])
    if status.returncode != 0:
        return f"git submodule status failed: {status.stderr.strip()}"
    pending = [
        line[1:].split()[1]
        for line in status.stdout.splitlines()
        if line[:1] in ("-", "U") and len(line[1:].split()) > 1
    ]
    if pending:
        return "submodules not initialised: " + ", ".join(pending)
    return None


def _submodule_note(ctx: StepContext, dest: Path) -> str:
    if ctx.params["submodules"] and (dest / ".gitmodules").exists():
        return ", submodules initialised"
    return ""


def _git_out(ctx: StepContext, dest: Path, *args: str) -> str | None:
    """stdout of a local git query, or None when it fails."""
    result = ctx.capture(["git", "-C", str(dest), *args])
    return result.stdout.strip() if result.returncode == 0 else None


def strip_credentials(url: str) -> str:
    """`url` without a user or password (safe to show)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def same_repo(a: str, b: str) -> bool:
    """Whether two clone URLs name the same repository (credentials and `.git` aside)."""
    return _normalise(a) == _normalise(b)


def _normalise(url: str) -> str:
    url = url.strip()
    if url.startswith("file://"):
        url = url[len("file://") :]
    if url.startswith(("/", ".", "~")):
        url = os.path.realpath(os.path.expanduser(url))
    else:
        url = strip_credentials(url)
        if "://" in url:
            parts = urlsplit(url)
            url = parts._replace(netloc=parts.netloc.lower()).geturl()
    url = url.rstrip("/")
    return url[: -len(".git")] if url.endswith(".git") else url


KIND = GitClone()
