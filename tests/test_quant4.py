"""4-bit layers on the CPU dequantize into one shared buffer (marl/quant4.py): same bits, no weight per call."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from marl.model import MultiAdapterModel

pytest.importorskip("bitsandbytes")

POLICIES = ["policy_0", "policy_1", "policy_2", "policy_3"]


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A 2-layer Llama of hidden 128: its linear weights (1.6 MB in float32) outweigh a small pass's activations."""
    from marl.default import save_tiny_random_llama

    return str(save_tiny_random_llama(tmp_path_factory.mktemp("wide") / "model", hidden_size=128, num_layers=2,
                                      num_heads=4))


def policies_model(model_dir, quantization: str, workspace: bool = True):
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(model_dir, quantization=quantization)
    if quantization == "4bit" and not workspace:  # bitsandbytes' own forward: a new dequantized weight per call
        for m in model.base.modules():
            m.__dict__.pop("forward", None)
    for name in POLICIES:
        model.add_adapter(name, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    model.set_trainable(POLICIES)
    with torch.no_grad():
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    return model


def update_pass(model):
    """One forward and backward of the 4 policies in one stacked pass (2 rows each, as the batched update)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (8, 16), generator=g)
    model.train()
    logits, _ = model.grouped_policy_forward([n for n in POLICIES for _ in range(2)], ids, torch.ones_like(ids))
    logits.float().square().mean().backward()
    model.eval()
    return logits.detach()


def allocated_bytes(fn) -> int:
    """Bytes of every CPU allocation `fn` makes (the profiler's memory events: inside bitsandbytes' ops too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0)


def linear_weight_bytes(model) -> int:
    """Float32 bytes of the decoder's linear weights (what a dequantization makes)."""
    return sum(m.in_features * m.out_features * 4 for n, m in model.base.named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in n and "lm_head" not in n)


def test_the_workspace_gives_bitsandbytes_outputs_gradients_and_generations_bit_for_bit(wide_model_dir):
    out = {}
    for workspace in (False, True):
        model = policies_model(wide_model_dir, "4bit", workspace=workspace)
        logits = update_pass(model)
        grads = {n: p.grad for n, p in model.lm.named_parameters() if p.grad is not None}
        ids = torch.randint(3, 1000, (4, 5), generator=torch.Generator().manual_seed(2))
        gen = model.generate(ids, torch.ones_like(ids), adapter_names=POLICIES, max_new_tokens=4, do_sample=False)
        out[workspace] = logits, grads, gen
    (l0, g0, s0), (l1, g1, s1) = out[False], out[True]
    assert torch.equal(l0, l1) and torch.equal(s0, s1)
    assert g0.keys() == g1.keys() and len(g0) == 4 * 2 * 7 * 2  # A and B of 7 layers x 2
    assert all(torch.equal(g0[k], g1[k]) for k in g0)


def test_a_4bit_update_pass_allocates_no_dequantized_weight(wide_model_dir):
    """bitsandbytes alone dequantizes every weight into a new tensor in the forward and again in the backward
    (docs/known-issues.md #19); with the workspace a 4-bit pass allocates what the same pass in full precision
    does, plus the small block maxima."""
    full = policies_model(wide_model_dir, "none")
    update_pass(full)  # warm-up
    weights = linear_weight_bytes(full)
    full_bytes = allocated_bytes(lambda: update_pass(full))
    for workspace, (low, high) in ((False, (1.5, 3.0)), (True, (-0.25, 0.25))):
        model = policies_model(wide_model_dir, "4bit", workspace=workspace)
        update_pass(model)  # warm-up: the workspace exists from here on
        extra = (allocated_bytes(lambda m=model: update_pass(m)) - full_bytes) / weights
        assert low < extra < high, (workspace, extra)
