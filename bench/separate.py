"""The baseline marl replaces: PPO with a separate full model copy per role.

    from bench.separate import SeparateCopiesPPO

For each policy, one copy of the base is the policy and another is the value network
(the layout TRL's PPOTrainer required from 0.12 on: policy, value, reference and reward
are four models); one frozen copy is the reference (the bare base, as marl's reference
when there is no sft adapter) and one the reward model (base + the reward adapter and
its score head). Frozen copies are shared by all policies, which only favours this
baseline.

The algorithm is marl's because it is marl's code: each policy has its own
`MultiPolicyPPOTrainer`, which samples its prompts, generates, scores, makes the
experience, updates and steps its KL controller exactly as in `marl ppo`; only the model
it sees differs (`_Copies`: the policy copy generates and gives the log-probs, the value
copy the values, the reward copy the scores), and the reference log-probs come from the
reference copy. With `train="lora"` the policy and value copies train a LoRA (initialised
exactly as marl initialises the policy's, same seed); with `train="full"` they train every
weight, as TRL's PPOTrainer does without peft.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from bench.common import own_weights
from marl.config import PPOArgs, ResolvedPolicy
from marl.model import MultiAdapterModel, position_ids_from_mask
from marl.heads import lm_head_fn
from marl.ppo.rollout import reference_logprobs
from marl.ppo.trainer import MultiPolicyPPOTrainer

REWARD = "reward"


class _Copies:
    """What a `MultiPolicyPPOTrainer` of one policy calls on its model, served by separate copies:
    generation, log-probs and the LM head from the policy copy, values from the value copy (its
    LoRA and value head, or a plain head when training every weight), scores from the reward copy."""

    def __init__(self, policy: MultiAdapterModel, value: MultiAdapterModel, reward: MultiAdapterModel,
                 adapter: str | None, head: nn.Linear | None, params: list[nn.Parameter]):
        self.policy, self.value, self.reward, self.adapter, self.head, self.params = (
            policy, value, reward, adapter, head, params)
        self.tokenizer, self.device, self.base = policy.tokenizer, policy.device, policy.base
        self.stop_token_ids = policy.stop_token_ids
        self.critic_of: dict[str, str] = {}  # the value copy is not an adapter of the policy's model

    def generate(self, input_ids, attention_mask, adapter_names=None, **gen_kwargs):
        return self.policy.generate(input_ids, attention_mask, adapter_names=self.adapter, **gen_kwargs)

    def score_texts(self, texts, **kwargs) -> torch.Tensor:
        return self.reward.score_texts(texts, **kwargs)

    def score_completions(self, prompts, completions, batch_size: int = 32, **kwargs) -> torch.Tensor:
        return self.reward.score_completions(prompts, completions, batch_size, **kwargs)

    def stacked_layout(self, names) -> None:
        """One policy on its own copies: nothing to stack."""
        return None

    def lm_head(self, names):
        """The policy copy's LM head (hidden -> logits), as `MultiAdapterModel.lm_head`."""
        return self.policy.lm_head(self.adapter)

    def policy_forward(self, name: str, input_ids, attention_mask, lm_head: bool = True):
        """As `MultiAdapterModel.policy_forward`: hidden states (B, T, H) or logits, and values (B, T)."""
        pos = position_ids_from_mask(attention_mask)
        with self.policy.use_adapter(self.adapter):
            hidden = self.policy.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                          use_cache=False).last_hidden_state
        if self.head is None:  # the value copy's LoRA and value head
            values = self.value.policy_forward(self.adapter, input_ids, attention_mask, lm_head=False)[1]
        else:
            h = self.value.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                    use_cache=False).last_hidden_state
            values = self.head(h.to(self.head.weight.dtype)).squeeze(-1)
        return (lm_head_fn(self.base)(hidden) if lm_head else hidden), values

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        return self.params

    def set_trainable(self, names) -> None:
        """Trainability was set when the copies were made."""

    def lora_layers(self) -> list[nn.Module]:
        return self.policy.lora_layers() if self.adapter is not None else []

    def train(self, mode: bool = True) -> _Copies:
        for m in (self.policy, self.value, self.head):
            if m is not None:
                m.train(mode)
        return self

    def eval(self) -> _Copies:
        return self.train(False)

    def modules(self):
        """Every module of the copies a policy trains with (the update turns their dropout off)."""
        for m in (self.policy, self.value, self.head):
            if m is not None:
                yield from m.modules()

    @contextlib.contextmanager
    def eval_mode(self):
        was_training = self.policy.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)


