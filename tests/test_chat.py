"""Instruct checkpoints end to end: conversational prompts through the chat template, the reward adapter
scoring exactly what RewardTrainer trained it on, every stop token of the checkpoint, and sampling from the
distribution PPO trains (never the checkpoint's generation_config.json sampling).

Three conventions (tests/tiny_models.py): Qwen2.5-Instruct-like (ChatML, EOS `<|im_end|>` + `<|endoftext|>`,
pad `<|endoftext|>`, no BOS), Llama-3.1-Instruct-like (BOS added, `<|eot_id|>` ends a turn, three EOS ids, no pad
token) and GPT-2-like (pad = EOS, dropout 0.1, no template of its own: marl's `plain`). For each, a reward adapter
is trained on conversations by marl's reward stage and merged into a plain `AutoModelForSequenceClassification`.
The reference format is TRL's own: `RewardTrainer._prepare_dataset` applied to the same (prompt, completion).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from marl.cli import main
from marl.config import PPOArgs, RewardArgs
from marl.errors import MarlError
from marl.model import MultiAdapterModel
from marl.ppo.rollout import generate_rollout, left_pad, response_mask

from . import tiny_models
from .conftest import stage_args
from .test_errors import one_line_error

CONVENTIONS = ("qwen_instruct", "llama3_instruct", "gpt2_pad_eos")
TEMPLATE = {"gpt2_pad_eos": "plain"}  # GPT-2 has no chat template of its own
PROMPTS = [[{"role": "user", "content": "Continue this movie review: The movie was"}],
           [{"role": "system", "content": "You are a critic."},
            {"role": "user", "content": "Continue this movie review: I watched it and"}],
           [{"role": "user", "content": "Review a film."}, {"role": "assistant", "content": "Which one?"},
            {"role": "user", "content": "Any."}]]
COMPLETIONS = ["wonderful and moving.", "  Dull, slow.  ", ""]
TEXT_PROMPTS = ["The movie was", "I watched it and", "Honestly, the acting"]


def conversational_pairs(n: int = 64) -> list[dict]:
    from marl.default_chat import build_chat_corpus

    return build_chat_corpus()["reward_train"][:n]


def trl_reward_ids(tokenizer, prompts, completions) -> list[list[int]]:
    """What TRL's RewardTrainer makes of each (prompt, completion) pair: its own dataset preparation."""
    from datasets import Dataset
    from trl import RewardTrainer

    def as_completion(p, c):
        return c if isinstance(p, str) else [{"role": "assistant", "content": c}]

    rows = [{"prompt": p, "chosen": as_completion(p, c), "rejected": as_completion(p, c)}
            for p, c in zip(prompts, completions)]
    ds = RewardTrainer._prepare_dataset(None, Dataset.from_list(rows), tokenizer,
                                        SimpleNamespace(dataset_num_proc=None, max_length=None), "reference")
    return [list(r) for r in ds["chosen_ids"]]


def classifier_scores(classifier, rows: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([classifier(input_ids=torch.tensor([r])).logits[0, 0] for r in rows])


@pytest.fixture(scope="module", params=CONVENTIONS)
def instruct(request, tmp_path_factory):
    """(convention, base folder, run folder, merged classifier, tokenizer as the reward stage loaded it)."""
    from pipelines import reward
    from transformers import AutoModelForSequenceClassification

    from marl.merge import merge_adapter
    from marl.model import load_tokenizer

    root = tmp_path_factory.mktemp(request.param)
    base = str(tiny_models.build(request.param, root / "base"))
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversational_pairs()))
    run_dir = root / "run"
    template = TEMPLATE.get(request.param)
    reward.run(stage_args(RewardArgs, run_dir, base, dataset_name=str(data), lora_dropout=0.0, max_length=256,
                          chat_template=template))
    merged = merge_adapter(run_dir / "adapters/reward", base, root / "merged", log=lambda *_: None)
    classifier = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    return SimpleNamespace(convention=request.param, base=base, run_dir=run_dir, classifier=classifier,
                           template=template, tokenizer=load_tokenizer(base, chat_template=template))


def load_model(c, side="left") -> MultiAdapterModel:
    model = MultiAdapterModel.from_pretrained(c.base, chat_template=c.template)
    model.load_adapter(str(c.run_dir / "adapters/reward"), "reward", role="reward")
    model.tokenizer.padding_side = side
    return model


