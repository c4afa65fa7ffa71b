"""Means of repeated measurements with their standard errors (seeds of a run, hands of a game)."""

from __future__ import annotations

import math


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (NaN for one value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def difference(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """The difference of two independent means (mean, standard error) and its standard error."""
    return a[0] - b[0], math.sqrt(a[1] ** 2 + b[1] ** 2)
