"""Evaluate a model, every checkpoint of a run, and pick the best checkpoint (the paper's protocol).

The ``spec`` (a dict, or a YAML file with the same keys; documented in docs/evaluation.md):

    retention: [stdlib-ppl, stdlib-nextline]   # presets, offline tasks, lm-eval names/YAML paths, mlm:CORPUS
    target: {type: exact_match, path: data.jsonl}   # or gsm8k / humaneval / classification / lm_eval / none
    limit: 50          # documents per task (None: all)
    n_docs: 200        # size of the generated offline tasks
    max_length: 512    # lm-eval context length (capped by the model's positions)
    batch_size: 8
    num_fewshot: null  # override every retention task's few-shot count
    mlm: {base: roberta-base, rate: 0.15, seed: 0, n: 200, max_length: 128}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..results import ResultsStore

SPEC_KEYS = {"retention", "target", "limit", "n_docs", "max_length", "batch_size", "num_fewshot", "mlm"}
TARGET_TYPES = ("exact_match", "gsm8k", "humaneval", "classification", "lm_eval", "none")


def load_spec(spec: dict[str, Any] | str | Path | None) -> dict[str, Any]:
    """Validate a spec dict or read it from a YAML file; fills defaults."""
    if spec is None:
        spec = {}
    if isinstance(spec, str | Path):
        p = Path(spec)
        if not p.exists():
            raise UserError(f"Eval spec {p} does not exist: pass a YAML file (see docs/evaluation.md).")
        import yaml

        spec = yaml.safe_load(p.read_text()) or {}
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


def evaluate_retention(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Raw values, metrics and [0, 1] scores of every retention task, and their unweighted mean."""
    from .retention import resolve_retention, run_lm_eval, score_of

    refs = resolve_retention(list(spec.get("retention") or []), n_docs=int(spec.get("n_docs", 200)))
    lm_refs = [r for r in refs if "mlm" not in r.extra]
    mlm_refs = [r for r in refs if "mlm" in r.extra]
    values: dict[str, float] = {}
    metrics: dict[str, str] = {}
    if lm_refs:
        if not _is_causal(model):
            raise UserError(
                f"Retention tasks {', '.join(r.name for r in lm_refs)} need a causal LM: for an encoder use "
                "mlm:CORPUS tasks (e.g. mlm:wikitext2)."
            )
        res = run_lm_eval(
            model,
            tokenizer,
            lm_refs,
            limit=spec.get("limit"),
            max_length=int(spec.get("max_length", 512)),
            batch_size=int(spec.get("batch_size", 8)),
            num_fewshot=spec.get("num_fewshot"),
        )
        for name, r in res.items():
            values[name], metrics[name] = r["value"], r["metric"]
    if mlm_refs:
        from .mlm import corpus_texts, load_original_head, mlm_head, mlm_perplexity

        opts = dict(spec.get("mlm") or {})
        base = opts.get("base")
        if base is None:
            hf = model.get_base_model() if hasattr(model, "get_base_model") else model
            if not type(hf).__name__.endswith("ForMaskedLM"):
                raise UserError(
                    "mlm: retention of a fine-tuned encoder needs mlm.base (the pretrained MLM model)."
                )
            head = mlm_head(hf)
        else:
            head = load_original_head(base)
        dev = next(model.parameters()).device
        head = head.to(dev)
        for r in mlm_refs:
            texts = corpus_texts(
                r.extra["mlm"], n=int(spec.get("limit") or opts.get("n", 200)), seed=int(opts.get("seed", 0))
            )
            out = mlm_perplexity(
                model,
                head,
                tokenizer,
                texts,
                rate=float(opts.get("rate", 0.15)),
                seed=int(opts.get("seed", 0)),
                max_length=int(opts.get("max_length", 128)),
                batch_size=int(spec.get("batch_size", 16)),
            )
            values[r.name], metrics[r.name] = out["ppl"], "perplexity"
    scores = {k: score_of(metrics[k], v) for k, v in values.items()}
    return {
        "retention": values,
        "retention_metrics": metrics,
        "retention_scores": scores,
        "retention_score": sum(scores.values()) / len(scores) if scores else None,
    }


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


def base_eval(
    base: str,
    spec: dict[str, Any],
    store: ResultsStore | None,
    task: str = "causal_lm",
    tokenizer: Any = None,
) -> dict[str, Any]:
    """The base model's retention (and target, for generation targets), cached as kind="base_eval"."""
    from ..loading import load_model

    spec = load_spec(spec)
    run_id = f"base:{base}"
    key = _spec_key(spec)
    if store is not None:
        for rec in reversed(store.records(kind="base_eval", run_id=run_id)):
            if rec.get("spec_key") == key:
                return rec
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
    if store is not None:
        store.put("base_eval", run_id, payload)
    return payload


def evaluate_run(
    run_dir: str | Path, spec: dict[str, Any] | None = None, store: ResultsStore | None = None
) -> list[dict[str, Any]]:
    """Evaluate every checkpoint (and ``final``) of a run directory; each payload stored as kind="eval"
    with its step, delta against the cached base evaluation. Returns the payloads (with ``step``)."""
    from tqdm.auto import tqdm

    from ..loading import load_model, load_tokenizer
    from ..rundir import FINAL_DIR, evaluation_points, read_run

    spec = load_spec(spec)
    run = read_run(run_dir)
    task = run.get("task", "causal_lm")
    cfg = run.get("config") or {}
    rd = Path(run_dir)
    if task in ("seq_cls", "masked_lm") and any(str(r).startswith("mlm:") for r in spec["retention"]):
        spec["mlm"] = {"base": run["model"], **(spec.get("mlm") or {})}
    cks = evaluation_points(rd)
    if not cks:
        raise UserError(f"{run_dir} has no checkpoint-<step> or final directory: train first.")
    tok = load_tokenizer(rd / FINAL_DIR, *[c for _, c in cks], run.get("model"))
    base = base_eval(run["model"], spec, store, task=task, tokenizer=tok)
    out = []
    for step, path in tqdm(cks, desc="checkpoints", leave=False):
        model, tok, _ = load_model(
            path, task=task, num_labels=run.get("num_labels", cfg.get("num_labels")), tokenizer=tok
        )
        payload = evaluate_model(model, tok, spec)
        payload.update({"method": run.get("method"), "rank": run.get("rank"), "checkpoint": str(path)})
        payload = with_delta(payload, base)
        if store is not None:
            store.put("eval", run.get("run_id", rd.name), payload, step=step)
        out.append({**payload, "step": step, "run_id": run.get("run_id", rd.name)})
        del model
    return out


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