def completions_of(model, rollout) -> list[str]:
    """Each row's response text before its first stop token (special tokens as written)."""
    out = []
    for ids, m in zip(rollout.response_ids, rollout.response_mask):
        ids = ids[m.bool()].tolist()
        cut = [i for i, t in enumerate(ids) if t in model.stop_token_ids]
        out.append(model.tokenizer.decode(ids[:cut[0]] if cut else ids, skip_special_tokens=False))
    return out


# --------------------------------------------------------------------------- the reward as RewardTrainer formatted it


@pytest.mark.parametrize("side", ["right", "left"])
def test_reward_of_a_conversation_equals_the_classifier_on_trls_format(instruct, side):
    model = load_model(instruct, side)
    want = classifier_scores(instruct.classifier, trl_reward_ids(instruct.tokenizer, PROMPTS, COMPLETIONS))
    torch.testing.assert_close(model.score_completions(PROMPTS, COMPLETIONS, batch_size=2), want, atol=1e-5, rtol=0)
    rows = trl_reward_ids(instruct.tokenizer, PROMPTS, COMPLETIONS)  # compute_reward_score on TRL's own ids
    ids, mask = left_pad(rows, model.tokenizer.pad_token_id, model.device) if side == "left" else \
        _right_pad(rows, model.tokenizer.pad_token_id)
    torch.testing.assert_close(model.compute_reward_score(ids, mask), want, atol=1e-5, rtol=0)


def _right_pad(rows, pad):
    from marl.ppo.rollout import pad_rows

    return pad_rows(rows, pad, "right")


def test_reward_of_text_equals_the_classifier_on_trls_format(instruct):
    model = load_model(instruct)
    want = classifier_scores(instruct.classifier, trl_reward_ids(instruct.tokenizer, TEXT_PROMPTS, COMPLETIONS))
    torch.testing.assert_close(model.score_completions(TEXT_PROMPTS, COMPLETIONS), want, atol=1e-5, rtol=0)


def test_the_conversation_keeps_the_templates_special_tokens(instruct):
    """The reward adapter's input holds the end-of-turn token the template writes (a skip_special_tokens decode
    and re-encode would lose it)."""
    from marl.chat import reward_ids

    ids = reward_ids(instruct.tokenizer, PROMPTS[0], COMPLETIONS[0])
    end_of_turn = {"qwen_instruct": "<|im_end|>", "llama3_instruct": "<|eot_id|>", "gpt2_pad_eos": "<|endoftext|>"}
    assert instruct.tokenizer.convert_tokens_to_ids(end_of_turn[instruct.convention]) in ids


def ppo_args(c, **kw) -> PPOArgs:
    base = dict(run_dir=str(c.run_dir), model_name_or_path=c.base, policies=[{"name": "policy_a"}], total_steps=1,
                prompts_per_policy=8, mini_batch_size=8, ppo_epochs=1, max_new_tokens=6, max_prompt_length=128,
                report_to="none", chat_template=c.template)
    return PPOArgs(**base | kw)


def test_ppo_stage_scores_rollouts_as_the_classifier_does(instruct):
    """The ppo stage's scoring (`MultiPolicyPPOTrainer.score`) of a rollout of conversational prompts."""
    from marl.chat import encode_prompt
    from marl.ppo.trainer import MultiPolicyPPOTrainer
    from marl.build import build_ppo_model

    cfg = ppo_args(instruct)
    model, _ = build_ppo_model(cfg, [cfg.policy(p) for p in cfg.policies], str(instruct.run_dir / "adapters/reward"))
    prompts = PROMPTS * 3
    trainer = MultiPolicyPPOTrainer(model, cfg, [cfg.policy(cfg.policies[0])],
                                    [encode_prompt(model.tokenizer, p) for p in prompts], None, prompts=prompts)
    torch.manual_seed(0)
    rollout = trainer.rollout()
    scores, components = trainer.score(rollout, 1)
    given = [prompts[i] for i in rollout.prompt_index.tolist()]
    want = classifier_scores(instruct.classifier, trl_reward_ids(instruct.tokenizer, given,
                                                                 completions_of(model, rollout)))
    torch.testing.assert_close(components["reward_model"], want, atol=1e-5, rtol=0)


