"""Accuracy-retention frontiers: a method's path through the (target accuracy, retention) plane over
training, retention interpolated at a matched accuracy, and its aggregation over seeds.

A *path* is the sequence of ``(accuracy, retention)`` points a run passed through, in training order (step
0 first). :func:`retention_at` reads a path at an accuracy: linear interpolation on the segment where the
path *first* reaches it from below (the retention the method had when it first got that good), ``None``
when it never does. :func:`matched_accuracy` picks the accuracy every path reaches (the largest one, unless
a fixed target is asked for); :func:`summarize` reads every method on every seed there and compares them.
Pure Python, no torch: the demo's report and its tests use the same maths.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Point = tuple[float, float]  # (target accuracy, retention)


def max_accuracy(path: Sequence[Point]) -> float:
    """The highest accuracy a path reaches (``-inf`` for an empty path)."""
    return max((a for a, _ in path), default=-math.inf)


def retention_at(path: Sequence[Point], accuracy: float) -> float | None:
    """Retention of ``path`` at ``accuracy``: linear interpolation on the first segment that reaches it.

    If the path starts at or above ``accuracy``, its first point's retention. ``None`` when the path never
    reaches ``accuracy`` (or is empty)."""
    if not path:
        return None
    a0, r0 = path[0]
    if a0 >= accuracy:
        return float(r0)
    for a1, r1 in path[1:]:
        if a1 >= accuracy:  # a0 < accuracy <= a1: the first crossing from below
            t = (accuracy - a0) / (a1 - a0)
            return float(r0 + t * (r1 - r0))
        a0, r0 = a1, r1
    return None


def matched_accuracy(paths: Iterable[Sequence[Point]], target: float | None = None) -> tuple[float, str]:
    """The accuracy to compare at, and how it was chosen.

    ``target`` given: that accuracy (paths that never reach it read as ``None`` in :func:`retention_at`).
    Otherwise the largest accuracy every path reaches: the minimum over paths of each path's maximum."""
    if target is not None:
        return float(target), "fixed"
    reach = [max_accuracy(p) for p in paths]
    if not reach or not all(math.isfinite(x) for x in reach):
        raise ValueError("matched_accuracy needs at least one non-empty path.")
    return float(min(reach)), "largest reached by all"


def stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count; NaNs when empty."""
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def summarize(
    paths: Mapping[str, Mapping[Any, Sequence[Point]]],
    base_retention: float,
    target: float | None = None,
    reference: str = "lora",
) -> dict[str, Any]:
    """Every method's retention at one matched accuracy, over seeds, and each method against ``reference``.

    ``paths``: ``{method: {seed: path}}``. Returns ``{"accuracy", "how", "base_retention", "reference",
    "methods": {m: {"by_seed": {seed: retention or None}, "retention": stats, "loss": base - mean}},
    "versus": {m: {"wins", "paired", "loss_ratio"}}, "sentence"}``; ``wins`` counts the seeds on which ``m``
    keeps more retention than the reference (among the ``paired`` seeds where both reach the accuracy),
    ``loss_ratio`` = m's mean retention loss / the reference's."""
    all_paths = [p for by_seed in paths.values() for p in by_seed.values()]
    acc, how = matched_accuracy(all_paths, target)
    methods: dict[str, Any] = {}
    for m, by_seed in paths.items():
        vals = {s: retention_at(p, acc) for s, p in by_seed.items()}
        st = stats([v for v in vals.values() if v is not None])
        methods[m] = {"by_seed": vals, "retention": st, "loss": base_retention - st["mean"]}
    ref = reference if reference in methods else next(iter(methods), None)
    versus: dict[str, Any] = {}
    for m, rec in methods.items():
        if m == ref:
            continue
        ref_vals = methods[ref]["by_seed"]
        paired = [s for s, v in rec["by_seed"].items() if v is not None and ref_vals.get(s) is not None]
        ref_loss = methods[ref]["loss"]
        versus[m] = {
            "wins": sum(rec["by_seed"][s] > ref_vals[s] for s in paired),
            "paired": len(paired),
            "loss_ratio": rec["loss"] / ref_loss if ref_loss and math.isfinite(ref_loss) else math.nan,
        }
    # the largest accuracy shared by all is where some path starts: that method never learned past its start
    start = max(p[0][0] for p in all_paths if p)
    out = {
        "accuracy": acc,
        "how": how,
        "degenerate": how != "fixed" and acc <= start,
        "base_retention": base_retention,
        "reference": ref,
        "methods": methods,
        "versus": versus,
    }
    out["sentence"] = sentence(out)
    return out


def _fmt(st: Mapping[str, float]) -> str:
    if st["n"] == 0:
        return "never reached"
    if st["n"] == 1:
        return f"{st['mean']:.4f}"
    return f"{st['mean']:.4f} ({st['min']:.4f}–{st['max']:.4f})"


def sentence(summary: Mapping[str, Any]) -> str:
    """One sentence of what the frontier shows, from :func:`summarize`'s numbers."""
    acc, ref, methods = summary["accuracy"], summary["reference"], summary["methods"]
    where = f"At matched accuracy {acc:.2f} ({summary['how']})"
    if ref is None:
        return f"{where}: no method to compare."
    if summary.get("degenerate"):
        return (
            f"{where}, the matched accuracy is a starting accuracy: some run never got past where it started, "
            "so the paths cannot be compared at a shared accuracy."
        )
    others = [m for m in summary["versus"] if methods[m]["retention"]["n"] > 0]
    ref_st = methods[ref]["retention"]
    if ref_st["n"] == 0 or not others:
        reached = [m for m, r in methods.items() if r["retention"]["n"] > 0]
        missing = [m for m, r in methods.items() if r["retention"]["n"] == 0]
        return (
            f"{where}, {', '.join(missing) or 'no method'} never reach{'es' if len(missing) == 1 else ''} it"
            + (f" and {', '.join(reached)} keep{'s' if len(reached) == 1 else ''} " if reached else "")
            + (", ".join(f"{m} {_fmt(methods[m]['retention'])}" for m in reached))
            + ": no paired comparison."
        )
    best = max(others, key=lambda m: methods[m]["retention"]["mean"])
    v = summary["versus"][best]
    ratio = v["loss_ratio"]
    if math.isfinite(ratio):
        diff = f"{abs(1 - ratio):.0%} {'less' if ratio < 1 else 'more'} retention loss (base − retention)"
    else:
        diff = "the reference loses no retention there"
    n_seeds = max(ref_st["n"], methods[best]["retention"]["n"])
    return (
        f"{where}, {best} keeps retention {_fmt(methods[best]['retention'])} against {ref}'s "
        f"{_fmt(ref_st)}: {diff}, higher on {v['wins']} of {v['paired']} paired seed"
        f"{'s' if v['paired'] != 1 else ''}"
        + (f" (of {n_seeds} run)" if n_seeds != v["paired"] else "")
        + "."
    )
