"""Stand-ins for what `playbooks/openpi-lerobot.yaml` fetches, small enough for a test.

- `build_wheels`: a wheel directory for an offline uv resolve shaped like openpi's JAX stack
  (Physical-Intelligence/openpi 15a9616): jax 0.5.3, numpy 1.26.4 (`asarray` only), lerobot
  (wants av >= 14.2.0, as lerobot 0cf8648's pyproject.toml:65 does), av 17.0.0 as a wheel (what
  upstream's uv.lock pins: no ffmpeg build, no override needed), and `openpi-src`, whose `.pth` puts the checkout's `src/` on the venv's path as
  uv's editable install of openpi does.
  Its `lerobot.common.datasets.lerobot_dataset.LeRobotDataset` reads a local v2.1 dataset's
  meta the way lerobot 0cf8648 does (`episodes=` loads those episodes; `episode_data_index`
  is positional over them, lerobot/common/datasets/utils.py:455-466, and `_get_query_indices`
  indexes it by episode index, lerobot_dataset.py:665-667).
- `build_repo`: openpi as a bare git repository on `main`: pyproject and uv.lock, and under
  `src/openpi/` the modules the rendered pi05_custom config and the playbook's checks import,
  with openpi's names and signatures (dataclasses reject unknown fields, as the real ones do):
  `training/config.py` (TrainConfig, DataConfig, DataConfigFactory, `_CONFIGS_DICT`,
  `get_config`, `cli`), `models/pi0_config.py`, `policies/libero_policy.py`,
  `training/optimizer.py`, `training/weight_loaders.py`, `transforms.py`, `shared/normalize.py`.
  `scripts/train.py` does what openpi's does before its first step — resolve the config, refuse
  an existing checkpoint dir without --resume, find the LeRobot dataset under HF_LEROBOT_HOME,
  load the norm stats and the weights, build the dataset as openpi's `create_torch_dataset`
  does (training/data_loader.py:140-146 at 15a9616: no `episodes`) and query each episode's
  first frame (an IndexError where lerobot's indexing goes wrong) — then prints the JAX trainer's log lines
  (provision/data/fake_trainer.py --mode jax). It records its environment in logs/jax_env.json.
- `write_drive`: the LeRobot v2.1 dataset of seed 004 (34 episodes, 31/3 split) on the "drive";
  the checkpoint objects come from `gcs_emulator.pi05_like`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from githttp import git
from pywheels import build_wheel

from provision.stats.samples import write_preset

REPO = Path(__file__).resolve().parent.parent
FAKE_TRAINER = REPO / "provision" / "data" / "fake_trainer.py"
REPO_ID = "rzh/openpi_segmented_data"


def build_wheels(dest: Path, src: Path) -> Path:
    """The wheel directory of the module docstring; `src` is the checkout's src/ on the box."""
    build_wheel(dest, "jax", "0.5.3")
    numpy = b'__version__ = "1.26.4"\n\n\ndef asarray(a):\n    return a\n'
    build_wheel(dest, "numpy", "1.26.4", files={"numpy/__init__.py": numpy})
    datasets = "lerobot/common/datasets"
    build_wheel(
        dest,
        "lerobot",
        "0.1.0",
        requires=("av>=14.2.0",),
        files={
            "lerobot/common/__init__.py": b"",
            f"{datasets}/__init__.py": b"",
            f"{datasets}/lerobot_dataset.py": LEROBOT_DATASET.encode(),
        },
    )
    build_wheel(dest, "av", "17.0.0")
    build_wheel(dest, "openpi_src", "0.1.0", files={"openpi_src.pth": f"{src}\n".encode()})
    return dest


