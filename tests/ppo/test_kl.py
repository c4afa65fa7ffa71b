"""Tests for marl.ppo.kl: fixed / adaptive (PI on log beta) KL controllers."""

import json
import math

import pytest
import torch

from marl.ppo.kl import BETA_MAX, AdaptiveKLController, FixedKLController, make_kl_controller


def test_fixed_controller_ignores_updates():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=512)
    ctl.update(0.0)
    assert ctl.value == 0.05


def test_adaptive_controller_on_a_scripted_kl_sequence_by_hand():
    # target 4, horizon 2, kp 1: log b += e_t / 2 + (e_t - e_{t-1}),  e = clip(log(KL / 4), lo, 2),
    # lo = -0.05 until the KL first reaches 4, then -1
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=4.0, horizon=2.0, kp=1.0)
    x = math.log(0.1)
    steps = [
        # KL 0 (the start): e = -0.05 (the floor)  -> x += -0.025 + (-0.05 - 0)        = -0.075
        (0.0, -0.05, -0.075),
        # KL 4 (on target, reached): e = 0          -> x += 0 + (0 + 0.05)               = +0.05
        (4.0, 0.0, 0.05),
        # KL 8: e = log 2 = 0.693147                -> x += 0.346574 + 0.693147          = +1.039721
        (8.0, math.log(2), math.log(2) / 2 + math.log(2)),
        # KL 100: log 25 = 3.22, clipped to 2       -> x += 1 + (2 - 0.693147)           = +2.306853
        (100.0, 2.0, 1.0 + 2.0 - math.log(2)),
        # KL 2: e = log 0.5 = -0.693147 (inside [-1, 2] now) -> x += -0.346574 + (-0.693147 - 2) = -3.039721
        (torch.tensor(2.0), -math.log(2), -math.log(2) / 2 - math.log(2) - 2.0),  # a 0-dim tensor is accepted
        # KL 0 again: e = -1 (the floor after the target was reached) -> x += -0.5 + (-1 + 0.693147) = -0.806853
        (0.0, -1.0, -0.5 - 1.0 + math.log(2)),
    ]
    expected_betas = [0.0927743486, 0.0975309912, 0.2758593010, 2.7703910881, 0.1325583605, 0.0591555364]
    for (kl, e, dx), beta in zip(steps, expected_betas):
        ctl.update(kl)
        x += dx
        assert ctl.error == pytest.approx(e, abs=1e-12)
        assert ctl.value == pytest.approx(math.exp(x), rel=1e-12)
        assert ctl.value == pytest.approx(beta, rel=1e-9)


def test_integral_part_is_ziegler_with_the_horizon_in_iterations():
    # kp 0, a constant error e = log(KL / T) = 1: beta grows by exp(1) every `horizon` iterations
    ctl = AdaptiveKLController(0.2, target=1.0, horizon=3.0, kp=0.0)
    for _ in range(3):
        ctl.update(math.e, n_steps=10_000)  # n_steps (samples) does not matter any more
    assert ctl.value == pytest.approx(0.2 * math.e, rel=1e-12)


def test_adaptive_controller_at_target_is_stable():
    ctl = AdaptiveKLController(0.2, target=4.0)
    for _ in range(5):
        ctl.update(4.0)
    assert ctl.value == pytest.approx(0.2, rel=1e-12)


def test_beta_stays_inside_its_bounds():
    ctl = AdaptiveKLController(50.0, target=1.0, horizon=1.0, kp=10.0)
    ctl.update(1e6)  # log b += 2 + 10 * 2 = 22: far above the cap
    assert ctl.value == BETA_MAX


@pytest.mark.parametrize(
    "make",
    [lambda: FixedKLController(0.3), lambda: AdaptiveKLController(0.3, target=2.0, horizon=5, kp=0.7)],
)
def test_state_dict_round_trip_through_json_continues_exactly(make):
    ctl = make()
    ctl.update(3.0)
    state = json.loads(json.dumps(ctl.state_dict()))
    assert all(isinstance(v, float) for v in state.values())

    fresh = make()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == ctl.state_dict()
    for kl in (0.5, 7.0):  # the last error (proportional term) and `reached` (the clip) are part of the state
        ctl.update(kl)
        fresh.update(kl)
        assert fresh.value == ctl.value


def test_a_checkpoint_of_the_proportional_only_controller_loads():
    ctl = AdaptiveKLController(0.1, target=6.0)
    ctl.load_state_dict({"value": 0.5, "target": 1.0, "horizon": 10.0})  # no kp, error, reached: 0, 0, 1
    ctl.update(math.e)  # e = 1 -> log b += 1 / 10
    assert ctl.value == pytest.approx(0.5 * math.exp(0.1), rel=1e-12)


def test_make_kl_controller():
    fixed = make_kl_controller(0.05)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    adaptive = make_kl_controller(0.05, target=6.0)
    assert isinstance(adaptive, AdaptiveKLController)
    assert adaptive.state_dict() == {"value": 0.05, "target": 6.0, "horizon": 3.0, "kp": 1.5, "error": 0.0,
                                     "reached": 0.0}


def test_invalid_arguments():
    with pytest.raises(ValueError):
        FixedKLController(-1.0)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.0, target=1.0)  # nothing to scale
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, kp=-1.0)


def test_below_target_beta_falls_slowly_until_the_kl_first_reaches_it():
    # kp 0, horizon 1: before the target was reached a KL of 0 moves log b by -0.05, afterwards by -1
    ctl = AdaptiveKLController(1.0, target=2.0, horizon=1.0, kp=0.0)
    ctl.update(0.0)
    assert ctl.value == pytest.approx(math.exp(-0.05), rel=1e-12)
    ctl.update(2.0)  # reached: e = 0
    ctl.update(0.0)
    assert ctl.value == pytest.approx(math.exp(-0.05 - 1.0), rel=1e-12)
