"""The PEFT and multi-adapter tests of TRL 0.11.4's tests/test_ppo_trainer.py (and what its PEFT tests share
with the others: the dataloader, a user optimizer and scheduler, the stats keys), through old TRL's calls with
marl's import, on the tiny GPT-2."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from marl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

from ..conftest import param_snapshot
from .conftest import lora_config

EXPECTED_STATS = [  # old TRL's list, every key its step returned
    "objective/kl", "objective/kl_dist", "objective/logprobs", "objective/ref_logprobs", "objective/kl_coef",
    "objective/entropy", "ppo/mean_non_score_reward", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total",
    "ppo/policy/entropy", "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/policy/clipfrac",
    "ppo/policy/advantages", "ppo/policy/advantages_mean", "ppo/policy/ratio", "ppo/returns/mean",
    "ppo/returns/var", "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var",
    "ppo/val/var_explained", "time/ppo/forward_pass", "time/ppo/compute_rewards", "time/ppo/optimize_step",
    "time/ppo/calc_stats", "time/ppo/total", "ppo/learning_rate",
]


class DummyDataset(torch.utils.data.Dataset):
    """(query, response) tuples, as old TRL's tests fed the trainer."""

    def __init__(self, query_data, response_data):
        self.query_data, self.response_data = query_data, response_data

    def __len__(self):
        return len(self.query_data)

    def __getitem__(self, idx):
        return self.query_data[idx], self.response_data[idx]