def test_marl_eval_reward_equals_the_classifier(instruct):
    from marl.chat import encode_prompt
    from marl.evaluate import evaluate_adapters

    model = load_model(instruct)
    ids = [encode_prompt(model.tokenizer, p) for p in PROMPTS]
    result = evaluate_adapters(model, {"base": None}, ids, None, max_new_tokens=5, seed=3, prompts=PROMPTS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        pids, mask = left_pad(ids, model.tokenizer.pad_token_id, model.device)
        rollout = generate_rollout(model, pids, mask, [None] * len(ids), torch.ones(len(ids)), 5)
    want = classifier_scores(instruct.classifier, trl_reward_ids(instruct.tokenizer, PROMPTS,
                                                                 completions_of(model, rollout)))
    assert result["base"]["n"] == len(PROMPTS)
    assert abs(result["base"]["reward_mean"] - float(want.mean())) < 1e-5
    assert abs(result["base"]["reward_std"] - float(want.std())) < 1e-5


# --------------------------------------------------------------------------- stop tokens


def test_stop_tokens_are_the_tokenizers_eos_and_the_generation_configs_list(tmp_path):
    qwen = MultiAdapterModel.from_pretrained(str(tiny_models.qwen_instruct(tmp_path / "q")))
    llama = MultiAdapterModel.from_pretrained(str(tiny_models.llama3_instruct(tmp_path / "l")))
    gpt2 = MultiAdapterModel.from_pretrained(str(tiny_models.gpt2_pad_eos(tmp_path / "g")))
    ids = qwen.tokenizer.convert_tokens_to_ids
    assert qwen.stop_token_ids == tuple(sorted(ids(["<|im_end|>", "<|endoftext|>"])))
    ids = llama.tokenizer.convert_tokens_to_ids
    assert llama.stop_token_ids == tuple(sorted(ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])))
    assert gpt2.stop_token_ids == (gpt2.tokenizer.eos_token_id,)
    # a base tokenizer given ChatML ends a turn at <|im_end|> too
    base = MultiAdapterModel.from_pretrained(str(tiny_models.qwen_instruct(tmp_path / "q2")), chat_template="chatml")
    base.base.generation_config.eos_token_id = None
    base.tokenizer.eos_token = "<|endoftext|>"
    assert base.stop_token_ids == tuple(sorted(base.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])))


def test_response_mask_ends_at_any_stop_token_hand_worked():
    r = torch.tensor([[5, 7, 9, 6, 6], [5, 8, 5, 5, 5], [5, 5, 5, 5, 5]])
    # stop ids {7, 8}: row 0 ends at its 7 (index 1), row 1 at its 8, row 2 runs to the limit
    assert response_mask(r, {7, 8}).tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert response_mask(r, 9).tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1] * 5]


@pytest.mark.parametrize("convention", ["qwen_instruct", "llama3_instruct"])
def test_a_rollout_ends_at_each_stop_token_of_the_list(tmp_path, convention):
    """Each row's logits are pushed toward one stop token of the list (row i: stop id i mod k): every row ends at
    its own stop token, the tokens after it are masked and padded, and has_eos sees every one of them."""
    model = MultiAdapterModel.from_pretrained(str(tiny_models.build(convention, tmp_path / "m")))
    stops = list(model.stop_token_ids)
    n = 4 * len(stops)
    target = torch.tensor([stops[i % len(stops)] for i in range(n)])

    def push(module, args, out):  # after a few tokens, the row's own stop token dominates
        if out.shape[1] == 1:
            out[torch.arange(out.shape[0]), -1, target[:out.shape[0]]] += 12.0
        return out

    prompt = model.tokenizer("The movie was")["input_ids"]
    ids, mask = left_pad([prompt] * n, model.tokenizer.pad_token_id, model.device)
    handle = model.base.get_output_embeddings().register_forward_hook(push)
    try:
        torch.manual_seed(0)
        ro = generate_rollout(model, ids, mask, [None] * n, torch.ones(n), max_new_tokens=12)
    finally:
        handle.remove()
    assert ro.has_eos(model.stop_token_ids).all()
    for i in range(n):
        length = int(ro.response_mask[i].sum())
        assert int(ro.response_ids[i, length - 1]) == int(target[i])  # the row's own stop token ends it
        assert not any(t in stops for t in ro.response_ids[i, :length - 1].tolist())
        assert (ro.response_ids[i, length:] == model.tokenizer.pad_token_id).all()
        assert (ro.response_mask[i, length:] == 0).all()
    assert {int(ro.response_ids[i, int(ro.response_mask[i].sum()) - 1]) for i in range(n)} == set(stops)


