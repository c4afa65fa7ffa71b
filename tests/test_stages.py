"""Stages 1 and 2 end to end on a tiny base, their outputs, and every bad input they name."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from marl.config import RewardArgs, SFTArgs
from marl.errors import MarlError
from marl.model import MultiAdapterModel

from .conftest import stage_args


def test_adapters_load_with_plain_peft(tiny_run, tiny_model_dir):
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                    str(tiny_run / "adapters/sft"))
    assert sft(torch.tensor([[1, 5, 6]])).logits.shape[-1] > 100
    rm = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1),
                                   str(tiny_run / "adapters/reward"))
    assert rm(torch.tensor([[1, 5, 6]])).logits.shape == (1, 1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_compute_reward_score_equals_trained_reward_model(tiny_run, tiny_model_dir, side):
    """The score marl reads on the shared causal LM is the RewardTrainer model's score."""
    seq = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm = PeftModel.from_pretrained(seq, str(tiny_run / "adapters/reward")).eval()
    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    model.load_adapter(str(tiny_run / "adapters/sft"), "sft", role="sft")
    model.load_adapter(str(tiny_run / "adapters/reward"), "reward", role="reward")
    model.set_adapter("sft")
    tok = model.tokenizer
    texts = ["The movie was wonderful and moving.</s>", "Dull.</s>", "I watched it last night and it was awful</s>"]
    tok.padding_side = "right"
    rm.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        want = rm(**tok(texts, return_tensors="pt", padding=True)).logits.squeeze(-1)
    tok.padding_side = side
    enc = tok(texts, return_tensors="pt", padding=True)
    got = model.compute_reward_score(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert model.active_adapter == "sft"
    torch.testing.assert_close(model.score_texts([t.removesuffix("</s>") for t in texts]), want, atol=1e-5,
                               rtol=1e-4)


def test_run_records(tiny_run):
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"sft", "reward"} and manifest["base_fingerprint"]
    finals = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    reward_final = [r for r in finals if r.get("stage") == "reward" and r.get("final")]
    assert 0.0 <= reward_final[0]["eval_accuracy"] <= 1.0


def test_finished_adapter_is_not_overwritten(tiny_run, tiny_model_dir):
    from pipelines import sft

    before = (tiny_run / "adapters/sft/adapter_model.safetensors").read_bytes()
    # the same settings are "up to date" (tests/test_errors.py); other settings are refused
    with pytest.raises(MarlError, match="already holds a finished sft adapter .*learning_rate.*--overwrite true"):
        sft.run(stage_args(SFTArgs, tiny_run, tiny_model_dir, learning_rate=2e-3))
    assert (tiny_run / "adapters/sft/adapter_model.safetensors").read_bytes() == before


def test_other_base_in_same_run_dir_is_refused(tiny_run, other_model_dir):
    from pipelines import sft

    with pytest.raises(MarlError, match="belongs to base"):
        sft.run(stage_args(SFTArgs, tiny_run, other_model_dir, adapter_name="sft2"))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_sft_on_local_files_in_trl_formats(tmp_path, tiny_model_dir, fmt):
    import datasets

    from pipelines import sft

    rows = {"prompt": ["The film was"] * 8, "completion": [" great fun.", " a bore."] * 4}
    ds = datasets.Dataset.from_dict(rows)
    path = tmp_path / f"data.{fmt}"
    getattr(ds, {"jsonl": "to_json", "csv": "to_csv", "parquet": "to_parquet"}[fmt])(str(path))
    res = sft.run(stage_args(SFTArgs, tmp_path / "run", tiny_model_dir, dataset_name=str(path), max_steps=1,
                             eval_fraction=0.25))
    assert (tmp_path / "run/adapters/sft/adapter_model.safetensors").exists()
    assert res["train_loss"] > 0


def test_sft_on_messages(tmp_path, tiny_model_dir):
    import datasets

    from pipelines import sft

    msgs = [[{"role": "user", "content": "Review it."}, {"role": "assistant", "content": "It was good."}]] * 8
    path = tmp_path / "chat.jsonl"
    datasets.Dataset.from_dict({"messages": msgs}).to_json(str(path))
    sft.run(stage_args(SFTArgs, tmp_path / "run", tiny_model_dir, dataset_name=str(path), max_steps=1))
    assert (tmp_path / "run/adapters/sft").exists()


