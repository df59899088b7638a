"""Retention (forgetting) suites run through lm-evaluation-harness, in process.

Three kinds of task references (strings in a spec's ``retention`` list, or ``{"task", "metric", ...}``):

- presets: ``"paper"`` — the DISeL paper's 14-task suite (5-shot, max length 512, unweighted mean; needs
  the Hugging Face hub); ``"offline"`` — the two offline tasks below;
- offline tasks generated at run time from real text every Python install has (the standard library's
  ``heldout`` split, see :mod:`disel.data.stdlib`), written as lm-eval YAML + JSONL into a cache directory:
  ``stdlib-ppl`` (rolling log-likelihood, bits per byte, on held-out docstrings and source) and
  ``stdlib-nextline`` (4-way multiple choice: which line really follows these lines of held-out source;
  distractors are real lines of other files, re-indented like the true line);
- ``stdlib-likelihood``: computed in process, without lm-eval (:func:`likelihood_retention`, the measure
  ``disel demo`` reports): the mean per-token likelihood ``exp(-NLL)`` of a fixed sample of held-out stdlib
  docstrings and source (:func:`stdlib_retention_texts`: ``n`` texts per domain, each cut to ``max_length``
  tokens with BOS first; the NLL of each domain token-weighted, then averaged over the domains). Options in
  the dict form ``{task: stdlib-likelihood, n: 48, max_length: 128, batch_size: 8}`` (these defaults);
- any lm-eval task name, or a path to a YAML task file.

Every task reports one raw value (``retention[task]``) and a score where higher is better and accuracies and
perplexities share a [0, 1] scale: accuracies and likelihoods as they are, ``2**-bits_per_byte`` for bits per
byte and ``1/ppl`` for perplexities (the geometric-mean probability the model gives each byte/token).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..utils.io import atomic_write_text

# (task, metric, filter) of the paper's suite, in FACTS.md's order; triviaqa/nq_open report exact match.
PAPER_SUITE: tuple[tuple[str, str, str], ...] = (
    ("hellaswag", "acc_norm", "none"),
    ("winogrande", "acc", "none"),
    ("arc_challenge", "acc_norm", "none"),
    ("arc_easy", "acc_norm", "none"),
    ("lambada_openai", "acc", "none"),
    ("boolq", "acc", "none"),
    ("piqa", "acc_norm", "none"),
    ("triviaqa", "exact_match", "remove_whitespace"),
    ("openbookqa", "acc_norm", "none"),
    ("sciq", "acc", "none"),
    ("mmlu", "acc", "none"),
    ("medqa_4options", "acc", "none"),
    ("commonsense_qa", "acc", "none"),
    ("nq_open", "exact_match", "remove_whitespace"),
)
PAPER_FEWSHOT = 5
PAPER_MAX_LENGTH = 512

OFFLINE_TASKS = ("stdlib-ppl", "stdlib-nextline")
# Computed in process from evaluation.lm's token NLL (no lm-eval); not part of the "offline" preset.
LIKELIHOOD_TASK = "stdlib-likelihood"
LIKELIHOOD_DEFAULTS: dict[str, int] = {"n": 48, "max_length": 128, "batch_size": 8}
STDLIB_DOMAINS = ("docstrings", "source")
# Metrics tried, in order, for a task given without one.
_DEFAULT_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "bits_per_byte", "word_perplexity")


@dataclass
class TaskRef:
    """One retention task: its report ``name``, lm-eval task name, metric, filter and few-shot count."""

    name: str
    lm_eval_task: str
    metric: str | None = None
    filter: str = "none"
    num_fewshot: int | None = None
    include_path: str | None = None
    hub: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_retention(entries: list[Any], n_docs: int = 200, generate: bool = True) -> list[TaskRef]:
    """Expand presets and normalise entries to :class:`TaskRef` (offline data is generated here; with
    ``generate=False`` it is not, and offline refs have no ``include_path``: what planning needs)."""
    out: list[TaskRef] = []
    for e in entries:
        if isinstance(e, dict):
            if "task" not in e:
                raise UserError(
                    f"Retention entry {e!r} has no 'task' key: write {{task: NAME, metric: ...}}."
                )
            if e["task"] == LIKELIHOOD_TASK:
                out.append(likelihood_ref({k: v for k, v in e.items() if k != "task"}))
                continue
            base = resolve_retention([e["task"]], n_docs, generate)
            for r in base:
                r.metric = e.get("metric", r.metric)
                r.filter = e.get("filter", r.filter)
                r.num_fewshot = e.get("num_fewshot", r.num_fewshot)
            out += base
        elif not isinstance(e, str) or not e:
            raise UserError(f"Retention entry {e!r} is not a task name: use a name, a preset or a YAML path.")
        elif e == "paper":
            out += [TaskRef(t, t, m, f, PAPER_FEWSHOT, hub=True) for t, m, f in PAPER_SUITE]
        elif e == "offline":
            out += resolve_retention(list(OFFLINE_TASKS), n_docs, generate)
        elif e in OFFLINE_TASKS:
            out.append(offline_task(e, n_docs) if generate else offline_ref(e))
        elif e == LIKELIHOOD_TASK:
            out.append(likelihood_ref({}))
        elif e.startswith("mlm:"):
            out.append(TaskRef(e, "", "perplexity", extra={"mlm": e[4:]}))
        elif e.endswith((".yaml", ".yml")):
            p = Path(e).expanduser().resolve()
            if not p.exists():
                raise UserError(
                    f"Retention task file {e} does not exist: pass an existing lm-eval YAML file."
                )
            name = _yaml_task_name(p, e)
            if not isinstance(name, str):
                raise UserError(f"{e} has no 'task:' name: add one to the YAML file.")
            out.append(TaskRef(name, name, include_path=str(p.parent)))
        else:
            out.append(TaskRef(e, e, hub=True))
    return out


def likelihood_ref(options: dict[str, Any]) -> TaskRef:
    """The :class:`TaskRef` of ``stdlib-likelihood`` with ``options`` (``n``, ``max_length``, ``batch_size``;
    positive integers) over :data:`LIKELIHOOD_DEFAULTS`."""
    unknown = sorted(set(options) - set(LIKELIHOOD_DEFAULTS))
    if unknown:
        raise UserError(
            f"Retention task {LIKELIHOOD_TASK} has no option {', '.join(map(repr, unknown))}: use "
            f"{', '.join(LIKELIHOOD_DEFAULTS)}."
        )
    opts = {**LIKELIHOOD_DEFAULTS, **options}
    for k, v in opts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{LIKELIHOOD_TASK}: {k}={v!r} is invalid: use a positive integer.")
    if opts["max_length"] < 2:
        raise UserError(f"{LIKELIHOOD_TASK}: max_length={opts['max_length']} is too small: use 2 or more.")
    return TaskRef(LIKELIHOOD_TASK, "", "likelihood", extra={"likelihood": opts})


def stdlib_retention_texts(n: int, domains: tuple[str, ...] = STDLIB_DOMAINS) -> dict[str, list[str]]:
    """A fixed sample of ``n`` held-out stdlib texts per domain (``docstrings``, ``source``: modules the
    shipped demo model never saw; :mod:`disel.data.stdlib`'s ``heldout`` split), drawn with a generator seeded
    by the domain's name and kept in the pool's order: what ``disel demo`` measures retention on."""
    from ..data.stdlib import stdlib_docstrings, stdlib_source_chunks

    readers = {"docstrings": stdlib_docstrings, "source": stdlib_source_chunks}
    out = {}
    for name in domains:
        pool = readers[name]("heldout")
        idx = sorted(random.Random(f"retention:{name}").sample(range(len(pool)), min(n, len(pool))))
        out[name] = [pool[i] for i in idx]
    return out


def likelihood_retention(
    model: Any, tokenizer: Any, texts: dict[str, list[str]], max_length: int, batch_size: int = 8
) -> dict[str, Any]:
    """Per-domain token NLL and perplexity of ``texts`` (:func:`disel.evaluation.lm.token_nll`: BOS first,
    each text cut to ``max_length`` tokens) and the score, higher is better: ``exp(-mean NLL over domains)``,
    the mean per-token likelihood. ``{"score", "domains": {domain: {"nll", "ppl"}}}``."""
    import math

    from .lm import token_nll

    per = {
        d: token_nll(model, tokenizer, t, max_length=max_length, batch_size=batch_size)
        for d, t in texts.items()
    }
    mean_nll = sum(v["nll"] for v in per.values()) / len(per)
    return {
        "score": math.exp(-mean_nll),
        "domains": {d: {"nll": v["nll"], "ppl": v["ppl"]} for d, v in per.items()},
    }


def _yaml_task_name(path: Path, entry: str) -> Any:
    import yaml

    from ..data.sources import read_text_file

    try:
        doc = yaml.safe_load(read_text_file(path))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        raise UserError(f"{path}{line} is not valid YAML: fix the lm-eval task file {entry}.") from None
    return doc.get("task") if isinstance(doc, dict) else None


def cache_dir() -> Path:
    """Where generated task data lives: $DISEL_CACHE_DIR/eval, else ~/.cache/disel/eval."""
    root = os.environ.get("DISEL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "disel")
    return Path(root) / "eval"


def _ppl_docs(n: int, max_chars: int = 800) -> list[dict[str, str]]:
    from ..data.stdlib import stdlib_docstrings, stdlib_source_chunks

    docs = [d[:max_chars] for d in stdlib_docstrings("heldout")[: (n + 1) // 2]]
    code = [c[:max_chars] for c in stdlib_source_chunks("heldout")[: n // 2]]
    mixed = [x for pair in zip(docs, code) for x in pair] + docs[len(code) :] + code[len(docs) :]
    return [{"text": t} for t in mixed[:n]]


def _nextline_docs(n: int, context_lines: int = 8, n_choices: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Items "which line follows this source?" with distractor lines from other chunks (other places)."""
    from ..data.stdlib import stdlib_source_chunks

    chunks = [c.splitlines() for c in stdlib_source_chunks("heldout")]

    def good(line: str) -> bool:
        s = line.strip()
        return len(s) >= 12 and not s.startswith("#")

    pool = [(ci, ln.strip()) for ci, ch in enumerate(chunks) for ln in ch if good(ln)]
    rng = random.Random(seed)
    items = []
    for ci, ch in enumerate(chunks):
        if len(items) >= n:
            break
        cands = [i for i in range(context_lines, len(ch)) if good(ch[i])]
        if not cands:
            continue
        k = cands[0]
        true = ch[k]
        indent = true[: len(true) - len(true.lstrip())]
        distract: list[str] = []
        while len(distract) < n_choices - 1:
            cj, text = pool[rng.randrange(len(pool))]
            if abs(cj - ci) > 2 and text != true.strip() and indent + text not in distract:
                distract.append(indent + text)
        choices = [true, *distract]
        rng.shuffle(choices)
        context = "\n".join(ch[k - context_lines : k]) + "\n"
        items.append({"context": context, "choices": choices, "label": choices.index(true)})
    return items


_PPL_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""

_MC_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_rolling_likelihood_task(directory: Path, task: str, docs: list[dict[str, str]]) -> Path:
    """Write an lm-eval task ``task`` (``directory/task.yaml`` + ``data.jsonl``) scoring the rolling
    log-likelihood of each doc's ``text`` (word/byte perplexity, bits per byte); returns the YAML's path.
    The offline ``stdlib-ppl`` task is one; pass ``--include_path directory`` to lm-eval for your own."""
    directory.mkdir(parents=True, exist_ok=True)
    data, yaml_path = directory / "data.jsonl", directory / f"{task}.yaml"
    atomic_write_text(data, "".join(json.dumps(x) + "\n" for x in docs))
    atomic_write_text(yaml_path, _PPL_YAML.format(task=task, data=json.dumps(str(data.resolve()))))
    return yaml_path


def offline_ref(name: str) -> TaskRef:
    """The :class:`TaskRef` of an offline task without its data (``include_path`` None)."""
    metric = "bits_per_byte" if name == "stdlib-ppl" else "acc"
    return TaskRef(name, "disel_" + name.replace("-", "_"), metric, "none", 0)


def offline_task(name: str, n_docs: int = 200) -> TaskRef:
    """Write (once, into the cache) the lm-eval YAML and JSONL of an offline task; its :class:`TaskRef`."""
    key = hashlib.sha1(f"{name}|{n_docs}|{sys.version_info[:2]}|v2".encode()).hexdigest()[:10]
    task = "disel_" + name.replace("-", "_")
    d = cache_dir() / f"{task}-{key}"
    yaml_path = d / f"{task}.yaml"
    if not yaml_path.exists():
        if name == "stdlib-ppl":
            write_rolling_likelihood_task(d, task, _ppl_docs(n_docs))
        elif name == "stdlib-nextline":
            data = d / "data.jsonl"
            atomic_write_text(data, "".join(json.dumps(x) + "\n" for x in _nextline_docs(n_docs)))
            atomic_write_text(yaml_path, _MC_YAML.format(task=task, data=json.dumps(str(data.resolve()))))
        else:  # pragma: no cover - guarded by OFFLINE_TASKS
            raise UserError(f"{name!r} is not an offline task: choose one of {', '.join(OFFLINE_TASKS)}.")
    ref = offline_ref(name)
    ref.include_path = str(d)
    return ref


def task_data_path(ref: TaskRef) -> Path:
    """The JSONL file of an offline task (for direct computations that must agree with lm-eval)."""
    if not ref.include_path:
        raise ValueError(f"{ref.name} is not a local task.")
    return Path(ref.include_path) / "data.jsonl"


def score_of(metric: str, value: float) -> float:
    """The higher-is-better [0, 1] score of a raw metric value (see the module docstring): accuracies and
    ``likelihood`` as they are."""
    if metric == "bits_per_byte":
        return 2.0 ** (-value)
    if "perplexity" in metric or metric == "ppl":
        return 1.0 / value if value > 0 else 0.0
    return value


_TASK_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}


