"""Tests for marl.ppo.kl: fixed / adaptive (PI on log beta) KL controllers."""

import json
import math

import pytest
import torch

from marl.ppo.kl import (
    BETA_MAX, BETA_MIN, AdaptiveKLController, FixedKLController, make_kl_controller, runaway_warning,
)


def test_fixed_controller_ignores_updates():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=512)
    ctl.update(0.0)
    assert ctl.value == 0.05


def test_adaptive_controller_on_a_scripted_kl_sequence_by_hand():
    # target 4, horizon 2, kp 0.25: d = e_t / 2 + 0.25 (e_t - e_{t-1}), clipped to [-log 2, log 2];
    # e = clip(log(KL / 4), lo, 2), lo = -0.05 until the KL first reaches 4, then -1
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=4.0, horizon=2.0, kp=0.25)
    x, ln2 = math.log(0.1), math.log(2)
    steps = [
        # KL 0 (the start): e = -0.05 (the floor)  -> d = -0.025 + 0.25 (-0.05 - 0)             = -0.0375
        (0.0, -0.05, -0.0375),
        # KL 4 (on target, reached): e = 0          -> d = 0 + 0.25 (0 + 0.05)                   = +0.0125
        (4.0, 0.0, 0.0125),
        # KL 8: e = log 2 = 0.693147                -> d = 0.346574 + 0.25 * 0.693147            = +0.519860
        (8.0, ln2, ln2 / 2 + 0.25 * ln2),
        # KL 100: log 25 = 3.22, clipped to 2       -> d = 1 + 0.25 (2 - 0.693147) = 1.326713, clipped to log 2
        (100.0, 2.0, ln2),
        # KL 2: e = -log 2 (inside [-1, 2] now)     -> d = -0.346574 + 0.25 (-0.693147 - 2) = -1.019860 -> -log 2
        (torch.tensor(2.0), -ln2, -ln2),  # a 0-dim tensor is accepted
        # KL 0 again: e = -1 (the floor after the target was reached) -> d = -0.5 + 0.25 (-1 + 0.693147) = -0.576713
        (0.0, -1.0, -0.5 + 0.25 * (-1.0 + ln2)),
    ]
    expected_betas = [0.0963194418, 0.0975309912, 0.1640269218, 0.3280538435, 0.1640269218, 0.0921407562]
    for (kl, e, dx), beta in zip(steps, expected_betas):
        ctl.update(kl)
        x += dx
        assert ctl.error == pytest.approx(e, abs=1e-12)
        assert ctl.value == pytest.approx(math.exp(x), rel=1e-12)
        assert ctl.value == pytest.approx(beta, rel=1e-9)


def test_beta_at_most_doubles_or_halves_per_iteration():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=1.0, kp=1.5)
    ctl.update(1e6)  # e = 2: d = 2 + 1.5 * 2 = 5, limited to log 2
    assert ctl.value == pytest.approx(0.2, rel=1e-12)
    ctl.update(0.0)  # e = -0.05 (not reached yet): d = -0.05 - 1.5 * 2.05 = -3.125, limited to -log 2
    assert ctl.value == pytest.approx(0.1, rel=1e-12)


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
    assert ctl.value == BETA_MAX  # the initial value is clipped too
    ctl.update(1e6)  # log b += log 2 (limited): above the cap
    assert ctl.value == BETA_MAX
    low = AdaptiveKLController(2e-4, target=1.0, horizon=1.0, kp=0.0)
    low.update(1.0)
    low.update(0.0)  # reached, then e = -1: log b -= log 2 (limited): 1e-4, the floor
    low.update(0.0)
    assert low.value == BETA_MIN


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
    # kp 0, horizon 2: before the target was reached a KL of 0 moves log b by -0.05 / 2, afterwards by -1 / 2
    ctl = AdaptiveKLController(1.0, target=2.0, horizon=2.0, kp=0.0)
    ctl.update(0.0)
    assert ctl.value == pytest.approx(math.exp(-0.025), rel=1e-12)
    ctl.update(2.0)  # reached: e = 0
    ctl.update(0.0)
    assert ctl.value == pytest.approx(math.exp(-0.025 - 0.5), rel=1e-12)


def test_a_lost_kl_target_is_named_only_at_the_cap_and_above_one_and_a_half_times_the_target():
    assert runaway_warning("p", 1.6, BETA_MAX, 1.0).startswith("p: kl_coef is at its cap (10) and the KL (1.60)")
    assert "value_model: adapter" in runaway_warning("p", 30.0, BETA_MAX, 4.0)
    assert runaway_warning("p", 1.5, BETA_MAX, 1.0) is None  # inside the band
    assert runaway_warning("p", 50.0, 9.99, 1.0) is None  # the controller still has room
    assert runaway_warning("p", 50.0, 20.0, None) is None  # a fixed coefficient holds no target
