"""No kernel from the Hub at run time unless asked: bitsandbytes' request for its CPU kernel (on AVX512-BF16
CPUs) is refused, and neither line it printed reaches the user; MARL_HUB_KERNELS=1 gives bitsandbytes' own
behaviour back (marl/hub_kernels.py, docs/known-issues.md #16)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINES = ("Skipping publisher trust check", "Failed to load CPU gemm_4bit_forward")


def _python(args: list[str], **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "MARL_HUB_KERNELS"}
    env = {**base, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_4bit_marl_command_prints_no_hub_kernel_line(tmp_path, tiny_model_dir):
    proc = _python(["-m", "marl.cli", "sft", "--config", "configs/sft.yaml", "--model_name_or_path", tiny_model_dir,
                    "--run_dir", str(tmp_path / "run"), "--quantization", "4bit", "--max_steps", "1",
                    "--max_train_samples", "8", "--per_device_train_batch_size", "4", "--report_to", "none",
                    "--torch_threads", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run/adapters/sft/adapter_model.safetensors").exists()
    for line in LINES:
        assert line not in proc.stdout and line not in proc.stderr, line


def test_marl_hub_kernels_1_lets_bitsandbytes_ask_the_hub_as_it_does_without_marl():
    code = "import marl, bitsandbytes.functional as F; print(bool(F.has_avx512bf16()))"
    allowed = _python(["-c", code], MARL_HUB_KERNELS="1")
    assert allowed.returncode == 0, allowed.stderr
    asks = allowed.stdout.strip() == "True"  # bitsandbytes asks only on an AVX512-BF16 CPU
    assert any(line in allowed.stderr for line in LINES) == asks  # offline: it asked, and said so
