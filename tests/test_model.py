"""The shared base with named adapters: switching, trainability, saving, reward scores."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from marl.errors import MarlError
from marl.model import MultiAdapterModel, last_token_index

from .conftest import param_snapshot


def lora(**kw):
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", **kw)


@pytest.fixture
def model(tiny_model_dir):
    m = MultiAdapterModel.from_pretrained(tiny_model_dir)
    m.add_adapter("policy_a", lora(init_lora_weights=False), role="policy")
    m.add_adapter("policy_b", lora(init_lora_weights=False), role="policy")
    return m


def batch(tok, texts, side):
    tok.padding_side = side
    return tok(texts, return_tensors="pt", padding=True)


def test_last_token_index_left_and_right():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]


def test_use_adapter_restores_also_on_error(model):
    model.set_adapter("policy_a")
    with model.use_adapter("policy_b"):
        assert model.active_adapter == "policy_b"
        assert model.peft.active_adapter == "policy_b"
    assert model.active_adapter == "policy_a"
    with pytest.raises(RuntimeError), model.use_adapter(None):
        assert model.active_adapter is None
        raise RuntimeError("boom")
    assert model.active_adapter == "policy_a" and model.peft.active_adapter == "policy_a"
    with pytest.raises(MarlError, match="unknown adapter 'nope'"):
        with model.use_adapter("nope"):
            pass
    assert model.active_adapter == "policy_a"


def test_disabled_adapters_give_base_logits(model, tiny_model_dir):
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    x = batch(model.tokenizer, ["the movie was great", "bad"], "right")
    want = plain(**x).logits
    with model.use_adapter(None):
        got = model.lm(**x).logits
    with model.use_adapter("policy_a"):
        adapted = model.lm(**x).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(adapted, want)


def test_switching_never_changes_trainability(model):
    """peft's set_adapter flips requires_grad (docs/known-issues.md #3): marl's map must win."""
    model.set_trainable(["policy_a"])
    for name in ["policy_b", None, "policy_a", "policy_b"]:
        model.set_adapter(name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable, name
        assert all(".policy_a." in n or n.startswith("value_heads.policy_a") for n in trainable), trainable


def test_training_one_adapter_leaves_base_and_others_bit_identical(model):
    model.set_trainable(["policy_a"])
    before = param_snapshot(model)
    opt = torch.optim.Adam(model.trainable_parameters("policy_a"), lr=1e-2)
    x = batch(model.tokenizer, ["the movie was great", "a dull film"], "right")
    for _ in range(3):
        logits, values = model.policy_forward("policy_a", x["input_ids"], x["attention_mask"])
        loss = logits.logsumexp(-1).mean() + values.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = param_snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".policy_a." in n or n.startswith("value_heads.policy_a") for n in changed)
    assert any(n.startswith("value_heads.policy_a") for n in changed)


def test_init_from_copies_weights(model):
    model.add_adapter("policy_c", None, init_from="policy_a")
    x = batch(model.tokenizer, ["the movie was great"], "right")
    with model.use_adapter("policy_a"):
        a = model.lm(**x).logits
    with model.use_adapter("policy_c"):
        c = model.lm(**x).logits
    torch.testing.assert_close(a, c)


def test_mixed_adapter_generate_matches_single(model):
    tok = model.tokenizer
    x = batch(tok, ["the movie", "the movie"], "left")
    kw = dict(max_new_tokens=5, do_sample=False)
    mixed = model.generate(x["input_ids"], x["attention_mask"], adapter_names=["policy_a", None], **kw)
    a = model.generate(x["input_ids"][:1], x["attention_mask"][:1], adapter_names="policy_a", **kw)
    base = model.generate(x["input_ids"][1:], x["attention_mask"][1:], adapter_names=None, **kw)
    assert mixed[0].tolist() == a[0].tolist()
    assert mixed[1].tolist() == base[0].tolist()


def test_save_load_roundtrip_and_plain_peft(model, tiny_model_dir, tmp_path):
    out = model.save_adapter("policy_a", tmp_path / "policy_a")
    assert (out / "value_head.safetensors").exists()
    with pytest.raises(MarlError, match="already holds an adapter"):
        model.save_adapter("policy_a", out)
    x = batch(model.tokenizer, ["the movie was great"], "right")
    with model.use_adapter("policy_a"):
        want = model.lm(**x).logits
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    torch.testing.assert_close(plain(**x).logits, want)
    other = MultiAdapterModel.from_pretrained(tiny_model_dir)
    other.load_adapter(str(out), "loaded")
    with other.use_adapter("loaded"):
        torch.testing.assert_close(other.lm(**x).logits, want)
    torch.testing.assert_close(other.value_heads["loaded"].weight, model.value_heads["policy_a"].weight)


def test_adapter_from_another_base_is_refused(model, other_model_dir, tmp_path):
    out = model.save_adapter("policy_a", tmp_path / "a")
    other = MultiAdapterModel.from_pretrained(other_model_dir)
    with pytest.raises(MarlError, match="was trained on base"):
        other.load_adapter(str(out), "a")


def test_bad_names(model, tmp_path):
    with pytest.raises(MarlError, match="already taken"):
        model.add_adapter("policy_a", lora())
    with pytest.raises(MarlError, match="does not exist"):
        model.load_adapter(str(tmp_path / "missing"))
    with pytest.raises(MarlError, match="no reward adapter"):
        model.compute_reward_score(torch.tensor([[1, 2]]))


def _seq_cls_reward_adapter(tiny_model_dir, path):
    """A reward adapter saved in RewardTrainer's layout (SEQ_CLS LoRA + score in modules_to_save)."""
    torch.manual_seed(0)
    seq = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    cfg = lora(task_type="SEQ_CLS", init_lora_weights=False)
    cfg.modules_to_save = ["score"]
    peft_seq = get_peft_model(seq, cfg)
    peft_seq.save_pretrained(str(path))
    return peft_seq.eval()


