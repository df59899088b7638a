"""Model and adapter loading: the one place that turns a name or a directory into a model.

A base model (hub id or local directory), a saved adapter of any registered method (through PEFT's own
loaders, which read the base from ``adapter_config.json``) or a full model directory. Weights are read with
safetensors wherever ``transformers`` finds them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError
from .methods.peft_registration import ensure_registered

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
    ensure_registered()
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


def load_base(
    name: str, task: str = "causal_lm", dtype: str = "float32", trust_remote_code: bool = False, **kw: Any
):
    """A pretrained base model for training: ``task`` causal_lm | seq_cls | masked_lm; ``kw`` go to
    ``from_pretrained`` (e.g. ``num_labels``, ``id2label`` for a fresh classification head)."""
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        dtype, dtype
    )
    try:
        return _auto_class(task).from_pretrained(
            name, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kw
        )
    except OSError as e:
        raise UserError(f"Could not load the model {name!r} ({e}): check model.name.") from e


def load_adapter(
    path: str | Path,
    base: str | None = None,
    task: str | None = None,
    device: str = "cpu",
    gated: bool = True,
) -> tuple[Any, Any, Path]:
    """(PeftModel in eval mode, tokenizer, adapter dir) of an adapter directory or a run directory.

    ``gated`` (the default) requires an adapter with DISeL gates, what gate recording and compaction read."""
    import transformers as tf
    from peft import PeftModel

    from .rundir import adapter_dir

    ensure_registered()
    adir, run = adapter_dir(path)
    cfg = json.loads((adir / "adapter_config.json").read_text(encoding="utf-8"))
    if gated and cfg.get("peft_type") != "DISEL":
        raise UserError(f"{adir} holds a {cfg.get('peft_type')} adapter; gates exist only in DISeL adapters.")
    base = base or run.get("model") or cfg.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adir} does not name its base model; pass --base PATH_OR_HUB_ID.")
    task = task or run.get("task") or _TASK_TYPES.get(cfg.get("task_type") or "", "causal_lm")
    if task not in ("causal_lm", "seq_cls", "masked_lm"):
        raise UserError(f"task {task!r} is unknown: use causal_lm, seq_cls or masked_lm.")
    model = _auto_class(task).from_pretrained(base)
    tok_dir = adir if (adir / "tokenizer_config.json").exists() else base
    tokenizer = tf.AutoTokenizer.from_pretrained(str(tok_dir))
    peft_model = PeftModel.from_pretrained(model, str(adir)).to(device)
    peft_model.eval()
    return peft_model, tokenizer, adir
