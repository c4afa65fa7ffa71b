"""Critic-free advantage estimators: GRPO, Dr. GRPO, RLOO and REINFORCE++.

Pure torch functions, no state, the companions of :func:`marl.ppo.advantages.gae` for
policies trained without a value model. Shapes: ``B`` sequences, ``T`` response tokens,
``G`` samples per prompt (``num_generations``). The group estimators need the B rows laid
out as B / G consecutive groups of G samples of one prompt each.

Every estimator returns per-token advantages (B, T), detached, 0 at masked positions, so the
clipped policy loss of :mod:`marl.ppo.losses` consumes them unchanged.

References
----------
- Shao et al. 2024, "DeepSeekMath" (GRPO), section 4.1.2: outcome supervision,
  A_i = (r_i - mean(r)) / std(r) over the G samples of a prompt, the same for every token.
- Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO), section 3.2: drop the
  std division (it up-weights prompts whose samples all score alike) and the per-sequence
  length normalisation of the loss (token sums divided by a constant).
- Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization" (RLOO),
  eq. 6: the baseline of sample i is the mean reward of the other G - 1 samples.
- Hu 2025, "REINFORCE++", section 3: per-token KL-shaped rewards, the return
  G_t = sum_{s >= t} r_s (gamma = 1), then the advantages normalised over the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from marl.names import ESTIMATORS, GROUP_ESTIMATORS
from marl.ppo.advantages import Reduce, masked_whiten

__all__ = ["ESTIMATORS", "GROUP_ESTIMATORS", "critic_free_advantages", "group_advantages", "reinforce_pp_advantages"]



def group_advantages(scores: Tensor, mask: Tensor, group_size: int, estimator: str = "grpo",
                     scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """Outcome advantages of G samples per prompt, broadcast to every valid token.

    - ``"grpo"``: A_i = (r_i - mean_g r) / (std_g r + eps), std unbiased (Shao et al. 2024);
      with ``scale_by_std=False`` it is Dr. GRPO's A_i = r_i - mean_g r (Liu et al. 2025).
    - ``"rloo"``: A_i = r_i - (sum_g r - r_i) / (G - 1) = G / (G - 1) * (r_i - mean_g r)
      (Ahmadian et al. 2024).

    Args:
        scores: (B,) one reward per sequence (KL not included: with a group estimator the KL
            goes into the loss, see ``kl_in_loss``, or is subtracted from the score first).
        mask: (B, T) 1 on valid response tokens.
        group_size: G >= 2; B must be a multiple of G, each group G consecutive rows.
        estimator: ``"grpo"`` or ``"rloo"``.
        scale_by_std: GRPO only: divide by the group's std.
        eps: added to the std, so a group whose samples all score alike gets advantages 0.

    Returns:
        (B, T) advantages, detached, 0 at masked positions.
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"unknown group estimator {estimator!r}; expected one of {GROUP_ESTIMATORS}")
    B = scores.shape[0]
    if group_size < 2 or B % group_size:
        raise ValueError(f"{B} rows do not split into groups of {group_size} (need group_size >= 2 dividing B)")
    r = scores.detach().float().view(B // group_size, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        adv = centred * group_size / (group_size - 1)
    elif scale_by_std:
        adv = centred / (r.std(dim=1, keepdim=True) + eps)
    else:
        adv = centred
    m = mask.bool()
    adv = adv.reshape(B, 1).expand(B, mask.shape[1]).to(scores.dtype if scores.is_floating_point() else torch.float32)
    return torch.where(m, adv, torch.zeros_like(adv))


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, reduce: Reduce | None = None) -> Tensor:
    """REINFORCE++ advantages (Hu 2025): returns-to-go, whitened over the whole batch.

        G_t = sum_{s >= t, valid} r_s          (gamma = 1; r from compute_token_rewards)
        A_t = (G_t - mean(G)) / std(G)         mean and std over every valid token of the batch

    Args:
        token_rewards: (B, T) per-token rewards: -beta * KL_t, plus the score at the last token.
        mask: (B, T) 1 on valid response tokens.
        reduce: None, or the mean and std over every process's batch (DDP; see
            :func:`marl.ppo.advantages.masked_moments`).

    Returns:
        (B, T) advantages, detached, 0 at masked positions.
    """
    m = mask.bool()
    r = torch.where(m, token_rewards.detach(), torch.zeros_like(token_rewards))
    returns = r.flip(-1).cumsum(-1).flip(-1)  # masked entries add 0, so holes are bridged
    return masked_whiten(returns, m, reduce=reduce)


def critic_free_advantages(estimator: str, token_rewards: Tensor, mask: Tensor, group_size: int = 1,
                           scale_by_std: bool = True, reduce: Reduce | None = None) -> Tensor:
    """The advantages of a policy without a value model, from its per-token rewards.

    ``token_rewards`` are those PPO uses (:func:`marl.ppo.advantages.compute_token_rewards`): -beta * KL_t
    on every token and the score at the last one, with beta = 0 when the KL goes into the loss instead.

    - ``"grpo"`` / ``"rloo"``: the sequence reward sum_t r_t (the score minus beta * the sequence KL) of
      each row, then :func:`group_advantages` over groups of ``group_size`` consecutive rows;
    - ``"reinforce_pp"``: :func:`reinforce_pp_advantages` of the token rewards.

    Args:
        estimator: ``"grpo"``, ``"rloo"`` or ``"reinforce_pp"``.
        token_rewards: (B, T).
        mask: (B, T) 1 on valid response tokens.
        group_size: G, samples per prompt (group estimators).
        scale_by_std: GRPO's std division (False: Dr. GRPO).
        reduce: REINFORCE++'s batch statistics over every process (the group estimators' groups are
            each on one process and need none).

    Returns:
        (B, T) advantages, detached, 0 at masked positions.
    """
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(token_rewards, mask, reduce)
    sequence_rewards = torch.where(mask.bool(), token_rewards.detach(), torch.zeros_like(token_rewards)).sum(-1)
    return group_advantages(sequence_rewards, mask, group_size, estimator, scale_by_std=scale_by_std)
