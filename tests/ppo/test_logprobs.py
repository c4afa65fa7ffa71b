"""Chunked log-probs and entropy from hidden states equal the full-logits computation, and hold less memory."""

from __future__ import annotations

import math

import pytest
import torch

from marl.model import MultiAdapterModel
from marl.heads import lm_head_fn
from marl.ppo.logprobs import token_logprobs
from marl.ppo.losses import entropy_from_logits, logprobs_from_logits
from marl.ppo.rollout import Rollout, reference_logprobs, response_logprobs
from tests.memory import TensorPeak  # exact peak bytes of live tensor storages, op by op


def full(hidden, head, labels, temps):
    """The computation the chunked path replaces: (B, R, V) tempered logits, then log-softmax and entropy."""
    logits = head(hidden) / temps[:, None, None]
    return logprobs_from_logits(logits, labels), entropy_from_logits(logits)


def test_logprob_and_entropy_by_hand():
    # identity head: logits [0, ln 3] -> p = [1/4, 3/4]; at temperature 2 logits [0, ln 3 / 2] -> p1 = √3 / (1 + √3)
    hidden = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    head = torch.nn.Identity()
    out = token_logprobs(hidden, head, torch.tensor([[1, 0]]), 1.0, entropy=True)
    torch.testing.assert_close(out.logprobs, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.5623351
    torch.testing.assert_close(out.entropy, torch.tensor([[h, h]]))
    hot = token_logprobs(hidden, head, torch.tensor([[1, 1]]), torch.tensor([2.0]))
    p1 = math.sqrt(3) / (1 + math.sqrt(3))  # 0.6340
    torch.testing.assert_close(hot.logprobs, torch.tensor([[math.log(p1)] * 2]))
    assert hot.entropy is None


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
@pytest.mark.parametrize("path", ["linear", "checkpointed"])  # the hand-written backward; any other head
def test_chunked_equals_full_logits_with_temperature_and_mask_values_and_gradients(chunk, path):
    torch.manual_seed(0)
    B, R, H, V = 3, 7, 8, 50
    linear = torch.nn.Linear(H, V)
    head = linear if path == "linear" else (lambda x: linear(x))
    hidden = torch.randn(B, R, H, requires_grad=True)
    labels = torch.randint(V, (B, R))
    temps = torch.tensor([1.0, 0.7, 1.5])
    mask = torch.ones(B, R, dtype=torch.long)
    mask[0, 5:] = 0  # right padding after EOS
    mask[2, 1:] = 0  # one valid token
    m = mask.bool()
    w = torch.randn(B, R)  # a loss that weighs every token differently

    want_lp, want_ent = full(hidden, head, labels, temps)
    ((want_lp * w)[m].sum() + (want_ent * w)[m].sum()).backward()
    want_grads = [hidden.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone()]
    hidden.grad = linear.weight.grad = linear.bias.grad = None

    out = token_logprobs(hidden, head, labels, temps, mask=mask, chunk_tokens=chunk, entropy=True)
    ((out.logprobs * w).sum() + (out.entropy * w).sum()).backward()
    got_grads = [hidden.grad, linear.weight.grad, linear.bias.grad]

    torch.testing.assert_close(out.logprobs[m], want_lp[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy[m], want_ent[m], atol=1e-5, rtol=1e-5)
    assert (out.logprobs[~m] == 0).all() and (out.entropy[~m] == 0).all()  # padding reads 0
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_entropy_without_gradient_leaves_the_logprob_gradient_alone():
    torch.manual_seed(1)
    head = torch.nn.Linear(4, 30)
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.randint(30, (2, 3))
    out = token_logprobs(hidden, head, labels, entropy=True, entropy_grad=False, chunk_tokens=2)
    assert not out.entropy.requires_grad
    (out.logprobs.sum() + out.entropy.sum()).backward()
    want = torch.autograd.grad(full(hidden, head, labels, torch.ones(2))[0].sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, want, atol=1e-5, rtol=1e-5)


def test_a_reported_entropy_costs_the_backward_nothing_the_logprob_gradient_is_bit_identical():
    """The entropy detached (only a metric): backward gives exactly the gradients of the log-probs alone."""
    torch.manual_seed(3)
    head = torch.nn.Linear(4, 30)
    hidden0 = torch.randn(2, 3, 4)
    labels = torch.randint(30, (2, 3))
    grads = []
    for entropy in (False, True):
        hidden = hidden0.clone().requires_grad_(True)
        head.zero_grad()
        out = token_logprobs(hidden, head, labels, torch.tensor([1.0, 0.7]), entropy=entropy, entropy_grad=False)
        (out.logprobs * torch.arange(6.0).view(2, 3)).sum().backward()
        grads.append([hidden.grad, head.weight.grad, head.bias.grad])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_bf16_hidden_states_give_float32_logprobs():
    torch.manual_seed(2)
    head = torch.nn.Linear(8, 40).to(torch.bfloat16)
    hidden = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    labels = torch.randint(40, (2, 3))
    out = token_logprobs(hidden, head, labels, torch.tensor([1.0, 0.5]), entropy=True)
    assert out.logprobs.dtype == out.entropy.dtype == torch.float32
    want_lp, want_ent = full(hidden, lambda h: head(h).float(), labels, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(out.logprobs, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, want_ent, atol=1e-5, rtol=1e-5)


def test_chunked_backward_holds_far_less_than_full_logits_at_151936_tokens():
    torch.manual_seed(0)
    V, H = 151_936, 16  # Qwen2.5's vocabulary
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    hidden0 = torch.randn(2, 64, H)
    labels = torch.randint(V, (2, 64))
    temps = torch.tensor([1.0, 0.8])
    peaks = {}
    for name in ("full", "chunked"):
        hidden = hidden0.clone().requires_grad_(True)
        with TensorPeak() as mem:
            if name == "full":
                lp, ent = full(hidden, head, labels, temps)
            else:
                lp, ent = token_logprobs(hidden, head, labels, temps, chunk_tokens=16, entropy=True)
            (lp.sum() + ent.sum()).backward()
            del lp, ent
        peaks[name] = mem.peak
    block = 16 * V * 4  # one chunk of float32 logits: 9.7 MB
    assert peaks["full"] > 128 * V * 4 * 3  # several (128, V) float32 copies: > 230 MB
    assert peaks["chunked"] < 8 * block < peaks["full"] / 5


def test_policy_pass_on_a_151936_token_model_holds_less_and_gives_the_same_gradients(tmp_path):
    from tests.tiny_models import marl_default

    path = marl_default(tmp_path / "m", vocab_size=151_936, hidden_size=16, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(str(path))
    from peft import LoraConfig

    model.add_adapter("p", LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear",
                                      init_lora_weights=False))
    ids = torch.randint(3, 1500, (2, 40))
    mask = torch.ones_like(ids)
    P, labels = 8, ids[:, 8:]
    temps = torch.tensor([1.0, 0.7])
    out, peaks = {}, {}
    for name in ("full", "chunked"):
        model.zero_grad(set_to_none=True)
        with TensorPeak() as mem:
            if name == "full":
                logits, values = model.policy_forward("p", ids, mask)
                lp = response_logprobs(logits, labels, P, temps)
                del logits
            else:
                hidden, values = model.policy_forward("p", ids, mask, lm_head=False)
                lp = token_logprobs(hidden[:, P - 1:-1], lm_head_fn(model.base), labels, temps, chunk_tokens=4).logprobs
                del hidden
            (lp.sum() + values[:, P - 1:-1].pow(2).sum()).backward()
        peaks[name] = mem.peak
        out[name] = (lp.detach(), values.detach(), [p.grad.clone() for p in model.trainable_parameters("p")])
    torch.testing.assert_close(out["chunked"][0], out["full"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["chunked"][1], out["full"][1], atol=1e-5, rtol=1e-5)
    for got, want in zip(out["chunked"][2], out["full"][2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert peaks["chunked"] < peaks["full"] / 3, peaks


def test_reference_logprobs_equal_the_full_logits_on_valid_tokens(tiny_model_dir):
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    enc = model.tokenizer(["the movie was", "a film"], return_tensors="pt", padding=True)
    resp = torch.randint(3, 200, (2, 5))
    rmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    ro = Rollout(enc["input_ids"], enc["attention_mask"], resp, rmask, [None, None], torch.tensor([1.0, 0.6]))
    got = reference_logprobs(model, None, ro, batch_size=1, chunk_tokens=3)
    logits = model(ro.input_ids, ro.attention_mask).logits
    want = response_logprobs(logits, resp, ro.prompt_ids.shape[1], ro.temperatures)
    m = rmask.bool()
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)
    assert (got[~m] == 0).all()


@pytest.mark.parametrize("entropy,entropy_grad", [(False, False), (True, False), (True, True)])
def test_a_chunk_that_keeps_its_blocks_gives_bit_identical_values_and_gradients(entropy, entropy_grad):
    """`keep` (the last chunk) reuses the forward's blocks in backward instead of recomputing the logits: the same
    outputs and gradients to the bit, and a second backward (retain_graph) recomputes and agrees too."""
    from marl.ppo.logprobs import _LinearLogprobs

    torch.manual_seed(4)
    head = torch.nn.Linear(6, 300)
    hidden0, labels, temps = torch.randn(5, 6), torch.randint(300, (5,)), torch.tensor([1.0, 0.7, 1.3, 1.0, 0.5])
    w_lp, w_ent = torch.randn(5), torch.randn(5)
    got = {}
    for keep in (False, True):
        hidden = hidden0.clone().requires_grad_(True)
        head.zero_grad()
        lp, ent = _LinearLogprobs.apply(hidden, head.weight, head.bias, labels, temps, entropy, entropy_grad, keep)
        loss = (lp * w_lp).sum() + ((ent if entropy_grad else ent.detach()) * w_ent).sum()
        loss.backward(retain_graph=True)
        first = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
        hidden.grad = None
        head.zero_grad()
        loss.backward()  # the kept blocks were used up: this one recomputes
        got[keep] = [lp, ent, *first, hidden.grad, head.weight.grad, head.bias.grad]
    for a, b in zip(got[False], got[True]):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(got[True][2:5], got[True][5:]))


def test_only_the_last_chunk_skips_the_lm_head_in_backward(monkeypatch):
    """Forward runs the head once a chunk; backward again for every chunk but the last (whose blocks it keeps)."""
    import marl.ppo.logprobs as lpmod

    calls = []
    real = lpmod._log_softmax_
    monkeypatch.setattr(lpmod, "_log_softmax_", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(5)
    head = torch.nn.Linear(4, 40)
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    labels = torch.randint(40, (2, 5))
    for chunk, forward, backward in ((10, 1, 0), (4, 3, 2)):
        calls.clear()
        out = token_logprobs(hidden, head, labels, chunk_tokens=chunk, entropy=True, entropy_grad=False)
        assert len(calls) == forward
        out.logprobs.sum().backward()
        assert len(calls) == forward + backward
    with torch.no_grad():  # no graph: nothing kept
        calls.clear()
        token_logprobs(hidden, head, labels, chunk_tokens=10)
        assert len(calls) == 1


def test_keeping_the_last_chunk_adds_no_peak_behind_a_trunk_at_151936_tokens():
    """At the moment backward starts every activation is alive; the kept blocks stand where the recomputed ones
    would: the update's peak is not above recomputing's (entropy reported, as in the update)."""
    import marl.ppo.logprobs as lpmod

    torch.manual_seed(6)
    V, H = 151_936, 16
    trunk = torch.nn.Sequential(*[torch.nn.Linear(H, H) for _ in range(4)])
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    x, labels = torch.randn(2, 32, H), torch.randint(V, (2, 32))
    real, peaks = lpmod._LinearLogprobs.apply, {}
    for keep in (False, True):
        apply = real if keep else (lambda *a: real(*a[:-1], False))
        lpmod._LinearLogprobs.apply = apply
        try:
            with TensorPeak() as mem:
                out = token_logprobs(trunk(x), head, labels, entropy=True, entropy_grad=False)
                out.logprobs.sum().backward()
                del out
        finally:
            lpmod._LinearLogprobs.apply = real
        peaks[keep] = mem.peak
    block = 64 * V * 4
    assert peaks[True] <= peaks[False] < 4 * block


def test_the_entropy_at_151936_tokens_is_exact_to_float32():
    """The entropy's sum over the vocabulary (one dot product a row on a CPU) agrees with float64."""
    torch.manual_seed(7)
    V = 151_936
    head = torch.nn.Linear(8, V, bias=False)
    hidden, labels = torch.randn(1, 6, 8) * 4, torch.randint(V, (1, 6))
    with torch.no_grad():
        out = token_logprobs(hidden, head, labels, entropy=True)
        z = head(hidden).double()
        want = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)  # float64 throughout
    torch.testing.assert_close(out.entropy.double(), want, atol=1e-5, rtol=1e-6)