# --------------------------------------------------------------------------- sampling: marl's settings only


def test_rollouts_ignore_the_checkpoints_sampling_settings(tmp_path):
    """With a generation_config.json that sets repetition_penalty 2, no_repeat_ngram_size 1 and top_k 1, marl's
    rollout still draws from the plain softmax at the row's temperature: repeated tokens appear, more than one
    first token is drawn, and the first token's frequencies match the softmax within sampling error."""
    from transformers import GenerationConfig

    folder = tiny_models.qwen_instruct(tmp_path / "m")
    saved = GenerationConfig.from_pretrained(folder)
    for k, v in dict(repetition_penalty=2.0, no_repeat_ngram_size=1, top_k=1, temperature=0.3).items():
        setattr(saved, k, v)
    saved.save_pretrained(folder)
    model = MultiAdapterModel.from_pretrained(str(folder))
    assert model.base.generation_config.top_k == 1  # the checkpoint's settings are there ...

    def sharpen(module, args, out):  # a peaked distribution, so that frequencies can be checked
        return out * 20.0

    prompt = model.tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
    n, temperature = 3000, 1.3
    ids, mask = left_pad([list(prompt)] * n, model.tokenizer.pad_token_id, model.device)
    handle = model.base.get_output_embeddings().register_forward_hook(sharpen)
    try:
        with torch.no_grad():
            logits = model.base(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1]
        torch.manual_seed(0)
        ro = generate_rollout(model, ids, mask, [None] * n, torch.full((n,), temperature), max_new_tokens=6)
    finally:
        handle.remove()
    p = torch.softmax(logits / temperature, -1)
    first = ro.response_ids[:, 0]
    assert len(set(first.tolist())) > 1  # top_k 1 would draw one token
    repeats = [len(set(r[m.bool()].tolist())) < int(m.sum()) for r, m in zip(ro.response_ids, ro.response_mask)]
    assert any(repeats)  # no_repeat_ngram_size 1 would forbid any repeat
    counts = torch.bincount(first, minlength=p.shape[0]).float()
    top = torch.topk(p, 5).indices
    se = torch.sqrt(n * p[top] * (1 - p[top]))
    assert ((counts[top] - n * p[top]).abs() < 5 * se).all(), (counts[top], n * p[top])
    assert model.base.generation_config.repetition_penalty == 2.0  # ... and restored after the rollout


def test_top_k_or_top_p_below_one_warns_that_ratios_ignore_the_truncation(tiny_model_dir):
    from marl.ppo.trainer import MultiPolicyPPOTrainer

    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    model.add_adapter("policy_a", None or PPOArgs(model_name_or_path=tiny_model_dir).lora_config(dropout=0.0))
    for kw in ({"top_k": 5}, {"top_p": 0.9}):
        cfg = PPOArgs(model_name_or_path=tiny_model_dir, report_to="none", **kw)
        with pytest.warns(UserWarning, match="off-policy"):
            MultiPolicyPPOTrainer(model, cfg, [cfg.policy({"name": "policy_a"})], [[1, 2, 3]], None)


# --------------------------------------------------------------------------- conversational data without a template


def test_conversational_prompts_need_a_chat_template(tmp_path):
    from marl.stages.prompts import encode_prompts

    model = MultiAdapterModel.from_pretrained(str(tiny_models.gpt2_pad_eos(tmp_path / "g")))
    cfg = PPOArgs(model_name_or_path="x", report_to="none")
    with pytest.raises(MarlError, match="no chat template: set chat_template"):
        encode_prompts(model, PROMPTS, cfg, "training")
    model.tokenizer.chat_template = None
    model = MultiAdapterModel.from_pretrained(str(tmp_path / "g"), chat_template="plain")
    assert len(encode_prompts(model, PROMPTS, cfg, "training")) == len(PROMPTS)


def test_sft_on_conversations_with_a_tokenizer_without_template_is_one_line(tmp_path, capsys):
    base = tiny_models.gpt2_pad_eos(tmp_path / "g")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": PROMPTS[0] + [{"role": "assistant", "content": "ok"}]}) + "\n"
                            for _ in range(8)))
    code = main(["sft", "--model_name_or_path", str(base), "--dataset_name", str(data), "--run_dir",
                 str(tmp_path / "run"), "--report_to", "none", "--max_steps", "1"])
    assert code == 2
    one_line_error(capsys, "holds conversations", "chat_template")


