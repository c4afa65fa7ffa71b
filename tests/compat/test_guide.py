"""The old TRL multi-adapter API (marl.compat): TRL 0.11.4's multi-adapter guide and examples/scripts/ppo_multi_adapter.py
with only the import line changed (moved here from tests/test_compat.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from marl.errors import MarlError

from ..conftest import param_snapshot

PROMPTS = ["The movie was", "I watched it and", "This film is", "The plot", "Honestly, the acting", "It was"]
GENERATION_KWARGS = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True, "max_new_tokens": 6}
ADAPTERS = ("policy_1", "default", "reward_adapter")
ARRAYS = ("objective/kl_dist", "objective/logprobs", "objective/ref_logprobs", "ppo/policy/advantages")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run far faster on one thread than on two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def owner(param_name: str) -> str:
    """Which adapter a parameter of the wrapped model belongs to ("base" for the base model's own)."""
    return next((a for a in ADAPTERS if f".{a}." in param_name), "base")


def changed(before: dict, after: dict) -> dict[str, set[str]]:
    """owner -> names of the parameters that differ between two snapshots."""
    out: dict[str, set[str]] = {}
    for n in before:
        if not torch.equal(before[n], after[n]):
            out.setdefault(owner(n), set()).add(n)
    return out


@pytest.fixture(scope="module")
def guide(tiny_model_dir, tiny_run, tmp_path_factory):
    """TRL's multi-adapter RL guide on the tiny base, 8-bit, two policies, one PPO step each."""
    from marl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # the only line changed

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig

    model_name, rm_adapter_id = tiny_model_dir, str(tiny_run / "adapters/reward")
    logs = tmp_path_factory.mktemp("logs")
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    dataset = Dataset.from_dict({"query": PROMPTS}).map(lambda row: {"input_ids": tokenizer(row["query"])["input_ids"]})
    dataset.set_format(type="torch", columns=["input_ids"], output_all_columns=True)
    ppo_config = PPOConfig(model_name=model_name, learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=1,
                           log_with="jsonl", project_kwargs={"logging_dir": str(logs)})
    generation_kwargs = {**GENERATION_KWARGS, "pad_token_id": tokenizer.eos_token_id}

    lora_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        model_name, peft_config=lora_config, reward_adapter=rm_adapter_id,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    model.pretrained_model.add_adapter("policy_1", lora_config)  # a second policy, the peft way
    trainer = PPOTrainer(config=ppo_config, model=model, ref_model=None, tokenizer=tokenizer, dataset=dataset)

    seen = {"start": param_snapshot(model.marl_model), "stats": []}
    for policy in ("policy_1", "default"):
        trainer.model.set_adapter(policy)
        batch = next(iter(trainer.dataloader))
        query_tensors = batch["input_ids"]
        response_tensors = trainer.generate(query_tensors, return_prompt=False, **generation_kwargs)
        batch["response"] = tokenizer.batch_decode(response_tensors, skip_special_tokens=True)
        texts = [q + r for q, r in zip(batch["query"], batch["response"])]
        inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(trainer.accelerator.device)
        rewards = trainer.model.compute_reward_score(**inputs)
        raw_rewards = trainer.accelerator.unwrap_model(trainer.model).compute_reward_score(
            **inputs, ppo_adapter_name=policy)
        rewards = [raw_rewards[i, -1, 0] for i in range(len(raw_rewards))]  # take last token (1 label here)
        stats = trainer.step(query_tensors, response_tensors, rewards)
        trainer.log_stats(stats, batch, rewards)
        seen[policy] = param_snapshot(model.marl_model)
        seen["stats"].append(stats)
    return {"model": model, "trainer": trainer, "tokenizer": tokenizer, "logs": logs, **seen}


def test_each_step_trains_only_the_active_policy(guide):
    first = changed(guide["start"], guide["policy_1"])
    second = changed(guide["policy_1"], guide["default"])
    assert set(first) == {"policy_1"}, "the policy_1 step touched the base, the reward or the default policy"
    assert set(second) == {"default"}, "the default step touched the base, the reward or policy_1"
    for name, names in (("policy_1", first["policy_1"]), ("default", second["default"])):
        assert any(".lora_" in n for n in names) and any(f"value_heads.{name}." in n for n in names)


def test_step_stats_have_old_trl_keys_and_are_finite(guide):
    keys = {"ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/approxkl", "ppo/policy/clipfrac",
            "ppo/policy/entropy", "ppo/val/clipfrac", "objective/kl", "objective/kl_coef", "ppo/mean_scores",
            "ppo/std_scores", "ppo/returns/mean", "ppo/val/mean", "ppo/learning_rate", "tokens/responses_len_mean",
            "time/ppo/total"}
    for stats in guide["stats"]:
        assert keys <= set(stats)
        assert all(isinstance(v, float) and math.isfinite(v) for k, v in stats.items() if k not in ARRAYS), stats
        assert all(isinstance(stats[k], np.ndarray) and np.isfinite(stats[k]).all() for k in ARRAYS)  # as old TRL
    rows = [json.loads(line) for line in (guide["logs"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["adapter"] for r in rows] == ["policy_1", "default"]
    assert "policy_1/ppo/loss/policy" in rows[0] and "ppo/loss/policy" in rows[1]  # the first policy keeps old keys
    assert len(rows[1]["samples"]) == 4 and {"query", "response", "reward"} <= set(rows[1]["samples"][0])


def test_compute_reward_score_restores_the_named_adapter_and_scores_text_plus_eos(guide):
    model, tokenizer = guide["model"], guide["tokenizer"]
    texts = ["The movie was great", "I watched it and it was dull to the end"]
    model.set_adapter("default")
    right = model.compute_reward_score(**tokenizer(texts, padding=True, return_tensors="pt"),
                                       ppo_adapter_name="policy_1")
    assert model.active_adapter == "policy_1"  # old TRL went back to "default" here
    tokenizer.padding_side = "left"
    left = model.compute_reward_score(**tokenizer(texts, padding=True, return_tensors="pt"))
    tokenizer.padding_side = "right"
    assert model.active_adapter == "policy_1"
    assert left.shape[:2] == right.shape[:2] and right.shape[2] == 1  # (B, T, num_labels), as old TRL
    torch.testing.assert_close(left[:, -1], right[:, -1])  # every row's score at the last position, either padding
    torch.testing.assert_close(right[:, -1, 0], model.marl_model.score_texts(texts))  # as RewardTrainer built the text


def test_bad_input_is_a_one_line_error(guide):
    from marl import PPOTrainer

    model, trainer = guide["model"], guide["trainer"]
    with pytest.raises(MarlError, match="ref_model must be None"):
        PPOTrainer(config=trainer.config, model=model, ref_model=model)
    model.set_adapter("default")
    queries = [torch.tensor([1, 5, 6]), torch.tensor([1, 7]), torch.tensor([1, 8, 9, 10]), torch.tensor([1, 4])]
    responses = [torch.tensor([11, 12]), torch.tensor([13]), torch.tensor([14, 15, 2]), torch.tensor([16, 17])]
    before = param_snapshot(model.marl_model)
    with pytest.raises(MarlError, match="one query, response and score per row, got 4 queries, 3 responses"):
        trainer.step(queries, responses[:3], [0.0] * 4)
    with pytest.raises(MarlError, match="got 2 rows but PPOConfig.batch_size is 4"):
        trainer.step(queries[:2], responses[:2], [0.0] * 2)
    with pytest.raises(MarlError, match=r"policy default, step 2: the score of row 1 is nan"):
        trainer.step(queries, responses, [torch.tensor(0.5), torch.tensor(float("nan")), 0.1, 0.2])
    with pytest.raises(MarlError, match=r"responses\[1\] must be a non-empty 1-D tensor"):
        trainer.step(queries, [responses[0], torch.tensor([], dtype=torch.long), *responses[2:]], [0.0] * 4)
    assert not changed(before, param_snapshot(model.marl_model))


@pytest.mark.parametrize("kwargs, message", [
    ({"bach_size": 4}, "no field 'bach_size': did you mean 'batch_size'"),
    ({"whiten_rewards": True}, r"whiten_rewards=True\) is not supported"),
    ({"kl_penalty": "full"}, "kl_penalty='full'"),
    ({"batch_size": 6, "mini_batch_size": 4}, r"multiple of mini_batch_size \* gradient_accumulation_steps \(4\)"),
])
def test_bad_config(kwargs, message):
    from marl import PPOConfig

    with pytest.raises(MarlError, match=message):
        PPOConfig(**kwargs)


def test_config_maps_onto_ppo_args():
    from marl import PPOConfig

    args = PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2, adap_kl_ctrl=False,
                     init_kl_coef=0.1, kl_penalty="abs", cliprange=0.3, lam=0.9).to_ppo_args()
    # old mini_batch_size is one backward pass; marl's is one optimizer step: 2 * 2 rows
    assert (args.prompts_per_policy, args.mini_batch_size, args.gradient_accumulation_steps) == (8, 4, 2)
    assert (args.kl_coef, args.kl_target, args.kl_estimator) == (0.1, None, "abs")
    assert (args.clip_coef, args.gae_lambda, args.max_grad_norm) == (0.3, 0.9, math.inf)
    assert (args.value_model, args.value_loss_norm) == ("head", False)  # old TRL's value loss, not divided


def test_save_pretrained_keeps_value_heads_and_reloads(guide, tmp_path, monkeypatch):
    from marl import AutoModelForCausalLMWithValueHead

    model, trainer = guide["model"], guide["trainer"]
    (tmp_path / "notes.txt").write_text("mine")
    trainer.save_pretrained(tmp_path)
    assert (tmp_path / "value_head.safetensors").exists() and (tmp_path / "policy_1/value_head.safetensors").exists()
    assert (tmp_path / "tokenizer_config.json").exists() and (tmp_path / "notes.txt").read_text() == "mine"

    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))  # onto a float32 base
    assert reloaded.policy_adapters == ["default", "policy_1"] and reloaded.active_adapter == "default"
    original, again = param_snapshot(model.marl_model), param_snapshot(reloaded.marl_model)
    policies = [n for n in original if owner(n) in ("default", "policy_1")]
    assert policies and all(torch.equal(original[n], again[n]) for n in policies)

    ids = torch.tensor([[1, 5, 6, 7]])
    logits, loss, values = reloaded(ids, torch.ones_like(ids))
    assert loss is None and logits.shape[:2] == values.shape == (1, 4)
    torch.testing.assert_close(values, reloaded.v_head(reloaded.marl_model.backbone(ids).last_hidden_state)[..., 0])

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded["files"] = sorted(str(p.relative_to(folder_path)) for p in __import__("pathlib").Path(
                folder_path).rglob("*") if p.is_file())

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    reloaded.push_to_hub("user/policies")
    assert uploaded["repo"] == "user/policies"
    assert {"adapter_model.safetensors", "value_head.safetensors", "policy_1/value_head.safetensors"} <= set(
        uploaded["files"])


