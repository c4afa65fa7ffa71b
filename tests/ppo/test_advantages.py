"""Tests for marl.ppo.advantages: masked statistics, KL estimators, token rewards, GAE."""

import math

import pytest
import torch

from marl.ppo.advantages import (
    Advantages,
    TokenRewards,
    compute_token_rewards,
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
)

NAN = float("nan")


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        atol=atol,
        rtol=1e-5,
    )


# --------------------------------------------------------------------------- masked statistics

# Valid entries are 1, 2 (row 0) and 4 (row 1); the rest is garbage that must be ignored.
X = torch.tensor([[1.0, 2.0, 1e6], [4.0, NAN, -1e6]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_mean_ignores_masked_entries():
    # (1 + 2 + 4) / 3 = 7/3 = 2.3333
    close(masked_mean(X, MASK), 7 / 3)
    # per row: (1 + 2) / 2 = 1.5 ; 4 / 1 = 4.0
    close(masked_mean(X, MASK, dim=1), [1.5, 4.0])
    # bool mask behaves the same
    close(masked_mean(X, MASK.bool()), 7 / 3)


def test_masked_mean_empty_mask_is_zero_not_nan():
    # row 1 has no valid entry: 0 instead of 0/0 = nan
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]])
    close(masked_mean(X, mask, dim=1), [1.0, 0.0])
    close(masked_mean(X, torch.zeros_like(mask)), 0.0)


def test_masked_var_by_hand():
    # valid 1, 2, 4; mean 7/3; deviations -4/3, -1/3, 5/3; squares sum 16/9 + 1/9 + 25/9 = 42/9
    # biased   = 42/9 / 3 = 14/9 = 1.5556
    # unbiased = 42/9 / 2 = 7/3  = 2.3333
    close(masked_var(X, MASK, unbiased=False), 14 / 9)
    close(masked_var(X, MASK, unbiased=True), 7 / 3)
    close(masked_var(X, MASK), 7 / 3)  # unbiased by default


def test_masked_var_single_or_no_entry_does_not_crash():
    # n = 1: Bessel n/(n-1) undefined -> variance 0, no nan
    close(masked_var(X, torch.tensor([[1, 0, 0], [0, 0, 0]])), 0.0)
    close(masked_var(X, torch.zeros(2, 3)), 0.0)


def test_masked_whiten_by_hand():
    # (x - 7/3) / sqrt(7/3), sqrt(7/3) = 1.5275:
    #   1 -> -0.8729, 2 -> -0.2182, 4 -> 1.0911 ; masked entries -> 0 (even the nan)
    out = masked_whiten(X, MASK)
    close(out, [[-0.8728716, -0.2182179, 0.0], [1.0910895, 0.0, 0.0]])
    valid = out[MASK.bool()]
    close(valid.mean(), 0.0)
    close(valid.var(unbiased=True), 1.0, atol=1e-4)


def test_masked_whiten_keep_mean():
    # shift_mean=False adds the mean 7/3 back to valid entries: -0.8729 + 2.3333 = 1.4605 ...
    out = masked_whiten(X, MASK, shift_mean=False)
    close(out, [[1.4604618, 2.1151154, 0.0], [3.4244228, 0.0, 0.0]])


# --------------------------------------------------------------------------- KL estimators

LOGP = torch.tensor([[-1.0, -2.0, -3.0]])
REF = torch.tensor([[-1.5, -1.0, -3.0]])


def test_kl_k1_by_hand():
    # logp - logp_ref = -1 + 1.5 = 0.5 ; -2 + 1 = -1.0 ; 0
    close(kl_penalty(LOGP, REF, "k1"), [[0.5, -1.0, 0.0]])
    close(kl_penalty(LOGP, REF), [[0.5, -1.0, 0.0]])  # k1 is the default


def test_kl_k3_by_hand():
    # log r = ref - logp = -0.5, 1.0, 0
    # (r - 1) - log r: exp(-0.5) - 1 + 0.5 = 0.60653 - 0.5 = 0.10653
    #                  e - 1 - 1 = 0.71828 ; 1 - 1 - 0 = 0
    close(kl_penalty(LOGP, REF, "k3"), [[0.1065307, 0.7182818, 0.0]])
    # always >= 0, unlike k1
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    assert (kl_penalty(a, b, "k3") >= 0).all()


