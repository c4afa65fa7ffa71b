"""Critic-free estimators on hand-worked inputs (expected values worked out in the comments)."""

import pytest
import torch

from marl.ppo.advantages import masked_mean
from marl.ppo.estimators import critic_free_advantages, group_advantages, reinforce_pp_advantages
from marl.ppo.experience import loss_weight


def test_grpo_normalises_each_group_by_its_mean_and_std():
    # group [1, 2, 3, 6]: mean 3, centred [-2, -1, 0, 3], unbiased var 14/3, std 2.16025
    # -> [-0.92582, -0.46291, 0, 1.38873]; group [4, 4]: all alike -> 0 (not nan)
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mask = torch.ones(4, 2)
    adv = group_advantages(scores, mask, group_size=4, estimator="grpo", eps=0.0)
    assert torch.allclose(adv[:, 0], torch.tensor([-0.92582, -0.46291, 0.0, 1.38873]), atol=1e-5)
    assert torch.equal(adv[:, 0], adv[:, 1])  # the same advantage on every token
    flat = group_advantages(torch.tensor([4.0, 4.0, 1.0, 3.0]), torch.ones(4, 1), group_size=2)
    # second group [1, 3]: centred [-1, 1], std sqrt(2) -> [-0.70711, 0.70711] (eps 1e-4 shifts the 5th digit)
    assert torch.allclose(flat[:, 0], torch.tensor([0.0, 0.0, -0.70706, 0.70706]), atol=1e-4)


def test_dr_grpo_drops_the_std_division():
    # [1, 2, 3, 6] - 3 = [-2, -1, 0, 3]
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.ones(4, 1), 4, "grpo", scale_by_std=False)
    assert torch.allclose(adv[:, 0], torch.tensor([-2.0, -1.0, 0.0, 3.0]))


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    # 1 - (2+3+6)/3 = -2.6667; 2 - (1+3+6)/3 = -1.3333; 3 - (1+2+6)/3 = 0; 6 - (1+2+3)/3 = 4
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.ones(4, 1), 4, "rloo")
    assert torch.allclose(adv[:, 0], torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]), atol=1e-6)


def test_group_advantages_are_zero_on_masked_tokens_and_refuse_ragged_groups():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = group_advantages(torch.tensor([0.0, 2.0]), mask, 2, "rloo")  # [-2, 2]
    assert torch.equal(adv, torch.tensor([[-2.0, -2.0, 0.0], [2.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="groups of 2"):
        group_advantages(torch.zeros(3), torch.ones(3, 1), 2)
    with pytest.raises(ValueError, match="group estimator"):
        group_advantages(torch.zeros(2), torch.ones(2, 1), 2, "gae")


def test_reinforce_pp_whitens_returns_to_go_over_the_batch():
    # row 0 rewards [0.1, -0.2, 1.0] -> returns [0.9, 0.8, 1.0]
    # row 1 rewards [0.5, 0.3, (pad 9)] mask [1, 1, 0] -> returns [0.8, 0.3, -]
    # valid returns 0.9 0.8 1.0 0.8 0.3: mean 0.76, squared deviations sum 0.292, unbiased var 0.073,
    # std 0.270185 -> [0.51816, 0.14805, 0.88827, 0.14805, -1.70254]
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.5, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = reinforce_pp_advantages(rewards, mask)
    expected = torch.tensor([[0.51816, 0.14805, 0.88827], [0.14805, -1.70254, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-4)


def test_reinforce_pp_bridges_a_hole_in_the_mask():
    # rewards [1, nan (masked), 2] -> returns [3, -, 2]; two valid values [3, 2] whiten to [0.7071, -0.7071]
    adv = reinforce_pp_advantages(torch.tensor([[1.0, float("nan"), 2.0]]), torch.tensor([[1, 0, 1]]))
    assert torch.allclose(adv, torch.tensor([[0.70711, 0.0, -0.70711]]), atol=1e-4)


def test_dr_grpo_s_token_sum_is_the_token_mean_weighted_by_its_tokens_over_a_constant():
    # (1 + 3 + 4) / 4 = 2: the masked 2 is not read; the token mean 8/3 times 3 valid tokens / 4 (the trainer's
    # loss_weight with Dr. GRPO's constant as the norm)
    x, mask = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1, 0], [1, 1]])
    assert float(masked_mean(x, mask) * loss_weight(mask.sum(), norm=4)) == pytest.approx(2.0, abs=1e-7)


def test_critic_free_advantages_read_the_sequence_reward_from_the_token_rewards():
    # token rewards (-beta * KL, score at the last token): row sums 0.8 and 2.8 (the pad 9 is not read)
    # rloo, G = 2: [0.8 - 2.8, 2.8 - 0.8] = [-2, 2] on every valid token
    # grpo: centred [-1, 1], std sqrt(2) -> [-0.70706, 0.70706] (eps 1e-4)
    rewards = torch.tensor([[-0.1, -0.1, 1.0], [-0.2, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rloo = critic_free_advantages("rloo", rewards, mask, group_size=2)
    assert torch.allclose(rloo, torch.tensor([[-2.0, -2.0, -2.0], [2.0, 2.0, 0.0]]), atol=1e-6)
    grpo = critic_free_advantages("grpo", rewards, mask, group_size=2)
    assert torch.allclose(grpo[:, 0], torch.tensor([-0.70706, 0.70706]), atol=1e-4)
    dr = critic_free_advantages("grpo", rewards, mask, group_size=2, scale_by_std=False)  # centred only
    assert torch.allclose(dr[:, 0], torch.tensor([-1.0, 1.0]), atol=1e-6)
    assert torch.equal(critic_free_advantages("reinforce_pp", rewards, mask), reinforce_pp_advantages(rewards, mask))
