"""Interleaved timing and the statistics of paired time ratios, for benchmarks on noisy shared machines.

Timing A and then B in two separate runs compares two machine states, not two programs: on a busy 2-core
machine the load drifts by more than the difference being measured. Here every *round* runs every
contender once, in a fresh random order, so a drift hits all contenders of a round alike; the ratio of two
contenders is then taken *per round* (``a_i / b_i``, paired) and summarised over rounds:

* ``median``: the median paired ratio, the estimate;
* ``q25`` / ``q75``: the inter-quartile range of the paired ratios, the spread of one round;
* ``ci_low`` / ``ci_high``: a distribution-free confidence interval for the median paired ratio (order
  statistics of the paired ratios, from the binomial distribution of how many fall below the median), at
  the coverage ``ci_level`` (at least ``level``, 0.95 by default, when there are 6 rounds or more; with
  fewer rounds no such interval exists and ``[min, max]`` is given with the smaller coverage it has);
* ``n``: the number of paired rounds.

Two runs "agree" when their confidence intervals overlap; a 1.000 outside the interval is a real
difference *on that machine in that state*. The interval assumes the rounds are exchangeable (a slow drift
is cancelled by the pairing; a burst of load that hits one contender of one round is what the spread is).

Use::

    from disel.utils.timing import interleaved, summarize, ratio_interval

    times = interleaved({"lora": run_lora, "disel": run_disel}, repeats=15, warmup=2)  # sync=, setup=
    stats = summarize(times, baseline="lora")  # {"disel": {"median_s": .., "ratio": {..interval..}}, ..}
    ratio_interval(times["disel"], times["lora"])  # {"median", "q25", "q75", "ci_low", "ci_high", ..}
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "format_interval",
    "interleaved",
    "median_ci",
    "quantile",
    "ratio_interval",
    "round_orders",
    "summarize",
]


def round_orders(names: Sequence[str], repeats: int, order: str = "random", seed: int = 0) -> list[list[str]]:
    """The order in which each round runs the contenders.

    ``"random"``: a fresh permutation per round (seeded, so a run is reproducible); ``"rotate"``: round i
    is the list rotated by ``i mod k``, reversed in every other block of k rounds, so over 2k rounds every
    contender runs once in every position and once after and before each other one (with 2 contenders:
    A B, B A, B A, A B, ...).
    """
    names = list(names)
    if order == "random":
        rng = random.Random(seed)
        out = []
        for _ in range(repeats):
            perm = names[:]
            rng.shuffle(perm)
            out.append(perm)
        return out
    if order == "rotate":
        out = []
        k = max(len(names), 1)
        for i in range(repeats):
            perm = names[i % k :] + names[: i % k]
            if (i // k) % 2:
                perm.reverse()
            out.append(perm)
        return out
    raise ValueError(f"order must be 'random' or 'rotate', got {order!r}")


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    *,
    order: str = "random",
    seed: int = 0,
    sync: Callable[[], object] | None = None,
    timer: Callable[[], float] = time.perf_counter,
    collect_garbage: bool = True,
    setup: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Wall-clock seconds of ``repeats`` calls of every ``fns[name]()``, interleaved: name -> list of times.

    First every function runs ``warmup`` times (not timed: allocator, caches, lazy initialisation), then
    ``repeats`` rounds, each calling every function once in the order of :func:`round_orders`. ``times[name][i]``
    is the time of round i for every name, so ``times[a][i] / times[b][i]`` are paired. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before starting and before stopping each clock, so asynchronous
    device work is counted where it is launched. Python's garbage collector runs between rounds and is
    paused within them (``collect_garbage=True``), so a collection never lands inside one contender's time.
    ``setup[name]()``, if given, runs before each call of ``fns[name]`` (warm-up included) outside the clock:
    e.g. ``peft_model.set_adapter(name)`` when the contenders are adapters of one model.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    names = list(fns)
    setup = setup or {}
    unknown = set(setup) - set(names)
    if unknown:
        raise ValueError(f"setup for unknown contenders {sorted(unknown)}")
    for _ in range(warmup):
        for n in names:
            if n in setup:
                setup[n]()
            fns[n]()
    if sync is not None:
        sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    try:
        for perm in round_orders(names, repeats, order, seed):
            if collect_garbage:
                gc.enable()
                gc.collect()
                gc.disable()
            for n in perm:
                if n in setup:
                    setup[n]()
                if sync is not None:
                    sync()
                t0 = timer()
                fns[n]()
                if sync is not None:
                    sync()
                times[n].append(timer() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def quantile(xs: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) by linear interpolation between order statistics (numpy's default)."""
    if not xs:
        raise ValueError("quantile of an empty sequence")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free confidence interval for the median of ``xs``: ``(low, high, coverage)``.

    The interval ``[x_(k), x_(n+1-k)]`` (order statistics, 1-based) covers the true median with probability
    ``1 - 2 P(Binomial(n, 1/2) <= k - 1)`` whatever the distribution; k is the largest with coverage >= level.
    Where even ``[min, max]`` falls short of ``level`` (n <= 5 for 0.95) it is returned with its coverage.
    """
    if not xs:
        raise ValueError("median_ci of an empty sequence")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = sorted(xs)
    n = len(s)
    if n == 1:
        return s[0], s[0], 0.0

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, j) for j in range(k)) / 2.0**n

    best = 1
    for k in range(1, (n + 1) // 2 + 1):
        if coverage(k) >= level:
            best = k
        else:
            break
    return s[best - 1], s[n - best], coverage(best)


def ratio_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Statistics of the paired ratios ``a[i] / b[i]`` (times of the same round): see the module docstring.

    Returns ``{"median", "q25", "q75", "ci_low", "ci_high", "ci_level", "n"}``.
    """
    if len(a) != len(b):
        raise ValueError(f"paired rounds need equal lengths, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("ratio_interval of empty sequences")
    if any(x <= 0 for x in b):
        raise ValueError("baseline times must be positive")
    ratios = [x / y for x, y in zip(a, b)]
    lo, hi, cov = median_ci(ratios, level)
    return {
        "median": statistics.median(ratios),
        "q25": quantile(ratios, 0.25),
        "q75": quantile(ratios, 0.75),
        "ci_low": lo,
        "ci_high": hi,
        "ci_level": round(cov, 4),
        "n": len(ratios),
    }


def summarize(
    times: Mapping[str, Sequence[float]], baseline: str, level: float = 0.95
) -> dict[str, dict[str, Any]]:
    """Per contender: ``median_s``, ``min_s``, ``q25_s``, ``q75_s`` (seconds) and ``ratio``, the
    :func:`ratio_interval` of its paired ratios to ``baseline``'s times (the baseline's own is exactly 1)."""
    if baseline not in times:
        raise KeyError(f"baseline {baseline!r} not among {sorted(times)}")
    base = times[baseline]
    out: dict[str, dict[str, Any]] = {}
    for name, ts in times.items():
        out[name] = {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "q25_s": quantile(ts, 0.25),
            "q75_s": quantile(ts, 0.75),
            "ratio": ratio_interval(ts, base, level),
        }
    return out


def format_interval(iv: Mapping[str, Any], digits: int = 3) -> str:
    """``1.023 [0.997, 1.051]`` (median and confidence interval) for a :func:`ratio_interval` dict."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(iv['median'])} [{f.format(iv['ci_low'])}, {f.format(iv['ci_high'])}]"
