"""The batched multi-LoRA path equals peft's per-adapter path: logits, log-probs, gradients, generation."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from marl.model import MultiAdapterModel
from marl.multilora import Layout, group_layout, grouped_lora
from marl.ppo.losses import logprobs_from_logits


def test_group_layout():
    assert group_layout(["a", "a", "b", "b"]) == Layout(("a", "b"), (2, 2))
    assert group_layout(["a"]) == Layout(("a",), (1,))
    assert group_layout(["a", "b", "a", "b"]) is None  # not contiguous
    uneven = group_layout(["a", "a", "a", "b"])
    assert uneven == Layout(("a", "b"), (3, 1)) and not uneven.even
    assert uneven.bounds() == [(0, 3), (3, 4)]
    assert uneven.padded_index("cpu").tolist() == [0, 1, 2, 3]  # b's row sits at the start of its padded group
    assert group_layout(["a", "b", "b", "b"]).padded_index("cpu").tolist() == [0, 3, 4, 5]
    assert group_layout([None, None, "a", "a"]) == Layout((None, "a"), (2, 2))


def make_model(model_dir, quantization="none", names=("p1", "p2", "p3")):
    torch.manual_seed(0)
    m = MultiAdapterModel.from_pretrained(model_dir, quantization=quantization)
    for n in names:
        m.add_adapter(n, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                    init_lora_weights=False))
    return m


def _per_adapter(model, names, ids, mask):
    logits, values = [], []
    for i, n in enumerate(names):
        lg, v = model.policy_forward(n, ids[i:i + 1], mask[i:i + 1])
        logits.append(lg)
        values.append(v)
    return torch.cat(logits), torch.cat(values)


@pytest.mark.parametrize("quantization, tol", [("none", 1e-5), ("4bit", 1e-4)])
@pytest.mark.parametrize("names", [
    ["p1", "p1", "p2", "p2", "p3", "p3"],
    ["p1", "p2", "p2", "p2", "p3", "p3"],  # uneven rows per policy
    ["p2", "p2", "p2"],  # a single policy
])
def test_grouped_forward_and_gradients_match_peft(tiny_model_dir, quantization, tol, names):
    model = make_model(tiny_model_dir, quantization)
    model.set_trainable(sorted(set(names)))
    tok = model.tokenizer
    tok.padding_side = "left"
    enc = tok(["the movie was great", "a dull and slow film", "I loved it", "bad", "ok then", "fine"][:len(names)],
              return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids[:, 1:]

    def loss_of(logits, values):
        lp = logprobs_from_logits(logits[:, :-1], labels)
        return -(lp * mask[:, 1:]).sum() + values.pow(2).sum()

    model.train()
    want_logits, want_values = _per_adapter(model, names, ids, mask)
    loss_of(want_logits, want_values).backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    got_logits, got_values = model.grouped_policy_forward(names, ids, mask)
    loss_of(got_logits, got_values).backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    m = mask.bool()
    torch.testing.assert_close(got_logits[m], want_logits[m], atol=tol, rtol=tol)
    torch.testing.assert_close(got_values[m], want_values[m], atol=tol, rtol=tol)
    assert set(got_grads) == set(want_grads)
    assert all(any(f".{n}." in k or k.startswith(f"value_heads.{n}") for n in names) for k in got_grads)
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("prompts, names", [
    (["the movie", "the movie", "a film", "a film"], ["p1", "p1", None, None]),
    (["the movie", "a film", "a film", "a film", "it was"], ["p1", "p2", "p2", None, "p3"]),  # uneven groups
])
def test_batched_generation_equals_peft_mixed_batch(tiny_model_dir, prompts, names):
    model = make_model(tiny_model_dir)
    tok = model.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 6, "do_sample": False}
    model.multi_lora = "batched"
    batched = model.generate(enc["input_ids"], enc["attention_mask"], adapter_names=names, **kw)
    model.multi_lora = "peft"
    peft_out = model.generate(enc["input_ids"], enc["attention_mask"], adapter_names=names, **kw)
    assert batched.tolist() == peft_out.tolist()
    assert "forward" not in model.peft.base_model.model.model.layers[0].self_attn.q_proj.__dict__  # unpatched


def test_adapters_of_different_ranks_share_a_batch(tiny_model_dir):
    model = make_model(tiny_model_dir, names=("p1",))
    model.add_adapter("wide", LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                         init_lora_weights=False))
    tok = model.tokenizer
    tok.padding_side = "left"
    enc = tok(["the movie", "the movie", "a film", "a film"], return_tensors="pt", padding=True)
    names = ["p1", "p1", "wide", "wide"]
    want, _ = _per_adapter(model, names, enc["input_ids"], enc["attention_mask"])
    got, _ = model.grouped_policy_forward(names, enc["input_ids"], enc["attention_mask"])
    m = enc["attention_mask"].bool()
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)


def test_a_batch_that_does_not_match_the_layout_is_refused(tiny_model_dir):
    model = make_model(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7]] * 3)
    with grouped_lora(model.peft, group_layout(["p1", "p2"]), layers=model.lora_layers()):
        with pytest.raises(ValueError, match="3 rows, the adapter layout 2"):
            model.peft(input_ids=ids)


def _loss_and_grads(model, names, ids, mask, grouped: bool):
    """A log-prob + value loss of `names` (one policy per row) through the grouped or the per-adapter path,
    backward run after the forward's adapter switch is undone (as the trainer runs it); the gradients."""
    from marl.heads import lm_head_fn
    from marl.ppo.logprobs import token_logprobs

    model.zero_grad(set_to_none=True)
    if grouped:
        hidden, values = model.grouped_policy_forward(names, ids, mask, lm_head=False)
    else:
        outs = [model.policy_forward(n, ids[i:i + 1], mask[i:i + 1], lm_head=False) for i, n in enumerate(names)]
        hidden, values = torch.cat([h for h, _ in outs]), torch.cat([v for _, v in outs])
    lp = token_logprobs(hidden[:, :-1], lm_head_fn(model.base), ids[:, 1:], mask=mask[:, 1:]).logprobs
    (-(lp.sum()) + values.float().pow(2).sum()).backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("quantization, tol", [("none", 1e-5), ("bf16", 2e-2), ("8bit", 1e-3), ("4bit", 1e-3)])
