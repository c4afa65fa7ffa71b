"""Generation's two fast paths: the exact sampler (marl.sampling) and peft's LoRA forward without its per-call
checks (marl.multilora.lean_lora). The sampler draws from the softmax (frequencies, hand-worked edges); the lean
forward gives peft's results bit for bit."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import marl.model as model_module
from marl.model import MultiAdapterModel
from marl.multilora import lean_lora
from marl.sampling import BLOCK, ExactSampler, exact_sampling, sample_tokens


def test_frequencies_follow_the_probabilities_across_blocks():
    """Mass in the first block, at a block's last and next block's first entry, and in the padded last block."""
    vocab = 3 * BLOCK + 17
    p = torch.zeros(vocab)
    where = [0, 3, BLOCK - 1, BLOCK, 2 * BLOCK + 5, vocab - 1]
    weights = torch.tensor([0.05, 0.2, 0.1, 0.3, 0.15, 0.2])
    p[where] = weights
    torch.manual_seed(0)
    n = 200_000
    counts = torch.bincount(sample_tokens(p.expand(n, -1)), minlength=vocab)
    assert counts.sum() == n and counts[where].sum() == n  # nothing outside the support
    freq = counts[where].double() / n
    se = (weights.double() * (1 - weights.double()) / n).sqrt()
    assert ((freq - weights.double()).abs() < 5 * se).all(), (freq, weights)


def test_unnormalised_weights_and_a_single_token():
    torch.manual_seed(1)
    w = torch.tensor([[0.0, 2.0, 0.0, 6.0]]).expand(40_000, -1)
    share = (sample_tokens(w) == 3).double().mean().item()
    assert abs(share - 0.75) < 0.01
    one = torch.zeros(3, 2 * BLOCK)
    one[:, BLOCK + 7] = 1e-30
    assert sample_tokens(one).tolist() == [BLOCK + 7] * 3


@pytest.mark.parametrize("u, expected", [(0.0, 2), (0.4999, 2), (0.5, 4), (1.0 - 2**-53, 4)])
def test_the_uniform_picks_the_first_entry_past_it(monkeypatch, u, expected):
    """Hand-worked inverse CDF over [0, 0, .5, 0, .5, 0...]: u in [0, .5) -> 2, [.5, 1) -> 4; a zero entry never,
    also at u = 0 and at the largest u below 1."""
    p = torch.zeros(1, BLOCK + 3)
    p[0, 2] = p[0, 4] = 0.5
    monkeypatch.setattr(torch, "rand", lambda *shape, dtype=None, device=None: torch.full(shape, u, dtype=dtype))
    assert sample_tokens(p).tolist() == [expected]


def test_rounding_past_a_blocks_running_sum_takes_its_last_positive_entry(monkeypatch):
    """u at the block's total (which float64 rounding of the two levels can give) lands on its last entry above 0,
    never on the zeros after it."""
    p = torch.zeros(1, 2 * BLOCK)
    p[0, BLOCK + 10] = 0.25
    p[0, BLOCK + 20] = 0.75
    monkeypatch.setattr(torch, "rand", lambda *shape, dtype=None, device=None: torch.ones(shape, dtype=dtype))
    assert sample_tokens(p).tolist() == [BLOCK + 20]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_invalid_row_raises_like_multinomial(bad):
    p = torch.ones(2, 8)
    p[1, 3] = bad
    with pytest.raises(RuntimeError, match="probability tensor"):
        sample_tokens(p)
    with pytest.raises(RuntimeError, match="probability tensor"):
        sample_tokens(torch.zeros(1, 8))


def test_exact_sampling_keeps_transformers_warpers_in_its_order():
    caller = TemperatureLogitsWarper(0.5)  # any processor of the caller's: it runs first, as in transformers
    kw = exact_sampling({"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "max_new_tokens": 3,
                         "logits_processor": LogitsProcessorList([caller])})
    assert kw["do_sample"] is False and "temperature" not in kw and "top_k" not in kw and "top_p" not in kw
    assert kw["max_new_tokens"] == 3 and kw["logits_processor"][0] is caller
    sampler = kw["logits_processor"][-1]
    assert isinstance(sampler, ExactSampler)
    assert [type(w) for w in sampler.warpers] == [TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper]
    plain = exact_sampling({"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0})
    assert plain["logits_processor"][-1].warpers == []


@pytest.mark.parametrize("kw", [{"do_sample": False}, {}, {"do_sample": True, "num_beams": 2},
                                {"do_sample": True, "num_return_sequences": 2}, {"do_sample": True, "min_p": 0.1},
                                {"do_sample": True, "output_scores": True}])
def test_exact_sampling_leaves_other_calls_to_transformers(kw):
    assert exact_sampling(kw) is kw


def test_the_sampler_returns_one_finite_score_a_row():
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    out = ExactSampler([TopKLogitsWarper(top_k=4)])(None, scores.clone())
    assert (torch.isfinite(out).sum(-1) == 1).all()
    picked = out.argmax(-1)
    assert (out.gather(1, picked[:, None]) == 0).all()
    top4 = scores.topk(4, dim=-1).indices
    assert (top4 == picked[:, None]).any(-1).all()  # a token the top-k cut left


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    m = MultiAdapterModel.from_pretrained(tiny_model_dir)
    m.add_adapter("p", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                  init_lora_weights=False))
    return m


def test_generate_samples_the_models_first_token_distribution(model):
    """The first new token of many rows, drawn by marl's generate, against the softmax of the same logits after
    temperature and top-k: frequencies within 5 standard errors, nothing outside the top k."""
    tok = model.tokenizer
    ids = torch.tensor([tok("the cat sat on")["input_ids"]])
    mask = torch.ones_like(ids)
    n, k, temperature = 3000, 6, 0.8
    with torch.no_grad(), model.use_adapter("p"), model.eval_mode():
        logits = model.peft(input_ids=ids, attention_mask=mask).logits[0, -1].float()
    top = logits.topk(k)
    probs = torch.softmax(top.values / temperature, -1).double()
    torch.manual_seed(3)
    out = model.generate(ids.expand(n, -1), mask.expand(n, -1), adapter_names="p", max_new_tokens=1, do_sample=True,
                         temperature=temperature, top_k=k)
    first = out[:, ids.shape[1]]
    assert torch.isin(first, top.indices).all()
    freq = torch.stack([(first == t).double().mean() for t in top.indices])
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() < 5 * se + 1e-9).all(), (freq, probs)


def test_generate_under_a_seed_is_reproducible_and_keeps_min_new_tokens(model):
    tok = model.tokenizer
    ids = torch.tensor([tok("a b c")["input_ids"]] * 4)
    mask = torch.ones_like(ids)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(model.generate(ids, mask, adapter_names="p", max_new_tokens=8, min_new_tokens=8, do_sample=True))
    assert torch.equal(runs[0], runs[1])
    new = runs[0][:, ids.shape[1]:]
    assert new.shape[1] == 8 and not torch.isin(new[:, :7], torch.tensor(sorted(model.stop_token_ids))).any()


def _lora_layers(model):
    return model.execution.layers(model.peft)


@pytest.mark.parametrize("adapter", ["p", None])
def test_lean_lora_gives_peft_logits_bit_for_bit(model, adapter):
    ids = torch.tensor([model.tokenizer("one two three four")["input_ids"]] * 3)
    with torch.no_grad(), model.eval_mode(), model.use_adapter(adapter):
        peft_logits = model.peft(input_ids=ids).logits
        with lean_lora(_lora_layers(model)):
            assert all("forward" in layer.__dict__ for layer in _lora_layers(model))
            lean_logits = model.peft(input_ids=ids).logits
        assert not any("forward" in layer.__dict__ for layer in _lora_layers(model))
    assert torch.equal(peft_logits, lean_logits)


def test_lean_lora_defers_to_peft_in_training_mode(model):
    """In training mode (LoRA dropout active) the call goes to peft's own forward: the same dropout masks under a
    seed, so the same logits."""
    ids = torch.tensor([model.tokenizer("one two three")["input_ids"]])
    outs = []
    with model.use_adapter("p"):
        model.train()
        for lean in (False, True):
            torch.manual_seed(5)
            with torch.no_grad(), (lean_lora(_lora_layers(model)) if lean else contextlib.nullcontext()):
                outs.append(model.peft(input_ids=ids).logits)
        model.eval()
    assert torch.equal(outs[0], outs[1])


def test_generate_with_and_without_lean_lora_gives_the_same_tokens(model, monkeypatch):
    ids = torch.tensor([model.tokenizer("the cat")["input_ids"]] * 2)
    mask = torch.ones_like(ids)
    outs = []
    for lean in (True, False):
        if not lean:
            monkeypatch.setattr(model_module, "lean_lora", lambda layers: contextlib.nullcontext())
        torch.manual_seed(2)
        outs.append(model.generate(ids, mask, adapter_names="p", max_new_tokens=6, do_sample=True))
    assert torch.equal(outs[0], outs[1])


def test_lean_lora_on_a_4bit_base_gives_peft_logits_bit_for_bit(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    m = MultiAdapterModel.from_pretrained(tiny_model_dir, quantization="4bit")
    m.add_adapter("p", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                  init_lora_weights=False))
    layers = _lora_layers(m)
    assert any(type(layer).__name__ == "Linear4bit" for layer in layers)
    ids = torch.tensor([m.tokenizer("one two three four")["input_ids"]] * 2)
    with torch.no_grad(), m.eval_mode(), m.use_adapter("p"):
        peft_logits = m.peft(input_ids=ids).logits
        with lean_lora(layers):
            lean_logits = m.peft(input_ids=ids).logits
    assert torch.equal(peft_logits, lean_logits)


def test_the_reference_and_reward_passes_are_bit_identical_with_the_lean_forward(tiny_model_dir, monkeypatch):
    """The no-grad passes run `lean_forward` too: the same reference log-probs and reward scores as peft's forward."""
    from marl.ppo.rollout import Rollout, reference_logprobs

    torch.manual_seed(0)
    m = MultiAdapterModel.from_pretrained(tiny_model_dir)
    for name, role in (("p", "policy"), ("r", "reward")):
        m.add_adapter(name, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                       init_lora_weights=False), role=role)
    m.score_heads["r"] = torch.nn.Linear(m.base.config.hidden_size, 1)
    tok = m.tokenizer
    prompt = torch.tensor([tok("the cat sat")["input_ids"]] * 2)
    response = torch.tensor([tok(" on the mat")["input_ids"], tok(" and then")["input_ids"] + [tok.pad_token_id]])
    rollout = Rollout(prompt, torch.ones_like(prompt), response, (response != tok.pad_token_id).long(), ["p", "p"],
                      [1.0, 0.7])
    ids, mask = rollout.input_ids, rollout.attention_mask
    outs, used, real = [], [], MultiAdapterModel.lean_forward
    for lean in (True, False):
        monkeypatch.setattr(MultiAdapterModel, "lean_forward",
                            lambda self, lean=lean: used.append(1) or real(self) if lean else contextlib.nullcontext())
        m.train()  # the passes set eval mode themselves
        outs.append([reference_logprobs(m, "p", rollout), reference_logprobs(m, None, rollout),
                     m.compute_reward_score(ids, mask, reward_adapter_name="r")])
    assert len(used) == 3  # each pass ran it
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bias", [False, True])
def test_few_row_products_on_a_cpu_run_with_the_weight_on_the_left(bias, monkeypatch):
    """A float32 base of at least 256 x 256 on a CPU takes 16-32 rows as (W @ x^T)^T without gradients (faster on
    a CPU's BLAS, docs/speed.md): F.linear's result within float32 rounding; other row counts, smaller weights and
    calls with gradients keep F.linear, bit for bit."""
    from marl import multilora

    torch.manual_seed(0)
    base = torch.nn.Linear(256, 512, bias=bias)
    forward = multilora.few_row_linear(base)
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append(a is base.weight) or real_mm(a, b))
    with torch.no_grad():
        for shape, left in (((16, 256), True), ((4, 8, 256), True), ((1, 32, 256), True), ((15, 256), False),
                            ((33, 256), False), ((1, 1, 256), False), ((64, 256), False)):
            calls.clear()
            x = torch.randn(shape)
            y, want = forward(x), torch.nn.functional.linear(x, base.weight, base.bias)
            assert calls == ([True] if left else []), shape
            assert y.shape == want.shape and y.is_contiguous()
            if left:
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(y, want)
    calls.clear()
    x = torch.randn(16, 256, requires_grad=True)
    assert torch.equal(forward(x), base(x)) and calls == []  # a call with gradients keeps F.linear
    for small in (torch.nn.Linear(255, 512), torch.nn.Linear(512, 128)):
        assert multilora.few_row_linear(small) is small  # too small to gain (docs/speed.md)
    assert multilora.few_row_linear(base.double()) is base  # float32 only
