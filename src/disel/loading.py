"""Model and adapter loading: the one place that turns a name or a directory into a model.

A base model (hub id or local directory), a saved adapter of any registered method (through PEFT's own
loaders, which read the base from ``adapter_config.json``) or a full model directory. Weights are read with
safetensors wherever ``transformers`` finds them.

A broken adapter is a :class:`~disel.errors.UserError` naming the file and the fix, before anything is
written: ``adapter_config.json`` that is not UTF-8 JSON, not a mapping or of an unknown ``peft_type``;
weights that are missing, truncated or corrupt; weights shaped for a base of another width.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError
from .methods.peft_registration import ensure_registered

_TASK_TYPES = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# peft_type -> the method name results are recorded under (LORA with use_dora is "dora")
_METHOD_OF_PEFT_TYPE = {"LORA": "lora", "DISEL": "disel", "ADALORA": "adalora", "QUERYABLE": "queryable"}
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+?): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)
_JSON_KINDS = {"list": "list", "str": "string", "int": "number", "float": "number", "bool": "boolean"}
_JSON_KINDS["NoneType"] = "null"
T = TypeVar("T")


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


# --------------------------------------------------------------------------------------------------
# Adapter directories, checked before anything loads


def _peft_types() -> set[str]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(getattr(k, "value", k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING}


def read_adapter_config(adir: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of an adapter directory, checked: UTF-8 JSON, a mapping, a ``peft_type`` that
    PEFT knows (disel's types registered first) and fields that type accepts; else a :class:`UserError`."""
    ensure_registered()
    f = Path(adir) / ADAPTER_CONFIG
    fix = "restore the adapter_config.json that save_pretrained wrote beside the adapter's weights"
    try:
        text = f.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{f} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): {fix}."
        ) from None
    except OSError as e:
        raise UserError(f"{f} cannot be read ({e.strerror or e}): {fix}.") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{f} is not valid JSON ({e.msg} at line {e.lineno}): {fix}.") from None
    if not isinstance(cfg, dict):
        kind = _JSON_KINDS.get(type(cfg).__name__, type(cfg).__name__)
        raise UserError(f"{f} holds a JSON {kind}, not a mapping of adapter settings: {fix}.")
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in _peft_types():
        raise UserError(
            f"{f} has peft_type {peft_type!r}, which no installed method knows: set it to the adapter's PEFT "
            f"type (such as LORA, ADALORA, DISEL or QUERYABLE) or {fix}."
        )
    from peft import PeftConfig

    try:
        PeftConfig.from_pretrained(str(adir))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{f} is not a valid {peft_type} adapter config ({_first_line(e)}): {fix}.") from None
    return cfg


def check_adapter_weights(adir: str | Path) -> Path:
    """The weights file of an adapter directory, its safetensors header read (a truncated or corrupt file
    fails here, before a base model is loaded); else a :class:`UserError`."""
    d = Path(adir)
    st, binary = (d / name for name in ADAPTER_WEIGHTS)
    if st.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(st), framework="pt") as fh:
                fh.keys()
        except Exception as e:  # safetensors raises its own SafetensorError (not an OSError)
            raise _corrupt(st, e) from None
        return st
    if binary.is_file():
        return binary
    raise UserError(
        f"{d} has no {ADAPTER_WEIGHTS[0]}: copy the adapter's weights beside its {ADAPTER_CONFIG} "
        "(save_pretrained writes both)."
    )


def adapter_method(cfg: dict[str, Any]) -> tuple[str | None, int | None]:
    """``(method, rank)`` an adapter config describes: peft_type DISEL -> "disel", LORA -> "lora" ("dora"
    with use_dora), ADALORA -> "adalora" (rank: target_r), QUERYABLE -> "queryable", others lower-cased."""
    peft_type = str(cfg.get("peft_type") or "")
    if not peft_type:
        return None, None
    method = _METHOD_OF_PEFT_TYPE.get(peft_type, peft_type.lower())
    if method == "lora" and cfg.get("use_dora"):
        method = "dora"
    rank = cfg.get("target_r") if peft_type == "ADALORA" else cfg.get("r")
    return method, int(rank) if isinstance(rank, int | float) and not isinstance(rank, bool) else None


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (error texts quoted inside one-sentence messages)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text.split(". ")[0].rstrip(".: ")


