"""``disel eval``: evaluate a base model, a saved adapter/full model, or every checkpoint of a run.

A run directory is evaluated with its own ``eval:`` spec (``run.json``'s ``config.eval``) into its own
results store (``config.output.results``, default ``<output.dir>/results.sqlite``) unless flags say
otherwise, unit by unit: a rerun finishes exactly what is missing. The store is created only when the
first record is written, after the inputs are checked and a model has loaded, so a failed evaluation
leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="Run directory, adapter or model directory, or a hub id of a base model.")
    p.add_argument(
        "--spec",
        help="YAML eval spec (keys: retention, target, limit, ...; see docs/evaluation.md); default: a run "
        "directory's own eval spec, else the offline retention suite.",
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
    p.add_argument(
        "--store",
        default=None,
        help="Results store (.sqlite file or directory); default: the run's own store for a run directory, "
        "else ./results.",
    )
    p.add_argument(
        "--base", help="Base model to compare a full fine-tuned model with (adapters name theirs)."
    )
    p.add_argument("--no-base", action="store_true", help="Skip the base model's (cached) evaluation.")
    p.add_argument(
        "--method",
        help="Method name to record (default: the enclosing run's, else the adapter's type: lora, dora, "
        "disel, adalora, queryable).",
    )
    p.add_argument("--json", action="store_true", help="Print the records as JSON instead of a table.")


def _spec(args: argparse.Namespace, default: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec: ``--spec``, else ``default`` (a run's own), with the other flags on top."""
    from ..evaluation.runner import load_spec

    spec = load_spec(args.spec) if args.spec else load_spec(default or {})
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
    elif args.target_path or args.target_task:
        raise UserError(
            "--target-path / --target-task need --target TYPE: add --target exact_match (or another)."
        )
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


def _enclosing_run(path: str) -> tuple[Path | None, dict[str, Any]]:
    """The run directory a checkpoint/``final`` adapter (or its export) lies in, and its run.json."""
    from ..rundir import is_run_dir, read_run_file

    p = Path(path)
    if not p.exists():
        return None, {}
    p = p.resolve()
    for d in (p.parent, p.parent.parent):
        if is_run_dir(d):
            return d, read_run_file(d) or {}
    return None, {}


def run(args: argparse.Namespace) -> int:
    from ..evaluation.runner import (
        LazyStore,
        base_eval,
        best_checkpoint,
        evaluate_model,
        evaluate_run,
        run_eval_spec,
        run_store_path,
        validate_inputs,
        with_delta,
    )
    from ..loading import load_model
    from ..rundir import is_run_dir, read_run

    rows: list[dict[str, Any]] = []
    best = None
    if is_run_dir(args.path):
        if args.method:
            raise UserError(
                f"--method {args.method} applies to an adapter or model path: a run directory records its "
                "run's method (run.json)."
            )
        info = read_run(args.path)
        spec = _spec(args, run_eval_spec(args.path, info))
        store = LazyStore(args.store or run_store_path(args.path, info))
        rows = evaluate_run(args.path, spec, store)
        if any(r.get("target_score") is not None for r in rows):
            best = best_checkpoint(rows)
    else:
        spec = _spec(args)
        validate_inputs(spec)
        model, tok, info = load_model(args.path, task=args.task)
        store = LazyStore(args.store or "results")
        base_id = args.base or (info["base"] if info["kind"] == "adapter" else None)
        if info["task"] in ("seq_cls", "masked_lm") and base_id and not (spec.get("mlm") or {}).get("base"):
            spec["mlm"] = {**(spec.get("mlm") or {}), "base": base_id}
        payload = evaluate_model(model, tok, spec)
        where = str(Path(args.path).resolve()) if Path(args.path).exists() else args.path
        payload["checkpoint"] = where
        if base_id is None and not args.method:  # a base model on its own: the cache other runs compare with
            payload["method"] = "base"
            store.put("base_eval", f"base:{args.path}", payload)
            rows.append({**payload, "label": "base"})
        else:
            run_dir, run_info = _enclosing_run(args.path)
            payload["method"] = args.method or run_info.get("method") or info.get("method")
            payload["rank"] = run_info.get("rank") if run_info.get("method") else info.get("rank")
            payload["seed"] = run_info.get("seed")
            payload["run_dir"] = str(run_dir) if run_dir else None
            payload["run_id"] = f"path:{where}"
            base = None
            if base_id is not None and not args.no_base:
                base = base_eval(base_id, spec, store, task=info["task"], tokenizer=tok)
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
