"""Old TRL's helpers that its PPO examples import (`set_seed`, `trl.core.LengthSampler`), and the old
names marl does not implement, each a one-line error naming what to use instead."""

from __future__ import annotations

import random

from marl.errors import MarlError


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (every device), as old TRL's `set_seed`."""
    from transformers import set_seed as seed_all

    seed_all(seed)


class LengthSampler:
    """A random length in [min_value, max_value) per call (old TRL's `trl.core.LengthSampler`), drawn from
    Python's `random`, so `set_seed` fixes it."""

    def __init__(self, min_value: int, max_value: int):
        if max_value <= min_value:
            raise MarlError(f"LengthSampler({min_value}, {max_value}): max_value must be above min_value "
                            "(the range is [min_value, max_value))")
        self.values = list(range(min_value, max_value))

    def __call__(self) -> int:
        return random.choice(self.values)


class AutoModelForSeq2SeqLMWithValueHead:
    """Old TRL's encoder-decoder value-head model: not in marl (docs/migrating-from-trl.md)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise MarlError("AutoModelForSeq2SeqLMWithValueHead: marl trains decoder-only causal LMs, not seq2seq models; "
                        "use AutoModelForCausalLMWithValueHead with a causal LM")


def create_reference_model(model, *args, **kwargs):
    """Old TRL made a frozen copy of the model for full fine-tuning: not in marl (docs/migrating-from-trl.md)."""
    raise MarlError("create_reference_model: marl trains LoRA adapters, not full models, and its reference is the "
                    "same base with the adapters disabled; pass ref_model=None to PPOTrainer")
