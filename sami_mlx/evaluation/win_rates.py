"""Win-rate statistics: the win rate with its Wilson interval, and the paper's length-controlled win
rate with its interval."""

from __future__ import annotations

import math
from collections.abc import Sequence

from sami_mlx.evaluation.comparisons import Outcome
from sami_mlx.stats import Z95, wilson_interval


def mean(values: Sequence[float]) -> float | None:
    return average(values) if values else None


def average(values: Sequence[float]) -> float:
    """The mean of a non-empty sequence."""
    return sum(values) / len(values)


def length_controlled_win_rate(
    scores: Sequence[float], checkpoint_lengths: Sequence[int], base_lengths: Sequence[int]
) -> tuple[float | None, dict]:
    """The paper's balanced strata: the mean of the win rate where the checkpoint's response is longer
    than the base's and the win rate where it is shorter, so neither length direction dominates.

    Equal-length pairs carry no length effect and sit in their own stratum; when every pair is equal
    the plain win rate is the answer. When only one direction occurs the value is None: length
    cannot be controlled for.
    """
    strata: dict[str, list[float]] = {"longer": [], "shorter": [], "equal": []}
    for s, mine, theirs in zip(scores, checkpoint_lengths, base_lengths):
        strata["longer" if mine > theirs else "shorter" if mine < theirs else "equal"].append(s)
    summary = {k: {"n": len(v), "win_rate": mean(v)} for k, v in strata.items()}
    if strata["longer"] and strata["shorter"]:
        return 0.5 * (average(strata["longer"]) + average(strata["shorter"])), summary
    if not strata["longer"] and not strata["shorter"]:
        return mean(strata["equal"]), summary
    return None, summary


def length_controlled_interval(strata: dict, z: float = Z95) -> list[float] | None:
    """A 95% interval for the length-controlled win rate, the mean of the 'longer' and 'shorter'
    strata's win rates: a Wald interval on each stratum's rate with one win and one loss added
    (Agresti and Caffo's adjustment, which keeps a stratum of all wins from claiming zero width),
    the two variances halved and added. With every pair of equal length it is the plain rate's
    Wilson interval; with one direction only there is no length-controlled rate, and no interval."""
    longer, shorter, equal = strata["longer"], strata["shorter"], strata["equal"]
    if not longer["n"] and not shorter["n"]:
        return wilson_interval(equal["win_rate"], equal["n"], z)
    if not longer["n"] or not shorter["n"]:
        return None
    adjusted = [((s["win_rate"] * s["n"] + 1) / (s["n"] + 2), s["n"] + 2) for s in (longer, shorter)]
    centre = 0.5 * sum(p for p, _ in adjusted)
    half = z * 0.5 * math.sqrt(sum(p * (1 - p) / n for p, n in adjusted))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def summarize(outcomes: Sequence[Outcome], checkpoint_lengths: Sequence[int], base_lengths: Sequence[int]) -> dict:
    """Win rate with its 95% interval, the length-controlled win rate with its interval and the
    equal-length pairs it left out, and the counts behind them."""
    scored = [o for o in outcomes if o.score is not None]
    scores = [o.score for o in scored if o.score is not None]
    rate = mean(scores)
    lc, strata = length_controlled_win_rate(
        scores, [checkpoint_lengths[o.query_index] for o in scored], [base_lengths[o.query_index] for o in scored]
    )
    parsed = [o for o in scored if o.verdict is not None]
    both_directions = strata["longer"]["n"] > 0 and strata["shorter"]["n"] > 0
    return {
        "win_rate": rate,
        "win_rate_ci": wilson_interval(rate, len(scores)),
        "length_controlled_win_rate": lc,
        "length_controlled_ci": length_controlled_interval(strata),
        # Pairs of equal length carry no length effect; the balanced estimate leaves them out.
        "length_controlled_left_out": strata["equal"]["n"] if both_directions else 0,
        "length_strata": strata,
        "n": len(scores),
        "wins": sum(o.score == 1.0 and o.verdict is not None for o in scored),
        "losses": sum(o.score == 0.0 for o in scored),
        "unparsable": sum(o.verdict is None for o in scored),
        "judge_errors": len(outcomes) - len(scored),
        "position_a_rate": mean([float(o.verdict == "A") for o in parsed]),
    }