@pytest.mark.parametrize("grouped", [True, False], ids=["batched", "peft"])
def test_checkpointed_gradients_equal_the_unchecked_run(tiny_model_dir, quantization, tol, grouped):
    """Each policy row recomputed in backward under its own adapter: a policy and its critic, several policies
    per pass, and backward after the adapter switch is undone."""
    from marl.multilora import activation_checkpointing

    model = make_model(tiny_model_dir, quantization, names=("p1", "p2"))
    for n in ("p1", "p2"):
        model.add_critic(n, "c" + n, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
                         init_from=n)
    with torch.no_grad():  # critics unlike their policies, so a recompute under the wrong adapter shows
        for n, p in model.named_parameters():
            if ".cp" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.set_trainable(["p1", "p2"])
    names = ["p1", "p2", "p2"]
    enc = model.tokenizer(["the movie was great", "a dull film", "I loved it"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    model.train()
    want = _loss_and_grads(model, names, ids, mask, grouped)
    with activation_checkpointing(model.base, model.lora_layers()):
        assert model.base.model.layers[0].gradient_checkpointing
        got = _loss_and_grads(model, names, ids, mask, grouped)
    assert not model.base.model.layers[0].gradient_checkpointing  # off again after the body
    assert not getattr(model.base, "_require_grads_hooks", None)  # no hook left on the embeddings
    assert got.keys() == want.keys() and any(".cp2." in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=tol, rtol=tol)


@pytest.mark.parametrize("multi_lora", ["batched", "peft"])
def test_a_checkpointed_ppo_update_equals_the_unchecked_update(tiny_model_dir, tiny_run, multi_lora):
    """`gradient_checkpointing: true` changes memory, not the update: two policies with separate critics."""
    from marl.ppo.rollout import reference_logprobs
    from tests.conftest import param_snapshot
    from tests.ppo.test_trainer import make_trainer

    kw = dict(multi_lora=multi_lora, value_model="adapter", ppo_epochs=1, ent_coef=0.01)
    plain = make_trainer(tiny_model_dir, tiny_run, **kw)
    ckpt = make_trainer(tiny_model_dir, tiny_run, gradient_checkpointing=True, **kw)
    rollout = plain.rollout()
    for n in plain.policies:
        ckpt.states[n].generator.set_state(plain.states[n].generator.get_state())
    scores, _ = plain.score(rollout, 1)
    ref_lp = reference_logprobs(plain.model, "sft", rollout)
    before, stats = param_snapshot(plain.model), {}
    for t in (plain, ckpt):
        shared = t.shares_passes(rollout)
        stats[t] = t.learner.update(t.learner.make_experience(rollout, scores, ref_lp, shared=shared), 1, shared=shared)
    assert plain.shares_passes(rollout) == (multi_lora == "batched")
    for n in plain.policies:
        assert stats[ckpt][n] == pytest.approx(stats[plain][n], rel=1e-4, abs=1e-6)
    a, b = param_snapshot(plain.model), param_snapshot(ckpt.model)
    assert any("_critic." in k and not torch.equal(a[k], before[k]) for k in a)  # the critics learned too
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)


def test_old_trl_gradient_checkpointing_reaches_marl_ppo():
    from marl.compat import PPOConfig

    assert PPOConfig(gradient_checkpointing=True, batch_size=8, mini_batch_size=8).to_ppo_args().gradient_checkpointing
    assert not PPOConfig(batch_size=8, mini_batch_size=8).to_ppo_args().gradient_checkpointing
