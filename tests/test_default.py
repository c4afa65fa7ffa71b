"""The embedded default: corpus, tokenizer, cache and models (marl/default.py)."""

import json
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from marl import default
from marl.default import (
    SPLIT_FILES,
    build_corpus,
    ensure_default_data,
    ensure_default_model,
    ensure_default_tokenizer,
    save_tiny_random_llama,
    sentiment_score,
)
from marl.embedded import resolve_model

COLUMNS = {"sft": {"text"}, "reward": {"prompt", "chosen", "rejected"}, "prompts": {"prompt"}}


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache shared by this module's fast tests (the tokenizer is built once, ~3 s)."""
    return tmp_path_factory.mktemp("marl_cache")


@pytest.fixture
def tmp_cache(cache, monkeypatch):
    monkeypatch.setenv("MARL_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tokenizer(cache):
    return AutoTokenizer.from_pretrained(ensure_default_tokenizer(cache))


def _texts(corpus):
    return default._corpus_texts(corpus, SPLIT_FILES)


def test_sentiment_score_by_hand():
    assert sentiment_score("A superb film.") == 1.0  # one +2 word: 2 / 2
    assert sentiment_score("Good acting, dull plot.") == 0.0  # (+1 - 1) / 2 / 2
    assert sentiment_score("It was not good.") == -0.5  # -(+1) / 1 / 2
    assert sentiment_score("I didn't hate it, it was great.") == 1.0  # (-(-2) + 2) / 2 / 2
    assert sentiment_score("It is set in Paris.") == 0.0


def test_corpus_is_deterministic(corpus):
    assert build_corpus() == corpus
    assert build_corpus(seed=1) != corpus


def test_corpus_sizes_and_columns(corpus):
    assert set(corpus) == set(SPLIT_FILES)
    for split, rows in corpus.items():
        assert len(rows) == default.SPLIT_SIZES[split]
        assert all(set(row) == COLUMNS[split.split("_")[0]] for row in rows)


def test_splits_are_disjoint(corpus):
    for stage in COLUMNS:
        train, test = (
            {json.dumps(r, sort_keys=True) for r in corpus[f"{stage}_{s}"]} for s in ("train", "test")
        )
        assert len(train) == len(corpus[f"{stage}_train"]) and len(test) == len(corpus[f"{stage}_test"])
        assert not train & test


def test_reviews_are_short_and_of_mixed_sentiment(corpus):
    texts = [r["text"] for r in corpus["sft_train"]]
    assert all(15 <= len(t.split()) <= 40 for t in texts)
    scores = [sentiment_score(t) for t in texts]
    for sign in (-1, 0, 1):  # each of positive, neutral, negative is a sizeable share
        assert sum((s > 0) - (s < 0) == sign for s in scores) > len(texts) / 8


def test_chosen_is_clearly_more_positive(corpus):
    for row in corpus["reward_train"] + corpus["reward_test"]:
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")
        assert sentiment_score(row["chosen"]) >= sentiment_score(row["rejected"]) + 0.5


def test_length_does_not_give_the_preference_away(corpus):
    pairs = corpus["reward_train"]
    longer = sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs) / len(pairs)
    assert 0.4 < longer < 0.6


def test_prompts_are_neutral_and_diverse(corpus):
    prompts = [r["prompt"] for r in corpus["prompts_train"] + corpus["reward_train"]]
    assert all(sentiment_score(p) == 0.0 for p in prompts)
    assert len(set(prompts)) > 500
    assert len({p.split()[0] for p in prompts}) > 10  # not all one template


def test_ensure_default_data_writes_the_corpus(corpus, tmp_cache):
    data_dir = ensure_default_data()
    assert data_dir.parent.parent == tmp_cache
    for split in SPLIT_FILES:
        lines = (data_dir / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == corpus[split]
    assert ensure_default_data() == data_dir


def test_tokenizer_round_trips_the_corpus(corpus, tokenizer):
    texts = _texts(corpus)
    ids = tokenizer(texts)["input_ids"]
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == texts
    assert 1000 <= len(tokenizer) <= 2000
    # Whole words are single tokens, so reviews are short sequences.
    assert max(map(len, ids)) < 64


def test_tokenizer_special_tokens(tokenizer):
    special = [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token]
    assert special == ["<pad>", "<s>", "</s>", "<unk>"]
    # _llama writes these ids into the model config.
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    ids = tokenizer("The movie was")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert tokenizer.padding_side == "right"


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "You are a critic."}, {"role": "user", "content": "Review it."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s>System: You are a critic.\nUser: Review it.\nAssistant:"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": "Superb."}],
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    answer = [i for i, m in zip(full["input_ids"], full["assistant_masks"]) if m]
    assert tokenizer.decode(answer) == " Superb.</s>"


