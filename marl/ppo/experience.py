"""One iteration's experience of one policy, and the plan of the update passes that consume it.

`make_experience` turns a policy's rows of a rollout, once they are scored and passed through the
reference and the old policy, into one `Experience` (as OpenRLHF's experience maker and torchtune's
`Trajectory` do); the trainer's `update` reads only that record. `plan_passes` deals the
micro-batches of several policies into shared forward/backward passes.

Shapes: ``B`` rows of the rollout, ``b`` rows of one policy, ``R`` response tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from marl.config import PPOArgs, ResolvedPolicy
from marl.ppo.advantages import Reduce, compute_token_rewards, gae, masked_whiten
from marl.ppo.estimators import critic_free_advantages
from marl.ppo.losses import returns_scale
from marl.ppo.rollout import Rollout, ends_with_stop


@dataclass
class Experience:
    """Everything one policy's PPO update and its metrics read from one rollout (all detached but `first_pass`)."""

    policy: str
    rollout: Rollout  # the generation of every policy; the model passes read this policy's `rows` of it
    rows: Tensor  # (b,) this policy's rows of `rollout`
    response_ids: Tensor  # (b, R) padding after the first EOS
    mask: Tensor  # (b, R) float: 1 on the response up to and including the first EOS
    old_logprobs: Tensor  # (b, R) under the policy before this update (the ratio's denominator)
    ref_logprobs: Tensor  # (b, R) under the reference (frozen sft adapter, or the bare base)
    values: Tensor | None  # (b, R) the critic's values before this update; None without a critic
    components: dict[str, Tensor]  # raw reward components, name -> (b,) (reward model, reward functions)
    scores: Tensor  # (b,) the combined score (weights, normalisation, clipping applied)
    kl: Tensor  # (b, R) per-token KL estimate to the reference (0 on padding)
    kl_coef: float  # the KL coefficient: the controller's (KL in the reward) or beta (KL in the loss)
    token_rewards: Tensor  # (b, R) -kl_coef * kl per token, the score added at the last one
    advantages: Tensor  # (b, R)
    returns: Tensor | None  # (b, R) the value targets (GAE); None without a critic
    returns_scale: float = 1.0  # the value loss's divisor (value_loss_norm: the policy's return variance, >= 1)
    # (log-probs, values, entropies) with their graph of the update's first micro-batch, rows `first_rows` (indices
    # into `rows`), when its forward gave their old_logprobs and values (Learner.first_rows); the update's first
    # micro-batch reads it instead of a forward
    first_pass: tuple[Tensor, Tensor, Tensor] | None = None
    first_rows: Tensor | None = None

    def sequence_kl(self) -> Tensor:
        """(b,) the KL of each response: its per-token KL summed over the response."""
        return (self.kl * self.mask).sum(1)

    def has_eos(self, stop_ids: int | Collection[int]) -> Tensor:
        """(b,) whether each response ended with a stop token (rather than at max_new_tokens)."""
        return ends_with_stop(self.response_ids, self.mask, stop_ids)


def make_experience(policy: ResolvedPolicy, cfg: PPOArgs, rollout: Rollout, rows: Tensor, scores: Tensor,
                    ref_logprobs: Tensor, old_logprobs: Tensor, values: Tensor, kl_coef: float,
                    components: dict[str, Tensor] | None = None, reduce: Reduce | None = None) -> Experience:
    """The `Experience` of `policy` from its `rows` of `rollout`, always built in this order:

    1. its rows' scores, reference log-probs and reward components (given for every row: (B,), (B, R));
    2. KL-penalised token rewards from the old and reference log-probs (Ziegler et al. 2019, eq. 2),
       with `kl_coef` (the KL controller's value) when the KL goes into the reward, none when it goes
       into the loss (`kl_in: loss`, GRPO's beta * k3: `MultiPolicyPPOTrainer._losses`);
    3. advantages and returns by the policy's estimator: GAE on its critic's `values` (whitened if
       `whiten_advantages`), or a critic-free one (marl.ppo.estimators; no values, no returns);
    4. the value loss's divisor (`value_loss_norm`): the variance of all its returns, once, so that every
       micro-batch and every piece of a shared pass divides by the same number.

    `old_logprobs` and `values` (b, R) are the rows' own, from the trainer's old-policy pass. With `reduce`
    (several processes: marl.dist.sum_over_processes) the batch statistics of steps 3 and 4 (whitening,
    REINFORCE++'s normalisation, the returns' variance) are those of every process's rows together.
    """
    mask = rollout.response_mask[rows].float()
    in_reward = policy.kl_in == "reward"
    tr = compute_token_rewards(scores[rows], old_logprobs, ref_logprobs[rows], mask, kl_coef if in_reward else 0.0,
                               cfg.kl_estimator)
    scale = 1.0
    if policy.has_critic:
        adv = gae(tr.rewards, values, mask, cfg.gamma, policy.gae_lambda)
        advantages = masked_whiten(adv.advantages, mask, reduce=reduce) if cfg.whiten_advantages else adv.advantages
        returns = adv.returns
        if cfg.value_loss_norm:
            scale = returns_scale(returns, mask, reduce)
    else:
        advantages = critic_free_advantages(policy.advantage_estimator, tr.rewards, mask, policy.group_size,
                                            policy.scale_rewards, reduce)
        values = returns = None
    return Experience(
        policy=policy.name, rollout=rollout, rows=rows, response_ids=rollout.response_ids[rows], mask=mask,
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs[rows], values=values,
        components={k: v[rows] for k, v in (components or {}).items()}, scores=scores[rows], kl=tr.kl,
        kl_coef=kl_coef if in_reward else policy.beta, token_rewards=tr.rewards, advantages=advantages,
        returns=returns, returns_scale=scale)