def test_4bit_base_keeps_the_cpu_autograd_fix(tiny_model_dir):
    import bitsandbytes as bnb
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from marl import AutoModelForCausalLMWithValueHead

    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        tiny_model_dir, peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)  # docs/known-issues.md #1


def test_two_label_reward_adapters_of_old_trl_need_a_score_index(tiny_run, tiny_model_dir, tmp_path):
    """Old TRL's multi-adapter example used a 2-label reward adapter and read output 1."""
    import shutil

    from marl.compat import AutoModelForCausalLMWithValueHead
    from marl.io import load_tensors, save_tensors
    from marl.model import MultiAdapterModel
    from peft import LoraConfig

    two = tmp_path / "rm-2-labels"
    shutil.copytree(tiny_run / "adapters/reward", two)
    state = load_tensors(two / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("score.weight"))
    state[key] = torch.cat([-3.0 * state[key], state[key]])  # output 1 is the trained one
    save_tensors(two / "adapter_model.safetensors", state)

    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    with pytest.raises(MarlError, match="score head with 2 outputs: choose the one that scores with "
                                        "reward_score_index"):
        model.load_adapter(str(two), "rm2", role="reward")
    with pytest.raises(MarlError, match="reward_score_index 2 is out of range"):
        model.load_adapter(str(two), "rm2", role="reward", score_index=2)
    model.load_adapter(str(tiny_run / "adapters/reward"), "rm1", role="reward")
    model.load_adapter(str(two), "rm2", role="reward", score_index=1)
    texts = ["the movie was great", "a dull film"]
    want = model.score_texts(texts, reward_adapter_name="rm1")
    torch.testing.assert_close(model.score_texts(texts, reward_adapter_name="rm2"), want, rtol=0, atol=0)

    old = AutoModelForCausalLMWithValueHead.from_pretrained(
        tiny_model_dir, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        reward_adapter=str(two), reward_score_index=1)
    enc = old.marl_model.tokenizer([t + old.marl_model.tokenizer.eos_token for t in texts], return_tensors="pt",
                                   padding=True)
    raw_rewards = old.compute_reward_score(**enc)
    assert raw_rewards.shape[2] == 2  # both outputs, as old TRL returned them; the example read output 1
    rewards = [raw_rewards[i, -1, 1] for i in range(len(raw_rewards))]
    torch.testing.assert_close(torch.stack(rewards), want, rtol=1e-6, atol=1e-6)