def build_repo(root: Path, wheels: Path, uv: str) -> Path:
    """A bare repository `root/openpi.git`; returns its path."""
    work = root / "openpi-work"
    git("init", "-q", "-b", "main", str(work))
    for name, text in FILES.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (work / "scripts" / "_fake_trainer.py").write_text(FAKE_TRAINER.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    env.update(
        UV_OFFLINE="1",
        UV_FIND_LINKS=str(wheels),
        UV_PYTHON_DOWNLOADS="never",
        UV_CACHE_DIR=str(root / "uv-cache"),
    )
    env.pop("VIRTUAL_ENV", None)
    subprocess.run([uv, "lock"], cwd=work, env=env, check=True, capture_output=True)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "openpi stand-in", cwd=work)
    git("clone", "-q", "--bare", str(work), str(root / "openpi.git"))
    return root / "openpi.git"


def write_drive(root: Path) -> Path:
    """`root/datasets/openpi_segmented_data`: seed 004's LeRobot dataset; returns that dir."""
    dest = root / "datasets" / "openpi_segmented_data"
    write_preset(dest, "lerobot")
    return dest


LEROBOT_DATASET = r'''"""Stand-in for lerobot 0cf8648's LeRobotDataset: metadata and indexing, no frames."""
import json
import os
import pathlib


class LeRobotDataset:
    def __init__(self, repo_id, root=None, episodes=None, delta_timestamps=None, **kwargs):
        home = pathlib.Path(os.environ.get("HF_LEROBOT_HOME", "~/.cache/huggingface/lerobot"))
        self.repo_id = repo_id
        self.root = pathlib.Path(root) if root else home.expanduser() / repo_id
        lines = (self.root / "meta" / "episodes.jsonl").read_text().splitlines()
        self.meta_episodes = {e["episode_index"]: e for e in map(json.loads, filter(None, lines))}
        self.episodes = episodes
        chosen = episodes if episodes is not None else sorted(self.meta_episodes)
        ends, total = [], 0
        for ep in chosen:  # utils.get_episode_data_index: positional over `episodes`
            total += self.meta_episodes[ep]["length"]
            ends.append(total)
        self.episode_data_index = {"from": [0] + ends[:-1], "to": ends}
        self.loaded = chosen

    @property
    def num_episodes(self):
        return len(self.loaded)

    def _get_query_indices(self, idx, ep_idx):
        # lerobot_dataset.py:666-667: indexed by the episode index, not its position.
        count = len(self.episode_data_index["from"])
        if not 0 <= ep_idx < count:
            raise IndexError(f"index {ep_idx} is out of bounds for dimension 0 with size {count}")
        return self.episode_data_index["from"][ep_idx], self.episode_data_index["to"][ep_idx]
'''

PYPROJECT = """\
[project]
name = "openpi"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["jax==0.5.3", "lerobot==0.1.0", "numpy==1.26.4", "openpi_src==0.1.0"]

[tool.uv]
override-dependencies = ["ml-dtypes==0.4.1", "tensorstore==0.1.74"]
"""

PI0_CONFIG = """\
import dataclasses
import enum


class ModelType(enum.Enum):
    PI0 = "pi0"
    PI0_FAST = "pi0_fast"
    PI05 = "pi05"


@dataclasses.dataclass(frozen=True)
class Pi0Config:
    dtype: str = "bfloat16"
    paligemma_variant: str = "gemma_2b"
    action_expert_variant: str = "gemma_300m"
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = None
    pi05: bool = False
    discrete_state_input: bool = None
    pytorch_compile_mode: str | None = "max-autotune"

    def __post_init__(self):
        variants = {"gemma_2b", "gemma_2b_lora", "gemma_300m", "gemma_300m_lora", "dummy"}
        for variant in (self.paligemma_variant, self.action_expert_variant):
            if variant not in variants:
                raise ValueError(f"Unknown variant: {variant}")

    @property
    def model_type(self):
        return ModelType.PI05 if self.pi05 else ModelType.PI0

    def get_freeze_filter(self):
        return ("freeze", self.paligemma_variant, self.action_expert_variant)
"""

LIBERO_POLICY = """\
import dataclasses

from openpi import transforms


@dataclasses.dataclass(frozen=True)
class LiberoInputs(transforms.DataTransformFn):
    model_type: object

    def __call__(self, data):
        return data


@dataclasses.dataclass(frozen=True)
class LiberoOutputs(transforms.DataTransformFn):
    def __call__(self, data):
        return {"actions": data["actions"][..., :7]}
"""

