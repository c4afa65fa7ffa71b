"""PPO losses and the log-prob / entropy helpers they need.

Pure torch functions. Shapes: ``B`` batch, ``T`` response length, ``V`` vocabulary.
``mask`` is (B, T) with 1 on valid response tokens. Losses are masked means over
valid tokens (every token weighs the same, whatever its sequence's length).
Statistics are returned detached; only ``loss`` carries a graph.

References
----------
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 (clip) and
  eq. 9 (value term).
- cleanrl ``ppo.py`` and old TRL ``PPOTrainer`` for the clipped value loss.
- Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from marl.ppo.advantages import Reduce, masked_mean, masked_moments

__all__ = [
    "PolicyLoss",
    "ValueLoss",
    "entropy_from_logits",
    "logprobs_from_logits",
    "policy_loss",
    "returns_scale",
    "value_loss",
]


class PolicyLoss(NamedTuple):
    """Output of :func:`policy_loss`; every field but ``loss`` is detached."""

    loss: Tensor
    """Scalar clipped surrogate loss (to minimise)."""
    clipfrac: Tensor
    """Scalar fraction of valid tokens with |ratio - 1| > clip_coef."""
    approx_kl: Tensor
    """Scalar k3 estimate of KL(pi_old || pi): mean((ratio - 1) - log ratio)."""
    ratio_mean: Tensor
    """Scalar mean of pi / pi_old over valid tokens."""


class ValueLoss(NamedTuple):
    """Output of :func:`value_loss`; ``clipfrac`` is detached."""

    loss: Tensor
    """Scalar value loss 0.5 * masked mean of the (clipped) squared error."""
    clipfrac: Tensor
    """Scalar fraction of valid tokens where the clipped error is the larger one."""


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits)``.

    log p(y) = logit_y - logsumexp(logits). Computed in float32 even for bf16/fp16
    logits (bf16 has ~3 significant digits; ratios exp(logp - logp_old) would be
    noise). Gathering then subtracting avoids materialising a second (B, T, V)
    log-softmax tensor; for low-precision logits rows are upcast one at a time so
    the float32 copy is (T, V) rather than (B, T, V).

    Args:
        logits: (B, T, V) next-token logits aligned with ``labels``.
        labels: (B, T) int64 token ids; must be valid indices everywhere (put any
            id, e.g. 0, at padded positions and mask the result).

    Returns:
        (B, T) float32 log-probs, differentiable w.r.t. ``logits``.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy H = -sum_v p_v log p_v of ``softmax(logits)`` at each position.

    Uses H = logsumexp(z) - sum_v p_v z_v, which never takes log of a tiny p. Computed
    in float32.

    Args:
        logits: (B, T, V).

    Returns:
        (B, T) entropies in nats (log V for a uniform distribution).
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_coef: float = 0.2,
) -> PolicyLoss:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated for minimisation.

        ratio_t = pi(y_t) / pi_old(y_t)
        L = -mean_t min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t)

    Gradients flow only through ``logprobs``: ``old_logprobs`` and ``advantages`` are
    detached here so a caller can't accidentally backprop into the rollout.

    Args:
        logprobs: (B, T) log pi(y_t) under the current policy (with grad).
        old_logprobs: (B, T) log pi_old(y_t) recorded at rollout.
        advantages: (B, T) advantage estimates, usually whitened.
        mask: (B, T) 1 on valid response tokens.
        clip_coef: eps in the clip range [1 - eps, 1 + eps].

    Returns:
        PolicyLoss(loss, clipfrac, approx_kl, ratio_mean), all scalars.
    """
    m = mask.bool()
    # Zero the log-ratio at padded positions *before* exp: garbage there would
    # otherwise give inf, and inf * 0 = nan in both forward and backward.
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    # max of the negated objectives == min of the objectives (pessimistic bound).
    loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), m)

    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1.0).abs() > clip_coef).to(ratio.dtype), m)
        # k3 estimator of KL(pi_old || pi) on samples from pi_old: unbiased, >= 0,
        # lower variance than -log ratio (http://joschu.net/blog/kl-approx.html).
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, m)
        ratio_mean = masked_mean(ratio, m)
    return PolicyLoss(loss=loss, clipfrac=clipfrac, approx_kl=approx_kl, ratio_mean=ratio_mean)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_coef: float | None = 0.2,
) -> ValueLoss:
    """Clipped value loss, as in cleanrl ``ppo.py`` and old TRL.

        v_clip = old_v + clip(v - old_v, -eps, eps)
        L = 0.5 * mean_t max((v - R)^2, (v_clip - R)^2)

    Clipping keeps the critic from moving further than ``eps`` from its rollout
    values in a step, mirroring the policy clip. With ``clip_coef=None`` this is
    plain 0.5 * MSE (Schulman et al. 2017, eq. 9) and ``clipfrac`` is 0.

    Args:
        values: (B, T) current critic values (with grad).
        old_values: (B, T) critic values recorded at rollout.
        returns: (B, T) targets, e.g. :attr:`Advantages.returns`.
        mask: (B, T) 1 on valid response tokens.
        clip_coef: eps, or None to disable clipping.

    Returns:
        ValueLoss(loss, clipfrac), scalars. ``clipfrac`` is the fraction of valid
        tokens where the clipped error is strictly larger, i.e. where clipping
        actually changed the gradient (old TRL's ``vf_clipfrac``).
    """
    m = mask.bool()
    zeros = torch.zeros_like(values)
    # Sanitise padded positions so garbage there can't produce nan gradients.
    v = torch.where(m, values, zeros)
    old_v = torch.where(m, old_values.detach(), zeros)
    ret = torch.where(m, returns.detach(), zeros)

    err_unclipped = (v - ret).square()
    if clip_coef is None:
        return ValueLoss(loss=0.5 * masked_mean(err_unclipped, m), clipfrac=v.new_zeros(()))
    v_clipped = old_v + torch.clamp(v - old_v, -clip_coef, clip_coef)
    err_clipped = (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), m)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err_unclipped).to(v.dtype), m)
    return ValueLoss(loss=loss, clipfrac=clipfrac)


def returns_scale(returns: Tensor, mask: Tensor, reduce: Reduce | None = None) -> float:
    """max(1, variance of the returns on valid tokens): the divisor of the value loss with
    `value_loss_norm: true`, so that the value loss no longer grows with the square of the rewards.

    A large KL coefficient makes every token's reward large; a value head on the policy's own LoRA
    then sees a value loss of 1e2-1e5 whose gradient moves the policy (docs/kl-control.md). Dividing by the return variance keeps that loss O(1); below a variance of 1
    nothing changes. The trainer takes it once per policy per iteration, over all of the policy's
    rows (`make_experience`; with `reduce`, every process's rows: `masked_moments`), so that every
    micro-batch and every piece of a shared pass divides by the same number.

    Args:
        returns: (B, T) value targets.
        mask: (B, T) 1 on valid response tokens.
        reduce: see :func:`marl.ppo.advantages.masked_moments`.
    """
    n, _, m2 = masked_moments(returns.detach().float(), mask, reduce)
    return max(1.0, float(m2 / n)) if n > 0 else 1.0
