"""The statistics of llmkd's tables: Wilson intervals of a share, exact McNemar tests of paired outcomes."""

from __future__ import annotations

import math
from typing import Sequence


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sane at 0% and 100%, unlike mean +- 1.96 SE."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Two-sided exact McNemar test of paired outcomes: a binomial test on the discordant pairs."""
    if len(a_correct) != len(b_correct):
        raise ValueError("paired outcomes must cover the same questions")
    only_a = sum(a and not b for a, b in zip(a_correct, b_correct))
    only_b = sum(b and not a for a, b in zip(a_correct, b_correct))
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": min(1.0, 2 * tail)}
