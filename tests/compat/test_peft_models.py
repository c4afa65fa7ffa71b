"""TRL 0.11.4's tests/test_peft_models.py, each usage through old TRL's calls with marl's import, on the tiny
GPT-2 (old TRL used a tiny GPT-NeoX from the Hub; the counts here are worked out for the tiny GPT-2)."""

from __future__ import annotations

import logging

import pytest
import torch

from marl import AutoModelForCausalLMWithValueHead

from .conftest import LORA_PLUS_VALUE_HEAD, lora_config, trainable


@pytest.fixture
def peft_model(gpt2_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    return get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2_dir), lora_config())


def test_a_peft_model_is_used_in_place_not_copied(peft_model):  # test_create_peft_model
    causal_lm = peft_model.get_base_model()
    model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model)
    assert model.marl_model.peft is peft_model and model.marl_model.base is causal_lm
    assert model.policy_adapters == ["default"] and model.active_adapter == "default"
    lora = peft_model.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight
    assert any(p is lora for p in model.parameters())  # the very tensor, so the user's optimizer sees it


def test_value_head_requires_grad(peft_model):  # test_peft_requires_grad
    model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model)
    assert model.v_head.summary.weight.requires_grad


def test_trainable_parameters_are_the_lora_and_the_value_head(peft_model, gpt2_dir, caplog):
    # test_check_peft_model_nb_trainable_params
    model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model)
    assert trainable(model) == LORA_PLUS_VALUE_HEAD
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n or n.startswith("v_head.summary.")}

    # old TRL trained every weight of a model loaded without peft (99,578 of its GPT-NeoX); marl gives it a
    # LoRA adapter on every linear layer and says so (docs/migrating-from-trl.md): per layer c_attn 32 -> 96
    # (512 + 1536), attn c_proj 32 -> 32 (512 + 512), c_fc 32 -> 128 (512 + 2048), mlp c_proj 128 -> 32
    # (2048 + 512) = 8192; 2 layers 16384; + value head 33
    with caplog.at_level(logging.WARNING, logger="marl.compat.model"):
        non_peft_model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    assert trainable(non_peft_model) == 16384 + 33
    assert any("marl trains LoRA adapters, not full models" in r.getMessage() for r in caplog.records)


def test_peft_config_on_a_name_or_on_a_loaded_model(gpt2_dir):  # test_create_peft_model_from_config
    from transformers import AutoModelForCausalLM

    trl_model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, peft_config=lora_config())
    assert trainable(trl_model) == LORA_PLUS_VALUE_HEAD

    causal_lm_model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    trl_model = AutoModelForCausalLMWithValueHead.from_pretrained(causal_lm_model, peft_config=lora_config())
    assert trainable(trl_model) == LORA_PLUS_VALUE_HEAD
    assert trl_model.marl_model.base is causal_lm_model  # peft injected its layers into the user's model


def test_8bit_base_by_name_or_loaded(gpt2_dir):  # test_create_bnb_peft_model_from_config
    from bitsandbytes.nn import Linear8bitLt
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    trl_model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, peft_config=lora_config(),
                                                                  load_in_8bit=True)
    assert trainable(trl_model) == LORA_PLUS_VALUE_HEAD
    assert isinstance(trl_model.pretrained_model.model.transformer.h[0].mlp.c_fc, Linear8bitLt)

    causal_lm_model = AutoModelForCausalLM.from_pretrained(
        gpt2_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": "cpu"})
    trl_model = AutoModelForCausalLMWithValueHead.from_pretrained(causal_lm_model, peft_config=lora_config())
    assert trainable(trl_model) == LORA_PLUS_VALUE_HEAD
    assert isinstance(trl_model.pretrained_model.model.transformer.h[0].mlp.c_fc, Linear8bitLt)
    assert trl_model.is_loaded_in_8bit and not trl_model.is_loaded_in_4bit


def test_save_pretrained_and_reload_give_equal_parameters(peft_model, tmp_path):  # test_save_pretrained_peft
    from safetensors.torch import load_file

    model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model)
    with torch.no_grad():  # a value head that is not the fresh one, so that equality means it was saved
        model.v_head.summary.bias.fill_(0.25)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").exists()
    # old TRL pickled the value head into pytorch_model.bin; marl writes safetensors (docs/migrating-from-trl.md)
    assert not (tmp_path / "pytorch_model.bin").exists()
    assert set(load_file(tmp_path / "value_head.safetensors")) == {"weight", "bias"}

    model_from_pretrained = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    pairs = list(zip(model.named_parameters(), model_from_pretrained.named_parameters(), strict=True))
    assert pairs and all(n1 == n2 for (n1, _), (n2, _) in pairs)
    for (name, p1), (_, p2) in pairs:
        assert torch.allclose(p1, p2), f"{name} differs"


def test_a_folder_saved_by_peft_loads_with_a_fresh_value_head(peft_model, tmp_path):  # test_load_pretrained_peft
    model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model)
    peft_model.save_pretrained(tmp_path)  # the user's peft model, which marl uses in place
    model_from_pretrained = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").exists()
    pairs = list(zip(model.named_parameters(), model_from_pretrained.named_parameters(), strict=True))
    for (name, p1), (_, p2) in pairs:
        if name not in ("v_head.summary.weight", "v_head.summary.bias"):
            assert torch.allclose(p1, p2), f"{name} differs"


def test_continue_training_a_folder_saved_by_peft(peft_model, tmp_path):  # test_continue_training_peft_model
    peft_model.save_pretrained(tmp_path)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path), is_trainable=True)
    assert trainable(model) == LORA_PLUS_VALUE_HEAD


def test_the_active_adapter_of_a_peft_model_is_the_policy_and_the_others_stay(peft_model, tmp_path):
    """Not in TRL's tests, but what its from_pretrained did with a peft model of several adapters."""
    peft_model.add_adapter("policy_b", lora_config())
    peft_model.set_adapter("policy_b")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model)
    assert model.policy_adapters == ["policy_b"] and model.policy_adapter_name == "policy_b"
    assert model.marl_model.adapter_names == ["default", "policy_b"]  # "default" stays loaded, frozen
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".policy_b." in n or n.startswith("v_head.summary.") for n in names)
    assert trainable(model) == LORA_PLUS_VALUE_HEAD
    model.save_pretrained(tmp_path)  # the policy at the folder's root, which reloads as "default" (as in peft)
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    assert reloaded.policy_adapters == ["default"]
    again = dict(reloaded.named_parameters())
    saved = {n.replace(".policy_b.", ".default."): p for n, p in model.named_parameters()
             if n.startswith("v_head") or ".policy_b." in n}
    assert len(saved) > 2 and all(torch.equal(p, again[n]) for n, p in saved.items())