@dataclass(frozen=True)
class Segment:
    """The rows of one policy's micro-batch that one shared pass holds, and how they count."""

    policy: str
    micro: int  # which micro-batch of the policy's minibatch
    rows: Tensor  # (k,) indices into the policy's experience rows, in micro-batch order
    share: float  # their tokens / the micro-batch's tokens: the weight of their statistics
    loss_weight: float  # the factor of their loss (a mean over their tokens) in the minibatch's loss


def loss_weight(tokens: Tensor | float, norm: float) -> float:
    """The factor of a loss averaged over `tokens` valid tokens in its minibatch's loss: tokens / `norm`, where
    `norm` is the minibatch's valid tokens (its loss a token mean) or Dr. GRPO's constant (a token sum over
    it). 0 for no token."""
    return float(tokens) / max(norm, 1.0)


def plan_passes(micro_batches: dict[str, list[Tensor]], tokens: dict[str, Tensor], cap: int,
                norms: Mapping[str, float] | None = None) -> list[list[Segment]]:
    """Deal the micro-batches of several policies' minibatches into shared forward/backward passes.

    The rows (policy, micro-batch, row) are dealt policy by policy, `cap` rows per pass: each policy's rows
    fill consecutive passes, so its minibatch is whole after as few passes as possible and the update can
    step its optimizer and free its gradients then (one policy's gradients at a time, not every policy's).
    Within a pass the policies keep their order (each one's rows contiguous, as the stacked-LoRA pass needs)
    and each one's rows their micro-batch order. A segment's loss (the mean over its valid tokens)
    is weighted by `loss_weight`: its tokens over the policy's `norms` (by default the tokens of the
    policy's whole minibatch), so the summed gradients are those of the minibatch's token mean however
    its rows are split, the same as the per-policy update's. A Dr. GRPO policy's norm is its constant
    (its loss a token sum over it).

    Args:
        micro_batches: policy -> its micro-batches, each a tensor of indices into its rows.
        tokens: policy -> (b,) response tokens of each of its rows.
        cap: the most rows one pass holds.
        norms: policy -> the divisor of its minibatch's loss (default: the minibatch's tokens).

    Returns:
        The passes in order, each a list of segments (at most `cap` rows in all).
    """
    names = list(micro_batches)
    totals = {n: [float(tokens[n][c].sum()) for c in micro_batches[n]] for n in names}
    norms = {n: sum(totals[n]) for n in names} | dict(norms or {})
    order = [(n, ci, int(i)) for n in names for ci, c in enumerate(micro_batches[n]) for i in c]
    passes = []
    for s in range(0, len(order), cap):
        grouped: dict[tuple[str, int], list[int]] = {}
        for n, ci, i in order[s:s + cap]:  # already policy by policy, each one's rows in micro-batch order
            grouped.setdefault((n, ci), []).append(i)
        segments = []
        for (n, ci), idx in grouped.items():
            rows = torch.tensor(idx)
            seg_tokens = float(tokens[n][rows].sum())
            share = seg_tokens / max(totals[n][ci], 1.0)
            segments.append(Segment(n, ci, rows, share, loss_weight(seg_tokens, norms[n])))
        passes.append(segments)
    return passes