def test_saved_tokenizer_config_is_portable(cache, tokenizer):
    config = json.loads((ensure_default_tokenizer(cache) / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == tokenizer.chat_template


@pytest.mark.parametrize("vocab_from_default", [True, False])
def test_save_tiny_random_llama_loads_back(tmp_cache, tmp_path, tokenizer, vocab_from_default):
    out = save_tiny_random_llama(tmp_path / "tiny", vocab_from_default=vocab_from_default)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == (len(tokenizer) if vocab_from_default else 256)
    assert (out / "tokenizer.json").exists() == vocab_from_default
    logits = model(input_ids=torch.tensor([[1, 5, 6]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)
    # Same seed, same weights; and the directory is replaced, not merged into.
    again = AutoModelForCausalLM.from_pretrained(
        save_tiny_random_llama(out, vocab_from_default=vocab_from_default)
    )
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_ensure_built_builds_once_under_concurrency(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        time.sleep(0.2)  # long enough for the other thread to reach the lock
        (tmp / "payload").write_text("x")
        return {}

    target = tmp_path / "artifact"
    threads = [threading.Thread(target=default.ensure_built, args=(target, build, {})) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert (target / "payload").read_text() == "x" and (target / default.MARKER).exists()


def test_a_cold_cache_build_leaves_the_callers_random_streams_as_a_warm_one(tmp_path):
    import random

    import numpy as np

    def build(tmp):  # as the default model's build: it seeds and draws
        torch.manual_seed(1234)
        random.seed(1234)
        np.random.seed(1234)
        torch.rand(100), random.random(), np.random.rand()
        return {}

    def draws(target):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        default.ensure_built(target, build, {})
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    cold = draws(tmp_path / "artifact")  # builds
    warm = draws(tmp_path / "artifact")  # already built: nothing runs
    assert cold == warm


def test_ensure_built_failure_leaves_nothing_and_another_recipe_rebuilds(tmp_path):
    target = tmp_path / "artifact"

    def failing(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        default.ensure_built(target, failing, {})
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    default.ensure_built(target, lambda tmp: {}, {"lr": 1})
    default.ensure_built(target, lambda tmp: {}, {"lr": 2})  # another recipe: stale, rebuilt
    assert json.loads((target / default.MARKER).read_text())["lr"] == 2


def test_resolve_model_leaves_other_names_alone():
    assert resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert resolve_model("./my_model") == "./my_model"


def test_default_model_generates_reviews_of_both_polarities():
    """Builds the default model into the normal cache on first run (~1.5 min), then reuses it."""
    path = ensure_default_model()
    assert resolve_model("default") == str(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompts = [r["prompt"] for r in build_corpus()["prompts_test"][:24]]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    out = model.generate(
        **enc, do_sample=True, top_k=0, max_new_tokens=40, pad_token_id=tokenizer.pad_token_id
    )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    scores = [sentiment_score(t) for t in texts]
    assert sum(s > 0 for s in scores) >= 3 and sum(s < 0 for s in scores) >= 3
    assert sum(len(t.split()) >= 5 for t in texts) >= 20  # real continuations, not instant eos


def test_pretraining_builds_the_same_model_whatever_threads_the_caller_set():
    """The default model must not depend on who built it first: `make sft` (torch_threads: 1) or the bench and
    the tests (torch's default). A matmul's float sums depend on how many threads split it, so `pretrain` runs
    on one thread and gives the caller's setting back."""
    recipe = {**default.PRETRAIN, "epochs": 1, "block_size": 128, "batch_size": 16}  # large enough to split
    rng = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 1536, (100,), generator=rng).tolist() for _ in range(60)]
    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = default._llama(1536, hidden_size=128, num_layers=2, num_heads=4, seed=0)
            default.pretrain(model, docs, "a test model", recipe)
            assert torch.get_num_threads() == threads  # the caller's setting, given back
            weights.append({k: v.clone() for k, v in model.state_dict().items()})
    finally:
        torch.set_num_threads(before)
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
