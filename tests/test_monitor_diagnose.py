"""`bootstrap diagnose`: a pasted terminal session in, diagnoses and fixes out."""

from __future__ import annotations

from provision.monitor.diagnose import diagnose_command, render_diagnosis

# What a user pastes after a bad evening: colours, prompts, a tqdm bar, two failures.
PASTED = (
    "\x1b[01;32mroot@C.27734211\x1b[00m:\x1b[01;34m/workspace/openpi\x1b[00m$ torchrun "
    "--standalone --nnodes=1 --nproc_per_node=2 scripts/train_waypoint.py --mode vlm "
    "--config configs/waypoint_vlm_libero.yaml\n"
    "W1121 11:02:40.114000 9920 torch/distributed/run.py:793] Setting OMP_NUM_THREADS "
    "environment variable for each process to be 1 in default\n"
    "Traceback (most recent call last):\n"
    '  File "/workspace/openpi/scripts/train_waypoint.py", line 22, in <module>\n'
    "    import safetensors.torch\n"
    "ModuleNotFoundError: No module named 'safetensors'\n"
    "\x1b[01;32mroot@C.27734211\x1b[00m:/workspace/openpi$ .venv/bin/torchrun --standalone "
    "--nnodes=1 --nproc_per_node=2 scripts/train_waypoint.py --mode vlm --config "
    "configs/waypoint_vlm_libero.yaml\n"
    "VLM Training:   0%|          | 0/30000 [00:00<?, ?it/s]\r"
    "VLM Training:   0%|          | 1/30000 [00:09<80:00:00,  9.60s/it]\n"
    "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 15.68 GiB. GPU 0 "
    "has a total capacity of 94.97 GiB of which 9.12 GiB is free.\n"
    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
)


def test_pasted_terminal() -> None:
    found = diagnose_command(PASTED)
    assert [(m.id, m.line_no) for m in found] == [("system-torchrun", 6), ("cuda-oom", 10)]
    text = render_diagnosis(found, "the pasted text")
    lines = text.splitlines()
    assert lines[0] == "2 known issues in the pasted text:"
    assert lines[2] == "[system-torchrun] the system torchrun/python ran instead of the venv's"
    assert lines[3] == "  line 6: ModuleNotFoundError: No module named 'safetensors'"
    assert "  remediation: venv_torchrun (steps may apply it once by themselves)" in lines
    assert "  remediation: expandable_segments (steps may apply it once by themselves)" in lines
    assert any(line.startswith("  fix: Set PYTORCH_CUDA_ALLOC_CONF=") for line in lines)
    assert all(len(line) <= 100 for line in lines if not line.startswith("  line "))


def test_nothing_known() -> None:
    assert diagnose_command("all fine\n[AE] step=50/10000 loss=0.6\n") == []
    text = render_diagnosis([], "train.log")
    assert text.startswith("No known issue found in train.log (") and "signatures checked" in text
