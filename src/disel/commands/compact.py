"""``disel compact ADAPTER --calibration SOURCE --out DIR``: drop closed gates, fold open ones.

Records the gates on the calibration data, plans per layer and component (drop / fold into an ungated
LoRA part / keep gated), writes the compacted adapter to ``--out`` (loads with one
``PeftModel.from_pretrained``) with ``compaction.json``: counts, parameter and multiply-add savings, and,
on ``--heldout`` data (default: the calibration data), logit and NLL fidelity and an interleaved timing
of the original and compacted forwards.

``--merge-static`` also folds the static part into the base weights (``disel.merge_static``) and writes
``--out`` as a full model directory (merged base + tokenizer + ``compaction.json``) with the remaining gated
adapter in ``--out/adapter`` (absent if no gated component is left), so the deployed forward costs the base
plus the gated rank only; the report adds the merge's logit difference and a timing of the merged forward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "adapter", help="DISeL adapter directory, or a run directory (its final/ adapter is used)."
    )
    p.add_argument(
        "--calibration",
        required=True,
        action="append",
        help="Calibration data: .txt/.jsonl/.json, stdlib:..., hf:... Repeat to mix sources (e.g. fine-tuning "
        "data and general text, so that only gates open on both are folded).",
    )
    p.add_argument(
        "--heldout", default=None, help="Held-out data for fidelity (default: the calibration data)."
    )
    p.add_argument("--out", required=True, help="Directory for the compacted adapter (must be new or empty).")
    p.add_argument(
        "--tau-closed", type=float, default=0.02, help="Drop if gate < this on --coverage of tokens."
    )
    p.add_argument(
        "--tau-open", type=float, default=0.98, help="Fold if gate > this on --coverage of tokens."
    )
    p.add_argument("--coverage", type=float, default=0.99, help="Fraction of tokens (default 0.99).")
    p.add_argument("--base", default=None, help="Base model path or hub id (default: from the adapter).")
    p.add_argument("--task", default=None, choices=["causal_lm", "seq_cls", "masked_lm"])
    p.add_argument("--max-sequences", type=int, default=200)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--timing-repeats", type=int, default=20, help="Interleaved timing repeats (0: skip).")
    p.add_argument(
        "--merge-static",
        action="store_true",
        help="Fold the static (always-open) components into the base weights and write --out as a full model "
        "directory with the remaining gated adapter in --out/adapter (deployment: base + gated rank only).",
    )
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from ..analysis.api import load_adapter, pad_id, record_gates
    from ..analysis.compact import (
        add_compacted_adapter,
        cost_report,
        fidelity,
        interleaved_timing,
        plan_compaction,
        save_adapter,
        save_merged,
    )
    from ..analysis.domains import batches, encode_items, load_items
    from ..utils.io import atomic_write_json

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory; choose a new directory.")
    if not 0.0 < args.tau_closed < args.tau_open < 1.0:
        raise UserError(
            f"--tau-closed {args.tau_closed} / --tau-open {args.tau_open}: use 0 < closed < open < 1."
        )
    model, tok, adir = load_adapter(args.adapter, base=args.base, task=args.task, device=args.device)
    pad = pad_id(tok)
    calib = []
    for src in args.calibration:
        items = load_items(src, args.max_sequences * 4)
        # every token the adapter acts on counts, prompt tokens included: a component shut on the answers
        # but open on the prompt still shapes the answer through attention
        calib += encode_items(tok, items, args.max_length, args.max_sequences, all_tokens=True)
    stats = record_gates(
        model,
        calib,
        pad,
        args.batch_size,
        thresholds=(args.tau_closed, args.tau_open),
        desc="calibration",
        progress=True,
    )
    plan = plan_compaction(stats, args.tau_closed, args.tau_open, args.coverage, adapter="default")
    add_compacted_adapter(model, plan, "default", "compact")
    heldout = calib
    if args.heldout:
        heldout = encode_items(
            tok, load_items(args.heldout, args.max_sequences * 4), args.max_length, args.max_sequences
        )
    held_batches = list(batches(heldout, args.batch_size, pad))
    report = {
        "adapter": str(adir),
        "tau_closed": args.tau_closed,
        "tau_open": args.tau_open,
        "coverage": args.coverage,
        "calibration_tokens": max(m.count for m in stats.modules.values()),
        "counts": plan.counts(),
        "cost": cost_report(model, plan, "default"),
        "fidelity": fidelity(model, held_batches, "default", "compact"),
        "layers": {
            n: {"r": lp.r, "folded": len(lp.static), "gated": len(lp.gated), "dropped": len(lp.dropped)}
            for n, lp in plan.layers.items()
        },
    }
    if args.timing_repeats > 0 and held_batches:
        ids, att, _ = held_batches[0]
        t = interleaved_timing(model, ids, att, ["default", "compact"], repeats=args.timing_repeats)
        report["timing_s"] = t
        report["speedup_adapter_overhead"] = (t["default"] - t["base"]) / max(t["compact"] - t["base"], 1e-9)
        report["speedup_forward"] = t["default"] / t["compact"]
    if args.merge_static:
        report["merge_static"] = _merge(model, held_batches, args.timing_repeats)
        if "timing_merged_s" in report["merge_static"]:
            t = report["merge_static"]["timing_merged_s"]
            report["speedup_forward_merged"] = t["default"] / t["compact"]
        save_merged(model, "compact", out, tokenizer=tok)
    else:
        save_adapter(model, "compact", out, tokenizer=tok)
    atomic_write_json(out / "compaction.json", report)
    c = report["counts"]
    print(
        f"components: {c['components']}  dropped: {c['dropped']}  folded (static): {c['folded']}  "
        f"kept gated: {c['gated']}  layers removed: {c['layers_removed']}/{c['layers']}"
    )
    print(json.dumps({k: report[k] for k in ("cost", "fidelity") if k in report}, indent=1))
    if "timing_s" in report:
        print(f"forward speed-up {report['speedup_forward']:.3f}x (timings {report['timing_s']})")
    if "speedup_forward_merged" in report:
        print(f"forward speed-up with the static part merged {report['speedup_forward_merged']:.3f}x")
    if args.merge_static:
        left = report["merge_static"]["gated_components"]
        print(
            f"merged base: {out}"
            + (f"; gated adapter ({left} components): {out / 'adapter'}" if left else "")
        )
    print(f"wrote {out}")
    return 0


def _merge(model: Any, held_batches: list[Any], repeats: int) -> dict[str, Any]:
    """Merge the static part of "compact" into the base; its logit difference on (up to 4 sequences of) the
    first held-out batch, and an interleaved timing of original, merged and base forwards."""
    import torch

    from ..analysis.compact import interleaved_timing, merge_static

    info: dict[str, Any] = {}
    if held_batches:
        ids, att, _ = held_batches[0]
        ids, att = ids[:4], att[:4]
        dev = next(model.parameters()).device
        ids, att = ids.to(dev), att.to(dev)
        active = model.active_adapter
        model.set_adapter("compact")
        with torch.no_grad():
            before = model(input_ids=ids, attention_mask=att).logits.float()
    info.update(merge_static(model, "compact"))
    if held_batches:
        with torch.no_grad():
            after = model(input_ids=ids, attention_mask=att).logits.float()
        model.set_adapter(active)
        info["max_abs_logit_diff"] = float((after - before).abs()[att.bool()].max())
        if repeats > 0:
            ids, att, _ = held_batches[0]
            info["timing_merged_s"] = interleaved_timing(model, ids, att, ["default", "compact"], repeats)
    return info