@pytest.mark.parametrize("side", ["left", "right"])
def test_compute_reward_score_matches_sequence_classifier(model, tiny_model_dir, tmp_path, side):
    ref = _seq_cls_reward_adapter(tiny_model_dir, tmp_path / "rm")
    model.load_adapter(str(tmp_path / "rm"), "reward", role="reward")
    tok = model.tokenizer
    texts = ["the movie was wonderful</s>", "awful</s>", "a film with a plot and some actors</s>"]
    want = ref(**batch(tok, texts, "right")).logits.squeeze(-1)
    x = batch(tok, texts, side)
    model.set_adapter("policy_b")
    got = model.compute_reward_score(x["input_ids"], x["attention_mask"], ppo_adapter_name="policy_a")
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert model.active_adapter == "policy_a" and model.peft.active_adapter == "policy_a"
    model.compute_reward_score(x["input_ids"], x["attention_mask"])
    assert model.active_adapter == "policy_a"


def test_compute_reward_score_restores_adapter_when_it_raises(model, tiny_model_dir, tmp_path):
    _seq_cls_reward_adapter(tiny_model_dir, tmp_path / "rm")
    model.load_adapter(str(tmp_path / "rm"), "reward", role="reward")
    model.set_adapter("policy_b")
    bad = torch.tensor([[10**9]])  # out of vocabulary: the embedding lookup raises
    with pytest.raises(IndexError):
        model.compute_reward_score(bad, ppo_adapter_name="policy_a")
    assert model.active_adapter == "policy_a" and model.peft.active_adapter == "policy_a"


def test_4bit_gradients_after_generate_equal_those_before(tiny_model_dir):
    """docs/known-issues.md #1: on a CPU with AVX512-BF16 a generate call used to switch bitsandbytes' 4-bit
    layers to a kernel without autograd, silently changing LoRA gradients. marl keeps them off it."""
    torch.manual_seed(0)
    m = MultiAdapterModel.from_pretrained(tiny_model_dir, quantization="4bit")
    m.add_adapter("policy_a", lora(init_lora_weights=False))
    m.set_trainable(["policy_a"])
    x = batch(m.tokenizer, ["the movie was great", "a dull film"], "right")

    def grads():
        m.zero_grad(set_to_none=True)
        logits, values = m.policy_forward("policy_a", x["input_ids"], x["attention_mask"])
        (logits.logsumexp(-1).mean() + values.mean()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    before = grads()
    m.generate(x["input_ids"][:1], x["attention_mask"][:1], adapter_names="policy_a", max_new_tokens=3,
               do_sample=False)
    after = grads()
    assert before and set(before) == set(after)
    for k in before:
        torch.testing.assert_close(after[k], before[k])


def test_fast_switch_leaves_peft_in_the_state_its_own_set_adapter_would(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.peft.modules() if isinstance(m, BaseTunerLayer)]
    grads = {n: p.requires_grad for n, p in model.peft.named_parameters()}
    model.set_adapter("policy_b")
    assert model.peft.active_adapter == model.peft.base_model.active_adapter == "policy_b"
    assert all(m.active_adapters == ["policy_b"] and not m.disable_adapters for m in layers)
    model.set_adapter(None)
    assert all(m.disable_adapters for m in layers)
    model.set_adapter("policy_a")
    assert all(m.active_adapters == ["policy_a"] and not m.disable_adapters for m in layers)
    assert grads == {n: p.requires_grad for n, p in model.peft.named_parameters()}  # trainability untouched


def test_an_adapter_that_does_not_fit_leaves_no_trace(model, tmp_path):
    """A plain peft adapter (no marl metadata to refuse it early) made for other shapes."""
    from marl.default import save_tiny_random_llama
    from peft import get_peft_model

    wide = save_tiny_random_llama(tmp_path / "wide", hidden_size=64, num_layers=2, seed=3)
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(wide), lora(init_lora_weights=False))
    other.save_pretrained(tmp_path / "wide-adapter")
    model.set_adapter("policy_a")
    before = param_snapshot(model)
    with pytest.raises(MarlError, match="does not fit base"):
        model.load_adapter(str(tmp_path / "wide-adapter"), "policy_c")
    assert "policy_c" not in model.roles and model.active_adapter == "policy_a"
    assert param_snapshot(model).keys() == before.keys()
    model.add_adapter("policy_c", lora(init_lora_weights=False))  # the name is free again
    x = batch(model.tokenizer, ["the movie"], "right")
    with model.use_adapter("policy_c"):
        model.lm(**x)


def test_eval_mode_switches_only_a_model_in_training_mode(tiny_model_dir, monkeypatch):
    """Already in eval mode: the body runs without walking the modules. In training mode, also when only the base
    or peft's wrapper was put there (as Trainer's `model.train()` does), every module is in eval mode for the body
    (no LoRA dropout) and back in training mode after."""
    m = MultiAdapterModel.from_pretrained(tiny_model_dir)
    m.add_adapter("p", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    walks = []
    real = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: walks.append(mode) or real(self, mode))
    m.eval()
    walks.clear()
    with m.eval_mode():
        assert not any(x.training for x in m.modules())
    assert walks == []
    for top in (m, m.base, m.peft):
        top.train()
        with m.eval_mode():
            assert not any(x.training for x in m.modules())
        assert m.base.training and all(x.training for x in m.base.modules())
        m.eval()
