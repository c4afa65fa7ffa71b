"""Rewards, KL penalties and advantages for token-level PPO on language models.

Pure torch functions, no state. Shapes use ``B`` for batch (sequences) and ``T``
for response length. Every ``mask`` is a (B, T) tensor of 0/1 (or bool) with 1 on
valid response tokens and 0 on padding / tokens after EOS.

Masked-out entries are never read arithmetically: they are selected away with
``torch.where`` rather than multiplied by 0, so ``nan``/``inf`` garbage at padded
positions (e.g. values from a critic on pad tokens) cannot leak into results.

References
----------
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2.
- Stiennon et al. 2020, "Learning to summarize from human feedback", section 3.4.
- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
  Advantage Estimation", eq. 16.
- Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from marl.names import KL_ESTIMATORS

__all__ = [
    "KL_ESTIMATORS",
    "Advantages",
    "TokenRewards",
    "compute_token_rewards",
    "gae",
    "kl_penalty",
    "masked_mean",
    "masked_moments",
    "masked_var",
    "masked_whiten",
]

Reduce = Callable[[Tensor], Tensor]  # a tensor -> its sum over every process (marl.dist.sum_over_processes)
K3_LOG_RATIO_MAX = 10.0  # k3's log r is clamped to +-10 (kl_penalty)


class TokenRewards(NamedTuple):
    """Output of :func:`compute_token_rewards` (both detached)."""

    rewards: Tensor
    """(B, T) per-token reward: -kl_coef * kl, plus the score at the last valid token."""
    kl: Tensor
    """(B, T) per-token KL estimate, 0 at masked positions."""


class Advantages(NamedTuple):
    """Output of :func:`gae` (both detached)."""

    advantages: Tensor
    """(B, T) GAE advantages A_t, 0 at masked positions."""
    returns: Tensor
    """(B, T) value targets R_t = A_t + V(s_t), 0 at masked positions."""


# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is nonzero.

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape as ``x`` (0/1 or bool).
        dim: reduce over this dimension only; ``None`` reduces over all entries.

    Returns:
        Scalar if ``dim`` is None, else ``x`` reduced over ``dim``. Where the mask
        has no valid entry the result is 0 (not nan): an all-padding batch must not
        poison a loss.
    """
    m = mask.bool()
    total = torch.where(m, x, torch.zeros_like(x))
    count = m.to(x.dtype)
    if dim is None:
        total, count = total.sum(), count.sum()
    else:
        total, count = total.sum(dim), count.sum(dim)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all entries where ``mask`` is nonzero (scalar).

    With ``unbiased=True`` Bessel's correction n / (n - 1) is applied, where n is
    the number of valid entries. For n <= 1 the correction is skipped (variance 0)
    instead of dividing by zero, so tiny or empty batches don't crash training.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum().to(var.dtype)
        bessel = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
        var = var * bessel
    return var


def masked_moments(x: Tensor, mask: Tensor, reduce: Reduce | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Count n, mean and sum of squared deviations M2 of ``x`` over the entries where ``mask`` is nonzero.

    With ``reduce`` (a function that returns its tensor summed over every process, e.g. under DDP) they
    are the moments of every process's entries together: the sums and counts are reduced first, then
    the squared deviations about that common mean, so that k processes = 1 process on all the rows.

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape as ``x`` (0/1 or bool).
        reduce: None (this process's entries only) or ``t -> sum of t over the processes``.

    Returns:
        Scalars (n, mean, M2); mean and M2 are 0 where no entry is valid.
    """
    reduce = reduce or (lambda t: t)
    m = mask.bool()
    zeros = torch.zeros_like(x)
    n, total = reduce(torch.stack([m.to(x.dtype).sum(), torch.where(m, x, zeros).sum()]))
    mean = total / n.clamp(min=1)
    m2 = reduce(torch.where(m, (x - mean) ** 2, zeros).sum())
    return n, mean, m2


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, reduce: Reduce | None = None) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance using only masked entries.

    Args:
        x: (B, T) values, e.g. advantages.
        mask: (B, T) 0/1 mask; statistics are computed over its nonzero entries.
        shift_mean: if False, the mean is added back (only the scale is normalised),
            as in old TRL's ``masked_whiten``.
        reduce: the statistics over every process's entries (:func:`masked_moments`), or None.

    Returns:
        (B, T) whitened ``x``; masked-out entries are 0.
    """
    m = mask.bool()
    n, mean, m2 = masked_moments(x, m, reduce)
    var = m2 / (n - 1).clamp(min=1)  # unbiased (Bessel), as masked_var; n <= 1: 0
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened))