@pytest.fixture(scope="module")
def tokenizer(gpt2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def dummy_dataset(gpt2_dir, tokenizer):
    """Two copies of one query and a sampled response, cut to the same length (old TRL's _init_dummy_dataset)."""
    from transformers import AutoModelForCausalLM

    query_tensor = tokenizer.encode("This morning I went to the ", return_tensors="pt")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    response_tensor = model.generate(query_tensor, do_sample=True, max_new_tokens=20, min_new_tokens=20,
                                     pad_token_id=tokenizer.eos_token_id)[:, query_tensor.shape[1]:]
    n = min(query_tensor.shape[1], response_tensor.shape[1])
    return DummyDataset([query_tensor[0, :n] for _ in range(2)], [response_tensor[0, :n] for _ in range(2)])


def gpt2_with_input_grad_hook(gpt2_dir, calls: list | None = None):
    """The base as old TRL's PEFT tests made it: the user's hook that makes the embeddings' output require grad."""
    from transformers import AutoModelForCausalLM

    gpt2_model = AutoModelForCausalLM.from_pretrained(gpt2_dir)

    def make_inputs_require_grad(module, input, output):  # "this line is very important"
        if calls is not None:
            calls.append(1)
        output.requires_grad_(True)

    gpt2_model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
    return gpt2_model


def two_steps(ppo_trainer):
    """Old TRL's loop: one batch, a step, then train() and gradient_checkpointing_enable() and a second step."""
    for query_tensor, response_tensor in ppo_trainer.dataloader:
        reward = [torch.tensor(1.0), torch.tensor(0.0)]
        first = ppo_trainer.step(list(query_tensor), list(response_tensor), reward)
        ppo_trainer.model.train()
        ppo_trainer.model.gradient_checkpointing_enable()
        second = ppo_trainer.step(list(query_tensor), list(response_tensor), reward)
        return first, second
    raise AssertionError("the dataloader gave no batch")


def test_peft_model_ppo_trainer(gpt2_dir, tokenizer, dummy_dataset):
    from peft import get_peft_model

    calls: list = []
    gpt2_model = gpt2_with_input_grad_hook(gpt2_dir, calls)
    peft_model = get_peft_model(gpt2_model, lora_config())
    model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model)
    ppo_config = PPOConfig(batch_size=2, mini_batch_size=1, log_with=None)
    ppo_trainer = PPOTrainer(config=ppo_config, model=model, ref_model=None, tokenizer=tokenizer,
                             dataset=dummy_dataset)
    ppo_trainer.optimizer.zero_grad = partial(ppo_trainer.optimizer.zero_grad, set_to_none=False)
    assert ppo_trainer.ref_model is None
    before = param_snapshot(model)

    first, second = two_steps(ppo_trainer)

    assert calls, "the user's forward hook on the input embeddings never ran"
    for name, param in model.named_parameters():
        if "lora" in name or "v_head" in name:
            assert param.grad is not None, f"Parameter {name} has a no gradient"
        else:
            assert param.grad is None, f"Parameter {name} has a gradient"
    after = param_snapshot(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all("lora_" in n or n.startswith("v_head.summary.") for n in moved)  # the base is untouched
    for stats in (first, second):
        assert set(EXPECTED_STATS) <= set(stats)
    assert not model.marl_model.base.is_activation_checkpointing  # marl's checkpointing is on only in the update


def test_peft_model_ppo_adapter_rm_trainer(gpt2_dir, tokenizer, dummy_dataset, tmp_path):
    """The issue's example: a 2-label peft reward model trained one step, saved, then the reward adapter of
    the policy model; compute_reward_score(...)[:, -1, :] equals its logits."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    dummy_inputs = torch.LongTensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    reward_model = AutoModelForSequenceClassification.from_pretrained(gpt2_dir)  # 2 labels, transformers' default
    reward_model.config.pad_token_id = tokenizer.eos_token_id  # old TRL's Hub model had one; batches need it
    reward_model = get_peft_model(reward_model, lora_config("SEQ_CLS"))
    dummy_optim = torch.optim.Adam(filter(lambda p: p.requires_grad, reward_model.parameters()), lr=1e-3)
    previous_rm_logits = reward_model(dummy_inputs).logits
    previous_rm_logits.mean().backward()
    dummy_optim.step()
    reward_model.eval()
    original_rm_logits = reward_model(dummy_inputs).logits
    reward_model.save_pretrained(tmp_path)

    gpt2_model = gpt2_with_input_grad_hook(gpt2_dir)
    peft_model = get_peft_model(gpt2_model, lora_config())
    model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model, reward_adapter=str(tmp_path))
    ppo_config = PPOConfig(batch_size=2, mini_batch_size=1, log_with=None)
    ppo_trainer = PPOTrainer(config=ppo_config, model=model, ref_model=None, tokenizer=tokenizer,
                             dataset=dummy_dataset)
    ppo_trainer.optimizer.zero_grad = partial(ppo_trainer.optimizer.zero_grad, set_to_none=False)
    assert ppo_trainer.ref_model is None
    before = param_snapshot(model)

    two_steps(ppo_trainer)

    dummy_inputs = dummy_inputs.to(ppo_trainer.accelerator.device)
    new_logits = ppo_trainer.model.compute_reward_score(dummy_inputs)
    assert new_logits.shape == (2, 5, 2)  # (batch, tokens, num_labels), as old TRL returned it
    assert not torch.allclose(previous_rm_logits, new_logits[:, -1, :])
    assert torch.allclose(original_rm_logits, new_logits[:, -1, :])
    for name, param in model.named_parameters():
        if ("lora" in name or "v_head" in name) and ("reward" not in name):
            assert param.grad is not None, f"Parameter {name} has a no gradient"
        else:
            assert param.grad is None, f"Parameter {name} has a gradient"
    after = param_snapshot(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all((".default." in n or n.startswith("v_head.summary.")) for n in moved)  # reward, base kept
    assert model.active_adapter == "default"


def test_compute_reward_score_reads_each_rows_reward_token_at_the_last_position(gpt2_dir, tokenizer, tmp_path):
    """Right-padded rows: old TRL's [:, -1] read a pad position; marl writes each row's score from its reward
    token to the end, so [:, -1] reads the classifier's score, and earlier positions keep their own."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    reward_model = AutoModelForSequenceClassification.from_pretrained(gpt2_dir, num_labels=1)
    reward_model.config.pad_token_id = tokenizer.eos_token_id
    reward_model = get_peft_model(reward_model, lora_config("SEQ_CLS"))
    with torch.no_grad():
        for p in reward_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    reward_model.eval()
    reward_model.save_pretrained(tmp_path)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, peft_config=lora_config(),
                                                              reward_adapter=str(tmp_path))
    texts = ["a good film", "I watched it and it was dull to the very end"]
    enc = tokenizer([t + tokenizer.eos_token for t in texts], padding=True, return_tensors="pt")  # right padded
    want = reward_model(**enc).logits  # transformers reads each row at its last non-pad token
    raw = model.compute_reward_score(**enc)
    torch.testing.assert_close(raw[:, -1, :], want)
    rows = [raw[i, -1, 0] for i in range(len(raw))]  # the seed's idiom, 1 label
    torch.testing.assert_close(torch.stack(rows), want[:, 0])
    short = int(enc["attention_mask"][0].sum()) - 2  # the token before the first row's EOS: its reward token
    assert torch.equal(raw[0, short:], raw[0, -1].expand_as(raw[0, short:]))
    assert not torch.equal(raw[0, short - 1], raw[0, short])  # before it: its own per-token score


