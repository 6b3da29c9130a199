"""The project the shaped-network bench clones: an openpi-like repo whose lock uses real wheels.

`build_repo()` writes a bare git repo `root/openpi.git` with a pyproject over `PROJECT_WHEELS`
(jax, jaxlib, transformers, ... from the loopback index), its `uv.lock` resolved against that
index's URL (the URL the box fetches from), openpi's `transformers_replace` in miniature, a
conversion stand-in and a training stand-in:

- `examples/convert_jax_model_to_pytorch.py`: imports the venv's jax (as the real one does),
  reads every Orbax data file of the checkpoint as float32, casts it to bfloat16 with ml_dtypes
  `--passes` times (the CPU work of the real slicing and casting; the real converter takes
  1.5-2 min on a 12 GB checkpoint) and writes `model.safetensors` with 812 BF16 tensors and
  `Model conversion completed successfully!`, as the real one ends.
- `scripts/train.py`: imports what the real training imports first (jax, numpy, transformers,
  safetensors), reads the model's header and the AE statistics, then runs the stand-in trainer
  (provision/data/fake_trainer.py: the real log lines of the fork's train_waypoint.py).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pyindex import PROJECT_WHEELS

REPO = Path(__file__).resolve().parent.parent
FAKE_TRAINER = REPO / "provision" / "data" / "fake_trainer.py"


def _git(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def build_repo(root: Path, index_url: str, uv: str, env: dict[str, str]) -> Path:
    """`root/openpi.git`, locked against `index_url`; returns the bare repo."""
    work = root / "openpi-work"
    _git("init", "-q", "-b", "main", str(work))
    for name, text in files().items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    lock_env = {**env, "UV_INDEX_URL": index_url, "UV_PYTHON_DOWNLOADS": "never"}
    lock_env.pop("VIRTUAL_ENV", None)
    subprocess.run(
        [uv, "lock", "--python", "/usr/bin/python3.11"],
        cwd=work, env=lock_env, check=True, capture_output=True,
    )  # fmt: skip
    _git("add", "-A", cwd=work)
    _git(
        "-c", "user.email=bench@example.invalid", "-c", "user.name=bench",
        "commit", "-q", "-m", "openpi-like project", cwd=work,
    )  # fmt: skip
    bare = root / "openpi.git"
    _git("clone", "-q", "--bare", str(work), str(bare))
    return bare


def locked_wheels(lock_text: str) -> list[str]:
    """The wheel file names a uv.lock downloads on this box."""
    names = []
    for line in lock_text.splitlines():
        if "url = " in line and ".whl" in line:
            url = line.split('url = "', 1)[1].split('"', 1)[0]
            names.append(url.rsplit("/", 1)[1])
    return names


def files() -> dict[str, str]:
    """The repo's files by path."""
    deps = "".join(f'    "{req}",\n' for req in PROJECT_WHEELS)
    replace = "src/openpi/models_pytorch/transformers_replace/models"
    return {
        "pyproject.toml": PYPROJECT.format(deps=deps),
        "src/openpi/__init__.py": "",
        f"{replace}/siglip/check.py": SIGLIP_CHECK,
        f"{replace}/siglip/modeling_siglip.py": "# openpi's patched SigLIP\n",
        f"{replace}/gemma/modeling_gemma.py": "# openpi's patched Gemma (adaRMS)\n",
        "examples/convert_jax_model_to_pytorch.py": CONVERTER,
        "scripts/train.py": TRAIN,
        "scripts/_fake_trainer.py": FAKE_TRAINER.read_text(),
        "configs/ae.yaml": AE_CONFIG,
    }


def uv_env() -> dict[str, str]:
    """This process's environment minus what would point uv elsewhere."""
    env = dict(os.environ)
    for key in ("VIRTUAL_ENV", "PIP_FIND_LINKS", "UV_FIND_LINKS", "UV_EXTRA_INDEX_URL"):
        env.pop(key, None)
    return env


PYPROJECT = """\
[project]
name = "openpi"
version = "0.1.0"
requires-python = "==3.11.*"
dependencies = [
{deps}]

[tool.uv]
environments = ["sys_platform == 'linux' and platform_machine == 'x86_64'"]
"""

SIGLIP_CHECK = """\
import transformers


def check_whether_transformers_replace_is_installed_correctly():
    return transformers.__version__.startswith("5.24")
"""

CONVERTER = r'''"""Stand-in for openpi's examples/convert_jax_model_to_pytorch.py: real CPU work, real imports.

Reads the Orbax checkpoint's data files as float32, casts them to bfloat16 `--passes` times and
writes model.safetensors (812 BF16 tensors, as pi0.5 has) and config.json.
"""
import argparse
import json
import pathlib
import sys

import jax  # noqa: F401  (the real converter loads the checkpoint with the venv's jax)
import ml_dtypes
import numpy as np

TENSORS = 812

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint_dir", required=True)
parser.add_argument("--config_name", required=True)
parser.add_argument("--output_path", required=True)
parser.add_argument("--precision", default="bfloat16")
parser.add_argument("--passes", type=int, default=4)
args = parser.parse_args()
params = pathlib.Path(args.checkpoint_dir) / "params"
if not (params / "commit_success.txt").exists():
    sys.exit(f"no Orbax params in {params}")
data = sorted((params / "ocdbt.process_0" / "d").iterdir())
print(f"Loading {len(data)} data files from {params}", flush=True)
raw = np.concatenate([np.frombuffer(p.read_bytes()[: p.stat().st_size // 4 * 4], np.float32)
                      for p in data])
raw = np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
for _ in range(args.passes):
    weights = (raw * np.float32(0.5)).astype(ml_dtypes.bfloat16)
out = pathlib.Path(args.output_path)
out.mkdir(parents=True, exist_ok=True)
blob = weights.tobytes()
step = len(blob) // TENSORS // 2 * 2
header, offset = {}, 0
for i in range(TENSORS):
    end = len(blob) if i == TENSORS - 1 else offset + step
    header[f"layers.{i}.weight"] = {"dtype": "BF16", "shape": [(end - offset) // 2],
                                    "data_offsets": [offset, end]}
    offset = end
head = json.dumps(header).encode()
head += b" " * (-len(head) % 8)
with open(out / "model.safetensors.tmp", "wb") as fh:
    fh.write(len(head).to_bytes(8, "little") + head + blob)
(out / "model.safetensors.tmp").rename(out / "model.safetensors")
(out / "config.json").write_text(json.dumps({"config": args.config_name, "precision": args.precision}))
print(f"Saved {TENSORS} tensors ({len(blob)} bytes) to {out}")
print("Model conversion completed successfully!")
'''

TRAIN = r'''"""Stand-in for scripts/train_waypoint.py: the real imports and inputs, then the real log."""
import json
import pathlib
import runpy
import sys

import jax  # noqa: F401  (what the training imports before its first line)
import numpy  # noqa: F401
import safetensors  # noqa: F401
import transformers  # noqa: F401

model, stats = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
head = model.read_bytes()[:8]
if len(head) < 8:
    sys.exit(f"{model}: not a safetensors file")
json.loads(stats.read_text())
sys.argv = ["train_waypoint.py", *sys.argv[3:]]
runpy.run_path(str(pathlib.Path(__file__).with_name("_fake_trainer.py")), run_name="__main__")
'''

AE_CONFIG = """\
exp_name: waypoint_ae_bench
num_train_steps: 10000
log_interval: 5
save_interval: 100000
batch_size: 4
wandb_enabled: false
checkpoint_dir: checkpoints/{exp_name}
"""
