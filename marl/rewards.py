"""Reward functions usable as extra PPO reward components.

TRL's convention: `fn(completions: list[str], **kwargs) -> list[float]`, one float
per completion; kwargs include `prompts`. Name them in a PPO config as
`reward_functions: {length: marl.rewards:length_penalty}` and weigh them with
`reward_weights: {reward_model: 1.0, length: 0.5}` (per policy if you like).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .errors import MarlError

RewardFn = Callable[..., list[float]]


def length_penalty(completions: list[str], **kwargs) -> list[float]:
    """Minus the number of words divided by 32: longer answers cost more."""
    return [-len(c.split()) / 32.0 for c in completions]


def lexicon_sentiment(completions: list[str], **kwargs) -> list[float]:
    """The embedded corpus's ground-truth sentiment of each completion (a rule, not a model)."""
    from .default import sentiment_score

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