TRANSFORMS = """\
import dataclasses
from collections.abc import Sequence


class DataTransformFn:
    def __call__(self, data):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Group:
    inputs: Sequence = ()
    outputs: Sequence = ()


@dataclasses.dataclass(frozen=True)
class RepackTransform(DataTransformFn):
    structure: dict

    def __call__(self, data):
        return {new: data[old] for new, old in self.structure.items()}
"""

OPTIMIZER = """\
import dataclasses


@dataclasses.dataclass(frozen=True)
class CosineDecaySchedule:
    warmup_steps: int = 1_000
    peak_lr: float = 2.5e-5
    decay_steps: int = 30_000
    decay_lr: float = 2.5e-6


@dataclasses.dataclass(frozen=True)
class AdamW:
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-10
    clip_gradient_norm: float = 1.0
"""

WEIGHT_LOADERS = """\
import dataclasses


@dataclasses.dataclass(frozen=True)
class NoOpWeightLoader:
    pass


@dataclasses.dataclass(frozen=True)
class CheckpointWeightLoader:
    params_path: str
"""

NORMALIZE = """\
import dataclasses
import json
import pathlib


@dataclasses.dataclass
class NormStats:
    mean: list
    std: list
    q01: list | None = None
    q99: list | None = None


def load(directory):
    path = pathlib.Path(directory) / "norm_stats.json"
    if not path.exists():
        raise FileNotFoundError(f"Norm stats file not found at: {path}")
    body = json.loads(path.read_text())["norm_stats"]
    names = [f.name for f in dataclasses.fields(NormStats)]
    return {key: NormStats(**{n: v for n, v in stats.items() if n in names}) for key, stats in body.items()}
"""

