"""apt, git_clone, template, patch_tree and check_safetensors end to end: `bootstrap up` over a
real sshd box, a token-protected git server on loopback, then a second `up` that does nothing."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
from boxes import Box
from githttp import git, make_repos, serve_git
from project import Project

from provision.formats.safetensors import write_file

TOKEN = "ghp_" + "E2eT0ken" * 5
WANDB_KEY = "wandb_v1_" + "k" * 77

PLAYBOOK = """
name: box-kinds
vars:
  repos: "{repos}"
  git_url: "{git_url}"
  py: "{python}"
steps:
  - id: packages
    kind: apt
    packages: [git, tmux]
  - id: clone
    kind: git_clone
    needs: [packages]
    repo: "{{{{ repos }}}}/app.git"
    dest: ~/work/app
    branch: feature
    config: {{protocol.file.allow: always}}
  - id: clone-private
    kind: git_clone
    needs: [packages]
    repo: "{{{{ git_url }}}}/app.git"
    dest: ~/work/private
    token_secret: GITHUB_TOKEN
  - id: netrc
    kind: template
    src: netrc
    dest: ~/.netrc
  - id: venv
    kind: shell
    run: |
      {{{{ py }}}} -m venv --without-pip ~/venv
      site=$(~/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      mkdir -p "$site/fakepkg" ~/cache
      echo 'PATCHED = False' > ~/cache/mod.py
      ln ~/cache/mod.py "$site/fakepkg/mod.py"
      touch "$site/fakepkg/__init__.py"
    creates: ~/venv/bin/python
  - id: patch
    kind: patch_tree
    needs: [venv, clone]
    src: ~/work/app/replace
    python: ~/venv/bin/python
    package: fakepkg
    verify: "import fakepkg.mod as m; assert m.PATCHED"
  - id: model-check
    kind: check_safetensors
    path: ~/models/model.safetensors
    count: 3
    dtype: BF16
    tensors:
      action_in_proj.weight: {{shape: [1024, 32]}}
"""


@pytest.mark.slow
def test_box_kinds_up_then_noop(tmp_path: Path, project: Project, box: Box) -> None:
    repos = make_repos(tmp_path / "srv")
    # The patch source lives in the cloned repo, as transformers_replace does in openpi.
    work = repos.root / "app-work"
    git("checkout", "-q", "feature", cwd=work)
    (work / "replace").mkdir()
    (work / "replace" / "mod.py").write_text("PATCHED = True\n")
    git("add", "replace", cwd=work)
    git("commit", "-q", "-m", "patch tree", cwd=work)
    git("push", "-q", str(repos.app), "feature", cwd=work)

    (box.home / "models").mkdir()
    write_file(
        box.home / "models" / "model.safetensors",
        {
            "action_in_proj.weight": ("BF16", [1024, 32], None),
            "time_mlp_in.weight": ("BF16", [1024, 1024], None),
            "action_out_proj.bias": ("BF16", [32], None),
        },
    )
    project.template(
        "netrc", "machine api.wandb.ai\n  login user\n  password {{ secrets.WANDB_API_KEY }}\n"
    )
    project.secrets = {"GITHUB_TOKEN": {"value": TOKEN}, "WANDB_API_KEY": {"value": WANDB_KEY}}

    with serve_git(repos.root, "x-access-token", TOKEN) as server:
        project.playbook(
            PLAYBOOK.format(repos=repos.root, git_url=server.url, python=sys.executable)
        )
        first = project.up("box1")
        assert first.returncode == 0, first.stdout + first.stderr
        steps = project.steps("box1")
        assert {s["status"] for s in steps.values()} == {"done"}, steps
        assert server.authorized > 0

        second = project.up("box1")
        assert second.returncode == 0, second.stdout + second.stderr
        again = project.steps("box1")
        assert {k: s["attempts"] for k, s in again.items()} == {
            k: s["attempts"] for k, s in steps.items()
        }
        plan = project.cli("plan", "box1", "-p", "playbooks/test.yaml", "--json")
        assert plan.returncode == 0, plan.stderr

    reasons = {s["id"]: s for s in json.loads(plan.stdout)["steps"]}
    assert not any(s["run"] for s in reasons.values()), reasons
    assert "installed: git tmux" in reasons["packages"]["reason"]
    assert "is at feature, submodules initialised" in reasons["clone"]["reason"]
    assert "files in" in reasons["patch"]["reason"]
    assert "3 tensors as expected" in reasons["model-check"]["reason"]
    assert "mode 0600" in reasons["netrc"]["reason"]

    netrc = box.home / ".netrc"
    assert netrc.read_text().endswith(f"password {WANDB_KEY}\n")
    assert stat.S_IMODE(netrc.stat().st_mode) == 0o600
    assert (box.home / "cache" / "mod.py").read_text() == "PATCHED = False\n"
    private = box.home / "work" / "private"
    assert (private / "lib" / "lib.py").exists()
    assert TOKEN not in (private / ".git" / "config").read_text()
    state_dir = box.home / ".bootstrap"
    for path in state_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 10_000_000:
            data = path.read_bytes()
            assert TOKEN.encode() not in data, path
            assert WANDB_KEY.encode() not in data, path
    output = first.stdout + first.stderr + second.stdout + plan.stdout
    assert TOKEN not in output and WANDB_KEY not in output
