"""Fixtures for old TRL's tests and examples run against marl.compat: the GPT-2-architecture tiny model
(pad = EOS) that old TRL's own tests used, built in code, and old TRL's LoRA settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run far faster on one thread than on two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A random tiny GPT2LMHeadModel (2 layers, hidden 32, vocabulary 512, pad = EOS) and its tokenizer."""
    from ..tiny_models import gpt2_pad_eos

    return str(gpt2_pad_eos(tmp_path_factory.mktemp("gpt2") / "model"))


def lora_config(task_type: str = "CAUSAL_LM"):
    """The LoraConfig of old TRL's PEFT tests (peft targets GPT-2's c_attn by default)."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type=task_type)


# trainable parameters of lora_config() on the tiny GPT-2, worked out by hand: per layer, c_attn (32 -> 96)
# gets lora_A 16 x 32 = 512 and lora_B 96 x 16 = 1536, so 2048; 2 layers: 4096; the value head 32 + 1 bias = 33
LORA_PLUS_VALUE_HEAD = 4096 + 33


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
