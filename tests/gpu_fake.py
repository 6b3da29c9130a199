"""Helpers for the stand-in nvidia-smi (tests/fakes/nvidia-smi) and realistic training logs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

FAKES = Path(__file__).parent / "fakes"


def use_fake_gpus(monkeypatch: pytest.MonkeyPatch, scenario: str | Path = "healthy") -> None:
    """Put the stand-in nvidia-smi first on PATH, reporting `scenario` (a preset or JSON file)."""
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NVIDIA_SMI", str(scenario))


def fake_env(scenario: str | Path = "healthy") -> dict[str, str]:
    """An environment (for a StepContext or a playbook step) that uses the stand-in."""
    return {
        **os.environ,
        "PATH": f"{FAKES}{os.pathsep}{os.environ['PATH']}",
        "FAKE_NVIDIA_SMI": str(scenario),
    }


def write_scenario(path: Path, preset: str = "healthy", *gpus: dict[str, Any], **top: Any) -> Path:
    """A scenario file: `preset` with per-GPU overrides; rewrite it to change what the fake says."""
    path.write_text(json.dumps({"preset": preset, "gpus": list(gpus), **top}))
    return path


def waypoint_log(
    mode: str = "AE",
    steps: range = range(0, 501, 50),
    total: int = 10000,
    s_per_step: float = 13.5,
    start: float = 10 * 3600.0,
    loss: Any = None,
    gnorm: Any = None,
) -> str:
    """The waypoint trainer's output as tee writes it: its logging lines right after tqdm's bar
    (same line, `\\r` between bar updates), formats copied from scripts/train_waypoint.py."""
    out = [
        _ts(start - 60)
        + " [I] Model: 3617.8M total, 3617.8M trainable"
        + " " * 38
        + "(5121:train_waypoint.py:283)\n",
        f"{mode} Training:   0%|          | 0/{total} [00:00<?, ?it/s]",
    ]
    for i, step in enumerate(steps):
        t = start + step * s_per_step
        value = loss(step) if callable(loss) else (loss if loss is not None else 0.9 - step / 2000)
        g = gnorm(step) if callable(gnorm) else (gnorm if gnorm is not None else 3.0)
        if i:
            elapsed = step * s_per_step
            out.append(
                f"\r{mode} Training:   {100 * step // total}%|▏         | {step}/{total} "
                f"[{_hms(elapsed)}<{_hms((total - step) * s_per_step)}, "
                f"{s_per_step:.2f}s/it, loss={value:.4f}, step={step}]"
            )
        eta = (total - step) / max(50 / (50 * s_per_step), 1e-6) / 60
        out.append(
            _ts(t) + f" [I] [{mode}] step={step}/{total} loss={value:.4f} lr=5.00e-05 "
            f"gnorm={g:.2f} sps={1 / s_per_step:.1f} gpu=51.2GB eta={eta:.0f}min"
            + " (5121:train_waypoint.py:330)\n"
        )
    return "".join(out)


def _ts(seconds: float) -> str:
    seconds %= 86400
    ms = int((seconds - int(seconds)) * 1000)
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}.{ms:03d}"


def _hms(seconds: float) -> str:
    s = int(seconds)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"
