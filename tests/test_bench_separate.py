"""The bench's separate-copies baseline (bench/separate.py, rows 1 and 6) stands in for a MultiAdapterModel in
marl's PPO trainer: it must keep up with what the trainer asks of its model, or those rows stop measuring."""

from __future__ import annotations

import pytest
import torch

from marl.config import PPOArgs


@pytest.mark.parametrize("train", ["lora", "full"])
def test_separate_copies_train_one_ppo_step_per_policy(tiny_model_dir, tiny_run, train):
    from bench.separate import SeparateCopiesPPO

    cfg = PPOArgs(run_dir="unused", model_name_or_path=tiny_model_dir, reward_adapter=str(tiny_run / "adapters/reward"),
                  sft_adapter="none", report_to="none", policies=[{"name": "policy_a"}, {"name": "policy_b", "seed": 1}],
                  prompts_per_policy=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4, lora_r=4, lora_alpha=8,
                  lora_dropout=0.0, value_model="head")
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    sep = SeparateCopiesPPO(tiny_model_dir, str(tiny_run / "adapters/reward"), cfg, cfg.resolved_policies(), prompts,
                            train=train)
    before = {n: [p.detach().clone() for p in r.copies.params] for n, r in sep.roles.items()}
    metrics = sep.step()
    for name, r in sep.roles.items():
        assert f"{name}/reward/mean" in metrics
        assert any(not torch.equal(a, b) for a, b in zip(before[name], r.copies.params)), name  # it trained
