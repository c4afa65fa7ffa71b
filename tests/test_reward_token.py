"""The reward is read where the reward model was trained to put it, for every tokenizer convention.

TRL's RewardTrainer trains a `*ForSequenceClassification` on `text + EOS`; transformers pools its score at
the last token that is not `config.pad_token_id` (docs/known-issues.md #2, #7). With pad = EOS that is the
token *before* the appended EOS. For each convention of `tests/tiny_models.py` a reward adapter is trained
by marl's reward stage, merged into a plain `AutoModelForSequenceClassification` with `marl merge`, and
every way marl reads a reward must give that classifier's scores.
"""

from __future__ import annotations

import pytest
import torch

from marl.config import RewardArgs
from marl.model import MultiAdapterModel, reward_token_index

from . import tiny_models
from .conftest import stage_args

PROMPTS = ["The movie was", "I watched it and", "Honestly, the acting"]


def texts_for(eos: str) -> list[str]:
    """Plain texts, one already ending in EOS, one with EOS inside, and an empty one."""
    return ["The movie was wonderful and moving.", "Dull.", f"A film with a plot{eos} and some actors",
            f"It ends here.{eos}", ""]


# --------------------------------------------------------------------------- the index, by hand


def test_reward_token_index_hand_worked():
    # pad 0 != eos 2 (bos 1): the appended EOS is the last real token, wherever the padding is
    right = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 5, 6, 2], [0, 0, 0, 1, 7, 2]])
    assert reward_token_index(right, (right != 0).long(), 0).tolist() == [3, 2]
    assert reward_token_index(left, (left != 0).long(), 0).tolist() == [5, 5]
    # pad = eos = 2: the appended EOS counts as padding, so the token before it is read
    right = torch.tensor([[5, 6, 7, 2, 2, 2], [8, 2, 2, 2, 2, 2]])
    right_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    assert reward_token_index(right, right_mask, 2).tolist() == [2, 0]
    left = torch.tensor([[2, 2, 5, 6, 7, 2], [2, 2, 2, 2, 8, 2]])
    left_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    assert reward_token_index(left, left_mask, 2).tolist() == [4, 4]
    # an EOS inside the text: transformers takes the LAST non-pad token (3), not "first pad - 1" (0)
    mid = torch.tensor([[5, 2, 6, 7, 2]])
    assert reward_token_index(mid, torch.ones_like(mid), 2).tolist() == [3]
    # only pad tokens attended (an empty text + EOS, no BOS): the first attended token, as on the unpadded row
    empty = torch.tensor([[2, 2, 2], [2, 2, 2]])
    assert reward_token_index(empty, torch.tensor([[0, 0, 1], [1, 0, 0]]), 2).tolist() == [2, 0]
    # no pad token at all (transformers then reads the last position of an unpadded row)
    assert reward_token_index(mid, torch.ones_like(mid), None).tolist() == [4]
    assert reward_token_index(left, left_mask, None).tolist() == [5, 5]


# --------------------------------------------------------------------------- trained reward models


@pytest.fixture(scope="module", params=tiny_models.CONVENTIONS)
def trained(request, tmp_path_factory):
    """(convention, base folder, run folder, merged classifier, the base's own tokenizer)."""
    from pipelines import reward
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from marl.merge import merge_adapter

    root = tmp_path_factory.mktemp(request.param)
    base = str(tiny_models.build(request.param, root / "base"))
    run_dir = root / "run"
    # max_length 256: the tiny BPEs cut the default pairs into more tokens than the default tokenizer
    reward.run(stage_args(RewardArgs, run_dir, base, lora_dropout=0.0, max_length=256))
    merged = merge_adapter(run_dir / "adapters/reward", base, root / "merged", log=lambda *_: None)
    classifier = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    return request.param, base, run_dir, classifier, AutoTokenizer.from_pretrained(base)


def classifier_scores(classifier, tokenizer, texts) -> torch.Tensor:
    """The merged classifier's scores (N,), each text built as RewardTrainer built it: text + EOS (unless it
    ends in EOS), tokenized on its own (BOS if the tokenizer adds one), unpadded."""
    eos = tokenizer.eos_token
    with torch.no_grad():
        return torch.stack([
            classifier(input_ids=torch.tensor([tokenizer(t if t.endswith(eos) else t + eos)["input_ids"]]))
            .logits[0, 0] for t in texts])


