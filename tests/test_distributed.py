"""Two CPU processes (gloo) run every stage with the shipped configs as shipped (their trackers too); both exit 0
and end with identical adapter weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _launch(args, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "marl.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_train_identical_adapters(tmp_path, tiny_model_dir):
    env = {**os.environ, "MARL_DIGEST_DIR": str(tmp_path / "digests"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = str(tmp_path / "run")
    common = ["--model_name_or_path", tiny_model_dir, "--run_dir", run]  # report_to as shipped: tensorboard
    small = ["--max_steps", "3", "--max_train_samples", "64", "--per_device_train_batch_size", "8"]
    _launch(["sft", "--config", "configs/sft.yaml", *common, *small], env)
    _launch(["reward", "--config", "configs/reward.yaml", *common, *small], env)
    _launch(["ppo", "--config", "configs/ppo.yaml", *common, "--total_steps", "2", "--prompts_per_policy", "4",
             "--mini_batch_size", "2", "--max_new_tokens", "6", "--eval_prompts", "4", "--save_steps", "1"], env)
    for stage in ("sft", "reward", "ppo"):
        digests = [json.loads((tmp_path / "digests" / f"{stage}.rank{r}.json").read_text())["digest"] for r in (0, 1)]
        assert digests[0] == digests[1], stage
    assert (tmp_path / "run/adapters/policy_a/adapter_model.safetensors").exists()
    assert (tmp_path / "run/checkpoints/ppo/latest/state.json").exists()
    assert list((tmp_path / "run/logs").rglob("events.out.tfevents.*"))  # the tracker wrote
