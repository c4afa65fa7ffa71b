"""What the text looks like, beside the reward: diversity and repetition of a set of responses.

A policy that over-optimises its reward model usually collapses onto a few phrases ("performance
of performance of ...") while the reward curve keeps rising. These numbers make that visible:

- distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
  Models"): unique n-grams / all n-grams over a set of responses. It falls when responses repeat
  themselves or each other. It also falls as the set grows, so sets are compared at one size:
  `group` responses at a time, averaged over the groups.
- repeated n-gram rate (seq-rep-n of Welleck et al. 2020, "Neural Text Generation with
  Unlikelihood Training"): per response, 1 - unique n-grams / n-grams, averaged over responses.
- mean length in words.

Words: lower-cased runs of letters, digits and apostrophes, and each punctuation mark on its own.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["CollapseWatch", "TextStats", "distinct_n", "mean_words", "ngrams", "repeated_ngram_rate", "text_stats", "words"]

_WORD = re.compile(r"[\w']+|[^\w\s]")
REPEAT_N = 4  # seq-rep-4, as Welleck et al.


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int, group: int | None = None) -> float:
    """Unique n-grams / n-grams over `texts` (0.0 when there are none).

    With `group`, the mean over consecutive groups of `group` texts (a shorter last group is dropped
    when there is a full one), so that sets of different sizes compare.
    """
    if group is not None and len(texts) > group:
        groups = [texts[i:i + group] for i in range(0, len(texts) - group + 1, group)]
        return sum(distinct_n(g, n) for g in groups) / len(groups)
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(texts: list[str], n: int = REPEAT_N) -> float:
    """Mean over responses of 1 - unique n-grams / n-grams within the response (responses shorter than
    n words count as 0)."""
    if not texts:
        return 0.0
    rates = []
    for t in texts:
        grams = ngrams(words(t), n)
        rates.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return sum(rates) / len(rates)


def mean_words(texts: list[str]) -> float:
    return sum(len(words(t)) for t in texts) / len(texts) if texts else 0.0


class TextStats(NamedTuple):
    distinct_1: float
    distinct_2: float
    repeat_4: float
    words: float


def text_stats(texts: list[str], group: int | None = None) -> TextStats:
    """Every statistic of this module for one set of responses (`group`: see `distinct_n`)."""
    return TextStats(distinct_n(texts, 1, group), distinct_n(texts, 2, group), repeated_ngram_rate(texts),
                     mean_words(texts))


class CollapseWatch:
    """Flags, once per policy, a reward that rises while distinct-2 falls below `ratio` x the reference
    adapter's distinct-2 (the sft adapter's, measured by the held-out evaluation before training).

    "Rises" is against the policy's first reward seen by this watch. Returns the warning text, or None.
    """

    def __init__(self, reference_distinct_2: float | None, ratio: float = 0.5) -> None:
        self.reference = reference_distinct_2
        self.threshold = None if reference_distinct_2 is None else ratio * reference_distinct_2
        self.first_reward: dict[str, float] = {}
        self.warned: set[str] = set()

    def check(self, name: str, reward: float, distinct_2: float) -> str | None:
        first = self.first_reward.setdefault(name, reward)
        if self.threshold is None or name in self.warned or not (reward > first and distinct_2 < self.threshold):
            return None
        self.warned.add(name)
        return (f"{name}: the reward rose ({first:.3f} -> {reward:.3f}) while distinct-2 fell to {distinct_2:.3f}, "
                f"under half the sft adapter's ({self.reference:.3f}): the policy is likely over-optimising the "
                "reward model (read its samples); raise kl_coef, set kl_target, or lower reward_scale")
