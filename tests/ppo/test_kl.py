"""Tests for marl.ppo.kl: fixed / adaptive KL controllers."""

import json
import math

import pytest
import torch

from marl.ppo.kl import AdaptiveKLController, FixedKLController, make_kl_controller


def test_fixed_controller_ignores_updates():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=512)
    ctl.update(0.0, n_steps=512)
    assert ctl.value == 0.05


def test_adaptive_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9 > target: error = 9/6 - 1 = 0.5, clipped to 0.2
    # value = 0.1 * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512 = 0.100512
    ctl.update(9.0, n_steps=256)
    assert math.isclose(ctl.value, 0.100512, rel_tol=1e-12)
    # KL 5.7 < target: error = 0.95 - 1 = -0.05 (inside the clip)
    # value = 0.100512 * (1 - 0.05 * 1000 / 10000) = 0.100512 * 0.995 = 0.10000944
    ctl.update(5.7, n_steps=1000)
    assert math.isclose(ctl.value, 0.10000944, rel_tol=1e-12)
    # KL 0: error = -1, clipped to -0.2; n_steps = horizon -> value * 0.8 = 0.080007552
    ctl.update(torch.tensor(0.0), n_steps=10000)  # a 0-dim tensor is accepted
    assert math.isclose(ctl.value, 0.080007552, rel_tol=1e-12)


def test_adaptive_controller_at_target_is_stable():
    ctl = AdaptiveKLController(0.2, target=4.0, horizon=100)
    ctl.update(4.0, n_steps=64)  # error 0 -> multiplier 1
    assert ctl.value == 0.2


@pytest.mark.parametrize(
    "make",
    [lambda: FixedKLController(0.3), lambda: AdaptiveKLController(0.3, target=2.0, horizon=500)],
)
def test_state_dict_round_trip_through_json(make):
    ctl = make()
    ctl.update(3.0, n_steps=50)
    state = json.loads(json.dumps(ctl.state_dict()))
    assert all(isinstance(v, float) for v in state.values())

    fresh = make()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == ctl.state_dict()
    ctl.update(1.0, n_steps=50)
    fresh.update(1.0, n_steps=50)
    assert fresh.value == ctl.value


def test_adaptive_load_restores_target_and_horizon():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.load_state_dict({"value": 0.5, "target": 1.0, "horizon": 10.0})
    # error = 2/1 - 1 = 1 -> clipped 0.2 ; value = 0.5 * (1 + 0.2 * 5 / 10) = 0.55
    ctl.update(2.0, n_steps=5)
    assert math.isclose(ctl.value, 0.55, rel_tol=1e-12)


def test_make_kl_controller():
    fixed = make_kl_controller(0.05)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    adaptive = make_kl_controller(0.05, target=6.0)
    assert isinstance(adaptive, AdaptiveKLController)
    assert adaptive.state_dict() == {"value": 0.05, "target": 6.0, "horizon": 10000.0}


def test_invalid_arguments():
    with pytest.raises(ValueError):
        FixedKLController(-1.0)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
