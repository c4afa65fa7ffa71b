"""Shared fixtures: tiny models built in code, saved and loaded back through from_pretrained."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: one thread is faster than two fighting over the cores (measured: a
# forward pass 0.37 s -> 0.002 s on this 2-core machine under load).
torch.set_num_threads(1)

from marl.config import RewardArgs, SFTArgs  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama with the default tokenizer (fast: no pretraining)."""
    from marl.default import save_tiny_random_llama

    return str(save_tiny_random_llama(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_layers=2))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory):
    """Another base of the same shape (different seed): adapters must not move between them."""
    from marl.default import save_tiny_random_llama

    return str(save_tiny_random_llama(tmp_path_factory.mktemp("other") / "model", hidden_size=32, num_layers=2,
                                      seed=1))


def stage_args(cls, run_dir, model_dir, **kw):
    base = dict(run_dir=str(run_dir), model_name_or_path=model_dir, max_steps=3, max_train_samples=64,
                per_device_train_batch_size=8, max_length=64, report_to="none", logging_steps=1, save_steps=1000,
                learning_rate=1e-3)
    base.update(kw)
    return cls(**base)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A run folder with an sft and a reward adapter trained for a few steps on the tiny base."""
    from pipelines import reward, sft

    run_dir = tmp_path_factory.mktemp("run")
    sft.run(stage_args(SFTArgs, run_dir, tiny_model_dir))
    reward.run(stage_args(RewardArgs, run_dir, tiny_model_dir, lora_dropout=0.0))
    return run_dir


def param_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}