def test_drop_last_dataloader(gpt2_dir, tokenizer, dummy_dataset):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, peft_config=lora_config())
    ppo_trainer = PPOTrainer(config=PPOConfig(batch_size=3, mini_batch_size=1, log_with=None), model=model,
                             ref_model=None, tokenizer=tokenizer, dataset=dummy_dataset)
    assert len(ppo_trainer.dataloader) == 0  # 2 rows, batches of 3, the partial one dropped


def test_user_optimizer_and_lr_scheduler(gpt2_dir, tokenizer, dummy_dataset):
    """test_ppo_step_with_no_ref_sgd(_lr_scheduler) on a peft policy: the user's SGD over the trainable
    parameters (stack-llama's filter(requires_grad)) steps them, and the scheduler moves its learning rate."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, peft_config=lora_config())
    optimizer = torch.optim.SGD(filter(lambda p: p.requires_grad, model.parameters()), lr=0.01)
    lr_scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    ppo_trainer = PPOTrainer(config=PPOConfig(batch_size=2, mini_batch_size=1, log_with=None), model=model,
                             ref_model=None, optimizer=optimizer, tokenizer=tokenizer, dataset=dummy_dataset,
                             lr_scheduler=lr_scheduler)
    ppo_trainer.optimizer.zero_grad = partial(ppo_trainer.optimizer.zero_grad, set_to_none=False)
    assert ppo_trainer.optimizer is optimizer and ppo_trainer.lr_scheduler is lr_scheduler
    before = param_snapshot(model)
    query_tensor, response_tensor = next(iter(ppo_trainer.dataloader))
    reward = [torch.tensor(1.0), torch.tensor(0.0)]
    first = ppo_trainer.step(list(query_tensor), list(response_tensor), reward)
    second = ppo_trainer.step(list(query_tensor), list(response_tensor), reward)
    # each step reports the rate it trained with; the scheduler then multiplies it by 0.9
    assert first["ppo/learning_rate"] == pytest.approx(0.01) and second["ppo/learning_rate"] == pytest.approx(0.009)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0081)
    after = param_snapshot(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}
    for stat in EXPECTED_STATS:
        assert stat in second
    arrays = ("objective/kl_dist", "objective/logprobs", "objective/ref_logprobs", "ppo/policy/advantages")
    assert all(isinstance(second[k], np.ndarray) for k in arrays)
    assert second["objective/logprobs"].shape == (2, len(response_tensor[0]))


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_kbit_base_prepared_by_the_user_trains_its_lora_in_place(gpt2_dir, tokenizer, dummy_dataset, bits):
    """The examples' pattern: load in 8/4-bit, prepare_model_for_kbit_training (fp32 norms, gradient
    checkpointing, the input-grad hook), then from_pretrained(model, peft_config=...). After PPO steps the
    user's checkpointing setting is as they left it."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_8bit=True) if bits == "8bit" else BitsAndBytesConfig(load_in_4bit=True)
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir, quantization_config=quant, device_map={"": "cpu"})
    base = prepare_model_for_kbit_training(base)
    assert base.is_activation_checkpointing
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora_config())
    assert model.marl_model.base is base and getattr(model, f"is_loaded_in_{bits}")
    ppo_trainer = PPOTrainer(config=PPOConfig(batch_size=2, mini_batch_size=1, log_with=None), model=model,
                             ref_model=None, tokenizer=tokenizer, dataset=dummy_dataset)
    before = param_snapshot(model)
    first, second = two_steps(ppo_trainer)
    after = param_snapshot(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("lora_" in n for n in moved) and any(n.startswith("v_head.summary.") for n in moved)
    assert all("lora_" in n or n.startswith("v_head.summary.") for n in moved)
    assert all(np.isfinite(second[k]) for k in ("ppo/loss/policy", "ppo/loss/value", "objective/kl"))
    assert base.is_activation_checkpointing  # the user's setting, kept
    assert base._require_grads_hooks and base.get_input_embeddings()(torch.tensor([[1]])).requires_grad  # its hook