@pytest.mark.parametrize("value,needle", [("chatml", "lacks"), ("nope.jinja", "neither a template name")])
def test_a_bad_chat_template_is_one_line(tmp_path, capsys, value, needle):
    base = tiny_models.gpt2_pad_eos(tmp_path / "g")
    code = main(["sft", "--model_name_or_path", str(base), "--run_dir", str(tmp_path / "run"), "--report_to", "none",
                 "--chat_template", value, "--max_steps", "1"])
    assert code == 2
    one_line_error(capsys, "chat_template", needle)


def test_a_chat_template_file_is_used(tmp_path):
    from marl.chat import CHATML
    from marl.model import load_tokenizer

    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    tok = load_tokenizer(str(tiny_models.qwen_instruct(tmp_path / "q")), chat_template=str(f))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi|"
    assert load_tokenizer(str(tmp_path / "q")).chat_template == CHATML  # null: the tokenizer's own


def test_reward_functions_get_conversations_as_trl_gives_them(instruct):
    """TRL's signature: for conversational prompts, the prompt's messages and `[{"role": "assistant", ...}]`."""
    from marl.chat import encode_prompt
    from marl.ppo.trainer import MultiPolicyPPOTrainer
    from marl.build import build_ppo_model

    seen = {}

    def length(prompts, completions, **kw):
        seen.update(prompts=prompts, completions=completions)
        return [float(len(c[0]["content"])) for c in completions]

    cfg = ppo_args(instruct, reward_weights={"length": 0.0})
    model, _ = build_ppo_model(cfg, [cfg.policy(p) for p in cfg.policies], str(instruct.run_dir / "adapters/reward"))
    trainer = MultiPolicyPPOTrainer(model, cfg, [cfg.policy(cfg.policies[0])],
                                    [encode_prompt(model.tokenizer, p) for p in PROMPTS], None, {"length": length},
                                    prompts=PROMPTS)
    rollout = trainer.rollout()
    _, components = trainer.score(rollout, 1)
    assert seen["prompts"] == [PROMPTS[i] for i in rollout.prompt_index.tolist()]
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in seen["completions"])
    assert components["length"].tolist() == [float(len(c[0]["content"])) for c in seen["completions"]]


def test_compat_reward_of_a_conversation_equals_the_classifier(instruct):
    """Old TRL's API on the ids TRL's RewardTrainer makes of a conversation: `[:, -1, 0]` reads the trained score."""
    from peft import LoraConfig

    from marl import AutoModelForCausalLMWithValueHead

    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        instruct.base, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        reward_adapter=str(instruct.run_dir / "adapters/reward"))
    model.marl_model.tokenizer.chat_template = instruct.tokenizer.chat_template
    rows = trl_reward_ids(instruct.tokenizer, PROMPTS, COMPLETIONS)
    want = classifier_scores(instruct.classifier, rows)
    ids, mask = _right_pad(rows, model.marl_model.tokenizer.pad_token_id)
    torch.testing.assert_close(model.compute_reward_score(input_ids=ids, attention_mask=mask)[:, -1, 0], want,
                               atol=1e-5, rtol=0)


def test_compat_generate_cuts_responses_at_every_stop_token(tmp_path):
    """old TRL's `PPOTrainer.generate` returns each response through its first stop token of the model's list."""
    from peft import LoraConfig

    from marl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    base = str(tiny_models.llama3_instruct(tmp_path / "l"))
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        base, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    tok = model.marl_model.tokenizer
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=4), model, None, tok)
    stops = list(model.marl_model.stop_token_ids)
    target = torch.tensor([stops[i % len(stops)] for i in range(6)])

    def push(module, args, out):
        out[torch.arange(out.shape[0]), -1, target[:out.shape[0]]] += 12.0
        return out

    query = torch.tensor(tok.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
    handle = model.marl_model.base.get_output_embeddings().register_forward_hook(push)
    try:
        responses = trainer.generate([query] * 6, batch_size=6, return_prompt=False, max_new_tokens=8, do_sample=True)
    finally:
        handle.remove()
    assert [int(r[-1]) for r in responses] == target.tolist()
    assert all(not any(t in stops for t in r[:-1].tolist()) for r in responses)
