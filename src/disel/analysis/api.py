"""High-level helpers: record gates on a domain, and the whole ``disel gates`` report.

Both commands read all their data before they load a model, and write their output folder only at the
end, in one piece (a temporary folder renamed into place), so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..loading import load_adapter
from ..utils.io import atomic_dir, atomic_write_json
from .domains import Encoded, Item, batches, encode_items, load_items
from .recorder import GateRecorder
from .stats import SCORES, GateStats, auroc

__all__ = [
    "compact_adapter",
    "domain_report",
    "gates_report",
    "load_adapter",
    "load_domains",
    "pad_id",
    "record_gates",
]


def pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


@torch.no_grad()
def record_gates(
    model: nn.Module,
    encoded: Sequence[Encoded],
    pad: int,
    batch_size: int = 8,
    bins: int = 50,
    thresholds: Sequence[float] = (),
    desc: str = "gates",
    progress: bool = False,
) -> GateStats:
    """Run ``model`` over ``encoded`` sequences and return the gate statistics of their masked tokens."""
    if not encoded:
        raise UserError(f"domain {desc!r} produced no sequence with tokens to record; check its data.")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total = (len(encoded) + batch_size - 1) // batch_size
    with GateRecorder(model, bins=bins, thresholds=thresholds) as rec:
        for ids, att, mask in tqdm(
            batches(encoded, batch_size, pad), total=total, desc=desc, disable=not progress
        ):
            rec.set_mask(mask.to(dev))
            model(input_ids=ids.to(dev), attention_mask=att.to(dev))
    model.train(was_training)
    return rec.stats()


def domain_report(
    stats: Mapping[str, GateStats], target: str | None, score: str = "mid_late"
) -> dict[str, Any]:
    """Per-domain summaries and, if ``target`` is given, the AUROC of each score, target vs each domain."""
    out: dict[str, Any] = {"score": score, "domains": {}}
    for name, st in stats.items():
        s = st.sequence_scores(score)
        out["domains"][name] = {
            **st.summary(per_rank=False),
            "sequence_score_mean": float(s.mean()) if s.numel() else None,
        }
    if target is not None:
        out["target"] = target
        out["auroc"] = {}
        for kind in SCORES:
            pos = stats[target].sequence_scores(kind).tolist()
            out["auroc"][kind] = {
                name: auroc(pos, st.sequence_scores(kind).tolist())
                for name, st in stats.items()
                if name != target and pos and st.sequence_scores(kind).numel()
            }
    return out


def load_domains(domains: Mapping[str, str | Sequence[Item]], max_sequences: int) -> dict[str, list[Item]]:
    """The items of every domain (sources read now, so bad data fails before a model is loaded)."""
    return {
        name: list(src) if not isinstance(src, str) else load_items(src, limit=max_sequences * 4)
        for name, src in domains.items()
    }


def _write_outputs(out: Path, write: Any) -> None:
    """``write(folder)`` into a new folder renamed to ``out`` at the end; into ``out`` itself (each file
    written atomically) when it already exists, so that other files in it stay."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} is a file; choose a directory.")
        write(out)
        return
    with atomic_dir(out) as tmp:
        write(tmp)