def test_kl_k3_log_ratio_is_clamped_to_10_so_one_collapsed_token_stays_finite():
    # log r = ref - logp = -5 + 30 = 25 -> clamped to 10: e^10 - 1 - 10 = 22026.4658 - 11 = 22015.4658
    #         -30 + 5 = -25 -> clamped to -10: e^-10 - 1 + 10 = 9.0000454
    #         0 + 200 = 200: unclamped e^200 is inf in float32; clamped it is the same 22015.4658
    logp, ref = torch.tensor([[-30.0, -5.0, -200.0]]), torch.tensor([[-5.0, -30.0, 0.0]])
    close(kl_penalty(logp, ref, "k3"), [[22015.4658, 9.0000454, 22015.4658]], atol=1e-2)
    assert torch.isfinite(kl_penalty(logp, ref, "k3")).all()
    # the other estimators take no exponential: finite, unclamped (k1 = logp - ref: -25, 25, -200)
    close(kl_penalty(logp, ref, "k1"), [[-25.0, 25.0, -200.0]])
    close(kl_penalty(logp, ref, "mse"), [[312.5, 312.5, 20000.0]])


def test_kl_abs_and_mse_by_hand():
    # |0.5| = 0.5, |-1| = 1 ; 0.5 * 0.5^2 = 0.125, 0.5 * 1^2 = 0.5
    close(kl_penalty(LOGP, REF, "abs"), [[0.5, 1.0, 0.0]])
    close(kl_penalty(LOGP, REF, "mse"), [[0.125, 0.5, 0.0]])


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(LOGP, REF, "k2")


# --------------------------------------------------------------------------- token rewards


def test_token_rewards_score_at_last_valid_token():
    mask = torch.tensor(
        [
            [1, 1, 1, 0],  # ends early: score at t = 2
            [1, 1, 1, 1],  # full: score at t = 3
            [0, 0, 0, 0],  # empty: no score, all zeros
            [1, 0, 1, 0],  # hole inside: last valid is still t = 2
        ]
    )
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ref = torch.full((4, 4), -2.0)
    # valid tokens: logp - ref = -1.9 + 2 = 0.1 ; padded tokens hold garbage that must not leak
    logprobs = torch.where(mask.bool(), torch.tensor(-1.9), torch.tensor(-1e4))
    out = compute_token_rewards(scores, logprobs, ref, mask, kl_coef=0.5)
    assert isinstance(out, TokenRewards)
    # each valid token: -0.5 * 0.1 = -0.05 ; last valid token: -0.05 + score
    close(
        out.rewards,
        [
            [-0.05, -0.05, 0.95, 0.0],
            [-0.05, -0.05, -0.05, 1.95],
            [0.0, 0.0, 0.0, 0.0],
            [-0.05, 0.0, 3.95, 0.0],
        ],
    )
    close(out.kl, mask * 0.1)


