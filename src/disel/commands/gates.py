"""``disel gates ADAPTER --domain NAME=SOURCE ... [--target NAME]``: record, summarise and plot the gates.

Writes ``gates.json`` (per domain: by depth band, module type and band x type; per-module and per-rank
detail for the target domain; the AUROC of the per-sequence gate score, target vs each other domain),
``fig_domains.png`` (the paper's figure 4) and ``fig_modules.png`` (figure 5) into ``--out``.
"""

from __future__ import annotations

import argparse
import json

from ..errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "adapter", help="DISeL adapter directory, or a run directory (its final/ adapter is used)."
    )
    p.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="A domain to record: SOURCE is a .txt/.jsonl/.json file, stdlib:docstrings, stdlib:source or "
        "hf:NAME[:CONFIG][:SPLIT]. Repeat for several domains.",
    )
    p.add_argument("--target", default=None, help="The fine-tuning domain (one of the --domain names).")
    p.add_argument("--out", default="gates_report", help="Output directory (default: gates_report).")
    p.add_argument("--base", default=None, help="Base model path or hub id (default: from the adapter).")
    p.add_argument("--task", default=None, choices=["causal_lm", "seq_cls", "masked_lm"])
    p.add_argument("--max-sequences", type=int, default=200, help="Sequences per domain (default 200).")
    p.add_argument("--max-length", type=int, default=256, help="Tokens per sequence (default 256).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bins", type=int, default=50, help="Histogram bins on [0, 1] (default 50).")
    p.add_argument("--score", default="mid_late", choices=["mid_late", "mean"], help="Per-sequence score.")
    p.add_argument("--device", default="cpu")


def parse_domains(specs: list[str]) -> dict[str, str]:
    if not specs:
        raise UserError("no --domain given; add at least one, e.g. --domain math=heldout.jsonl.")
    out: dict[str, str] = {}
    for s in specs:
        name, sep, src = s.partition("=")
        if not sep or not name or not src:
            raise UserError(f"--domain {s!r} is not NAME=SOURCE; write e.g. --domain code=humaneval.jsonl.")
        if name in out:
            raise UserError(f"--domain name {name!r} is given twice; give each domain its own name.")
        out[name] = src
    return out


def run(args: argparse.Namespace) -> int:
    from ..analysis.api import gates_report, load_adapter, load_domains

    domains = parse_domains(args.domain)
    for n, v in (
        ("--max-sequences", args.max_sequences),
        ("--max-length", args.max_length),
        ("--bins", args.bins),
    ):
        if v < 1:
            raise UserError(f"{n} {v} is invalid; use a positive integer.")
    if args.target is not None and args.target not in domains:
        raise UserError(
            f"--target {args.target!r} is not one of the domains ({', '.join(domains)}); name one of them."
        )
    items = load_domains(domains, args.max_sequences)  # bad data fails before the model is loaded
    model, tok, _ = load_adapter(args.adapter, base=args.base, task=args.task, device=args.device)
    rep = gates_report(
        model,
        tok,
        items,
        args.out,
        target=args.target,
        max_sequences=args.max_sequences,
        max_length=args.max_length,
        batch_size=args.batch_size,
        bins=args.bins,
        score=args.score,
    )
    print(f"{'domain':<16}{'seqs':>6}  " + "  ".join(f"{b:>7}" for b in ("early", "middle", "late", "score")))
    for name, d in rep["domains"].items():
        bands = [d["by_band"].get(b, {}).get("mean", float("nan")) for b in ("early", "middle", "late")]
        cells = "  ".join(f"{v:7.4f}" for v in [*bands, d["sequence_score_mean"] or float("nan")])
        print(f"{name:<16}{d['sequences']:>6}  {cells}")
    if "auroc" in rep:
        print(f"AUROC of the per-sequence gate score, {args.target} vs each domain:")
        print(json.dumps(rep["auroc"], indent=1))
    print(f"wrote {args.out}/gates.json, fig_domains.png, fig_modules.png")
    return 0