def gates_report(
    model: nn.Module,
    tokenizer: Any,
    domains: Mapping[str, str | Sequence[Item]],
    out_dir: str | os.PathLike[str],
    target: str | None = None,
    max_sequences: int = 200,
    max_length: int = 256,
    batch_size: int = 8,
    bins: int = 50,
    score: str = "mid_late",
    progress: bool = True,
) -> dict[str, Any]:
    """Record every domain (a source, or its items from :func:`load_domains`), write ``gates.json``,
    ``fig_domains.png`` and ``fig_modules.png`` into ``out_dir`` (created only at the end); return the JSON."""
    from .plots import plot_domains, plot_modules

    if target is not None and target not in domains:
        raise UserError(
            f"--target {target!r} is not one of the domains ({', '.join(domains)}); name one of them."
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory.")
    items = load_domains(domains, max_sequences)
    stats: dict[str, GateStats] = {}
    for name, its in items.items():
        enc = encode_items(tokenizer, its, max_length, max_sequences)
        stats[name] = record_gates(
            model, enc, pad_id(tokenizer), batch_size, bins, desc=name, progress=progress
        )
    report = domain_report(stats, target, score)
    focus = target or next(iter(stats))
    report["modules_detail"] = stats[focus].summary(per_rank=True)["modules"]
    report["modules_detail_domain"] = focus

    def write(d: Path) -> None:
        plot_domains(stats, d / "fig_domains.png", target)
        plot_modules(stats[focus], d / "fig_modules.png", focus)
        atomic_write_json(d / "gates.json", report)

    _write_outputs(out, write)
    return report


def compact_adapter(
    adapter: str | os.PathLike[str],
    calibration: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    heldout: str | None = None,
    tau_closed: float = 0.02,
    tau_open: float = 0.98,
    coverage: float = 0.99,
    base: str | None = None,
    task: str | None = None,
    max_sequences: int = 200,
    max_length: int = 256,
    batch_size: int = 8,
    timing_repeats: int = 20,
    merge_static: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """What ``disel compact`` does: record the gates on ``calibration`` sources, plan, write the compacted
    adapter (or, with ``merge_static``, the merged full model) to ``out_dir`` with ``compaction.json``."""
    from .compact import (
        add_compacted_adapter,
        cost_report,
        fidelity,
        interleaved_times,
        plan_compaction,
        save_adapter,
        save_merged,
        speedup_interval,
    )

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory; choose a new directory.")
    if not 0.0 < tau_closed < tau_open < 1.0:
        raise UserError(f"--tau-closed {tau_closed} / --tau-open {tau_open}: use 0 < closed < open < 1.")
    calib_items = [load_items(src, max_sequences * 4) for src in calibration]
    held_items = load_items(heldout, max_sequences * 4) if heldout else None
    model, tok, adir = load_adapter(adapter, base=base, task=task, device=device)
    pad = pad_id(tok)
    calib = []
    for items in calib_items:
        # every token the adapter acts on counts, prompt tokens included: a component shut on the answers
        # but open on the prompt still shapes the answer through attention
        calib += encode_items(tok, items, max_length, max_sequences, all_tokens=True)
    stats = record_gates(
        model,
        calib,
        pad,
        batch_size,
        thresholds=(tau_closed, tau_open),
        desc="calibration",
        progress=True,
    )
    plan = plan_compaction(stats, tau_closed, tau_open, coverage, adapter="default")
    add_compacted_adapter(model, plan, "default", "compact")
    held = calib
    if held_items is not None:
        held = encode_items(tok, held_items, max_length, max_sequences)
    held_batches = list(batches(held, batch_size, pad))
    report = {
        "adapter": str(adir),
        "tau_closed": tau_closed,
        "tau_open": tau_open,
        "coverage": coverage,
        "calibration_tokens": max(m.count for m in stats.modules.values()),
        "counts": plan.counts(),
        "cost": cost_report(model, plan, "default"),
        "fidelity": fidelity(model, held_batches, "default", "compact"),
        "layers": {
            n: {"r": lp.r, "folded": len(lp.static), "gated": len(lp.gated), "dropped": len(lp.dropped)}
            for n, lp in plan.layers.items()
        },
    }
    if timing_repeats > 0 and held_batches:
        ids, att, _ = held_batches[0]
        rounds = interleaved_times(model, ids, att, ["default", "compact"], repeats=timing_repeats)
        t = {n: statistics.median(v) for n, v in rounds.items()}
        report["timing_s"] = t
        report["speedup_forward_interval"] = speedup_interval(rounds)
        report["speedup_adapter_overhead"] = (t["default"] - t["base"]) / max(t["compact"] - t["base"], 1e-9)
        report["speedup_forward"] = t["default"] / t["compact"]
    if merge_static:
        report["merge_static"] = _merge_static(model, held_batches, timing_repeats)
        if "timing_merged_s" in report["merge_static"]:
            t = report["merge_static"]["timing_merged_s"]
            report["speedup_forward_merged"] = t["default"] / t["compact"]
            report["speedup_forward_merged_interval"] = report["merge_static"].pop("speedup_interval")
    # the whole folder appears at once, compaction.json included
    with atomic_dir(out) as tmp:
        if merge_static:
            save_merged(model, "compact", tmp, tokenizer=tok)
            _rebase_adapter(tmp / "adapter", out)
        else:
            save_adapter(model, "compact", tmp, tokenizer=tok)
        atomic_write_json(tmp / "compaction.json", report)
    return report


def _rebase_adapter(adapter_dir: Path, base: Path) -> None:
    """Point a gated adapter written beside a merged base (in a temporary folder) at the base's final place."""
    cfg_path = adapter_dir / "adapter_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = str(base.resolve())
        atomic_write_json(cfg_path, cfg)


def _merge_static(model: Any, held_batches: list[Any], repeats: int) -> dict[str, Any]:
    """Merge the static part of "compact" into the base; its logit difference on (up to 4 sequences of) the
    first held-out batch, and an interleaved timing of original, merged and base forwards."""
    import torch

    from .compact import interleaved_times, merge_static, speedup_interval

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
            rounds = interleaved_times(model, ids, att, ["default", "compact"], repeats)
            info["timing_merged_s"] = {n: statistics.median(v) for n, v in rounds.items()}
            info["speedup_interval"] = speedup_interval(rounds)
    return info
