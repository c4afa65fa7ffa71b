"""Tests for marl.ppo.losses: log-probs, entropy, PPO policy and value losses."""

import math

import pytest
import torch

from marl.ppo.losses import (
    PolicyLoss,
    ValueLoss,
    entropy_from_logits,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        atol=atol,
        rtol=1e-5,
    )


# --------------------------------------------------------------------------- log-probs / entropy


def test_logprobs_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])  # (1, 2, 3)
    labels = torch.tensor([[2, 0]])
    # logsumexp(1, 2, 3) = 3 + log(1 + e^-1 + e^-2) = 3 + 0.40761 = 3.40761
    # log p(2) = 3 - 3.40761 = -0.40761 ; log p(0) = 1 - 3.40761 = -2.40761
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (1, 2)
    close(out, [[-0.4076060, -2.4076060]])


def test_logprobs_match_log_softmax_and_are_stable():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(logprobs_from_logits(logits, labels), expected)
    # huge logits: log p = 0 and -1000, no overflow to nan/inf
    big = torch.tensor([[[1000.0, 0.0]]])
    close(logprobs_from_logits(big, torch.tensor([[0]])), [[0.0]])
    close(logprobs_from_logits(big, torch.tensor([[1]])), [[-1000.0]])


def test_logprobs_bf16_computed_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    # same as float32 math on the bf16 values (not bf16 math, which is off by ~1e-2)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    close(out, expected, atol=1e-6)


def test_logprobs_gradient_flows_to_logits():
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[1]])).sum().backward()
    # d log softmax_1 / d z = onehot(1) - p = [-0.25, 0.75, -0.25, -0.25]
    close(logits.grad, [[[-0.25, 0.75, -0.25, -0.25]]])


def test_entropy_uniform_is_log_v():
    # uniform over V = 7: H = log 7 = 1.94591, whatever the constant logit
    out = entropy_from_logits(torch.full((2, 3, 7), 3.0))
    assert out.shape == (2, 3)
    close(out, torch.full((2, 3), math.log(7)))
    close(entropy_from_logits(torch.full((1, 1, 7), -5.0, dtype=torch.bfloat16)), [[math.log(7)]])


def test_entropy_by_hand():
    # logits (0, log 3) -> p = (0.25, 0.75)
    # H = -(0.25 log 0.25 + 0.75 log 0.75) = 0.34657 + 0.21576 = 0.56234
    close(entropy_from_logits(torch.tensor([[[0.0, math.log(3.0)]]])), [[0.5623351]])
    # near-deterministic: H ~ 0, not nan
    close(entropy_from_logits(torch.tensor([[[100.0, 0.0, 0.0]]])), [[0.0]])


# --------------------------------------------------------------------------- policy loss

# Four valid tokens and one padded token with garbage (exp(1e4) would overflow).
LOG_RATIO = torch.tensor([[-0.1, 0.5, -0.5, 0.5, 1e4]])
ADV = torch.tensor([[1.0, 1.0, 2.0, -1.0, 1e6]])
PMASK = torch.tensor([[1, 1, 1, 1, 0]])


def make_policy_inputs():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]], requires_grad=True)
    logprobs = (old.detach() + LOG_RATIO).requires_grad_(True)
    adv = ADV.clone().requires_grad_(True)
    return logprobs, old, adv


def test_policy_loss_by_hand():
    logprobs, old, adv = make_policy_inputs()
    out = policy_loss(logprobs, old, adv, PMASK, clip_coef=0.2)
    assert isinstance(out, PolicyLoss)
    # per token, clip range [0.8, 1.2], loss_t = max(-A r, -A clip(r)):
    #   t0: r = exp(-0.1) = 0.90484, A =  1: inside range              -> -0.90484
    #   t1: r = exp(0.5)  = 1.64872, A =  1: max(-1.64872, -1.2)       -> -1.2     (clipped)
    #   t2: r = exp(-0.5) = 0.60653, A =  2: max(-1.21306, -0.8 * 2)   -> -1.21306 (pessimistic: unclipped)
    #   t3: r = 1.64872,             A = -1: max(1.64872, 1.2)         ->  1.64872 (unclipped)
    #   t4: padded, ignored
    # loss = (-0.90484 - 1.2 - 1.21306 + 1.64872) / 4 = -1.66918 / 4 = -0.41729
    close(out.loss, -0.4172944)
    # |r - 1| > 0.2 at t1, t2, t3 -> 3/4
    close(out.clipfrac, 0.75)
    # k3 per token (r - 1) - log r: 0.00484, 0.14872, 0.10653, 0.14872 -> mean 0.10220
    close(out.approx_kl, 0.1022027)
    # (0.90484 + 1.64872 + 0.60653 + 1.64872) / 4 = 1.20220
    close(out.ratio_mean, 1.2022027)
    for stat in (out.clipfrac, out.approx_kl, out.ratio_mean):
        assert not stat.requires_grad