def rollout_texts(rollout, prompts, tokenizer) -> list[str]:
    """Each row's prompt + its response's text up to its first EOS: the pair RewardTrainer would be given."""
    texts = []
    for prompt, ids, mask in zip(prompts, rollout.response_ids, rollout.response_mask):
        ids = ids[mask.bool()].tolist()
        ids = ids[:ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids
        texts.append(prompt + tokenizer.decode(ids))
    return texts


def load_model(base, run_dir, side) -> MultiAdapterModel:
    model = MultiAdapterModel.from_pretrained(base)
    model.load_adapter(str(run_dir / "adapters/reward"), "reward", role="reward")
    model.tokenizer.padding_side = side
    return model


def test_classifier_pad_token_is_the_tokenizers_pad_or_eos(trained):
    """What RewardTrainer sets in the score model's config (its tokenizer's pad, else EOS) survives the merge."""
    convention, _, _, classifier, tokenizer = trained
    want = {"gpt2_pad_eos": tokenizer.eos_token_id, "llama_bos_no_pad": tokenizer.eos_token_id, "marl_default": 0}
    assert classifier.config.pad_token_id == want[convention]
    assert (tokenizer.pad_token is None) == (convention == "llama_bos_no_pad")
    assert (tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id) == (convention != "gpt2_pad_eos")


@pytest.mark.parametrize("side", ["right", "left"])
def test_compute_reward_score_and_score_texts_equal_the_merged_classifier(trained, side):
    _, base, run_dir, classifier, tokenizer = trained
    texts = texts_for(tokenizer.eos_token)
    want = classifier_scores(classifier, tokenizer, texts)
    model = load_model(base, run_dir, side)
    eos = model.tokenizer.eos_token
    enc = model.tokenizer([t if t.endswith(eos) else t + eos for t in texts], return_tensors="pt", padding=True)
    torch.testing.assert_close(model.compute_reward_score(enc["input_ids"], enc["attention_mask"]), want,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(model.score_texts(texts, batch_size=3), want, atol=1e-5, rtol=0)


def test_reading_at_the_appended_eos_would_be_another_score(trained):
    """The claim has teeth: with pad = EOS the score at the appended EOS (marl's old reading) is not the trained one."""
    convention, _, _, classifier, tokenizer = trained
    texts = texts_for(tokenizer.eos_token)[:2]
    want = classifier_scores(classifier, tokenizer, texts)
    pad = classifier.config.pad_token_id
    classifier.config.pad_token_id = None  # a single unpadded row: transformers then reads the last token, the EOS
    try:
        at_eos = classifier_scores(classifier, tokenizer, texts)
    finally:
        classifier.config.pad_token_id = pad
    assert torch.allclose(at_eos, want, atol=1e-4, rtol=0) == (convention == "marl_default")


@pytest.mark.parametrize("side", ["right", "left"])
def test_compat_compute_reward_score_equals_the_merged_classifier(trained, side):
    """Old TRL's API (marl.compat) on texts without EOS, with and without an attention mask."""
    from peft import LoraConfig

    from marl import AutoModelForCausalLMWithValueHead

    _, base, run_dir, classifier, tokenizer = trained
    texts = texts_for(tokenizer.eos_token)
    want = classifier_scores(classifier, tokenizer, texts)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        base, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        reward_adapter=str(run_dir / "adapters/reward"))
    tok = model.marl_model.tokenizer
    tok.padding_side = side
    enc = tok(texts, return_tensors="pt", padding=True)
    raw = model.compute_reward_score(**enc)  # (B, T, 1), as old TRL; each row's score from its reward token on
    torch.testing.assert_close(raw[:, -1, 0], want, atol=1e-5, rtol=0)  # EOS appended by marl
    assert model.active_adapter == "default"
    if side == "right" or tok.pad_token_id != tok.eos_token_id:  # left pads that are EOS need the mask
        no_mask = model.compute_reward_score(enc["input_ids"])  # pads at the ends are dropped, not scored
        torch.testing.assert_close(no_mask[:, -1, 0], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_evaluate_adapters_reward_equals_the_merged_classifier(trained, side):
    """`marl eval`'s reward (evaluate_adapters): the same seeded rollout, scored by the merged classifier."""
    from marl.evaluate import evaluate_adapters
    from marl.ppo.rollout import generate_rollout, left_pad

    _, base, run_dir, classifier, tokenizer = trained
    model = load_model(base, run_dir, side)
    prompt_ids = [model.tokenizer(p)["input_ids"] for p in PROMPTS]
    result = evaluate_adapters(model, {"base": None}, prompt_ids, None, max_new_tokens=5, seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        ids, mask = left_pad(prompt_ids, model.tokenizer.pad_token_id, model.device)
        rollout = generate_rollout(model, ids, mask, [None] * len(PROMPTS), torch.ones(len(PROMPTS)), 5)
    want = classifier_scores(classifier, tokenizer, rollout_texts(rollout, PROMPTS, tokenizer))
    assert result["base"]["n"] == len(PROMPTS)
    assert abs(result["base"]["reward_mean"] - float(want.mean())) < 1e-5
    assert abs(result["base"]["reward_std"] - float(want.std())) < 1e-5
