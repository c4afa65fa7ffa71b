"""Old TRL's multi-adapter RL API (TRL <= 0.11) on marl's own PPO core.

Code written against TRL's "multi adapter RL" guide runs with only its import changed:

    from marl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, set_seed
    from marl.core import LengthSampler

- `AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=, reward_adapter=,
  quantization_config=)` wraps one `MultiAdapterModel`: a policy adapter ("default", as in old
  TRL) with a value head, the reward adapter with its score head, all on one (8/4-bit) base. The
  base may also be a model already loaded (a transformers causal LM or a peft model), used in place.
  More policies are added by name (`add_policy_adapter`, or peft-style `pretrained_model.add_adapter`).
- `PPOConfig` takes old TRL's field names and maps them onto marl's `PPOArgs`.
- `PPOTrainer.step(queries, responses, scores)` trains the model's *active* policy adapter with
  `Learner` (marl.ppo.learner); the reference is the same base with adapters disabled.

What differs from old TRL is listed in docs/migrating-from-trl.md.
"""

from .config import PPOConfig
from .core import AutoModelForSeq2SeqLMWithValueHead, LengthSampler, create_reference_model, set_seed
from .model import AutoModelForCausalLMWithValueHead
from .trainer import PPOTrainer

__all__ = ["AutoModelForCausalLMWithValueHead", "AutoModelForSeq2SeqLMWithValueHead", "LengthSampler", "PPOConfig",
           "PPOTrainer", "create_reference_model", "set_seed"]
