"""Means with standard errors, hand-worked."""

import math

import pytest

from marl.stats import difference, mean_se


def test_mean_se_hand_checked():
    # [1, 2, 3]: mean 2, sample variance (1 + 0 + 1) / 2 = 1, standard error sqrt(1 / 3)
    assert mean_se([1.0, 2.0, 3.0]) == (2.0, pytest.approx(3 ** -0.5))
    m, se = mean_se([5.0])
    assert m == 5.0 and math.isnan(se)  # one value has no spread to measure


def test_difference_of_independent_means():
    # 3 - 1 = 2, standard error sqrt(0.3^2 + 0.4^2) = 0.5
    assert difference((3.0, 0.3), (1.0, 0.4)) == (2.0, pytest.approx(0.5))
