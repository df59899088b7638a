"""Evaluate a model, every checkpoint of a run, and pick the best checkpoint (the paper's protocol).

The ``spec`` (a dict, or a YAML file with the same keys; documented in docs/evaluation.md):

    retention: [stdlib-ppl, stdlib-nextline]   # presets, offline tasks, stdlib-likelihood, lm-eval names/YAML
                                               # paths, mlm:CORPUS
    target: {type: exact_match, path: data.jsonl}   # or gsm8k / humaneval / classification / lm_eval / none
    limit: 50          # documents per task (None: all)
    n_docs: 200        # size of the generated offline tasks
    max_length: 512    # lm-eval context length (capped by the model's positions)
    batch_size: 8
    num_fewshot: null  # override every retention task's few-shot count
    mlm: {base: roberta-base, rate: 0.15, seed: 0, n: 200, max_length: 128}

A run is evaluated in units, one per (checkpoint, metric): each retention task and the target of every
``checkpoint-<step>`` and ``final``. Each unit is stored (kind ``"eval_unit"``) the moment it is done, keyed
by the run's key (``run.json``'s ``run_key``, else its ``run_id``), the step and a fingerprint of the spec
settings that unit depends on; a rerun evaluates exactly the missing units and loads no model when none is
missing. When every unit of a checkpoint is there, its ``"eval"`` record (the whole payload, with the delta
against the base model) is written; the run's ``"eval_plan"`` record lists the checkpoints and metrics the
evaluation is to cover, so a report can tell a complete evaluation from part of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..results import DEFAULT_NAME, ResultsStore

SPEC_KEYS = {"retention", "target", "limit", "n_docs", "max_length", "batch_size", "num_fewshot", "mlm"}
TARGET_TYPES = ("exact_match", "gsm8k", "humaneval", "classification", "lm_eval", "none")
UNIT_KIND = "eval_unit"
PLAN_KIND = "eval_plan"
TARGET_UNIT = "target"
RETENTION_UNIT = "retention:"


def load_spec(spec: dict[str, Any] | str | Path | None) -> dict[str, Any]:
    """Validate a spec dict or read it from a YAML file; fills defaults."""
    if spec is None:
        spec = {}
    if isinstance(spec, str | Path):
        p = Path(spec)
        if not p.exists():
            raise UserError(f"Eval spec {p} does not exist: pass a YAML file (see docs/evaluation.md).")
        import yaml

        from ..data.sources import read_text_file

        try:
            spec = yaml.safe_load(read_text_file(p)) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            raise UserError(
                f"Eval spec {where} is not valid YAML: fix the file (see docs/evaluation.md)."
            ) from None
    if not isinstance(spec, dict):
        raise UserError("The eval spec must be a mapping: write keys retention, target, limit, ...")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"Unknown eval spec key(s) {sorted(unknown)}: use {', '.join(sorted(SPEC_KEYS))}.")
    out = {
        "retention": ["offline"],
        "target": None,
        "limit": None,
        "n_docs": 200,
        "max_length": 512,
        "batch_size": 8,
        "num_fewshot": None,
        "mlm": {},
    }
    out.update({k: v for k, v in spec.items() if v is not None or k in ("target", "limit")})
    if isinstance(out["retention"], str):
        out["retention"] = [out["retention"]]
    t = out["target"]
    if t is not None:
        if not isinstance(t, dict) or t.get("type") not in TARGET_TYPES:
            raise UserError(
                f"target={t!r} is invalid: use a mapping with type one of {', '.join(TARGET_TYPES)}."
            )
        if t["type"] in ("exact_match",) and "path" not in t:
            raise UserError(f"target type {t['type']} needs a 'path' to a JSONL file of prompt/answer lines.")
        if t["type"] == "gsm8k" and "path" not in t:
            out["target"] = {**t, "type": "lm_eval", "task": "gsm8k", "metric": "exact_match,strict-match"}
    return out


def _spec_key(spec: dict[str, Any]) -> str:
    keep = {k: spec.get(k) for k in ("retention", "limit", "n_docs", "max_length", "num_fewshot", "mlm")}
    text = json.dumps(keep, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def target_key(spec: dict[str, Any]) -> str:
    """A fingerprint of the spec's target: a cached base evaluation is reused only under the same target
    (two runs on other test sets, e.g. one per seed, each get the base's score on their own)."""
    return hashlib.sha1(json.dumps(spec.get("target"), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _is_causal(model: Any) -> bool:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(hf).__name__.endswith("ForCausalLM")


def evaluate_target(model: Any, tokenizer: Any, target: dict[str, Any] | None, limit: int | None) -> dict:
    """``(metrics, score)`` of the target task; score is the metric chosen as higher-is-better."""
    from . import targets

    if not target or target.get("type") == "none":
        return {}
    kind = target["type"]
    if kind == "exact_match":
        m = targets.evaluate_exact_match(model, tokenizer, target, limit)
    elif kind == "gsm8k":
        m = targets.evaluate_gsm8k_local(model, tokenizer, target, limit)
    elif kind == "humaneval":
        from .humaneval import evaluate_humaneval

        r = evaluate_humaneval(
            model,
            tokenizer,
            limit=target.get("limit", limit),
            max_new_tokens=int(target.get("max_new_tokens", 384)),
            workers=int(target.get("workers", 2)),
            timeout=float(target.get("timeout", 10.0)),
            # target: {type: humaneval, weak_sandbox: true} accepts the weaker sandbox where the kernel
            # offers no namespaces (docs/evaluation.md says what it still protects)
            allow_weak=bool(target.get("weak_sandbox", False)),
        )
        m = {"pass@1": r["pass@1"], "n": float(r["n"])}
    elif kind == "classification":
        m = targets.evaluate_classification(model, tokenizer, target, limit)
    elif kind == "lm_eval":
        from .retention import resolve_retention, run_lm_eval

        metric, _, filt = str(target.get("metric", "")).partition(",")
        refs = resolve_retention(
            [{"task": target["task"], "metric": metric or None, "filter": filt or "none"}]
        )
        r = run_lm_eval(model, tokenizer, refs, limit=limit, num_fewshot=target.get("num_fewshot"))
        m = {f"{v['metric']}": v["value"] for v in r.values()}
    else:  # pragma: no cover - load_spec validates
        raise UserError(f"Unknown target type {kind!r}.")
    return m


def _target_score(metrics: dict[str, float], target: dict[str, Any] | None) -> float | None:
    if not metrics:
        return None
    if target and target.get("metric"):
        name = str(target["metric"]).split(",")[0]
        if name in metrics:
            return float(metrics[name])
    for k in ("pass@1", "exact_match", "accuracy", "acc", "acc_norm"):
        if k in metrics:
            return float(metrics[k])
    return float(next(v for k, v in metrics.items() if k != "n"))


def validate_inputs(spec: dict[str, Any]) -> None:
    """Read the spec's local target data once (existence, UTF-8, JSON lines, fields), so that bad input fails
    before any model is loaded or anything is written."""
    from .targets import read_jsonl

    t = spec.get("target") or {}
    kind = t.get("type")
    if kind == "exact_match":
        read_jsonl(t["path"], ("prompt", "answer"))
    elif kind == "gsm8k" and "path" in t:
        read_jsonl(t["path"], ("question", "answer"))
        if "fewshot_path" in t:
            read_jsonl(t["fewshot_path"], ("question", "answer"), what="Few-shot data file")
    elif kind == "classification" and "path" in t:
        read_jsonl(t["path"], ("label",))


class _Retention:
    """The retention tasks of one spec, resolved once (offline task data generated), evaluated one at a time."""

    def __init__(self, spec: dict[str, Any]):
        from .retention import resolve_retention

        self.spec = spec
        self.refs: dict[str, Any] = {}
        for r in resolve_retention(list(spec.get("retention") or []), n_docs=int(spec.get("n_docs", 200))):
            self.refs.setdefault(r.name, r)
        self._heads: dict[str, Any] = {}

    def check(self, model: Any, names: list[str] | None = None) -> None:
        lm = [n for n in (names if names is not None else self.refs) if "mlm" not in self.refs[n].extra]
        if lm and not _is_causal(model):
            raise UserError(
                f"Retention tasks {', '.join(lm)} need a causal LM: for an encoder use "
                "mlm:CORPUS tasks (e.g. mlm:wikitext2)."
            )

    def evaluate(self, model: Any, tokenizer: Any, name: str) -> tuple[float, str]:
        """``(raw value, metric)`` of one retention task: in-process likelihood, lm-eval, or MLM perplexity."""
        extra = self.refs[name].extra
        kind = "likelihood" if "likelihood" in extra else "mlm" if "mlm" in extra else "lm_eval"
        return getattr(self, f"_{kind}")(model, tokenizer, name)

    def _likelihood(self, model: Any, tokenizer: Any, name: str) -> tuple[float, str]:
        """exp(-NLL) on the stdlib texts, in process (the demo's measure; no lm-eval)."""
        from .retention import likelihood_retention, stdlib_retention_texts

        self.check(model, [name])
        opts = self.refs[name].extra["likelihood"]
        n = min(opts["n"], self.spec["limit"]) if self.spec.get("limit") else opts["n"]
        res = likelihood_retention(
            model, tokenizer, stdlib_retention_texts(n), opts["max_length"], opts["batch_size"]
        )
        return float(res["score"]), "likelihood"

    def _lm_eval(self, model: Any, tokenizer: Any, name: str) -> tuple[float, str]:
        from .retention import run_lm_eval

        self.check(model, [name])
        spec = self.spec
        res = run_lm_eval(
            model,
            tokenizer,
            [self.refs[name]],
            limit=spec.get("limit"),
            max_length=int(spec.get("max_length", 512)),
            batch_size=int(spec.get("batch_size", 8)),
            num_fewshot=spec.get("num_fewshot"),
        )
        return float(res[name]["value"]), str(res[name]["metric"])

    def _mlm(self, model: Any, tokenizer: Any, name: str) -> tuple[float, str]:
        from .mlm import corpus_texts, mlm_perplexity

        spec = self.spec
        opts = dict(spec.get("mlm") or {})
        head = self._head(model, opts.get("base"))
        texts = corpus_texts(
            self.refs[name].extra["mlm"],
            n=int(spec.get("limit") or opts.get("n", 200)),
            seed=int(opts.get("seed", 0)),
        )
        out = mlm_perplexity(
            model,
            head.to(next(model.parameters()).device),
            tokenizer,
            texts,
            rate=float(opts.get("rate", 0.15)),
            seed=int(opts.get("seed", 0)),
            max_length=int(opts.get("max_length", 128)),
            batch_size=int(spec.get("batch_size", 16)),
        )
        return float(out["ppl"]), "perplexity"

    def _head(self, model: Any, base: str | None) -> Any:
        from .mlm import load_original_head, mlm_head

        if base is None:
            hf = model.get_base_model() if hasattr(model, "get_base_model") else model
            if not type(hf).__name__.endswith("ForMaskedLM"):
                raise UserError(
                    "mlm: retention of a fine-tuned encoder needs mlm.base (the pretrained MLM model)."
                )
            return mlm_head(hf)
        if base not in self._heads:  # the pretrained head is the same for every checkpoint: loaded once
            self._heads[base] = load_original_head(base)
        return self._heads[base]


def retention_summary(values: dict[str, float], metrics: dict[str, str]) -> dict[str, Any]:
    """Raw values, metrics and [0, 1] scores of retention tasks, and their unweighted mean."""
    from .retention import score_of

    scores = {k: score_of(metrics[k], v) for k, v in values.items()}
    return {
        "retention": dict(values),
        "retention_metrics": dict(metrics),
        "retention_scores": scores,
        "retention_score": sum(scores.values()) / len(scores) if scores else None,
    }


def evaluate_retention(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Raw values, metrics and [0, 1] scores of every retention task, and their unweighted mean."""
    ret = _Retention(spec)
    ret.check(model)
    values: dict[str, float] = {}
    metrics: dict[str, str] = {}
    for name in ret.refs:
        values[name], metrics[name] = ret.evaluate(model, tokenizer, name)
    return retention_summary(values, metrics)


def evaluate_model(model: Any, tokenizer: Any, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The payload of an "eval" record for an in-memory model (method/rank/checkpoint left None)."""
    spec = load_spec(spec)
    target = evaluate_target(model, tokenizer, spec.get("target"), spec.get("limit"))
    payload: dict[str, Any] = {
        "method": None,
        "rank": None,
        "checkpoint": None,
        "target": target,
        "target_score": _target_score(target, spec.get("target")),
    }
    payload.update(evaluate_retention(model, tokenizer, spec))
    payload["spec_key"] = _spec_key(spec)
    payload["target_key"] = target_key(spec)
    return payload


def with_delta(payload: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """Add ``retention_delta`` (score minus the base's) and per-task ``retention_change``."""
    out = dict(payload)
    if base is None or base.get("retention_score") is None or out.get("retention_score") is None:
        out["retention_delta"] = None
        return out
    out["retention_delta"] = out["retention_score"] - base["retention_score"]
    out["retention_change"] = {
        k: v - base["retention"][k] for k, v in out["retention"].items() if k in base.get("retention", {})
    }
    return out


# --------------------------------------------------------------------------------------------------
# The results store, opened lazily


class LazyStore:
    """A :class:`~disel.results.ResultsStore` that creates its file only when the first record is written:
    reads of a store that does not exist yet find nothing, so a command that fails leaves no empty store."""

    def __init__(self, path: str | os.PathLike[str]):
        p = Path(path)
        self.path = p if p.suffix in (".sqlite", ".db") else p / DEFAULT_NAME
        self._store: ResultsStore | None = None

    def _open(self, create: bool) -> ResultsStore | None:
        if self._store is None and (create or self.path.is_file()):
            self._store = ResultsStore(self.path)
        return self._store

    def add(self, kind: str, run_id: str, payload: dict[str, Any], step: int | None = None) -> int:
        return self._open(True).add(kind, run_id, payload, step=step)  # type: ignore[union-attr]

    def put(self, kind: str, run_id: str, payload: dict[str, Any], step: int | None = None) -> int:
        return self._open(True).put(kind, run_id, payload, step=step)  # type: ignore[union-attr]

    def records(
        self, kind: str | None = None, run_id: str | None = None, step: int | None | str = "any"
    ) -> list[dict[str, Any]]:
        store = self._open(False)
        return [] if store is None else store.records(kind=kind, run_id=run_id, step=step)

    def latest(self, kind: str, run_id: str, step: int | None | str = "any") -> dict[str, Any] | None:
        recs = self.records(kind=kind, run_id=run_id, step=step)
        return recs[-1] if recs else None

    def has(self, kind: str, run_id: str) -> bool:
        store = self._open(False)
        return store is not None and store.has(kind, run_id)


# --------------------------------------------------------------------------------------------------
# The base model


def _base_run_id(base: str) -> str:
    return f"base:{base}"


def cached_base_eval(store: Any, base: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The stored base-model evaluation of ``base`` under ``spec`` (kind "base_eval": the same retention
    settings and the same target), or None."""
    if store is None:
        return None
    spec = load_spec(spec)
    key, tkey = _spec_key(spec), target_key(spec)
    for rec in reversed(store.records(kind="base_eval", run_id=_base_run_id(base))):
        if rec.get("spec_key") == key and rec.get("target_key") == tkey:
            return rec
    return None


def _compute_base(base: str, spec: dict[str, Any], task: str, tokenizer: Any) -> dict[str, Any]:
    from ..loading import load_model

    load_task = "masked_lm" if task in ("seq_cls", "masked_lm") else "causal_lm"
    model, tok, _ = load_model(base, task=load_task, tokenizer=tokenizer)
    bspec = dict(spec)
    if load_task != "causal_lm" or (spec.get("target") or {}).get("type") == "classification":
        bspec["target"] = None
    if load_task == "masked_lm":
        bspec["mlm"] = {**(spec.get("mlm") or {}), "base": None}
    payload = evaluate_model(model, tok, bspec)
    payload["checkpoint"] = str(base)
    payload["method"] = "base"
    payload["target_key"] = target_key(spec)  # what the cache is looked up by (bspec may drop the target)
    return payload


def base_eval(
    base: str,
    spec: dict[str, Any],
    store: Any,
    task: str = "causal_lm",
    tokenizer: Any = None,
) -> dict[str, Any]:
    """The base model's retention (and target, for generation targets), cached as kind="base_eval": one
    record per retention spec and target, looked up by both (:func:`cached_base_eval`)."""
    spec = load_spec(spec)
    cached = cached_base_eval(store, base, spec)
    if cached is not None:
        return cached
    payload = _compute_base(base, spec, task, tokenizer)
    if store is not None:  # added beside the base's evaluations under other specs or targets, not over them
        store.add("base_eval", _base_run_id(base), payload)
    return payload


# --------------------------------------------------------------------------------------------------
# Runs: evaluation units


def _fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_key(run: dict[str, Any], run_dir: str | os.PathLike[str]) -> str:
    """What a run's records are keyed by: ``run.json``'s ``run_key`` (``NAME#HASH``: its name and a hash of
    its fingerprint and run dir), else its ``run_id``, else the directory's name."""
    return str(run.get("run_key") or run.get("run_id") or Path(run_dir).name)


def plan_units(spec: dict[str, Any]) -> dict[str, str]:
    """The units one checkpoint has under ``spec``: ``{unit: fingerprint}``, ``"retention:<task>"`` for each
    retention task, then ``"target"``. The fingerprint covers the settings that unit's number depends on
    (changing the target does not redo retention, and the other way round). Nothing is generated or loaded."""
    from .retention import OFFLINE_TASKS, resolve_retention

    spec = load_spec(spec)
    common = {k: spec.get(k) for k in ("limit", "max_length", "num_fewshot")}
    units: dict[str, str] = {}
    for ref in resolve_retention(list(spec["retention"]), int(spec.get("n_docs", 200)), generate=False):
        name = RETENTION_UNIT + ref.name
        if name in units:
            continue
        key: dict[str, Any] = {"ref": asdict(ref), **common}
        if ref.name in OFFLINE_TASKS:
            key["n_docs"] = spec.get("n_docs")
        if "mlm" in ref.extra:
            key["mlm"] = spec.get("mlm")
        units[name] = _fingerprint(key)
    t = spec.get("target")
    if t and t.get("type") != "none":
        units[TARGET_UNIT] = _fingerprint({"target": t, "limit": spec.get("limit")})
    return units


def _evaluate_unit(
    model: Any, tokenizer: Any, spec: dict[str, Any], retention: _Retention, unit: str
) -> dict[str, Any]:
    """The payload of one unit: ``{"target", "target_score"}`` or ``{"task", "value", "task_metric"}``."""
    if unit == TARGET_UNIT:
        target = evaluate_target(model, tokenizer, spec.get("target"), spec.get("limit"))
        return {"target": target, "target_score": _target_score(target, spec.get("target"))}
    task = unit.removeprefix(RETENTION_UNIT)
    value, metric = retention.evaluate(model, tokenizer, task)
    return {"task": task, "value": value, "task_metric": metric}


def _records_of(store: Any, kind: str, key: str, **kw: Any) -> list[dict[str, Any]]:
    """The records of exactly run key ``key`` (a query by a bare run name also finds ``NAME#HASH`` keys)."""
    if store is None:
        return []
    return [r for r in store.records(kind=kind, run_id=key, **kw) if r.get("run_key", r.get("run_id")) == key]


def finished_units(store: Any, key: str, units: dict[str, str]) -> dict[tuple[int | None, str], dict]:
    """The stored units of run ``key`` that match ``units``' fingerprints: ``{(step, unit): record}``."""
    done: dict[tuple[int | None, str], dict] = {}
    for rec in _records_of(store, UNIT_KIND, key):
        unit = rec.get("unit")
        if unit in units and rec.get("unit_key") == units[unit]:
            done[(rec["step"], unit)] = rec
    return done


def _aggregate(
    ident: dict[str, Any],
    step: int | None,
    path: Path,
    units: dict[str, str],
    done: dict[tuple[int | None, str], dict],
    spec: dict[str, Any],
    base: dict[str, Any] | None,
    units_key: str,
) -> dict[str, Any]:
    """The "eval" payload of one checkpoint from its finished units, with the delta against the base."""
    values: dict[str, float] = {}
    metrics: dict[str, str] = {}
    target: dict[str, Any] = {}
    target_score = None
    for unit in units:
        rec = done[(step, unit)]
        if unit == TARGET_UNIT:
            target, target_score = dict(rec.get("target") or {}), rec.get("target_score")
        else:
            values[rec["task"]], metrics[rec["task"]] = float(rec["value"]), str(rec["task_metric"])
    payload: dict[str, Any] = {
        **ident,
        "checkpoint": str(path),
        "target": target,
        "target_score": target_score,
        **retention_summary(values, metrics),
        "spec_key": _spec_key(spec),
        "units_key": units_key,
        "units": sorted(units),
    }
    return with_delta(payload, base)


def _preflight(paths: list[Path]) -> None:
    """Check the adapter files of the checkpoints about to be loaded (config, weights header), so a broken
    checkpoint fails before anything is evaluated or written."""
    from ..loading import ADAPTER_CONFIG, check_adapter_weights, read_adapter_config

    for p in paths:
        if (p / ADAPTER_CONFIG).exists():
            read_adapter_config(p)
            check_adapter_weights(p)
        elif not (p / "config.json").is_file():
            raise UserError(
                f"{p} holds neither {ADAPTER_CONFIG} nor config.json: remove the broken checkpoint or "
                "train the run again."
            )


def evaluate_run(
    run_dir: str | Path, spec: dict[str, Any] | None = None, store: Any = None
) -> list[dict[str, Any]]:
    """Evaluate every checkpoint (and ``final``) of a run directory, unit by unit (see the module docstring);
    finished units in ``store`` are not redone, and nothing is loaded when none is missing. Returns the
    "eval" payload of every checkpoint (with ``step``), oldest first; each is stored as kind="eval" with its
    step, and its delta against the cached base evaluation."""
    from tqdm.auto import tqdm

    from ..loading import load_model, load_tokenizer
    from ..rundir import FINAL_DIR, evaluation_points, read_run

    spec = load_spec(spec)
    rd = Path(run_dir)
    run = read_run(rd)
    task = run.get("task", "causal_lm")
    cfg = run.get("config") or {}
    if task in ("seq_cls", "masked_lm") and any(str(r).startswith("mlm:") for r in spec["retention"]):
        spec["mlm"] = {"base": run["model"], **(spec.get("mlm") or {})}
    cks = evaluation_points(rd)
    if not cks:
        raise UserError(f"{run_dir} has no checkpoint-<step> or final directory: train first.")
    key = run_key(run, rd)
    ident = {
        "run_key": key,
        "run_id": str(run.get("run_id") or rd.name),
        "run_dir": str(rd.resolve()),
        "method": run.get("method"),
        "rank": run.get("rank"),
        "seed": run.get("seed"),
    }
    units = plan_units(spec)
    units_key = _fingerprint(sorted(units.items()))
    plan = {
        **ident,
        "spec_key": _spec_key(spec),
        "units_key": units_key,
        "units": list(units),
        "unit_keys": units,
        "checkpoints": [{"step": step, "checkpoint": str(path)} for step, path in cks],
    }
    done = finished_units(store, key, units)
    todo = [(step, path, [u for u in units if (step, u) not in done]) for step, path in cks]
    todo = [t for t in todo if t[2]]
    stored = {r["step"]: r for r in _records_of(store, "eval", key)}
    stale = [step for step, _ in cks if (stored.get(step) or {}).get("units_key") != units_key]
    base = cached_base_eval(store, run["model"], spec)
    pending: list[tuple[str, str, dict[str, Any]]] = []  # written once the first checkpoint has loaded

    def flush() -> None:
        if store is not None:
            for kind, rid, payload in pending:
                # base evaluations accumulate (one per spec and target: runs of one sweep may have their own
                # test sets); the plan is replaced
                (store.add if kind == "base_eval" else store.put)(kind, rid, payload)
        pending.clear()

    plans = _records_of(store, PLAN_KIND, key, step=None)
    prev = plans[-1] if plans else None
    if prev is None or any(prev.get(k) != v for k, v in plan.items()):
        pending.append((PLAN_KIND, key, plan))
    tok = None
    if todo or (stale and base is None):
        validate_inputs(spec)
        _preflight([path for _, path, _ in todo])
        tok = load_tokenizer(rd / FINAL_DIR, *[c for _, c in cks], run.get("model"))
        if base is None:
            base = _compute_base(run["model"], spec, task, tok)
            pending.insert(0, ("base_eval", _base_run_id(run["model"]), base))
    if not todo:
        flush()
    retention = _Retention(spec) if todo else None
    out = []
    todo_steps = {step: (path, missing) for step, path, missing in todo}
    bar = tqdm(total=sum(len(m) for _, _, m in todo), desc="eval units", leave=False, disable=not todo)
    for step, path in cks:
        if step in todo_steps:
            _, missing = todo_steps[step]
            model, tok, _ = load_model(
                path, task=task, num_labels=run.get("num_labels", cfg.get("num_labels")), tokenizer=tok
            )
            flush()  # the base evaluation and the plan: only now that a checkpoint of the run has loaded
            for unit in missing:
                payload = _evaluate_unit(model, tok, spec, retention, unit)  # type: ignore[arg-type]
                rec = {**ident, "step": step, "checkpoint": str(path), "unit": unit, "unit_key": units[unit]}
                rec.update(payload)
                if store is not None:
                    store.add(UNIT_KIND, key, rec, step=step)
                done[(step, unit)] = rec
                bar.update(1)
            del model
        if step in todo_steps or step in stale:
            payload = _aggregate(ident, step, path, units, done, spec, base, units_key)
            if store is not None:
                store.put("eval", key, payload, step=step)
        else:
            payload = {k: v for k, v in stored[step].items() if k not in ("id", "kind", "created", "step")}
        out.append({**payload, "step": step, "run_id": ident["run_id"], "run_key": key})
    bar.close()
    return out


# --------------------------------------------------------------------------------------------------
# What a run directory says about its own evaluation


def _training_root(run_dir: Path, run: dict[str, Any]) -> Path | None:
    """The directory training ran in, when the run dir's path ends with its configured (relative) path."""
    out = (run.get("config") or {}).get("output") or {}
    configured = out.get("run_dir") or os.path.join(
        str(out.get("dir") or "runs"), str(run.get("run_id") or "")
    )
    rel = Path(os.path.normpath(configured))
    if rel.is_absolute() or not rel.parts:
        return None
    rd = run_dir.resolve()
    n = len(rel.parts)
    if len(rd.parts) > n and rd.parts[-n:] == rel.parts:
        return Path(*rd.parts[:-n])
    return None


def run_store_path(run_dir: str | os.PathLike[str], run: dict[str, Any]) -> Path:
    """The results store a run's training wrote to: ``config.output.results``, else
    ``<output.dir>/results.sqlite``; relative paths are taken from where training ran (the run dir's path
    minus its configured path), and a run without a config has its store beside it."""
    rd = Path(run_dir)
    out = (run.get("config") or {}).get("output") or {}
    results = out.get("results")
    if results and Path(results).expanduser().is_absolute():
        return Path(results).expanduser()
    root = _training_root(rd, run)
    if results:
        return (root / results) if root is not None else Path(results)
    if not out.get("run_dir"):
        return rd.resolve().parent / DEFAULT_NAME
    parent = Path(out.get("dir") or "runs").expanduser()
    if parent.is_absolute():
        return parent / DEFAULT_NAME
    return (root if root is not None else Path.cwd()) / parent / DEFAULT_NAME


def run_eval_spec(run_dir: str | os.PathLike[str], run: dict[str, Any]) -> dict[str, Any]:
    """The run's own eval spec (``config.eval``; empty when it has none), its relative target paths taken
    from where training ran when they do not exist from here."""
    spec = (run.get("config") or {}).get("eval") or {}
    if not isinstance(spec, dict):
        raise UserError(
            f"{Path(run_dir) / 'run.json'} has an eval spec that is not a mapping: pass --spec FILE instead."
        )
    spec = json.loads(json.dumps(spec))
    root = _training_root(Path(run_dir), run)
    target = spec.get("target")
    if root is not None and isinstance(target, dict):
        for k in ("path", "fewshot_path"):
            v = target.get(k)
            relative = isinstance(v, str) and not Path(v).expanduser().is_absolute()
            if relative and not Path(v).exists() and (root / v).exists():
                target[k] = str(root / v)
    return spec


def best_checkpoint(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The record with the best target score (ties: better retention, then the later step), as in the paper:
    the checkpoint is chosen on the target metric only and its retention is what gets reported."""
    scored = [r for r in records if r.get("target_score") is not None]
    if not scored:
        raise UserError("No record has a target score: evaluate with a target to choose a checkpoint.")

    def key(r: dict[str, Any]) -> tuple:
        step = r.get("step")
        return (r["target_score"], r.get("retention_score") or 0.0, float("inf") if step is None else step)

    return max(scored, key=key)
