"""marl: multi-adapter RLHF on one shared base model.

Every role of an RLHF run is a named LoRA adapter on ONE (optionally 4/8-bit) base:
`sft`, `reward` (+ score head) and several PPO policies (+ value heads).

Heavy imports are lazy: `import marl` is cheap, the names below load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from . import hub_kernels  # noqa: E402

hub_kernels.install()  # no kernel from the Hub at run time unless asked (docs/known-issues.md #16)

_LAZY = {
    "MultiAdapterModel": "marl.model",
    "MarlError": "marl.errors",
    "SFTArgs": "marl.config",
    "RewardArgs": "marl.config",
    "PPOArgs": "marl.config",
    "MultiPolicyPPOTrainer": "marl.ppo.trainer",
    "evaluate_adapters": "marl.evaluate",
    # the old-TRL migration surface (issue: two front doors)
    "AutoModelForCausalLMWithValueHead": "marl.compat",
    "PPOConfig": "marl.compat",
    "PPOTrainer": "marl.compat",
    "set_seed": "marl.compat",
    "AutoModelForSeq2SeqLMWithValueHead": "marl.compat",  # a one-line error: marl trains causal LMs
    "create_reference_model": "marl.compat",  # a one-line error: the reference is the base, adapters off
    # LlamaGym-style agents for gymnasium environments
    "Agent": "marl.agent",
    "AgentConfig": "marl.agent",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("sft", "reward", "ppo"):  # the stages as functions: marl.sft(SFTArgs(...))
        return importlib.import_module(f"marl.stages.{name}").run
    raise AttributeError(f"module 'marl' has no attribute {name!r}")


__all__ = [*list(_LAZY), "sft", "reward", "ppo"]
