"""The baseline marl replaces: PPO with a separate full model copy per role.

    from bench.separate import SeparateCopiesPPO

For each policy, one copy of the base is the policy and another is the value network
(the layout TRL's PPOTrainer required from 0.12 on: policy, value, reference and reward
are four models); one frozen copy is the reference (the bare base, as marl's reference
when there is no sft adapter) and one the reward model (base + the reward adapter and
its score head). Frozen copies are shared by all policies, which only favours this
baseline.

The algorithm is marl's, step for step (`MultiPolicyPPOTrainer.train_policy` and
`update`): the same prompt sampling, `generate_rollout`, reward scoring, reference
log-probs, `compute_token_rewards`, `gae`, `masked_whiten`, `policy_loss`, `value_loss`,
one Adam per policy over what it trains, the same clipping. The only differences are
where the weights live, and that the value comes from its own network instead of a
head on the policy's LoRA trunk. With `train="lora"` the policy and value copies train
a LoRA (initialised exactly as marl initialises the policy's, same seed); with
`train="full"` they train every weight, as TRL's PPOTrainer does without peft.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from bench.common import own_weights
from marl.config import PPOArgs, ResolvedPolicy
from marl.model import MultiAdapterModel, position_ids_from_mask
from marl.ppo.advantages import compute_token_rewards, gae, masked_mean, masked_whiten
from marl.ppo.kl import make_kl_controller
from marl.ppo.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from marl.ppo.rollout import generate_rollout, left_pad, reference_logprobs

REWARD = "reward"


@dataclass
class _Policy:
    spec: ResolvedPolicy
    policy: MultiAdapterModel  # its own full copy
    value: MultiAdapterModel  # its own full copy
    adapter: str | None  # the LoRA name on both copies (None when training all weights)
    value_head: nn.Linear
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    kl_ctl: object


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
        self.cfg, self.prompt_ids = cfg, prompt_ids

        def load() -> MultiAdapterModel:
            m = MultiAdapterModel.from_pretrained(base, **(load_kwargs or {}))
            own_weights(m.base)  # a copy is a copy: not pages shared with the others through the file
            return m

        self.reward = load()
        self.reward.load_adapter(reward_adapter, REWARD, role="reward")
        self.reward.eval()
        self.ref = load().eval()
        self.copies = 2 + 2 * len(policies)
        self.roles: dict[str, _Policy] = {}
        for p in policies:
            policy, value = load(), load()
            if train == "lora":
                # marl: torch.manual_seed(seed); add_adapter(name) draws the LoRA, then the value head
                torch.manual_seed(p.seed)
                policy.add_adapter(p.name, cfg.lora_config(dropout=0.0), role="policy", value_head=False)
                torch.manual_seed(p.seed)
                value.add_adapter(p.name, cfg.lora_config(dropout=0.0), role="policy", value_head=True)
                head = value.value_heads[p.name]
                params = policy.trainable_parameters(p.name) + value.trainable_parameters(p.name)
                adapter = p.name
            else:
                head = nn.Linear(value.hidden_size, 1).to(value.device)
                with torch.no_grad():
                    head.weight.normal_(0.0, 1.0 / (value.hidden_size + 1))
                    head.bias.zero_()
                for m in (policy, value):
                    m.base.requires_grad_(True)
                params = list(policy.base.parameters()) + list(value.base.parameters()) + list(head.parameters())
                adapter = None
            policy.eval()
            value.eval()
            self.roles[p.name] = _Policy(
                p, policy, value, adapter, head, params, torch.optim.Adam(params, lr=p.learning_rate),
                torch.Generator().manual_seed(p.seed), make_kl_controller(p.kl_coef, p.kl_target, cfg.kl_horizon))
        self.step_count = 0

    # ------------------------------------------------------------------ passes

    def _prompt_batch(self, r: _Policy):
        """Left-padded prompts of one policy (the trainer's sampling, policy by policy)."""
        idx = torch.randint(len(self.prompt_ids), (self.cfg.prompts_per_policy,), generator=r.generator)
        ids, mask = left_pad([self.prompt_ids[i] for i in idx.tolist()], r.policy.tokenizer.pad_token_id,
                             r.policy.device)
        return ids, mask, torch.full((len(ids),), float(r.spec.temperature))

    def _score(self, r: _Policy, rollout) -> torch.Tensor:
        tok = self.reward.tokenizer
        full = [tok.decode(i[m.bool()], skip_special_tokens=True)
                for i, m in zip(rollout.input_ids, rollout.attention_mask)]
        p, cfg = r.spec, self.cfg
        w = p.reward_weights.get("reward_model", 1.0)
        s = w * (self.reward.score_texts(full).to(rollout.response_ids.device) * p.reward_scale + p.reward_shift)
        if cfg.missing_eos_penalty is not None:
            s = s - cfg.missing_eos_penalty * (~rollout.has_eos(tok.eos_token_id)).float()
        if not torch.isfinite(s).all():
            raise RuntimeError(f"policy {p.name}: NaN or infinite reward")
        return s.clamp(-cfg.reward_clip, cfg.reward_clip) if cfg.reward_clip is not None else s

    def _passes(self, r: _Policy, ids, mask, responses, temps, prompt_len: int):
        """Log-probs (b, R), values (b, R) and tempered logits (b, R, V): policy copy and value copy."""
        with r.policy.use_adapter(r.adapter):
            logits = r.policy(ids, mask, use_cache=False).logits
        logits = logits[:, prompt_len - 1: -1] / temps.to(logits.device, logits.dtype)[:, None, None]
        with r.value.use_adapter(r.adapter):
            hidden = r.value.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                      use_cache=False).last_hidden_state
        values = r.value_head(hidden.to(r.value_head.weight.dtype)).squeeze(-1)
        return logprobs_from_logits(logits, responses), values[:, prompt_len - 1: -1], logits

    def _set_train(self, r: _Policy, mode: bool) -> None:
        r.policy.train(mode)
        r.value.train(mode)

    # ------------------------------------------------------------------ one iteration

    def train_policy(self, r: _Policy) -> dict:
        cfg = self.cfg
        ids, mask, temps = self._prompt_batch(r)
        rollout = generate_rollout(r.policy, ids, mask, [r.adapter] * len(ids), temps, cfg.max_new_tokens,
                                   cfg.top_k, cfg.top_p)
        scores = self._score(r, rollout)
        ref_lp = reference_logprobs(self.ref, None, rollout)
        P = rollout.prompt_ids.shape[1]
        b_ids, b_attn, b_resp, b_temp = rollout.input_ids, rollout.attention_mask, rollout.response_ids, temps
        rmask = rollout.response_mask.float()
        with torch.no_grad():
            self._set_train(r, False)
            old_lp, old_values, _ = self._passes(r, b_ids, b_attn, b_resp, b_temp, P)
            old_values = old_values.float()
        kl_coef = r.kl_ctl.value
        tr = compute_token_rewards(scores, old_lp, ref_lp, rmask, kl_coef, cfg.kl_estimator)
        adv = gae(tr.rewards, old_values, rmask, cfg.gamma, cfg.gae_lambda)
        advantages = masked_whiten(adv.advantages, rmask) if cfg.whiten_advantages else adv.advantages
        returns = adv.returns

        stats = defaultdict(list)
        micro = max(1, cfg.mini_batch_size // cfg.gradient_accumulation_steps)
        self._set_train(r, True)
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(b_ids), generator=r.generator)
            for start in range(0, len(b_ids), cfg.mini_batch_size):
                mb = perm[start:start + cfg.mini_batch_size]
                r.optimizer.zero_grad(set_to_none=True)
                chunks = [mb[i:i + micro] for i in range(0, len(mb), micro)]
                for c in chunks:
                    lp, v, logits = self._passes(r, b_ids[c], b_attn[c], b_resp[c], b_temp[c], P)
                    pg = policy_loss(lp, old_lp[c], advantages[c], rmask[c], cfg.clip_coef)
                    vl = value_loss(v.float(), old_values[c], returns[c], rmask[c], cfg.vf_clip_coef)
                    ent = masked_mean(entropy_from_logits(logits), rmask[c])
                    loss = pg.loss + cfg.vf_coef * vl.loss - cfg.ent_coef * ent
                    (loss / len(chunks)).backward()
                    stats["policy_loss"].append(float(pg.loss.detach()))
                    stats["value_loss"].append(float(vl.loss.detach()))
                    stats["approx_kl"].append(float(pg.approx_kl))
                torch.nn.utils.clip_grad_norm_(r.params, cfg.max_grad_norm)
                r.optimizer.step()
        self._set_train(r, False)
        seq_kl = (tr.kl * rmask).sum(1)
        r.kl_ctl.update(float(seq_kl.mean()), len(b_ids))
        return {"reward/mean": float(scores.mean()), "kl/mean": float(seq_kl.mean()), "kl/coef": kl_coef,
                **{f"ppo/{k}": sum(v) / len(v) for k, v in stats.items()}}

    def step(self) -> dict:
        """One PPO iteration of every policy (each generates, is scored and updated on its own copies)."""
        self.step_count += 1
        metrics: dict = {"step": self.step_count}
        for name, r in self.roles.items():
            metrics.update({f"{name}/{k}": v for k, v in self.train_policy(r).items()})
        return metrics

    def save_adapter(self, name: str, out_dir) -> None:
        """Save policy `name`'s LoRA (train="lora") in marl's adapter format."""
        r = self.roles[name]
        r.policy.save_adapter(r.adapter, out_dir, overwrite=True)