CONFIG = '''\
"""openpi's training/config.py, reduced to what a config module and train.py use."""

import abc
import dataclasses
import difflib
import logging
import pathlib
import sys
from collections.abc import Sequence

import openpi.models.pi0_config as pi0_config
import openpi.shared.normalize as _normalize
import openpi.training.optimizer as _optimizer
import openpi.training.weight_loaders as weight_loaders
import openpi.transforms as _transforms


@dataclasses.dataclass(frozen=True)
class AssetsConfig:
    assets_dir: str | None = None
    asset_id: str | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    repo_id: str | None = None
    asset_id: str | None = None
    norm_stats: dict | None = None
    repack_transforms: _transforms.Group = dataclasses.field(default_factory=_transforms.Group)
    data_transforms: _transforms.Group = dataclasses.field(default_factory=_transforms.Group)
    model_transforms: _transforms.Group = dataclasses.field(default_factory=_transforms.Group)
    use_quantile_norm: bool = False
    action_sequence_keys: Sequence[str] = ("actions",)
    prompt_from_task: bool = False


@dataclasses.dataclass(frozen=True)
class ModelTransformFactory:
    default_prompt: str | None = None

    def __call__(self, model_config):
        return _transforms.Group()


@dataclasses.dataclass(frozen=True)
class DataConfigFactory(abc.ABC):
    repo_id: str = None
    assets: AssetsConfig = dataclasses.field(default_factory=AssetsConfig)
    base_config: DataConfig | None = None

    @abc.abstractmethod
    def create(self, assets_dirs, model_config):
        """Create a data config."""

    def create_base_config(self, assets_dirs, model_config):
        asset_id = self.assets.asset_id or self.repo_id
        return dataclasses.replace(
            self.base_config or DataConfig(),
            repo_id=self.repo_id,
            asset_id=asset_id,
            norm_stats=self._load_norm_stats(pathlib.Path(self.assets.assets_dir or assets_dirs), asset_id),
            use_quantile_norm=model_config.model_type != pi0_config.ModelType.PI0,
        )

    def _load_norm_stats(self, assets_dir, asset_id):
        data_assets_dir = str(assets_dir / asset_id)
        try:
            norm_stats = _normalize.load(data_assets_dir)
            logging.info(f"Loaded norm stats from {data_assets_dir}")
            return norm_stats
        except FileNotFoundError:
            logging.info(f"Norm stats not found in {data_assets_dir}, skipping.")
        return None


@dataclasses.dataclass(frozen=True)
class FakeDataConfig(DataConfigFactory):
    repo_id: str = "fake"

    def create(self, assets_dirs, model_config):
        return DataConfig(repo_id=self.repo_id)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str
    project_name: str = "openpi"
    exp_name: str = None
    model: object = dataclasses.field(default_factory=pi0_config.Pi0Config)
    weight_loader: object = dataclasses.field(default_factory=weight_loaders.NoOpWeightLoader)
    pytorch_weight_path: str | None = None
    pytorch_training_precision: str = "bfloat16"
    lr_schedule: object = dataclasses.field(default_factory=_optimizer.CosineDecaySchedule)
    optimizer: object = dataclasses.field(default_factory=_optimizer.AdamW)
    ema_decay: float | None = 0.99
    freeze_filter: object = None
    data: DataConfigFactory = dataclasses.field(default_factory=FakeDataConfig)
    assets_base_dir: str = "./assets"
    checkpoint_base_dir: str = "./checkpoints"
    seed: int = 42
    batch_size: int = 32
    num_workers: int = 2
    num_train_steps: int = 30_000
    log_interval: int = 100
    save_interval: int = 1000
    keep_period: int | None = 5000
    overwrite: bool = False
    resume: bool = False
    wandb_enabled: bool = True
    policy_metadata: dict | None = None
    fsdp_devices: int = 1

    @property
    def assets_dirs(self):
        return (pathlib.Path(self.assets_base_dir) / self.name).resolve()

    @property
    def checkpoint_dir(self):
        if not self.exp_name:
            raise ValueError("--exp_name must be set")
        return (pathlib.Path(self.checkpoint_base_dir) / self.name / self.exp_name).resolve()

    def __post_init__(self):
        if self.resume and self.overwrite:
            raise ValueError("Cannot resume and overwrite at the same time.")


_CONFIGS = [
    TrainConfig(name="debug", data=FakeDataConfig(), batch_size=2, num_train_steps=10),
]

if len({config.name for config in _CONFIGS}) != len(_CONFIGS):
    raise ValueError("Config names must be unique.")
_CONFIGS_DICT = {config.name: config for config in _CONFIGS}


def cli():
    """tyro's overridable_config_cli, for: NAME [--exp_name X | --exp-name=X] [--resume] [--overwrite]."""
    args = sys.argv[1:]
    config = get_config(args[0])
    changes = {}
    i = 1
    while i < len(args):
        arg = args[i]
        if arg in ("--resume", "--overwrite"):
            changes[arg[2:]] = True
        elif arg.split("=")[0] in ("--exp_name", "--exp-name"):
            if "=" in arg:
                changes["exp_name"] = arg.split("=", 1)[1]
            else:
                i += 1
                changes["exp_name"] = args[i]
        else:
            raise SystemExit(f"Unrecognized options: {arg}")
        i += 1
    return dataclasses.replace(config, **changes)


def get_config(config_name):
    if config_name not in _CONFIGS_DICT:
        closest = difflib.get_close_matches(config_name, _CONFIGS_DICT.keys(), n=1, cutoff=0.0)
        closest_str = f" Did you mean '{closest[0]}'? " if closest else ""
        raise ValueError(f"Config '{config_name}' not found.{closest_str}")
    return _CONFIGS_DICT[config_name]
'''

