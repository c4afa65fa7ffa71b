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
