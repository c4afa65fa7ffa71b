"""Sweeps: the policies of a population from a grid or a list of per-policy settings, and their names.

Pure functions over plain data; `PPOArgs.policy_entries` expands a config's `sweep` with them, and PBT's
explore step (marl.ppo.population) resamples from `sweep_values`.
"""

from __future__ import annotations

import itertools

# Short names of settings in policy names (`lr3e-4_kl2_grpo`); a setting not listed is named by itself.
ABBREVIATIONS = {"learning_rate": "lr", "kl_target": "kl", "kl_coef": "klc", "advantage_estimator": "",
                 "num_generations": "g", "temperature": "t", "reward_norm": "rn", "ent_coef": "ent", "seed": "s",
                 "beta": "beta", "reward_scale": "rs", "reward_shift": "rsh", "reward_weights": "rw",
                 "clip_coef": "clip", "vf_coef": "vf", "gae_lambda": "lam", "scale_rewards": "scale", "kl_in": "klin",
                 "optim": ""}


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
    """3e-4 -> `3e-4`, 1e-3 -> `1e-3`, 2.0 -> `2`, 0.5 -> `0p5`, 1.25e-05 -> `1p25e-5`."""
    if float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    if abs(x) >= 1e-2:
        return f"{x:g}".replace(".", "p")
    mantissa, _, exponent = f"{x:.6e}".partition("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}".replace(".", "p")
