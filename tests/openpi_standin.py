"""Stand-ins for everything `playbooks/openpi-waypoint.yaml` fetches, small enough for a test.

- `build_wheels`: a wheel directory that makes an offline uv resolve look like openpi's: torch
  2.7.1 (shipping `torchrun` as a script, so the venv has its own), jax 0.5.3 (refuses an
  ml_dtypes older than 0.4, as the real one breaks), transformers 4.53.2 (with the siglip module
  openpi patches), wandb 0.19.11 (a `wandb sync` CLI), lerobot (wants av >= 14), av 13.1.0 as a
  wheel and av 14.0.0 as an sdist that cannot build (the seed's ffmpeg 7 trap), ml_dtypes 0.2.0
  and 0.4.1, tensorflow 2.15.0 (asks for ml-dtypes~=0.2.0: only the project's override keeps
  0.4.1) and tensorflow-datasets 4.9.3.
- `build_repo`: the fork as a bare git repository on branch `pytorch_lora_blackwell` with a
  submodule and two commits on the branch, as the fork has: `seed_commit(root)` stands for
  2a67705 (seed 003 was validated on it) and the tip for 7de21c7 (HEAD): their
  `train_waypoint.py` run the stand-in trainer as that commit's code (`--commit`: HEAD's
  checkpoints have no optimizer.pt, so its `--resume` crashes); a pyproject whose `[tool.uv]` overrides lack the av pin (the state seed 003 §4.1
  fixes), its uv.lock, `transformers_replace/`, a converter that writes 812 bf16 tensors with
  pi0.5's named shapes (pi0's when `pi05` is not in the checkpoint path, as the real one slices),
  and a `train_waypoint.py` that checks what the real one reads (config paths, stats dims,
  the patch, TensorFlow, the venv) before printing the real log lines (provision/data/
  fake_trainer.py). It records the environment it got (the wandb key as a yes/no only).
- `write_drive`: the runbook's Google Drive layout (`dissert_ntu/libero/...`) with generated RLDS
  datasets; `checkpoint_objects`: `checkpoints/pi05_base/` for the GCS emulator, with assets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from gcs_emulator import pi05_like
from githttp import git
from pywheels import build_sdist, build_wheel

from provision.stats.samples import write_preset

REPO = Path(__file__).resolve().parent.parent
FAKE_TRAINER = REPO / "provision" / "data" / "fake_trainer.py"
SAFETENSORS = REPO / "provision" / "formats" / "safetensors.py"
TORCHRUN = Path(__file__).resolve().parent / "fakes" / "torchrun"
BRANCH = "pytorch_lora_blackwell"


@dataclass(frozen=True)
class Sizes:
    """The generated datasets: episode and step counts (shard counts are the runbook's)."""

    rlds_episodes: int = 30
    rlds_steps: int = 450
    wp_episodes: int = 30
    wp_steps: int = 120


def build_wheels(dest: Path) -> Path:
    """The wheel directory described in the module docstring."""
    torchrun = "#!python\n" + TORCHRUN.read_text().split("\n", 1)[1]
    build_wheel(
        dest,
        "torch",
        "2.7.1",
        files={
            "torch-2.7.1.data/scripts/torchrun": torchrun.encode(),
            # What the cu128 wheel reports (the playbook's torch-cuda step asks).
            "torch/__init__.py": b"__version__ = '2.7.1+cu128'\nfrom torch import version\n",
            "torch/version.py": b"cuda = '12.8'\n",
        },
    )
    build_wheel(
        dest,
        "jax",
        "0.5.3",
        requires=("ml-dtypes>=0.4.0",),
        files={"jax/__init__.py": JAX_INIT.encode()},
    )
    for version in ("0.2.0", "0.4.1"):
        build_wheel(dest, "ml_dtypes", version)
    siglip = "transformers/models/siglip"
    build_wheel(
        dest,
        "transformers",
        "4.53.2",
        files={
            "transformers/models/__init__.py": b"",
            f"{siglip}/__init__.py": b"",
            f"{siglip}/modeling_siglip.py": b"# transformers 4.53.2, unpatched\n",
        },
    )
    build_wheel(
        dest,
        "wandb",
        "0.19.11",
        files={
            "wandb/cli.py": WANDB_CLI.encode(),
            "wandb-0.19.11.dist-info/entry_points.txt": b"[console_scripts]\nwandb = wandb.cli:main\n",
        },
    )
    build_wheel(dest, "lerobot", "0.1.0", requires=("av>=14.0.0",))
    build_wheel(dest, "av", "13.1.0")
    build_sdist(dest, "av", "14.0.0")
    build_wheel(dest, "tensorflow", "2.15.0", requires=("ml-dtypes~=0.2.0",))
    build_wheel(dest, "tensorflow_datasets", "4.9.3")
    return dest


def uv_offline_env(wheels: Path, cache: Path) -> dict[str, str]:
    """uv settings of an air-gapped box: the wheel directory only, no interpreter downloads."""
    return {
        "UV_OFFLINE": "1",
        "UV_NO_INDEX": "1",
        "UV_FIND_LINKS": str(wheels),
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_CACHE_DIR": str(cache),
    }


def build_repo(root: Path, wheels: Path, uv: str) -> Path:
    """Bare repos `root/openpi.git` (+ `root/libero.git`, its submodule); returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    lib = root / "libero-work"
    git("init", "-q", "-b", "main", str(lib))
    (lib / "README.md").write_text("LIBERO stand-in\n")
    git("add", "-A", cwd=lib)
    git("commit", "-q", "-m", "libero", cwd=lib)
    git("clone", "-q", "--bare", str(lib), str(root / "libero.git"))

    work = root / "openpi-work"
    git("init", "-q", "-b", "main", str(work))
    for name, text in _repo_files().items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = {**os.environ, **uv_offline_env(wheels, root / "uv-cache")}
    env.pop("VIRTUAL_ENV", None)
    subprocess.run([uv, "lock"], cwd=work, env=env, check=True, capture_output=True)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "openpi stand-in", cwd=work)
    git("checkout", "-q", "-b", BRANCH, cwd=work)
    git("submodule", "add", "-q", str(root / "libero.git"), "third_party/libero", cwd=work)
    git(
        "config", "-f", ".gitmodules", "submodule.third_party/libero.url", "../libero.git", cwd=work
    )
    git("add", ".gitmodules", cwd=work)
    git("commit", "-q", "-m", "waypoint VLA (as at 2a67705)", cwd=work)
    train = work / "scripts" / "train_waypoint.py"
    train.write_text(TRAIN_WAYPOINT.replace('"--commit", "2a67705"', '"--commit", "7de21c7"'))
    git(
        "commit",
        "-q",
        "-am",
        "skip optimizer state save (as since d30a12f; HEAD 7de21c7)",
        cwd=work,
    )
    git("clone", "-q", "--bare", str(work), str(root / "openpi.git"))
    shutil.rmtree(root / "uv-cache", ignore_errors=True)
    return root


def _repo_files() -> dict[str, str]:
    replace = "src/openpi/models_pytorch/transformers_replace/models"
    return {
        "pyproject.toml": PYPROJECT,
        "src/openpi/__init__.py": "",
        f"{replace}/siglip/check.py": SIGLIP_CHECK,
        f"{replace}/siglip/modeling_siglip.py": "# openpi's patched SigLIP\n",
        f"{replace}/gemma/modeling_gemma.py": "# openpi's patched Gemma (adaRMS)\n",
        "examples/convert_jax_model_to_pytorch.py": CONVERTER,
        "examples/_safetensors.py": SAFETENSORS.read_text(),
        "scripts/train_waypoint.py": TRAIN_WAYPOINT,
        "scripts/_fake_trainer.py": FAKE_TRAINER.read_text(),
        "configs/waypoint_ae_libero.yaml": "# replaced by bootstrap\n",
    }


def seed_commit(root: Path) -> str:
    """The stand-in fork's commit that plays the seed-validated 2a67705 (the tip's parent)."""
    done = subprocess.run(
        ["git", "-C", str(root / "openpi.git"), "rev-parse", f"{BRANCH}~1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def write_drive(root: Path, sizes: Sizes) -> Path:
    """`root/dissert_ntu/libero/{libero_object_no_noops,libero_object_wp_001}`; returns root."""
    libero = root / "dissert_ntu" / "libero"
    write_preset(
        libero / "libero_object_no_noops",
        "libero_object",
        {"episodes": sizes.rlds_episodes, "steps": sizes.rlds_steps, "image_bytes": 16},
    )
    write_preset(
        libero / "libero_object_wp_001",
        "libero_wp",
        {"episodes": sizes.wp_episodes, "steps": sizes.wp_steps, "image_bytes": 16},
    )
    return root


def checkpoint_objects() -> dict[str, bytes]:
    """`checkpoints/pi05_base/`: 20 params objects (Orbax OCDBT layout) and one asset."""
    objects = pi05_like(big_bytes=4096, small_bytes=256)
    objects["checkpoints/pi05_base/assets/trossen/norm_stats.json"] = b'{"norm_stats": {}}'
    return objects


PYPROJECT = """\
[project]
name = "openpi"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = [
    "jax==0.5.3",
    "lerobot==0.1.0",
    "torch==2.7.1",
    "transformers==4.53.2",
    "wandb==0.19.11",
]

