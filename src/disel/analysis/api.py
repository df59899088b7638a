"""High-level helpers: load an adapter, record gates on a domain, and the whole ``disel gates`` report."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..utils.io import atomic_write_json
from .domains import Encoded, batches, encode_items, load_items
from .recorder import GateRecorder
from .stats import SCORES, GateStats, auroc


def resolve_adapter_dir(path: str | os.PathLike[str]) -> tuple[Path, dict]:
    """An adapter directory from an adapter path or a run directory (uses ``final/``); plus run.json."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"adapter path {p} does not exist; give a PEFT adapter directory or a run directory.")
    run: dict = {}
    if (p / "run.json").exists():
        run = json.loads((p / "run.json").read_text(encoding="utf-8"))
        if not (p / "adapter_config.json").exists():
            p = p / "final"
    if not (p / "adapter_config.json").exists():
        raise UserError(
            f"{p} has no adapter_config.json; give a DISeL adapter directory (or a run directory with final/)."
        )
    return p, run


def load_adapter(
    path: str | os.PathLike[str], base: str | None = None, task: str | None = None, device: str = "cpu"
) -> tuple[nn.Module, Any, Path]:
    """(PeftModel in eval mode, tokenizer, adapter dir) for a DISeL adapter or run directory."""
    import transformers as tf
    from peft import PeftModel

    import disel  # noqa: F401  (registers the DISEL PEFT type)

    adir, run = resolve_adapter_dir(path)
    cfg = json.loads((adir / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "DISEL":
        raise UserError(f"{adir} holds a {cfg.get('peft_type')} adapter; gates exist only in DISeL adapters.")
    base = base or run.get("model") or cfg.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adir} does not name its base model; pass --base PATH_OR_HUB_ID.")
    task = task or run.get("task") or {"SEQ_CLS": "seq_cls"}.get(cfg.get("task_type") or "", "causal_lm")
    auto = {
        "causal_lm": tf.AutoModelForCausalLM,
        "seq_cls": tf.AutoModelForSequenceClassification,
        "masked_lm": tf.AutoModelForMaskedLM,
    }.get(task)
    if auto is None:
        raise UserError(f"task {task!r} is unknown: use causal_lm, seq_cls or masked_lm.")
    model = auto.from_pretrained(base)
    tok_dir = adir if (adir / "tokenizer_config.json").exists() else base
    tokenizer = tf.AutoTokenizer.from_pretrained(str(tok_dir))
    peft_model = PeftModel.from_pretrained(model, str(adir)).to(device)
    peft_model.eval()
    return peft_model, tokenizer, adir


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


def gates_report(
    model: nn.Module,
    tokenizer: Any,
    domains: Mapping[str, str],
    out_dir: str | os.PathLike[str],
    target: str | None = None,
    max_sequences: int = 200,
    max_length: int = 256,
    batch_size: int = 8,
    bins: int = 50,
    score: str = "mid_late",
    progress: bool = True,
) -> dict[str, Any]:
    """Record every domain, write ``gates.json``, ``fig_domains.png`` and ``fig_modules.png``; return the JSON."""
    from .plots import plot_domains, plot_modules

    if target is not None and target not in domains:
        raise UserError(
            f"--target {target!r} is not one of the domains ({', '.join(domains)}); name one of them."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, GateStats] = {}
    for name, spec in domains.items():
        items = load_items(spec, limit=max_sequences * 4)
        enc = encode_items(tokenizer, items, max_length, max_sequences)
        stats[name] = record_gates(
            model, enc, pad_id(tokenizer), batch_size, bins, desc=name, progress=progress
        )
    report = domain_report(stats, target, score)
    focus = target or next(iter(stats))
    report["modules_detail"] = stats[focus].summary(per_rank=True)["modules"]
    report["modules_detail_domain"] = focus
    plot_domains(stats, out / "fig_domains.png", target)
    plot_modules(stats[focus], out / "fig_modules.png", focus)
    atomic_write_json(out / "gates.json", report)
    return report
