"""Load what ``disel eval`` is pointed at: a base model, a saved adapter, a full model or a run directory."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import UserError

_TASK_TYPES = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls"}


def _auto_class(task: str):
    import transformers as tf

    return {
        "causal_lm": tf.AutoModelForCausalLM,
        "seq_cls": tf.AutoModelForSequenceClassification,
        "masked_lm": tf.AutoModelForMaskedLM,
    }[task]


def _task_from_config(path: str | Path) -> str:
    try:
        from transformers import AutoConfig

        archs = AutoConfig.from_pretrained(str(path)).architectures or []
    except (OSError, ValueError):
        archs = []
    a = " ".join(archs)
    if "SequenceClassification" in a:
        return "seq_cls"
    if "MaskedLM" in a:
        return "masked_lm"
    return "causal_lm"


def load_tokenizer(*candidates: str | Path | None) -> Any:
    """The tokenizer of the first candidate (adapter dir, then base) that has one."""
    from transformers import AutoTokenizer

    errors = []
    for c in candidates:
        if c is None:
            continue
        try:
            tok = AutoTokenizer.from_pretrained(str(c))
        except (OSError, ValueError, TypeError) as e:
            errors.append(f"{c}: {e}")
            continue
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        return tok
    raise UserError(
        f"No tokenizer found in {', '.join(str(c) for c in candidates if c)}: save one beside the model."
    )


def load_model(
    path: str | Path, task: str | None = None, num_labels: int | None = None, tokenizer: Any = None
) -> tuple[Any, Any, dict]:
    """``(model, tokenizer, info)`` for a PEFT adapter dir (any registered method, DISeL included, in one
    call through PEFT's loaders, which read the base path from adapter_config.json), a full model dir or a
    hub id. ``info`` has ``kind`` ("adapter"/"model"), ``base`` and ``task``."""
    import disel  # noqa: F401  (registers DISeL with PEFT)

    p = Path(path).expanduser()
    extra = {"num_labels": num_labels} if num_labels else {}
    if (p / "adapter_config.json").exists():
        cfg = json.loads((p / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise UserError(
                f"{p}/adapter_config.json has no base_model_name_or_path: set it to the base model."
            )
        task = task or _TASK_TYPES.get(cfg.get("task_type") or "") or _task_from_config(base)
        import peft

        if task == "causal_lm":
            model = peft.AutoPeftModelForCausalLM.from_pretrained(str(p), **extra)
        elif task == "seq_cls":
            model = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(p), **extra)
        else:
            model = peft.PeftModel.from_pretrained(_auto_class(task).from_pretrained(base, **extra), str(p))
        model.eval()
        return model, tokenizer or load_tokenizer(p, base), {"kind": "adapter", "base": base, "task": task}
    if not p.exists() and (str(path).startswith((".", "/", "~")) or str(path).count("/") > 1):
        raise UserError(
            f"{path} does not exist: pass a model or adapter directory, or a hub id like org/name."
        )
    if p.exists() and not (p / "config.json").exists():
        raise UserError(
            f"{p} holds neither adapter_config.json nor config.json: pass a model or adapter dir."
        )
    task = task or _task_from_config(p if p.exists() else str(path))
    try:
        model = _auto_class(task).from_pretrained(str(p) if p.exists() else str(path), **extra)
    except OSError as e:
        raise UserError(
            f"Cannot load model {path} ({e}): pass a local directory or a reachable hub id."
        ) from e
    model.eval()
    return (
        model,
        tokenizer or load_tokenizer(p if p.exists() else str(path)),
        {"kind": "model", "base": str(path), "task": task},
    )


def read_run(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir) / "run.json"
    if not p.exists():
        raise UserError(f"{run_dir} has no run.json: pass a run directory written by `disel train`.")
    return json.loads(p.read_text())


def run_checkpoints(run_dir: str | Path) -> list[tuple[int | None, Path]]:
    """``(step, dir)`` for every ``checkpoint-<step>`` (by step) and then ``final`` (step None)."""
    d = Path(run_dir)
    out: list[tuple[int | None, Path]] = []
    for c in d.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", c.name)
        if m and c.is_dir():
            out.append((int(m.group(1)), c))
    out.sort(key=lambda x: x[0] or 0)
    if (d / "final").is_dir():
        out.append((None, d / "final"))
    # CorDA runs keep, beside each native adapter (for the residual base), a plain LoRA export for the
    # original base model: that is the one to evaluate.
    return [(step, p / "original_base_lora" if (p / "original_base_lora").is_dir() else p) for step, p in out]


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "run.json").exists()
