"""Normalising the reward model's scores before they become PPO rewards (`reward_norm`).

A reward model's scores have an arbitrary offset and scale (the Bradley-Terry loss only sees
differences), so the same `kl_coef` is a strong or a negligible penalty depending on the model.
Normalising the raw scores to zero mean and unit variance makes the KL coefficient and
`reward_scale` mean the same thing for every reward model:

    none:     r = s
    batch:    r = (s - mean(s_batch)) / (std(s_batch) + eps)
    running:  r = (s - mu_t) / (sigma_t + eps),  mu_t, sigma_t over every score seen so far
              (this batch included), as TRL's `use_score_norm` and OpenRLHF's `normalize_reward`

The running moments use Chan et al.'s parallel update ("Updating formulae and a pairwise
algorithm for computing sample variances", 1979), the batch form of Welford's algorithm: for the
moments (n_a, mean_a, M2_a) so far and (n_b, mean_b, M2_b) of a new batch, with d = mean_b - mean_a,

    n = n_a + n_b,  mean = mean_a + d * n_b / n,  M2 = M2_a + M2_b + d^2 * n_a * n_b / n,
    var = M2 / (n - 1)

Under several processes the batch's count, sum and sum of squares are all-reduced first, so every
process holds the same moments (and normalises with the same numbers).
"""

from __future__ import annotations

import math

import torch

from marl import dist
from marl.names import REWARD_NORMS

__all__ = ["REWARD_NORMS", "RunningMoments", "batch_moments", "normalize_scores"]

EPS = 1e-8


def batch_moments(x: torch.Tensor) -> tuple[float, float, float]:
    """(n, mean, M2) of the scores x (n,), over every process's x when several run. The sums are reduced on
    x's device (NCCL cannot all-reduce a CPU tensor)."""
    x = x.detach().double()
    t = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x ** 2).sum()])
    if dist.world_size() > 1:
        dist.all_reduce_sum([t])
    n, s, sq = (float(v) for v in t.cpu())
    mean = s / n
    return n, mean, max(sq - n * mean * mean, 0.0)


class RunningMoments:
    """Running count, mean and sum of squared deviations (M2) of every score seen (module docstring)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        """Fold the scores x (n,) into the moments (Chan et al.'s parallel update)."""
        n_b, mean_b, m2_b = batch_moments(x)
        n = self.count + n_b
        d = mean_b - self.mean
        self.mean += d * n_b / n
        self.m2 += m2_b + d * d * self.count * n_b / n
        self.count = n

    @property
    def std(self) -> float:
        """Sample standard deviation (0 for fewer than two scores)."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def normalize_scores(scores: torch.Tensor, mode: str, moments: RunningMoments | None = None) -> torch.Tensor:
    """The scores (n,) normalised per `mode` (none | batch | running); `running` first folds them into
    `moments`. One score alone in a batch is centred only (its std is undefined)."""
    if mode == "none":
        return scores
    if mode == "batch":
        n, mean, m2 = batch_moments(scores)
        std = math.sqrt(m2 / (n - 1)) if n > 1 else 0.0
    elif mode == "running":
        if moments is None:
            raise ValueError("reward_norm running needs the policy's RunningMoments")
        moments.update(scores)
        mean, std = moments.mean, moments.std
    else:
        raise ValueError(f"reward_norm must be one of {', '.join(REWARD_NORMS)}, got {mode!r}")
    return (scores - mean) / (std + EPS) if std > 0 else scores - mean