def _bad_data(tmp_path, rows, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_datasets(tmp_path, tiny_model_dir):
    from pipelines import reward, sft

    with pytest.raises(MarlError, match=r"has columns \['txt'\] but `marl sft` needs text"):
        sft.run(stage_args(SFTArgs, tmp_path / "r", tiny_model_dir, dataset_name=_bad_data(tmp_path, [{"txt": "a"}])))
    with pytest.raises(MarlError, match="needs chosen\\+rejected"):
        reward.run(stage_args(RewardArgs, tmp_path / "r", tiny_model_dir,
                              dataset_name=_bad_data(tmp_path, [{"chosen": "a", "reject": "b"}])))
    with pytest.raises(MarlError, match="does not exist"):
        sft.run(stage_args(SFTArgs, tmp_path / "r", tiny_model_dir, dataset_name=str(tmp_path / "nope.jsonl")))
    empty = tmp_path / "empty.csv"
    empty.write_text("text\n")
    with pytest.raises(MarlError, match="is empty"):
        sft.run(stage_args(SFTArgs, tmp_path / "r", tiny_model_dir, dataset_name=str(empty)))
    with pytest.raises(MarlError, match="not found"):
        sft.run(stage_args(SFTArgs, tmp_path / "r", str(tmp_path / "no_model")))
    assert not (tmp_path / "r/adapters").exists()


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_reward_stage_on_a_quantized_base(tmp_path, tiny_model_dir, quantization):
    """TRL casts a quantized model's trainable weights to bf16; the score head must still run."""
    from pipelines import reward

    res = reward.run(stage_args(RewardArgs, tmp_path / "run", tiny_model_dir, quantization=quantization,
                                max_steps=1, eval_split="none", eval_fraction=0.1))
    assert res["train_loss"] > 0
    model = MultiAdapterModel.from_pretrained(tiny_model_dir, quantization=quantization)
    model.load_adapter(str(tmp_path / "run/adapters/reward"), "reward", role="reward")
    assert torch.isfinite(model.score_texts(["The movie was great."])).all()


# --------------------------------------------------------------------------- the PPO stage's pieces


def test_held_out_prompts_are_the_eval_split_else_the_last_training_prompts(tmp_path):
    from marl.config import PPOArgs
    from marl.stages.prompts import held_out_prompts, train_prompts

    one = _bad_data(tmp_path, [{"prompt": f"p{i}"} for i in range(5)], "one.jsonl")  # a file: a train split only
    cfg = PPOArgs(dataset_name=one, eval_prompts=2, report_to="none")
    train = train_prompts(cfg, None)[1]
    assert train == ["p0", "p1", "p2", "p3", "p4"]
    assert held_out_prompts(cfg, None) == ["p3", "p4"] == held_out_prompts(cfg, None, train)
    folder = tmp_path / "two"
    folder.mkdir()
    _bad_data(folder, [{"prompt": "t0"}, {"prompt": "t1"}], "train.jsonl")
    _bad_data(folder, [{"prompt": f"e{i}"} for i in range(3)], "test.jsonl")
    cfg = PPOArgs(dataset_name=str(folder), eval_prompts=2, report_to="none")
    assert train_prompts(cfg, None)[1] == ["t0", "t1"]
    assert held_out_prompts(cfg, None, ["t0", "t1"]) == ["e0", "e1", "e2"]  # the caller takes the first eval_prompts


def test_prompts_over_max_prompt_length_are_dropped_and_their_rows_kept(capsys):
    from types import SimpleNamespace

    from marl.config import PPOArgs
    from marl.stages.prompts import encode_prompt_rows, encode_prompts

    text_config = SimpleNamespace(max_position_embeddings=16)
    model = SimpleNamespace(tokenizer=lambda t: {"input_ids": [ord(c) for c in t]},  # one token per character
                            base=SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text_config)))
    cfg = PPOArgs(max_prompt_length=3, max_new_tokens=8, report_to="none")
    # "abcd" is 4 tokens > 3 (dropped, and counted), "" is no prompt; their dataset rows (1, 2) are not carried
    assert encode_prompt_rows(model, ["ab", "abcd", "", "xyz"], cfg, "training") == ([[97, 98], [120, 121, 122]], [0, 3])
    assert "dropped 1 of 3 training prompts longer than 3 tokens" in capsys.readouterr().out
    with pytest.raises(MarlError, match=r"every held-out prompt is longer than max_prompt_length=3 tokens \(longest 4\)"):
        encode_prompts(model, ["abcd"], cfg, "held-out")
    cfg.max_new_tokens = 14  # 3 + 14 > 16
    with pytest.raises(MarlError, match="max_prompt_length \\+ max_new_tokens = 17 exceeds the model's context of 16"):
        encode_prompts(model, ["ab"], cfg, "training")


def test_the_ppo_model_has_each_policy_its_seeded_lora_its_critic_and_the_sft_reference(tiny_run, tiny_model_dir):
    from marl.config import PPOArgs
    from marl.build import build_ppo_model

    cfg = PPOArgs(model_name_or_path=tiny_model_dir, report_to="none", value_model="adapter", prompts_per_policy=4, mini_batch_size=4,
                  policies=[{"name": "policy_a", "seed": 3}, {"name": "policy_b", "seed": 3, "init_from_sft": False},
                            {"name": "policy_g", "advantage_estimator": "grpo", "num_generations": 2}])
    specs = [cfg.policy(p) for p in cfg.policies]
    model, ref = build_ppo_model(cfg, specs, str(tiny_run / "adapters/reward"), str(tiny_run / "adapters/sft"))
    assert ref == "sft" and model.roles == {"reward": "reward", "sft": "sft", "policy_a": "policy",
                                            "policy_a_critic": "critic", "policy_b": "policy",
                                            "policy_b_critic": "critic", "policy_g": "policy"}
    assert model.critic_of == {"policy_a": "policy_a_critic", "policy_b": "policy_b_critic"}  # GRPO: no critic
    assert "policy_g" not in model.value_heads and not model.training

    def lora(name):
        return [p.detach().clone() for n, p in model.peft.named_parameters() if f".{name}." in n]

    a, sft = lora("policy_a"), lora("sft")  # init_from_sft (the default): the sft weights
    assert len(a) == len(sft) > 0 and all(torch.equal(x, y) for x, y in zip(a, sft))
    fresh, _ = build_ppo_model(cfg, specs[1:2], str(tiny_run / "adapters/reward"))  # drawn under its seed alone
    b, alone = lora("policy_b"), [p for n, p in fresh.peft.named_parameters() if ".policy_b." in n]
    assert len(b) == len(alone) > 0 and all(torch.equal(x, y) for x, y in zip(b, alone))
