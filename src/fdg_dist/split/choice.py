"""The pure rule of ``pipeline.cost=time``: which candidate splits a trial compares, and which one wins.

Candidates are the balanced split and its neighbours, ranked by the time per batch ``pace`` predicts; the trial
(``run.split_trial``) measures the best few in the pipeline and hands the samples back here: the fastest wins,
and among those the trial cannot tell from it, the best predicted.  Must not start processes, time anything or
touch files: numbers in, a decision out.
"""

from __future__ import annotations

import itertools
import math
import statistics

from fdg_dist.split import pace, partition

SPREAD = 2  # blocks each boundary of the balanced split may move
TRIALS = 3  # candidates tried in the pipeline
PLAUSIBLE = 0.10  # only candidates predicted within this of the best are tried: noise cannot pick a poor one
Z = 2.0  # medians closer than Z standard errors of their difference cannot be told apart ...
TIE = 0.03  # ... nor closer than this (relative): a fresh pipeline on a shared machine varies more than that


def worth_trying(ranked: list[tuple[list[int], float]], runs: int) -> list[tuple[list[int], float]]:
    """The candidates a trial compares: the best ``TRIALS`` (fewer if only ``runs`` trial runs fit the budget)
    predicted within ``PLAUSIBLE`` of the best; none if that leaves fewer than two."""
    plausible = [c for c in ranked[:min(TRIALS, runs)] if c[1] <= ranked[0][1] * (1 + PLAUSIBLE)]
    return plausible if len(plausible) >= 2 else []


def median_se(samples: list[float]) -> tuple[float, float]:
    """The median of a candidate's seconds per batch and its standard error (from the median absolute
    deviation: one batch slowed by interference neither moves the median nor inflates the spread)."""
    median = statistics.median(samples)
    mad = statistics.median(abs(x - median) for x in samples)
    return median, 1.2533 * 1.4826 * mad / math.sqrt(len(samples))


def _lags(samples: list[list[float]]) -> list[tuple[float, float]]:
    """Every candidate's lag behind the fastest median and the uncertainty of that lag (``Z`` standard errors
    of the difference), both relative to the fastest."""
    estimates = [median_se(s) for s in samples]
    fastest, fastest_se = min(estimates)
    return [((m - fastest) / fastest, Z * math.hypot(se, fastest_se) / fastest) for m, se in estimates]


def contenders(samples: list[list[float]]) -> list[int]:
    """The candidates the trial cannot tell from the fastest (lag within ``Z`` standard errors, or within
    ``TIE``), the fastest included."""
    return [i for i, (lag, error) in enumerate(_lags(samples)) if lag <= max(error, TIE)]


def decide(samples: list[list[float]]) -> int:
    """Which tried candidate (in predicted order) wins: the fastest in the trial, or the best predicted of those
    the trial cannot tell from the fastest.

    Candidates that close are equally fast within what the trial measured, and whether one of them comes out
    ahead changes from run to run; the prediction ranks them the same way in every fresh run (it comes from
    block times measured in one process, away from the pipeline's interference), so it decides.
    """
    return min(contenders(samples))


def settled(samples: list[list[float]]) -> bool:
    """Whether the trial has seen enough: every contender's uncertainty is inside ``TIE``, so measuring
    better could hardly change who contends."""
    lags = _lags(samples)
    return all(lags[i][1] <= TIE for i in contenders(samples))


def rank_candidates(times: list[pace.BlockTime], K: int, method: str, recompute: bool,
                    starts: list[int] | None = None) -> list[tuple[list[int], float]]:
    """Every split within ``SPREAD`` blocks of the balanced one, fastest predicted first (ties: smaller bounds);
    modules start only at ``starts`` (default: any block; see ``partition.weighted_starts``)."""
    n = len(times)
    base = partition.split_points([t.total for t in times], K, "auto", starts)
    allowed = set(range(1, n) if starts is None else starts)
    options = set()
    for shift in itertools.product(range(-SPREAD, SPREAD + 1), repeat=K - 1):
        bounds = [0, *(b + s for b, s in zip(base[1:-1], shift, strict=True)), n]
        if all(a < b for a, b in itertools.pairwise(bounds)) and allowed.issuperset(bounds[1:-1]):
            options.add(tuple(bounds))
    scored = [(list(b), pace.split_period(method, times, b, recompute=recompute)) for b in options]
    return sorted(scored, key=lambda c: (c[1], c[0]))
