"""No dropout in the update (`disable_dropout`): on a GPT-2-style base with dropout 0.1 and LoRA dropout, the first
minibatch's ratio is 1 and its approx_kl 0, one policy at a time and in shared passes."""

from __future__ import annotations

import pytest
import torch

from marl.config import PPOArgs
from marl.model import MultiAdapterModel
from marl.ppo.rollout import reference_logprobs
from marl.ppo.learner import dropout_off
from marl.ppo.trainer import MultiPolicyPPOTrainer

from ..tiny_models import gpt2_pad_eos


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return gpt2_pad_eos(tmp_path_factory.mktemp("gpt2") / "model")


def first_minibatch(model_dir, multi_lora: str, weights: list | None = None, **kw) -> dict[str, dict]:
    """The update statistics of one minibatch (all of each policy's rows, one micro-batch) of two policies; the
    trained parameters after it appended to `weights`."""
    cfg = PPOArgs(model_name_or_path=str(model_dir), policies=[{"name": "policy_a"}, {"name": "policy_b"}],
                  prompts_per_policy=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=6, lora_r=4, lora_alpha=8,
                  lora_dropout=0.1, multi_lora=multi_lora, report_to="none", **kw)
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(str(model_dir))
    assert (model.base.config.resid_pdrop, model.base.config.embd_pdrop, model.base.config.attn_pdrop) == (0.1,) * 3
    for spec in cfg.policies:
        model.add_adapter(spec["name"], cfg.lora_config())  # LoRA dropout 0.1
    prompts = [model.tokenizer(t)["input_ids"] for t in ["The movie was", "I watched it and", "This film is"]]
    trainer = MultiPolicyPPOTrainer(model, cfg, [cfg.policy(p) for p in cfg.policies], prompts, None)
    rollout = trainer.rollout()
    scores = torch.randn(len(rollout.adapter_names), generator=torch.Generator().manual_seed(0))
    ref_lp = reference_logprobs(model, None, rollout)
    shared = trainer.shares_passes(rollout)
    assert shared == (multi_lora == "batched")
    stats = trainer.learner.update(trainer.learner.make_experience(rollout, scores, ref_lp, shared=shared), 1,
                                   shared=shared)
    if weights is not None:
        weights.append([p.detach().clone() for n in trainer.policies for p in model.trainable_parameters(n)])
    return stats


@pytest.mark.parametrize("multi_lora", ["peft", "batched"])
def test_the_first_minibatch_s_ratio_is_1_without_dropout_in_the_update(gpt2_dir, multi_lora):
    stats = first_minibatch(gpt2_dir, multi_lora)  # disable_dropout: true, the default
    for name, st in stats.items():
        assert st["ratio"] == pytest.approx(1.0, abs=1e-6), name
        assert st["approx_kl"] == pytest.approx(0.0, abs=1e-6) and st["clipfrac"] == 0.0, name
    with_dropout = first_minibatch(gpt2_dir, multi_lora, disable_dropout=False)  # the test can fail
    for name, st in with_dropout.items():
        assert st["approx_kl"] > 1e-4, name


def test_dropout_off_sets_every_dropout_to_0_and_puts_it_back():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.2))
    model.train()
    extra = torch.nn.Dropout(0.3)
    model.add_module("extra", extra)
    attention = model.model.layers[0].self_attn
    with dropout_off(model):
        assert extra.p == 0.0 and attention.attention_dropout == 0.0 and model.training
    assert extra.p == 0.3 and attention.attention_dropout == 0.2


@pytest.mark.parametrize("multi_lora", ["peft", "batched"])
def test_an_update_without_dropout_runs_in_eval_mode_and_trains_the_same_adapters(gpt2_dir, multi_lora, monkeypatch):
    """Without dropout and checkpointing the update runs in eval mode (no walks to switch modes): the same adapters,
    bit for bit, as in training mode with every dropout at 0."""
    from marl.ppo.learner import Learner

    weights, modes = [], []
    real = MultiAdapterModel.policy_forward
    monkeypatch.setattr(MultiAdapterModel, "policy_forward",
                        lambda self, *a, **k: modes.append(self.base.training) or real(self, *a, **k))
    for eval_update in (True, False):
        monkeypatch.setattr(Learner, "update_in_eval_mode", eval_update)
        modes.clear()
        first_minibatch(gpt2_dir, multi_lora, weights)
        assert modes and not any(modes) if eval_update else any(modes)
    for a, b in zip(*weights):
        assert torch.equal(a, b)


def test_the_users_own_checkpointing_keeps_the_update_in_training_mode(tiny_model_dir):
    """transformers checkpoints only in training mode: a base the user called gradient_checkpointing_enable() on
    (old TRL's examples do) keeps its update in training mode."""
    from marl.ppo.learner import Learner

    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    cfg = PPOArgs(model_name_or_path=tiny_model_dir, policies=[{"name": "p"}], lora_r=4, report_to="none")
    model.add_adapter("p", cfg.lora_config())
    learner = Learner(model, cfg, [cfg.policy(cfg.policies[0])])
    assert learner.update_in_eval_mode
    model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not learner.update_in_eval_mode