TRAIN = r'''"""Stand-in for openpi's scripts/train.py: what it checks before step 0, then its log lines."""
import json
import os
import pathlib
import runpy
import sys

from openpi.training import config as _config


def create_torch_dataset(data_config):
    """openpi's data_loader.create_torch_dataset (15a9616 lines 140-146): no `episodes`."""
    from lerobot.common.datasets import lerobot_dataset

    return lerobot_dataset.LeRobotDataset(data_config.repo_id, delta_timestamps={})


def fail(error):
    print("Traceback (most recent call last):", file=sys.stderr)
    print(error, file=sys.stderr, flush=True)
    sys.exit(1)


def main(config):
    ckpt = config.checkpoint_dir
    resuming = False
    if ckpt.exists():
        if config.overwrite:
            pass
        elif config.resume:
            resuming = True
        else:
            fail(f"FileExistsError: Checkpoint directory {ckpt} already exists. Use --overwrite or "
                 "--resume to indicate how to handle it.")
    ckpt.mkdir(parents=True, exist_ok=True)
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    if resuming and not steps:
        print("Checkpoint directory exists, but does not contain any checkpoints. Aborting resume.")
        resuming = False
    home = pathlib.Path(os.environ.get("HF_LEROBOT_HOME", "~/.cache/huggingface/lerobot"))
    info = home.expanduser() / config.data.repo_id / "meta" / "info.json"
    if not info.is_file():
        fail(f"FileNotFoundError: {info} (the hub has no dataset {config.data.repo_id})")
    data_config = config.data.create(config.assets_dirs, config.model)
    if data_config.norm_stats is None:
        fail("ValueError: Normalization stats not found. Make sure to run "
             "`scripts/compute_norm_stats.py --config-name=<your-config>`.")
    if "actions" not in data_config.norm_stats:
        print("norm stats have no 'actions': training unnormalised")
    dataset = create_torch_dataset(data_config)
    ranges = dict(zip(dataset.loaded, zip(dataset.episode_data_index["from"], dataset.episode_data_index["to"])))
    for ep in dataset.loaded:  # each episode's first frame, as __getitem__ queries it
        if dataset._get_query_indices(ranges[ep][0], ep) != ranges[ep]:
            fail(f"AssertionError: episode {ep}'s frames come from another episode")
    weights = pathlib.Path(config.weight_loader.params_path)
    if not (weights / "commit_success.txt").is_file():
        fail(f"FileNotFoundError: No checkpoint found at {weights}")
    env = {k: os.environ.get(k) for k in (
        "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "HF_LEROBOT_HOME",
        "CUDA_VISIBLE_DEVICES", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_TAGS")}
    env.update(key=bool(os.environ.get("WANDB_API_KEY")), venv=sys.prefix, argv=sys.argv[1:],
               batch_size=config.batch_size, action_sequence_keys=list(data_config.action_sequence_keys),
               repack=dict(data_config.repack_transforms.inputs[0].structure),
               episodes=dataset.loaded)
    pathlib.Path("logs").mkdir(exist_ok=True)
    pathlib.Path("logs/jax_env.json").write_text(json.dumps(env, indent=1))
    mode = os.environ.get("WANDB_MODE", "online") if config.wandb_enabled else "disabled"
    sys.argv = [sys.argv[0], config.name, "--exp_name", config.exp_name, "--mode", "jax",
                "--wandb", mode, "--total", str(config.num_train_steps), "--steps", "5",
                "--step-sleep", "0.05", "--startup-sleep", "0.02", "--hold"]
    if resuming:
        sys.argv += ["--resume", "--start-step", str(steps[-1])]
    runpy.run_path(str(pathlib.Path(__file__).with_name("_fake_trainer.py")), run_name="__main__")


if __name__ == "__main__":
    main(_config.cli())
'''

FILES = {
    "pyproject.toml": PYPROJECT,
    "src/openpi/__init__.py": "",
    "src/openpi/models/__init__.py": "",
    "src/openpi/models/pi0_config.py": PI0_CONFIG,
    "src/openpi/policies/__init__.py": "",
    "src/openpi/policies/libero_policy.py": LIBERO_POLICY,
    "src/openpi/shared/__init__.py": "",
    "src/openpi/shared/normalize.py": NORMALIZE,
    "src/openpi/training/__init__.py": "",
    "src/openpi/training/config.py": CONFIG,
    "src/openpi/training/optimizer.py": OPTIMIZER,
    "src/openpi/training/weight_loaders.py": WEIGHT_LOADERS,
    "src/openpi/transforms.py": TRANSFORMS,
    "scripts/train.py": TRAIN,
}
