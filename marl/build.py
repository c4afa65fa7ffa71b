"""Building the PPO model: one base, the reward adapter, the sft reference, and per policy
a LoRA adapter with its value head or critic adapter, as `marl ppo` trains them.

The ppo stage, the Agent and the benchmarks build it here, so a policy starts from the
same weights (drawn under its seed) wherever it is trained.
"""

from __future__ import annotations

import torch

from marl.config import PPOArgs, ResolvedPolicy, critic_name
from marl.model import MultiAdapterModel

REWARD = "reward"
SFT = "sft"


def add_policy(model: MultiAdapterModel, cfg: PPOArgs, spec: ResolvedPolicy, init_from: str | None = None) -> None:
    """Policy `spec.name`: a LoRA adapter (dropout 0: PPO ratios need a deterministic policy) drawn
    under `spec.seed`, or a copy of adapter `init_from`; with a critic (GAE), its value head, or
    with `value_model: adapter` a critic adapter started from the policy or the reward adapter. Under
    `schedule: pbt` every policy gets a value head, so that any policy can take over any other's weights
    and optimizer state (a critic-free one leaves its head untrained until it copies a GAE policy).

    Seeds the global RNG (as `torch.manual_seed`); wrap in `torch.random.fork_rng()` to keep it.
    """
    torch.manual_seed(spec.seed)
    model.add_adapter(spec.name, cfg.lora_config(dropout=0.0), role="policy", init_from=init_from,
                      value_head=spec.has_critic or cfg.schedule == "pbt")
    if cfg.value_model == "adapter" and spec.has_critic:
        model.add_critic(spec.name, critic_name(spec.name), cfg.lora_config(dropout=0.0),
                         init_from=REWARD if cfg.critic_init == "reward" else spec.name)


def build_ppo_model(cfg: PPOArgs, specs: list[ResolvedPolicy], reward: str, sft: str | None = None, *,
                    model: MultiAdapterModel | None = None) -> tuple[MultiAdapterModel, str | None]:
    """(model, reference adapter or None): the base of `cfg` (or `model`, a base already loaded,
    e.g. on a device or checked against a run), adapter `reward` with its score head, adapter
    `sft` frozen as the reference (None: the bare base is the reference), and every policy of
    `specs` (`add_policy`), each started from the sft weights when its `init_from_sft` says so.
    The model is in eval mode; the trainer switches modes itself.
    """
    if model is None:
        model = MultiAdapterModel.from_pretrained(cfg.model_name_or_path, **cfg.model_kwargs())
    model.load_adapter(reward, REWARD, role="reward", score_index=cfg.reward_score_index)
    ref = model.load_adapter(sft, SFT, role="sft") if sft is not None else None
    for spec in specs:
        add_policy(model, cfg, spec, init_from=ref if (spec.init_from_sft and ref) else None)
    model.eval()
    return model, ref
