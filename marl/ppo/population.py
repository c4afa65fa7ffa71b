"""Populations of policies on one base: a sweep's policies, their ranking on held-out prompts, and the two
schedules that act on the ranking (successive halving, population-based training).

Pure functions over plain data (settings dicts, evaluation dicts, a `random.Random`); the trainer applies
what they decide. The ranking refuses to reward a reward hacker: a policy whose held-out KL to the reference
exceeds `max_kl`, whose distinct-2 fell below `min_distinct_2` x the reference's, or whose KL controller lost
its target ranks below every policy that does none of these, whatever its reward.

Population-based training follows Jaderberg et al. 2017 ("Population Based Training of Neural Networks"):
*exploit*, each policy of the bottom quantile takes a top-quantile policy's weights and training state;
*explore*, it then perturbs the copied settings.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

# Short names of settings in policy names (`lr3e-4_kl2_grpo`); a setting not listed is named by itself.
ABBREVIATIONS = {"learning_rate": "lr", "kl_target": "kl", "kl_coef": "klc", "advantage_estimator": "",
                 "num_generations": "g", "temperature": "t", "reward_norm": "rn", "ent_coef": "ent", "seed": "s",
                 "beta": "beta", "reward_scale": "rs", "reward_shift": "rsh", "reward_weights": "rw",
                 "clip_coef": "clip", "vf_coef": "vf", "gae_lambda": "lam", "scale_rewards": "scale", "kl_in": "klin",
                 "optim": ""}
# Settings PBT's explore step never changes: they change a policy's structure or its prompts' grouping, and
# an exploit copies them from the source with its weights.
NOT_EXPLORED = frozenset({"advantage_estimator", "num_generations", "seed", "init_from_sft", "optim"})
PERTURB_FACTORS = (0.8, 1.25)


def expand_sweep(sweep) -> list[dict]:
    """The settings of each policy of a sweep, in order: `{"grid": {key: [values]}}` gives every combination
    (the last key varying fastest), `{"list": [{key: value}, ...]}` or a plain list gives each entry; both
    together give the grid, then the list."""
    if isinstance(sweep, list):
        sweep = {"list": sweep}
    out = []
    grid = sweep.get("grid") or {}
    keys = list(grid)
    if keys:
        out += [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    out += [dict(entry) for entry in sweep.get("list") or []]
    return out


def sweep_values(sweep) -> dict[str, list]:
    """Every value a sweep names for each setting (the choices PBT's explore step resamples from)."""
    values: dict[str, list] = {}
    for settings in expand_sweep(sweep):
        for k, v in settings.items():
            if v not in values.setdefault(k, []):
                values[k].append(v)
    return values


def policy_name(settings: dict, values: dict[str, list] | None = None) -> str:
    """A policy's name from its swept settings, e.g. `lr3e-4_kl2_grpo` (valid as an adapter name: no dots).
    A value that is not a number, a string or a bool is named by its index in `values[key]`."""
    parts = []
    for key, value in settings.items():
        abbr = ABBREVIATIONS.get(key, key)
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif value is None:
            text = "none"
        elif isinstance(value, (int, float)):
            text = _number(value)
        elif isinstance(value, str):
            text = value
        else:
            text = str((values or {}).get(key, [value]).index(value))
        parts.append(f"{abbr}{text}" if abbr else text)
    name = "_".join(parts) or "policy"
    return "".join(c if c.isalnum() or c in "-_" else "p" for c in name)


def _number(x: float) -> str:
    """3e-4 -> `3e-4`, 2.0 -> `2`, 0.5 -> `0p5`, 1.25e-05 -> `1p25e-5`."""
    if float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    if abs(x) >= 1e-3:
        return f"{x:g}".replace(".", "p")
    mantissa, _, exponent = f"{x:.6e}".partition("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}".replace(".", "p")


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
