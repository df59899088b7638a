"""``disel compact ADAPTER --calibration SOURCE --out DIR``: drop closed gates, fold open ones.

Records the gates on the calibration data, plans per layer and component (drop / fold into an ungated
LoRA part / keep gated), writes the compacted adapter to ``--out`` (loads with one
``PeftModel.from_pretrained``) with ``compaction.json``: counts, parameter and multiply-add savings, and,
on ``--heldout`` data (default: the calibration data), logit and NLL fidelity and an interleaved timing
of the original and compacted forwards (:mod:`disel.utils.timing`: interleaved rounds in random order, the
paired speed-up with its confidence interval; the speed-up is printed only when that interval excludes 1).

``--merge-static`` also folds the static part into the base weights (``disel.merge_static``) and writes
``--out`` as a full model directory (merged base + tokenizer + ``compaction.json``) with the remaining gated
adapter in ``--out/adapter`` (absent if no gated component is left), so the deployed forward costs the base
plus the gated rank only; the report adds the merge's logit difference and a timing of the merged forward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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


def speedup_line(what: str, iv: dict) -> str | None:
    """``what 1.23 [1.10, 1.31]x (median [95% interval], n rounds)`` for a speed-up interval of paired rounds
    (:func:`disel.utils.timing.ratio_interval`), or None when the interval includes 1 (on this machine, in
    this state, no speed-up was measured, and none is claimed) or covers less than 90% (fewer than 5 rounds)."""
    from ..utils.timing import format_interval

    if iv["ci_level"] < 0.9 or iv["ci_low"] <= 1.0 <= iv["ci_high"]:
        return None
    return f"{what} {format_interval(iv)}x (median [{iv['ci_level']:.0%} interval], {iv['n']} rounds)"


def run(args: argparse.Namespace) -> int:
    from ..analysis.api import compact_adapter

    report = compact_adapter(
        args.adapter,
        args.calibration,
        args.out,
        heldout=args.heldout,
        tau_closed=args.tau_closed,
        tau_open=args.tau_open,
        coverage=args.coverage,
        base=args.base,
        task=args.task,
        max_sequences=args.max_sequences,
        max_length=args.max_length,
        batch_size=args.batch_size,
        timing_repeats=args.timing_repeats,
        merge_static=args.merge_static,
        device=args.device,
    )
    out = Path(args.out)
    c = report["counts"]
    print(
        f"components: {c['components']}  dropped: {c['dropped']}  folded (static): {c['folded']}  "
        f"kept gated: {c['gated']}  layers removed: {c['layers_removed']}/{c['layers']}"
    )
    print(json.dumps({k: report[k] for k in ("cost", "fidelity") if k in report}, indent=1))
    for key, what in (
        ("speedup_forward_interval", "forward speed-up"),
        ("speedup_forward_merged_interval", "forward speed-up with the static part merged"),
    ):
        if key in report:
            line = speedup_line(what, report[key])
            if line:
                print(line)
    if args.merge_static:
        left = report["merge_static"]["gated_components"]
        print(
            f"merged base: {out}"
            + (f"; gated adapter ({left} components): {out / 'adapter'}" if left else "")
        )
    print(f"wrote {out}")
    return 0