def test_policy_loss_gradients_only_through_logprobs():
    logprobs, old, adv = make_policy_inputs()
    policy_loss(logprobs, old, adv, PMASK, clip_coef=0.2).loss.backward()
    assert old.grad is None and adv.grad is None
    # d loss / d logp_t = -A r / 4 where the unclipped term is active, 0 where clipped:
    #   t0: -0.90484 / 4 = -0.22621 ; t1: clipped -> 0 ; t2: -2 * 0.60653 / 4 = -0.30327
    #   t3: 1.64872 / 4 = 0.41218 ; t4: padded -> 0 (and finite despite exp(1e4))
    close(logprobs.grad, [[-0.2262094, 0.0, -0.3032653, 0.4121803, 0.0]])


def test_policy_loss_on_policy():
    # ratio = 1 everywhere: loss = -mean(A) = -(1 + 2) / 2 = -1.5, nothing clipped, KL 0
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    out = policy_loss(lp, lp.clone(), torch.tensor([[1.0, 2.0, 50.0]]), torch.tensor([[1, 1, 0]]))
    close(out.loss, -1.5)
    close(out.clipfrac, 0.0)
    close(out.approx_kl, 0.0)
    close(out.ratio_mean, 1.0)


# --------------------------------------------------------------------------- value loss

VMASK = torch.tensor([[1, 1, 1, 0]])


def make_value_inputs():
    values = torch.tensor([[1.0, 1.5, 1.5, float("nan")]], requires_grad=True)
    old = torch.tensor([[0.9, 1.0, 1.0, 1e9]], requires_grad=True)
    returns = torch.tensor([[1.5, 2.0, 1.0, -1e9]], requires_grad=True)
    return values, old, returns


def test_value_loss_clipped_by_hand():
    values, old, returns = make_value_inputs()
    out = value_loss(values, old, returns, VMASK, clip_coef=0.2)
    assert isinstance(out, ValueLoss)
    # t0: v - old = 0.1 inside [-0.2, 0.2]: both errors (1.0 - 1.5)^2 = 0.25
    # t1: v_clip = 1.0 + 0.2 = 1.2: unclipped (1.5 - 2)^2 = 0.25, clipped (1.2 - 2)^2 = 0.64 -> 0.64
    # t2: v_clip = 1.2:            unclipped (1.5 - 1)^2 = 0.25, clipped (1.2 - 1)^2 = 0.04 -> 0.25
    # t3: padded (nan value), ignored
    # loss = 0.5 * (0.25 + 0.64 + 0.25) / 3 = 0.5 * 0.38 = 0.19
    close(out.loss, 0.19)
    # clipped error strictly larger only at t1 -> 1/3
    close(out.clipfrac, 1 / 3)
    assert not out.clipfrac.requires_grad

    out.loss.backward()
    assert old.grad is None and returns.grad is None
    # d/dv of 0.5 * err / 3: t0: (1.0 - 1.5) / 3 = -0.16667 ; t1: clipped branch is flat -> 0
    #                        t2: (1.5 - 1.0) / 3 = 0.16667  ; t3: padded -> 0 (not nan)
    close(values.grad, [[-1 / 6, 0.0, 1 / 6, 0.0]])


def test_value_loss_unclipped():
    values, old, returns = make_value_inputs()
    out = value_loss(values, old, returns, VMASK, clip_coef=None)
    # 0.5 * (0.25 + 0.25 + 0.25) / 3 = 0.125
    close(out.loss, 0.125)
    close(out.clipfrac, 0.0)


def test_returns_scale_is_the_masked_variance_of_the_returns_but_never_below_one():
    from marl.ppo.losses import returns_scale

    returns = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # valid returns 1, 3, 5, 7: mean 4, population variance (9 + 1 + 1 + 9) / 4 = 5
    assert returns_scale(returns, mask) == pytest.approx(5.0)
    assert returns_scale(torch.tensor([[0.2, 0.4]]), torch.ones(1, 2)) == 1.0  # variance 0.01: unchanged
    assert returns_scale(returns, torch.zeros(2, 3)) == 1.0  # nothing valid
