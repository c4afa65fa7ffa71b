"""Populations: sweep expansion and names (marl/sweep.py), the ranking that cannot pick a reward hacker, halving, PBT pairs and
explore (marl/ppo/population.py), hand-worked."""

from __future__ import annotations

import random

from marl.ppo.population import exploit_pairs, explore, final_ranking, halve, rank
from marl.sweep import expand_sweep, policy_name, sweep_values


def test_a_grid_gives_every_combination_last_key_fastest_then_the_list():
    sweep = {"grid": {"learning_rate": [1e-4, 3e-4], "kl_target": [2, 6]}, "list": [{"advantage_estimator": "grpo"}]}
    assert expand_sweep(sweep) == [
        {"learning_rate": 1e-4, "kl_target": 2}, {"learning_rate": 1e-4, "kl_target": 6},
        {"learning_rate": 3e-4, "kl_target": 2}, {"learning_rate": 3e-4, "kl_target": 6},
        {"advantage_estimator": "grpo"}]
    assert expand_sweep([{"seed": 1}, {"seed": 2}]) == [{"seed": 1}, {"seed": 2}]
    assert sweep_values(sweep) == {"learning_rate": [1e-4, 3e-4], "kl_target": [2, 6],
                                   "advantage_estimator": ["grpo"]}


def test_policy_names_are_short_and_valid_adapter_names():
    assert policy_name({"learning_rate": 3e-4, "kl_target": 2, "advantage_estimator": "grpo"}) == "lr3e-4_kl2_grpo"
    assert policy_name({"temperature": 0.7, "learning_rate": 1.25e-5}) == "t0p7_lr1p25e-5"
    assert policy_name({"kl_target": None, "scale_rewards": False}) == "klnone_scaleoff"
    weights = [{"reward_model": 1.0}, {"reward_model": 1.0, "length": 0.1}]
    assert policy_name({"reward_weights": weights[1]}, {"reward_weights": weights}) == "rw1"
    assert "." not in policy_name({"ent_coef": 0.01})


def evals(**rows):
    """name -> (reward, kl, distinct_2) as evaluate_adapters reports them, ranked by the reward."""
    return {n: {"reward_mean": r, "kl_mean": kl, "distinct_2": d2} for n, (r, kl, d2) in rows.items()}


def test_a_reward_hacker_ranks_below_every_policy_inside_the_limits():
    e = evals(hacker=(9.0, 20.0, 0.10), repeater=(8.0, 3.0, 0.20), lost=(7.0, 3.0, 0.50), good=(4.0, 3.0, 0.50),
              better=(5.0, 4.0, 0.45))
    ranking = rank(e, "reward_mean", max_kl=6, min_distinct_2=0.8 * 0.5, lost={"lost"})
    assert [s.name for s in ranking] == ["better", "good", "hacker", "repeater", "lost"]
    assert [s.eligible for s in ranking] == [True, True, False, False, False]
    assert ranking[2].reason == "KL 20.00 > max_kl 6; distinct-2 0.100 < 0.400"
    assert ranking[4].reason == "KL target lost"
    # without limits the hacker wins: the limits are what the ranking adds
    assert rank(e, "reward_mean")[0].name == "hacker"


def test_a_survivor_that_drifted_out_of_the_limits_ranks_below_the_stopped_policies_inside_them():
    # halving left one policy, which then trained on alone and fell under the distinct-2 floor (bench row 11,
    # seed 1, before this ranking): the best stopped policy inside the limits wins
    limits = dict(max_kl=8, min_distinct_2=0.45)
    survivors = rank(evals(drifted=(2.8, 7.6, 0.43)), "reward_mean", **limits)
    stopped = rank(evals(hacker=(3.0, 9.0, 0.50), second=(2.1, 2.6, 0.53), third=(1.7, 0.6, 0.57)), "reward_mean",
                   **limits)
    assert [s.name for s in final_ranking(survivors, stopped)] == ["second", "third", "drifted", "hacker"]
    # a survivor inside the limits stays first, even below a stopped policy's (older) metric
    survivors = rank(evals(kept=(2.0, 1.6, 0.54)), "reward_mean", **limits)
    assert [s.name for s in final_ranking(survivors, stopped)] == ["kept", "second", "third", "hacker"]


def test_halving_keeps_the_best_ceil_fraction_and_at_least_one():
    ranking = rank(evals(a=(1, 0, None), b=(3, 0, None), c=(2, 0, None), d=(0, 0, None), e=(5, 0, None)),
                   "reward_mean")
    assert halve(ranking, 0.5) == (["e", "b", "c"], ["a", "d"])  # ceil(2.5) = 3
    assert halve(ranking, 0.01) == (["e"], ["b", "c", "a", "d"])
    assert halve(ranking[:1], 0.5) == (["e"], [])


def test_exploit_pairs_the_bottom_quantile_with_the_top():
    ranking = rank(evals(**{f"p{i}": (float(i), 0, None) for i in range(8)}), "reward_mean")  # p7 best
    pairs = exploit_pairs(ranking, 0.25, random.Random(0))
    assert [loser for loser, _ in pairs] == ["p1", "p0"]
    assert all(source in ("p7", "p6") for _, source in pairs)
    assert exploit_pairs(ranking[:1], 0.25, random.Random(0)) == []
    assert [p for p, _ in exploit_pairs(ranking[:3], 0.25, random.Random(0))] == ["p5"]  # one of three


def test_explore_multiplies_numbers_by_0_8_or_1_25_and_redraws_choices():
    values = {"learning_rate": [1e-4, 3e-4], "kl_target": [2, 6], "reward_norm": ["none", "batch"],
              "advantage_estimator": ["gae", "grpo"], "num_generations": [2, 4]}
    settings = {"learning_rate": 1e-4, "kl_target": 2, "reward_norm": "none", "advantage_estimator": "gae",
                "num_generations": 4, "temperature": 1.0}
    seen = set()
    for seed in range(40):
        out = explore(settings, values, random.Random(seed), resample=0.5)
        assert out["learning_rate"] in (0.8e-4, 1.25e-4)
        assert out["kl_target"] in (2, 3)  # round(1.6) = 2, round(2.5) = 2 ... integers stay integers
        assert out["advantage_estimator"] == "gae" and out["num_generations"] == 4  # structural: never explored
        assert out["temperature"] == 1.0  # not swept: not explored
        seen.add(out["reward_norm"])
    assert seen == {"none", "batch"}
    assert settings["learning_rate"] == 1e-4  # the input is not changed