@dataclass
class _Policy:
    copies: _Copies
    trainer: MultiPolicyPPOTrainer  # of this one policy, on its copies


class SeparateCopiesPPO:
    """PPO for `policies` with 2 full copies per policy + a reference copy + a reward copy.

    Args:
        base: path of the base model (loaded with `MultiAdapterModel.from_pretrained` once per copy).
        reward_adapter: path of the reward adapter (with its score head).
        cfg, policies, prompt_ids: as for `MultiPolicyPPOTrainer`.
        train: "lora" (same trainable parameters as marl) or "full" (every weight of policy and value).
        load_kwargs: extra `from_pretrained` kwargs (quantization, device_map).
    """

    def __init__(self, base: str, reward_adapter: str, cfg: PPOArgs, policies: list[ResolvedPolicy],
                 prompt_ids: list[list[int]], train: str = "lora", load_kwargs: dict | None = None):
        if train not in ("lora", "full"):
            raise ValueError(f"train must be lora or full, not {train!r}")
        self.cfg = cfg

        def load() -> MultiAdapterModel:
            m = MultiAdapterModel.from_pretrained(base, **(load_kwargs or {}))
            own_weights(m.base)  # a copy is a copy: not pages shared with the others through the file
            return m

        self.reward = load()
        self.reward.load_adapter(reward_adapter, REWARD, role="reward")
        self.reward.eval()
        self.ref = load().eval()
        self.roles: dict[str, _Policy] = {}
        for p in policies:
            policy, value = load(), load()
            if train == "lora":
                # marl: torch.manual_seed(seed); add_adapter(name) draws the LoRA, then the value head
                torch.manual_seed(p.seed)
                policy.add_adapter(p.name, cfg.lora_config(dropout=0.0), role="policy", value_head=False)
                torch.manual_seed(p.seed)
                value.add_adapter(p.name, cfg.lora_config(dropout=0.0), role="policy", value_head=True)
                head, adapter = None, p.name
                params = policy.trainable_parameters(p.name) + value.trainable_parameters(p.name)
            else:
                head, adapter = nn.Linear(value.hidden_size, 1).to(value.device), None
                with torch.no_grad():
                    head.weight.normal_(0.0, 1.0 / (value.hidden_size + 1))
                    head.bias.zero_()
                for m in (policy, value):
                    m.base.requires_grad_(True)
                params = list(policy.base.parameters()) + list(value.base.parameters()) + list(head.parameters())
            copies = _Copies(policy, value, self.reward, adapter, head, params).eval()
            self.roles[p.name] = _Policy(copies, MultiPolicyPPOTrainer(copies, cfg, [p], prompt_ids, None))
        self.step_count = 0

    @property
    def prompt_ids(self) -> list[list[int]]:
        return next(iter(self.roles.values())).trainer.prompt_ids

    @prompt_ids.setter
    def prompt_ids(self, ids: list[list[int]]) -> None:
        for r in self.roles.values():
            r.trainer.prompt_ids = ids

    def step(self) -> dict:
        """One PPO iteration of every policy (each generates, is scored and updated on its own copies)."""
        self.step_count += 1
        metrics: dict = {"step": self.step_count}
        for name, r in self.roles.items():
            t = r.trainer
            rollout = t.rollout()
            scores, _ = t.score(rollout, self.step_count)
            ref_lp = reference_logprobs(self.ref, None, rollout, self.cfg.forward_batch_size,
                                        self.cfg.logprob_chunk_tokens)
            m = t.learner.train(rollout, scores, ref_lp, self.step_count, names=[name])[name]
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
        return metrics

    def save_adapter(self, name: str, out_dir) -> None:
        """Save policy `name`'s LoRA (train="lora") in marl's adapter format."""
        r = self.roles[name]
        r.copies.policy.save_adapter(r.copies.adapter, out_dir, overwrite=True)