def test_token_rewards_estimator_and_zero_coef():
    mask = torch.tensor([[1, 1, 0]])
    logprobs = torch.tensor([[-1.0, -2.0, 5.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    # k3 per token (see test_kl_k3_by_hand): 0.10653, 0.71828 ; masked -> 0
    # rewards with beta = 1: -0.10653, -0.71828 + 10 = 9.28172
    out = compute_token_rewards(torch.tensor([10.0]), logprobs, ref, mask, kl_coef=1.0, estimator="k3")
    close(out.kl, [[0.1065307, 0.7182818, 0.0]])
    close(out.rewards, [[-0.1065307, 9.2817182, 0.0]])
    # beta = 0: only the score remains
    out0 = compute_token_rewards(torch.tensor([10.0]), logprobs, ref, mask, kl_coef=0.0)
    close(out0.rewards, [[0.0, 10.0, 0.0]])


# --------------------------------------------------------------------------- GAE


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 123.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert isinstance(out, Advantages)
    # row 0 (gamma = 1, lam = 0.5; value after the last token = 0):
    #   t=2: delta = 1 + 0 - 0.7 = 0.3               A = 0.3
    #   t=1: delta = 0 + 0.7 - 0.6 = 0.1             A = 0.1 + 0.5 * 0.3  = 0.25
    #   t=0: delta = 0 + 0.6 - 0.5 = 0.1             A = 0.1 + 0.5 * 0.25 = 0.225
    #   returns = A + V = 0.725, 0.85, 1.0
    # row 1 ends at t=1 (t=2 is padding, its reward 123 and value 99 are ignored):
    #   t=1: delta = 1 + 0 - 0.6 = 0.4               A = 0.4
    #   t=0: delta = 0 + 0.6 - 0.5 = 0.1             A = 0.1 + 0.5 * 0.4 = 0.3
    #   returns = 0.8, 1.0, 0 (masked)
    close(out.advantages, [[0.225, 0.25, 0.3], [0.3, 0.4, 0.0]])
    close(out.returns, [[0.725, 0.85, 1.0], [0.8, 1.0, 0.0]])


def test_gae_discount_by_hand():
    # one token reward 1 at the end, zero values, gamma = 0.9, lam = 1 -> Monte-Carlo returns
    #   A_2 = 1 ; A_1 = 0.9 * 1 = 0.9 ; A_0 = 0.9^2 = 0.81
    out = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.ones(1, 3), gamma=0.9, lam=1.0)
    close(out.advantages, [[0.81, 0.9, 1.0]])
    close(out.returns, [[0.81, 0.9, 1.0]])


def reference_gae(rewards, values, mask, gamma, lam):
    """Plain Python GAE: each row is its valid positions in order, terminal value 0."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b][t]]
        last_gae, next_v = 0.0, 0.0
        for t in reversed(idx):
            r, v = float(rewards[b][t]), float(values[b][t])
            delta = r + gamma * next_v - v
            last_gae = delta + gamma * lam * last_gae
            adv[b][t], ret[b][t] = last_gae, last_gae + v
            next_v = v
    return torch.tensor(adv), torch.tensor(ret)


def right_padded_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0)])
def test_gae_matches_python_loop_right_padded(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    B, T = 7, 11
    # lengths include an empty row, a full row, and rows ending early
    lengths = [0, T, 1] + torch.randint(2, T, (B - 3,), generator=g).tolist()
    mask = right_padded_mask(lengths, T)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    out = gae(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = reference_gae(rewards, values, mask, gamma, lam)
    close(out.advantages, exp_adv)
    close(out.returns, exp_ret)


@pytest.mark.parametrize("seed", [3, 4])
def test_gae_matches_python_loop_random_holes(seed):
    # arbitrary masks (holes inside a row): masked positions are skipped, not episode ends
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    mask = (torch.rand(B, T, generator=g) > 0.4).long()
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    out = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    exp_adv, exp_ret = reference_gae(rewards, values, mask, 0.97, 0.9)
    close(out.advantages, exp_adv)
    close(out.returns, exp_ret)


def test_gae_padded_values_do_not_change_results():
    g = torch.Generator().manual_seed(5)
    B, T = 5, 8
    mask = right_padded_mask([8, 5, 3, 1, 0], T)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    base = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    pad = ~mask.bool()
    # garbage at padded positions: huge numbers and nan
    junk = torch.full((B, T), 1e9)
    junk[0::2] = NAN
    out = gae(torch.where(pad, junk, rewards), torch.where(pad, junk, values), mask, gamma=0.99, lam=0.95)
    close(out.advantages, base.advantages)
    close(out.returns, base.returns)
    assert (out.advantages[pad] == 0).all() and (out.returns[pad] == 0).all()


def test_gae_outputs_are_detached():
    values = torch.randn(2, 4, requires_grad=True)
    out = gae(torch.randn(2, 4), values, torch.ones(2, 4))
    assert not out.advantages.requires_grad and not out.returns.requires_grad


def test_rewards_then_gae_pipeline():
    # score placed at the last valid token reaches every earlier token with gamma = lam = 1:
    # zero values, zero KL -> A_t = score for every valid t
    mask = right_padded_mask([3, 1], 4)
    lp = torch.zeros(2, 4)
    tr = compute_token_rewards(torch.tensor([2.0, -1.0]), lp, lp, mask, kl_coef=0.1)
    out = gae(tr.rewards, torch.zeros(2, 4), mask, gamma=1.0, lam=1.0)
    close(out.advantages, [[2.0, 2.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    assert math.isclose(float(tr.kl.abs().sum()), 0.0)