def _corrupt(path: Path, e: BaseException) -> UserError:
    reason = _first_line(e).removeprefix("Error while deserializing header: ")
    return UserError(
        f"{path} is truncated or corrupt ({reason}): copy the adapter again, or save it anew with save_pretrained."
    )


def _local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _check_base(base: str, where: str, fix: str) -> None:
    if _local_path(base) and not Path(base).expanduser().exists():
        raise UserError(f"The base model {base} named in {where} does not exist: {fix}.")


def _load_guarded(fn: Callable[[], T], adir: Path, base: str, fix: str) -> T:
    """``fn()`` (a base + adapter load), its known failures turned into one-sentence :class:`UserError`s."""
    try:
        return fn()
    except RuntimeError as e:
        m = _SIZE_MISMATCH.search(str(e))
        if m is None:
            raise
        name, saved, model = m.groups()
        name = re.sub(r"^base_model\.model\.", "", name)
        raise UserError(
            f"{adir} does not fit the base model {base} ({name} is {saved} in the adapter but {model} in the "
            f"model, a base of another width): {fix}."
        ) from None
    except OSError as e:
        raise UserError(f"Cannot load the base model {base} for {adir} ({_first_line(e)}): {fix}.") from None
    except Exception as e:
        if type(e).__name__ == "SafetensorError":
            raise _corrupt(adir / ADAPTER_WEIGHTS[0], e) from None
        raise


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
    hub id. ``info`` has ``kind`` ("adapter"/"model"), ``base`` and ``task``, and for an adapter the ``method``
    and ``rank`` its config describes (:func:`adapter_method`). A broken adapter is a :class:`UserError`."""
    ensure_registered()
    p = Path(path).expanduser()
    extra = {"num_labels": num_labels} if num_labels else {}
    if (p / ADAPTER_CONFIG).exists():
        cfg = read_adapter_config(p)
        base = cfg.get("base_model_name_or_path")
        if not base or not isinstance(base, str):
            raise UserError(f"{p / ADAPTER_CONFIG} has no base_model_name_or_path: set it to the base model.")
        fix = f"set base_model_name_or_path in {p / ADAPTER_CONFIG} to the base model the adapter was trained on"
        _check_base(base, str(p / ADAPTER_CONFIG), fix)
        check_adapter_weights(p)
        task = task or _TASK_TYPES.get(cfg.get("task_type") or "") or _task_from_config(base)
        import peft

        def load() -> Any:
            if task == "causal_lm":
                return peft.AutoPeftModelForCausalLM.from_pretrained(str(p), **extra)
            if task == "seq_cls":
                return peft.AutoPeftModelForSequenceClassification.from_pretrained(str(p), **extra)
            return peft.PeftModel.from_pretrained(_auto_class(task).from_pretrained(base, **extra), str(p))

        model = _load_guarded(load, p, base, fix)
        model.eval()
        method, rank = adapter_method(cfg)
        info = {"kind": "adapter", "base": base, "task": task, "method": method, "rank": rank}
        return model, tokenizer or load_tokenizer(p, base), info
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
    cfg = read_adapter_config(adir)
    if gated and cfg.get("peft_type") != "DISEL":
        raise UserError(
            f"{adir} holds a {cfg.get('peft_type')} adapter, which has no gates: pass a DISeL adapter "
            "(peft_type DISEL)."
        )
    base = base or run.get("model") or cfg.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adir} does not name its base model; pass --base PATH_OR_HUB_ID.")
    task = task or run.get("task") or _TASK_TYPES.get(cfg.get("task_type") or "", "causal_lm")
    if task not in ("causal_lm", "seq_cls", "masked_lm"):
        raise UserError(f"task {task!r} is unknown: use causal_lm, seq_cls or masked_lm.")
    fix = "pass --base with the base model the adapter was trained on"
    _check_base(str(base), str(adir / ADAPTER_CONFIG), fix)
    check_adapter_weights(adir)

    def load() -> Any:
        model = _auto_class(task).from_pretrained(base)
        return PeftModel.from_pretrained(model, str(adir))

    peft_model = _load_guarded(load, adir, str(base), fix)
    tok_dir = adir if (adir / "tokenizer_config.json").exists() else base
    tokenizer = tf.AutoTokenizer.from_pretrained(str(tok_dir))
    peft_model = peft_model.to(device)
    peft_model.eval()
    return peft_model, tokenizer, adir
