"""Reward functions usable as extra reward components of every policy.

TRL's signature (GRPOTrainer): `fn(prompts, completions, **kwargs) -> list[float | None]`, one
value per completion, all arguments by keyword. `kwargs` hold `completion_ids` and the dataset's
other columns for those rows (everything but `prompt`), so a reward can check an answer column:

    def exact_answer(prompts, completions, answer, **kwargs):
        return [float(a in c) if a is not None else None for c, a in zip(completions, answer)]

`None` means "no score from this function for this row": as in TRL 1.16's GRPOTrainer (which
turns None into NaN and sums the weighted functions with `nansum`), it adds nothing to that row's
combined reward. The reward adapter scores every row, so a row is never left without a score.
Older marl functions `fn(completions, **kwargs)` and functions that name only some arguments
(`fn(completions, prompts)`) keep working: each function gets the arguments its signature takes.

Name them in a PPO config as `reward_functions: {length: marl.rewards:length_penalty}` and weigh
them with `reward_weights: {reward_model: 1.0, length: 0.5}` (per policy if you like).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from .default import sentiment_score
from .errors import MarlError

RewardFn = Callable[..., list[float | None]]
NOT_COLUMNS = ("prompt", "completion", "completion_ids", "prompts", "completions")  # not passed on as columns


def length_penalty(completions: list[str], **kwargs) -> list[float]:
    """Minus the number of words divided by 32: longer answers cost more."""
    return [-len(c.split()) / 32.0 for c in completions]


def lexicon_sentiment(completions: list[str], **kwargs) -> list[float]:
    """The embedded corpus's ground-truth sentiment of each completion (a rule, not a model)."""

    return [float(sentiment_score(c)) for c in completions]


def load_reward_function(spec: str) -> RewardFn:
    """Import `package.module:function`; a clear error if it is not there."""
    if ":" not in spec:
        raise MarlError(f"reward function {spec!r} must be written module:function, e.g. marl.rewards:length_penalty")
    module_name, fn_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MarlError(f"reward function {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise MarlError(f"reward function {spec!r}: {module_name} has no function {fn_name!r}")
    return fn


def dataset_columns(ds) -> dict[str, list]:
    """The columns of a `datasets.Dataset` that reward functions receive (all but the prompt), by name."""
    return {c: list(ds[c]) for c in ds.column_names if c not in NOT_COLUMNS}


def call_reward_function(fn: RewardFn, name: str, prompts: list[str], completions: list[str],
                         **kwargs) -> list[float]:
    """`fn`'s score of every completion as floats, None (no score) read as 0.0.

    Arguments go by keyword (TRL's convention); a function without `**kwargs` gets only those it names.
    A wrong number of values or a value that is not a number is a one-line error naming the function.
    """
    args = {"prompts": prompts, "completions": completions, **kwargs}
    sig = inspect.signature(fn)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        args = {k: v for k, v in args.items() if k in sig.parameters}
    try:
        sig.bind(**args)
    except TypeError as e:
        raise MarlError(f"reward function {name!r} cannot be called as fn(prompts=, completions=, **columns) "
                        f"({e}): give it TRL's signature fn(prompts, completions, **kwargs)") from None
    values = list(fn(**args))
    if len(values) != len(completions):
        raise MarlError(f"reward function {name!r} returned {len(values)} values for {len(completions)} "
                        "completions: return one value (or None) per completion")
    out = []
    for v in values:
        if v is not None and not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise MarlError(f"reward function {name!r} returned {v!r}: return a number or None per completion")
        out.append(0.0 if v is None else float(v))  # TRL: None is NaN, then nansum over the functions
    return out


__all__ = ["RewardFn", "call_reward_function", "dataset_columns", "length_penalty", "lexicon_sentiment",
           "load_reward_function"]