[tool.uv]
override-dependencies = ["ml-dtypes==0.4.1", "tensorstore==0.1.74"]
"""

JAX_INIT = """\
import ml_dtypes

__version__ = "0.5.3"
if tuple(int(p) for p in ml_dtypes.__version__.split(".")[:2]) < (0, 4):
    raise AttributeError("module 'ml_dtypes' has no attribute 'int2'")
"""

SIGLIP_CHECK = """\
import transformers


def check_whether_transformers_replace_is_installed_correctly():
    return transformers.__version__ == "4.53.2"
"""

WANDB_CLI = r'''"""Stand-in for `wandb sync` (wandb 0.19): uploads nothing, marks each run synced."""
import os
import sys
from pathlib import Path


def _has_key():
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return "api.wandb.ai" in Path("~/.netrc").expanduser().read_text()
    except OSError:
        return False


def main():
    args = sys.argv[1:]
    if not args or args[0] != "sync":
        sys.exit("Usage: wandb sync [OPTIONS] [PATH]...")
    options, paths, i = {}, [], 1
    while i < len(args):
        if args[i] in ("-p", "--project", "-e", "--entity", "--id"):
            options[args[i].lstrip("-")[0]] = args[i + 1]
            i += 2
            continue
        if not args[i].startswith("-"):
            paths.append(args[i])
        i += 1
    if not _has_key():
        print("wandb: ERROR api_key not configured (no-tty). call wandb.login(key=[your_api_key])")
        sys.exit(1)
    entity = options.get("e") or os.environ.get("WANDB_ENTITY") or "bootstrap"
    project = options.get("p") or os.environ.get("WANDB_PROJECT") or "uncategorized"
    for path in paths:
        for run in sorted(Path(path).glob("run-*.wandb")):
            run_id = run.stem.split("-", 1)[1]
            print(f"Syncing: https://wandb.ai/{entity}/{project}/runs/{run_id} ... done.")
            Path(f"{run}.synced").touch()
'''

CONVERTER = r'''"""Stand-in for openpi's examples/convert_jax_model_to_pytorch.py (no JAX, no torch).