def _task_manager(includes: tuple[str, ...], defaults: bool) -> Any:
    """lm-eval's task index, built once per process for each set of task folders: indexing lm-eval's own
    tasks takes seconds, and evaluation units call :func:`run_lm_eval` once per task."""
    from lm_eval.tasks import TaskManager

    key = (includes, defaults)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=list(includes) or None, include_defaults=defaults)
    return _TASK_MANAGERS[key]


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    refs: list[TaskRef],
    limit: int | None = None,
    max_length: int = PAPER_MAX_LENGTH,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``refs`` with lm-eval on an in-memory model: ``{name: {"metric", "value", "all"}}``."""
    if not refs:
        return {}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    cfg = getattr(model, "config", None)
    limit_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit_len:
        max_length = min(max_length, int(limit_len))
    lm = HFLM(
        pretrained=model, tokenizer=tokenizer, backend="causal", max_length=max_length, batch_size=batch_size
    )
    includes = tuple(sorted({r.include_path for r in refs if r.include_path}))
    needs_defaults = any(not r.include_path for r in refs)
    tm = _task_manager(includes, needs_defaults)
    out: dict[str, dict[str, Any]] = {}
    groups: dict[int | None, list[TaskRef]] = {}
    for r in refs:
        groups.setdefault(num_fewshot if num_fewshot is not None else r.num_fewshot, []).append(r)
    for shots, group in groups.items():
        try:
            res = simple_evaluate(
                model=lm,
                tasks=sorted({r.lm_eval_task for r in group}),
                num_fewshot=shots,
                limit=limit,
                task_manager=tm,
                log_samples=False,
                bootstrap_iters=0,
                verbosity="ERROR",
            )
        except (ConnectionError, OSError) as e:
            hub = [r.name for r in group if r.hub]
            raise UserError(
                f"lm-eval could not load {', '.join(hub) or 'the tasks'} ({e}): these need the Hugging Face "
                "hub; run with network access or use the offline suite ('offline')."
            ) from e
        results = (res or {}).get("results", {})
        for r in group:
            row = results.get(r.lm_eval_task)
            if row is None:
                raise UserError(f"lm-eval returned no result for {r.lm_eval_task!r}: check the task name.")
            metric = r.metric or next(
                (m for m in _DEFAULT_METRICS if f"{m},{r.filter}" in row),
                next((k.split(",")[0] for k, v in row.items() if "," in k and isinstance(v, float)), None),
            )
            key = f"{metric},{r.filter}"
            if key not in row:
                raise UserError(
                    f"Task {r.lm_eval_task!r} has no metric {key!r}: choose one of "
                    f"{', '.join(k for k in row if ',' in k and 'stderr' not in k)}."
                )
            out[r.name] = {
                "metric": metric,
                "value": float(row[key]),
                "all": {k: v for k, v in row.items() if isinstance(v, int | float)},
            }
    return out
