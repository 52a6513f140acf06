"""Win rates and their 95% intervals: one formula for `sami-mlx eval` and the demo."""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


def wilson_interval(p: float | None, n: int, z: float = Z95) -> list[float] | None:
    """The Wilson score interval for a win rate p over n comparisons (ties count half); None without any."""
    if p is None or n == 0:
        return None
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def win_rate(scores: Sequence[float]) -> tuple[float | None, list[float] | None]:
    """The mean of per-comparison scores (1 a win, 0.5 a tie, 0 a loss) and its 95% Wilson interval."""
    if not scores:
        return None, None
    rate = sum(scores) / len(scores)
    return rate, wilson_interval(rate, len(scores))