# --------------------------------------------------------------------------- KL and rewards


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs.

    Tokens are sampled from pi, so with log r = log pi_ref(y) - log pi(y):

    - ``"k1"``: -log r = logp - logp_ref. Unbiased, high variance, can be negative.
    - ``"k3"``: (r - 1) - log r. Unbiased and always >= 0 (Schulman 2020,
      "Approximating KL divergence"). log r is clamped to [-K3_LOG_RATIO_MAX, K3_LOG_RATIO_MAX]
      first (OpenRLHF's bound, 10): r = exp(log r) overflows float32 past log r ~ 88, so one token
      the policy has all but ruled out would make the KL, and the loss, inf.
    - ``"abs"``: |logp - logp_ref| (old TRL).
    - ``"mse"``: 0.5 * (logp - logp_ref)^2, i.e. k2 (old TRL).

    k1, abs and mse take no exponential: finite for finite log-probs, and left unclamped.

    Args:
        logprobs: (B, T) log pi(y_t | ...) of the policy that sampled.
        ref_logprobs: (B, T) log pi_ref(y_t | ...) of the frozen reference.
        estimator: one of :data:`KL_ESTIMATORS`.

    Returns:
        (B, T) per-token KL estimate (not masked).
    """
    log_ratio = logprobs - ref_logprobs  # = -log r
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        log_r = (-log_ratio).clamp(-K3_LOG_RATIO_MAX, K3_LOG_RATIO_MAX)
        return torch.expm1(log_r) - log_r  # expm1: exact near r = 1 where the KL is tiny
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "mse":
        return 0.5 * log_ratio.square()
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def compute_token_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    estimator: str = "k1",
) -> TokenRewards:
    """KL-shaped per-token rewards (Ziegler et al. 2019, eq. 2; Stiennon et al. 2020).

    R(x, y) = r(x, y) - beta * KL, spread over tokens: every valid token t gets
    -beta * kl_t, and the sequence score r(x, y) is added at the last valid token
    (the reward model only judges complete responses).

    Args:
        scores: (B,) reward-model score per sequence.
        logprobs: (B, T) sampled-token log-probs under the rollout policy.
        ref_logprobs: (B, T) same tokens under the reference policy.
        mask: (B, T) 1 on valid response tokens.
        kl_coef: beta, float or 0-dim tensor.
        estimator: KL estimator, see :func:`kl_penalty`.

    Returns:
        TokenRewards(rewards (B, T), kl (B, T)), detached, 0 at masked positions.
        Rows with no valid token get all-zero rewards (their score is dropped).
    """
    m = mask.bool()
    zeros = torch.zeros_like(logprobs)
    kl = torch.where(m, kl_penalty(logprobs, ref_logprobs, estimator), zeros).detach()
    rewards = -kl_coef * kl

    # Last valid index per row: the argmax of position * mask. Works for right
    # padding and for holes inside the mask; rows with no valid token are handled
    # by zeroing their score instead of branching on them.
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(m)
    last = torch.where(m, positions, torch.full_like(positions, -1)).amax(dim=-1)  # (B,)
    has_valid = last >= 0
    score = torch.where(has_valid, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    rewards = rewards.scatter_add(-1, last.clamp(min=0).unsqueeze(-1), score.unsqueeze(-1))
    return TokenRewards(rewards=rewards.detach(), kl=kl)


# --------------------------------------------------------------------------- GAE


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Advantages:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16).

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = sum_l (gamma * lam)^l * delta_{t+l}
        R_t     = A_t + V(s_t)                      (value-function target)

    The sequence of a row is its valid (mask = 1) positions in order; masked
    positions are skipped entirely, so their rewards and values are never read and
    they do not cut the recursion (a hole in the mask is bridged). The value after
    the last valid token is 0 because the episode ends there (EOS / max length).

    Vectorised over the batch, loops over time in reverse (T is a few hundred; the
    recursion is inherently sequential).

    Args:
        rewards: (B, T) per-token rewards, e.g. from :func:`compute_token_rewards`.
        values: (B, T) critic values V(s_t) at the rollout.
        mask: (B, T) 1 on valid response tokens.
        gamma: discount.
        lam: GAE lambda (bias/variance trade-off).

    Returns:
        Advantages(advantages (B, T), returns (B, T)), detached, 0 at masked positions.
    """
    rewards, values = rewards.detach(), values.detach()
    m = mask.bool()
    B, T = rewards.shape
    zeros = rewards.new_zeros(B)
    next_value = zeros  # V(s_{t+1}) of the next *valid* position; 0 past the end
    next_adv = zeros  # A_{t+1} of the next valid position
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        valid = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        # Carry state through masked positions unchanged, so they are invisible.
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv_t, next_adv)
        advantages[:, t] = torch.where(valid, adv_t, zeros)
    returns = torch.where(m, advantages + values, torch.zeros_like(values))
    return Advantages(advantages=advantages, returns=returns)
