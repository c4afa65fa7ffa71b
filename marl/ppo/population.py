"""Populations of policies on one base: their ranking on held-out prompts, and the two schedules that act on
the ranking (successive halving, population-based training). A sweep's policies come from marl.sweep.

Pure functions over plain data (settings dicts, evaluation dicts, a `random.Random`); the trainer applies
what they decide. The ranking refuses to reward a reward hacker: a policy whose held-out KL to the reference
exceeds `max_kl`, whose distinct-2 fell below `min_distinct_2` x the reference's, or whose KL controller lost
its target ranks below every policy that does none of these, whatever its reward.

Population-based training follows Jaderberg et al. 2017 ("Population Based Training of Neural Networks"):
*exploit*, each policy of the bottom quantile takes a top-quantile policy's weights and training state;
*explore*, it then perturbs the copied settings.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# Settings PBT's explore step never changes: they change a policy's structure or its prompts' grouping, and
# an exploit copies them from the source with its weights.
NOT_EXPLORED = frozenset({"advantage_estimator", "num_generations", "seed", "init_from_sft", "optim"})
PERTURB_FACTORS = (0.8, 1.25)


@dataclass(frozen=True)
class Standing:
    """One policy's place in a ranking: its metric and why it may be ranked out."""

    name: str
    metric: float  # what the population is ranked by (held-out), higher is better
    reward: float  # the reward adapter's held-out mean
    kl: float  # held-out KL to the reference
    distinct_2: float | None
    eligible: bool  # inside max_kl, above the distinct-2 floor, KL target held
    reason: str  # why not eligible ("" when eligible)


def rank(evals: dict[str, dict], metric: str, max_kl: float | None = None, min_distinct_2: float | None = None,
         lost: frozenset[str] | set[str] = frozenset()) -> list[Standing]:
    """The policies of `evals` (name -> held-out evaluation: `reward_mean`, `kl_mean`, `distinct_2` and
    `<metric>`) best first: eligible policies by `metric`, then the rest by `metric`. `min_distinct_2` is an
    absolute floor (the caller multiplies the reference's distinct-2); `lost`: policies whose KL controller
    lost its target. Ties keep the order of `evals`."""
    standings = []
    for name, e in evals.items():
        reasons = []
        if max_kl is not None and e["kl_mean"] > max_kl:
            reasons.append(f"KL {e['kl_mean']:.2f} > max_kl {max_kl:g}")
        d2 = e.get("distinct_2")
        if min_distinct_2 is not None and d2 is not None and d2 < min_distinct_2:
            reasons.append(f"distinct-2 {d2:.3f} < {min_distinct_2:.3f}")
        if name in lost:
            reasons.append("KL target lost")
        standings.append(Standing(name, float(e[metric]), float(e["reward_mean"]), float(e["kl_mean"]), d2,
                                  not reasons, "; ".join(reasons)))
    return sorted(standings, key=lambda s: (not s.eligible, -s.metric))


def final_ranking(survivors: list[Standing], stopped: list[Standing]) -> list[Standing]:
    """A schedule's last ranking: the policies still training (ranked at the end) and the stopped ones (ranked
    by their last evaluation). Every policy inside the limits comes before every policy outside them, so a
    survivor that drifted past `max_kl` or the distinct-2 floor after its last competitor stopped does not win;
    within each group the survivors, which won the schedule's rankings, come first."""
    return sorted([*survivors, *stopped], key=lambda s: not s.eligible)  # stable: keeps each list's order


def halve(ranking: list[Standing], keep: float) -> tuple[list[str], list[str]]:
    """(kept, stopped): the best `ceil(keep * n)` policies of a ranking (at least one), and the rest."""
    n = max(1, math.ceil(keep * len(ranking)))
    return [s.name for s in ranking[:n]], [s.name for s in ranking[n:]]


def exploit_pairs(ranking: list[Standing], quantile: float, rng: random.Random) -> list[tuple[str, str]]:
    """(loser, source) pairs: each policy of the bottom `quantile` of the ranking copies a policy drawn from
    the top `quantile` (at least one each, never itself; none for a population of one)."""
    n = len(ranking)
    k = min(max(1, math.floor(quantile * n)), n // 2)
    top, bottom = [s.name for s in ranking[:k]], [s.name for s in ranking[n - k:]]
    return [(loser, rng.choice(top)) for loser in bottom]


def explore(settings: dict, values: dict[str, list], rng: random.Random, resample: float = 0.25) -> dict:
    """PBT's explore step on copied settings: each swept number is multiplied by 0.8 or 1.25 (integers rounded,
    at least 1), each other swept setting is redrawn from the sweep's values with probability `resample`;
    settings in `NOT_EXPLORED` stay. Returns new settings (the input is not changed)."""
    out = dict(settings)
    for key, choices in values.items():
        if key in NOT_EXPLORED or key not in out:
            continue
        value = out[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            factor = rng.choice(PERTURB_FACTORS)
            out[key] = max(1, round(value * factor)) if isinstance(value, int) else value * factor
        elif len(choices) > 1 and rng.random() < resample:
            out[key] = rng.choice([c for c in choices if c != value])
    return out
