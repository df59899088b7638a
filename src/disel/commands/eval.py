"""``disel eval``: evaluate a base model, a saved adapter/full model, or every checkpoint of a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="Run directory, adapter or model directory, or a hub id of a base model.")
    p.add_argument(
        "--spec", help="YAML eval spec (keys: retention, target, limit, ...; see docs/evaluation.md)."
    )
    p.add_argument(
        "--retention",
        nargs="+",
        help="Retention tasks: offline, stdlib-ppl, stdlib-nextline, paper, mlm:CORPUS, lm-eval names or YAML.",
    )
    p.add_argument(
        "--target",
        choices=["exact_match", "gsm8k", "humaneval", "classification", "lm_eval", "none"],
        help="Target task type.",
    )
    p.add_argument("--target-path", help="JSONL data of the target task.")
    p.add_argument("--target-task", help="lm-eval task name for --target lm_eval.")
    p.add_argument("--limit", type=int, help="Evaluate at most N documents per task.")
    p.add_argument(
        "--task", choices=["causal_lm", "seq_cls", "masked_lm"], help="Model head (default: detected)."
    )
    p.add_argument("--mlm-base", help="Pretrained MLM model whose head reads a fine-tuned encoder.")
    p.add_argument("--store", default="results", help="Results store (.sqlite file or directory).")
    p.add_argument(
        "--base", help="Base model to compare a full fine-tuned model with (adapters name theirs)."
    )
    p.add_argument("--no-base", action="store_true", help="Skip the base model's (cached) evaluation.")
    p.add_argument("--json", action="store_true", help="Print the records as JSON instead of a table.")


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    from ..evaluation.runner import load_spec

    spec = load_spec(args.spec) if args.spec else load_spec({})
    if args.retention:
        spec["retention"] = list(args.retention)
    if args.limit is not None:
        spec["limit"] = args.limit
    if args.target:
        t = {"type": args.target}
        if args.target_path:
            t["path"] = str(Path(args.target_path).resolve())
        if args.target_task:
            t["task"] = args.target_task
        spec["target"] = t
    if args.mlm_base:
        spec["mlm"] = {**(spec.get("mlm") or {}), "base": args.mlm_base}
    return load_spec(spec)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per evaluated model/checkpoint: target metrics, retention raw values, score and delta."""
    tasks = sorted({k for r in rows for k in (r.get("retention") or {})})
    tmetrics = sorted({k for r in rows for k in (r.get("target") or {}) if k != "n"})
    head = ["checkpoint", *tmetrics, *tasks, "retention", "delta"]
    lines = []
    for r in rows:
        name = r.get("label") or Path(str(r.get("checkpoint") or "-")).name
        cells = [name]
        cells += [_fmt((r.get("target") or {}).get(m)) for m in tmetrics]
        cells += [_fmt((r.get("retention") or {}).get(t)) for t in tasks]
        cells += [_fmt(r.get("retention_score")), _fmt(r.get("retention_delta"))]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.runner import base_eval, best_checkpoint, evaluate_model, evaluate_run, with_delta
    from ..loading import load_model
    from ..results import ResultsStore
    from ..rundir import is_run_dir

    spec = _spec(args)
    store = ResultsStore(args.store)
    rows: list[dict[str, Any]] = []
    best = None
    if is_run_dir(args.path):
        rows = evaluate_run(args.path, spec, store)
        if any(r.get("target_score") is not None for r in rows):
            best = best_checkpoint(rows)
    else:
        model, tok, info = load_model(args.path, task=args.task)
        base_id = args.base or (info["base"] if info["kind"] == "adapter" else None)
        if info["task"] in ("seq_cls", "masked_lm") and base_id and not (spec.get("mlm") or {}).get("base"):
            spec["mlm"] = {**(spec.get("mlm") or {}), "base": base_id}
        payload = evaluate_model(model, tok, spec)
        where = str(Path(args.path).resolve()) if Path(args.path).exists() else args.path
        payload["checkpoint"] = where
        if base_id is None:  # a base model on its own: its numbers are the cache other runs compare with
            payload["method"] = "base"
            store.put("base_eval", f"base:{args.path}", payload)
            rows.append({**payload, "label": "base"})
        else:
            base = None if args.no_base else base_eval(base_id, spec, store, task=info["task"], tokenizer=tok)
            if base is not None:
                rows.append({**base, "label": "base"})
            payload = with_delta(payload, base)
            store.put("eval", f"path:{where}", payload)
            rows.append(payload)
    if args.json:
        print(json.dumps({"records": rows, "best": best}, indent=2, default=str))
    else:
        print(format_table(rows))
        if best is not None:
            print(
                f"best checkpoint (by target): {best.get('checkpoint')}  retention_delta={_fmt(best.get('retention_delta'))}"
            )
    return 0