Fails where the real one fails (an unknown config name, no Orbax params), slices the weights as
pi0.5 only when `pi05` is in the checkpoint path, copies assets from the parent directory, and
writes model.safetensors (812 bf16 tensors for pi0.5) and config.json.
"""
import argparse
import json
import os
import pathlib
import shutil
import sys

import jax  # noqa: F401  (the real converter needs the venv's jax and torch)
import torch  # noqa: F401
from _safetensors import write_file

CONFIGS = {"pi05_libero", "pi05_droid", "pi05_aloha", "pi0_libero", "pi0_droid", "pi0_aloha"}


def tensors(pi05):
    named = {
        "action_in_proj.weight": [1024, 32],
        "action_in_proj.bias": [1024],
        "action_out_proj.weight": [32, 1024],
        "action_out_proj.bias": [32],
    }
    if pi05:
        named.update({"time_mlp_in.weight": [1024, 1024], "time_mlp_in.bias": [1024],
                      "time_mlp_out.weight": [1024, 1024], "time_mlp_out.bias": [1024]})
    else:
        named.update({"state_proj.weight": [1024, 32], "state_proj.bias": [1024],
                      "action_time_mlp_in.weight": [1024, 2048], "action_time_mlp_in.bias": [1024],
                      "action_time_mlp_out.weight": [1024, 1024]})
    layer = 0
    while len(named) < 812:
        for part in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "input_layernorm", "post_attention_layernorm"):
            if len(named) < 812:
                name = f"paligemma_with_expert.paligemma.model.language_model.layers.{layer}.{part}.weight"
                named[name] = [16]
        layer += 1
    return {name: ("BF16", shape, None) for name, shape in named.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint_dir", required=True)
    parser.add_argument("--config_name", required=True)
    parser.add_argument("--output_path")
    parser.add_argument("--precision", default="bfloat16")
    args = parser.parse_args()
    if args.config_name not in CONFIGS:
        print("Traceback (most recent call last):", file=sys.stderr)
        print(f"ValueError: Config '{args.config_name}' not found.", file=sys.stderr)
        sys.exit(1)
    params = pathlib.Path(args.checkpoint_dir) / "params"
    if not (params / "commit_success.txt").exists():
        print(f"FileNotFoundError: No checkpoint found at {params}/", file=sys.stderr)
        sys.exit(1)
    print(f"Converting PI0 checkpoint from {args.checkpoint_dir} to {args.output_path}")
    print(f"Model config: Pi0Config(pi05={args.config_name.startswith('pi05')})")
    os.makedirs(args.output_path, exist_ok=True)
    write_file(os.path.join(args.output_path, "model.safetensors"),
               tensors("pi05" in args.checkpoint_dir))
    assets = pathlib.Path(args.checkpoint_dir).parent / "assets"
    if assets.exists():
        shutil.copytree(assets, pathlib.Path(args.output_path) / "assets", dirs_exist_ok=True)
    with open(os.path.join(args.output_path, "config.json"), "w") as fh:
        json.dump({"action_dim": 32, "action_horizon": 10, "precision": args.precision}, fh)
    print("Model conversion completed successfully!")
    print(f"Model saved to {args.output_path}")


main()
'''

TRAIN_WAYPOINT = r'''"""Stand-in for the fork's scripts/train_waypoint.py: checks what the real script reads, then
prints its log lines (_fake_trainer.py). Records its environment in logs/<mode>_env.json."""
import argparse
import json
import os
import runpy
import sys
import time
import uuid
from pathlib import Path


def fail(error):
    print("Traceback (most recent call last):", file=sys.stderr)
    print(error, file=sys.stderr, flush=True)
    sys.exit(1)


def load_config(path):
    config = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].rstrip()
        if ":" in line and not line.startswith(" "):
            key, value = line.split(":", 1)
            config[key.strip()] = value.strip()
    return config


def need(path):
    if not Path(path).exists():
        fail(f"FileNotFoundError: [Errno 2] No such file or directory: '{path}'")


def check_stats(directory, mode):
    need(f"{directory}/dataset_statistics.json")
    stats = json.loads(Path(f"{directory}/dataset_statistics.json").read_text())
    if mode == "ae":
        stats = next(iter(stats.values()))
    action = len(stats["action"]["q99"])
    if action != 7:
        fail(f"ValueError: operands could not be broadcast together with shapes (144,7) ({action},)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ae", "vlm"], required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    if sys.prefix == sys.base_prefix:
        fail("ModuleNotFoundError: No module named 'safetensors'")
    import ml_dtypes
    import tensorflow  # noqa: F401
    import tensorflow_datasets  # noqa: F401
    from transformers.models.siglip import check
    if not check.check_whether_transformers_replace_is_installed_correctly():
        fail("ValueError: transformers_replace is not installed correctly")
    need(args.config)
    cfg = load_config(args.config)
    if args.mode == "ae":
        need(f"{cfg['original_rlds_dir']}/dataset_info.json")
        need(cfg["wp_indices_path"])
        data_dir = cfg["original_rlds_dir"].split("/libero/")[0]
    else:
        need(f"{cfg['wp_rlds_dir']}/dataset_info.json")
        data_dir = cfg["wp_rlds_dir"].split("/libero/")[0]
    check_stats(cfg["dataset_statistics_path"], args.mode)
    need(f"{cfg['pretrained_weight_path']}/model.safetensors")
    env = {k: v for k, v in os.environ.items() if k.startswith("WANDB_") and k != "WANDB_API_KEY"}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "XLA_PYTHON_CLIENT_PREALLOCATE", "WORLD_SIZE"):
        env[name] = os.environ.get(name)
    env.update(key=bool(os.environ.get("WANDB_API_KEY")), venv=sys.prefix,
               ml_dtypes=ml_dtypes.__version__, config=cfg)
    Path("logs").mkdir(exist_ok=True)
    Path(f"logs/{args.mode}_env.json").write_text(json.dumps(env, indent=1))
    mode = os.environ.get("WANDB_MODE", "online")
    if cfg.get("wandb_enabled") == "false":
        mode = "disabled"
    if mode == "offline" and os.environ.get("RANK", "0") == "0":  # other ranks: wandb disabled
        run_id = uuid.uuid4().hex[:8]
        stamp = time.strftime("%Y%m%d_%H%M%S")
        run_dir = Path("wandb") / f"offline-run-{stamp}-{run_id}"
        run_dir.mkdir(parents=True)
        (run_dir / f"run-{run_id}.wandb").write_bytes(b":W&B\x00")
    sys.argv = [
        sys.argv[0], "--mode", args.mode, "--config", args.config, "--wandb", mode,
        "--total", cfg["num_train_steps"], "--data-dir", data_dir, "--steps", "10",
        "--commit", "2a67705",
        "--step-sleep", "0.05", "--startup-sleep", "0.02", "--hold",
    ] + (["--resume"] if args.resume else [])
    runpy.run_path(str(Path(__file__).with_name("_fake_trainer.py")), run_name="__main__")


main()
'''
