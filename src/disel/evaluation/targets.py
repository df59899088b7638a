"""Target-task metrics: GSM8K strict-match exact match, generic exact match from JSONL, classification.

Exact match of greedy generations (:func:`generation_exact_match`) is one function for every caller: the
``exact_match`` target of ``disel eval``/``disel sweep`` and ``disel demo``'s accuracy both call it, so a
target spec with the demo's settings (``max_new_tokens: 4``, ``batch_size: 16``, ``stop: ["\\n"]``,
``extract: first_word``) gives the demo's number.

The GSM8K rule is lm-eval's ``gsm8k`` task, "strict-match" filter: take the first match of
``#### (\\-?[0-9\\.\\,]+)`` in the generation (``[invalid]`` when none), then lm-eval's ``exact_match`` with
``ignore_case`` and ``regexes_to_ignore`` = ``,``, ``\\$``, ``(?s).*#### ``, ``\\.$`` applied to both the
prediction and the reference answer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError

GSM8K_STRICT_REGEX = r"#### (\-?[0-9\.\,]+)"
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
GSM8K_FALLBACK = "[invalid]"


def gsm8k_extract(generation: str) -> str:
    """lm-eval's strict-match filter: the first ``#### <number>`` group, stripped, else "[invalid]"."""
    found = re.findall(GSM8K_STRICT_REGEX, generation)
    return found[0].strip() if found else GSM8K_FALLBACK


def first_word(generation: str) -> str | None:
    """The first whitespace-separated word of a generation, trailing dots dropped ("9." -> "9"); None when the
    generation is blank (it then matches no answer)."""
    words = generation.split()
    return words[0].rstrip(".") if words else None


def _normalise(text: str, regexes: Sequence[str], ignore_case: bool) -> str:
    for rx in regexes:
        text = re.sub(rx, "", text)
    return text.lower() if ignore_case else text


def gsm8k_correct(generation: str, reference: str) -> bool:
    """Whether a generation scores 1 under GSM8K strict-match (``reference`` is the dataset's answer)."""
    pred = _normalise(gsm8k_extract(generation), GSM8K_IGNORE, True)
    return pred == _normalise(reference, GSM8K_IGNORE, True)


def exact_match(
    predictions: Sequence[str],
    references: Sequence[str],
    extract: str | None = None,
    ignore_case: bool = False,
    strip: bool = True,
) -> float:
    """Fraction of predictions equal to their reference; ``extract`` = "gsm8k" (strict-match), "first_word"
    (:func:`first_word`: the first word, trailing dots dropped; a blank prediction never matches) or a regex
    whose first group (or whole match) is compared."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("exact_match needs equally many predictions and references, at least one.")
    hits = 0
    for p, r in zip(predictions, references):
        if extract == "gsm8k":
            hits += gsm8k_correct(p, r)
            continue
        if extract == "first_word":
            word = first_word(p)
            if word is None:
                continue
            p = word
        elif extract:
            m = re.search(extract, p)
            p = (m.group(1) if m and m.groups() else m.group(0)) if m else ""
        if strip:
            p, r = p.strip(), r.strip()
        if ignore_case:
            p, r = p.lower(), r.lower()
        hits += p == r
    return hits / len(predictions)


def matthews_corrcoef(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Matthews correlation (multi-class form, as scikit-learn computes it); 0 when undefined."""
    labels = sorted(set(y_true) | set(y_pred))
    idx = {v: i for i, v in enumerate(labels)}
    k = len(labels)
    conf = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred):
        conf[idx[t]][idx[p]] += 1
    t_sum = [sum(row) for row in conf]
    p_sum = [sum(conf[i][j] for i in range(k)) for j in range(k)]
    n = sum(t_sum)
    correct = sum(conf[i][i] for i in range(k))
    cov_ytyp = correct * n - sum(a * b for a, b in zip(t_sum, p_sum))
    cov_ypyp = n * n - sum(b * b for b in p_sum)
    cov_ytyt = n * n - sum(a * a for a in t_sum)
    denom = math.sqrt(cov_ytyt * cov_ypyp)
    return cov_ytyp / denom if denom else 0.0


def read_jsonl(
    path: str | Path, required: Sequence[str], what: str = "Target data file"
) -> list[dict[str, Any]]:
    """Records of a local JSONL file (``.gz`` too), each checked to be an object with the ``required`` keys
    (a byte that is not UTF-8 is a :class:`UserError` naming ``file:line``)."""
    import gzip

    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {p} does not exist: pass an existing JSONL file.")
    if not p.is_file():
        raise UserError(f"{what} {p} is not a file: pass a JSONL file.")
    from ..data.sources import utf8_lines

    out = []
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        for n, line in utf8_lines(f, p):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{n} is not valid JSON ({e.msg}): write one object per line.") from e
            missing = [k for k in required if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise UserError(
                    f"{p}:{n} lacks {', '.join(missing)}: every line needs {', '.join(required)}."
                )
            out.append(rec)
    if not out:
        raise UserError(f"{what} {p} is empty: add at least one JSON line.")
    return out


def generation_exact_match(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    stop: Sequence[str] = ("\n",),
    extract: str | None = None,
    ignore_case: bool = False,
    progress: bool = False,
) -> float:
    """Exact-match accuracy of greedy completions (:func:`disel.evaluation.lm.greedy_generate`: BOS first,
    left-padded batches of ``batch_size``, cut at the first ``stop`` string) against ``answers``, scored by
    :func:`exact_match` with ``extract`` / ``ignore_case``."""
    from .lm import greedy_generate

    gens = greedy_generate(
        model,
        tokenizer,
        list(prompts),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop=tuple(stop),
        progress=progress,
    )
    return exact_match(gens, [str(a) for a in answers], extract=extract, ignore_case=ignore_case)


def evaluate_exact_match(model: Any, tokenizer: Any, target: dict[str, Any], limit: int | None) -> dict:
    """Greedy generation on ``{"prompt", "answer"}`` lines (the first ``limit``); ``{"exact_match", "n"}``.

    Target options: ``max_new_tokens`` (32), ``batch_size`` (8), ``stop`` (``["\\n"]``), ``extract``
    (none; ``gsm8k``, ``first_word`` or a regex), ``ignore_case`` (false)."""
    recs = read_jsonl(target["path"], ("prompt", "answer"))[: limit or None]
    score = generation_exact_match(
        model,
        tokenizer,
        [r["prompt"] for r in recs],
        [str(r["answer"]) for r in recs],
        max_new_tokens=int(target.get("max_new_tokens", 32)),
        batch_size=int(target.get("batch_size", 8)),
        stop=tuple(target.get("stop", ("\n",))),
        extract=target.get("extract"),
        ignore_case=bool(target.get("ignore_case", False)),
    )
    return {"exact_match": score, "n": float(len(recs))}


def evaluate_gsm8k_local(model: Any, tokenizer: Any, target: dict[str, Any], limit: int | None) -> dict:
    """GSM8K-format JSONL (``question``/``answer``) scored by strict-match, lm-eval's prompt, k-shot from
    ``fewshot_path`` (default: the first k other lines of the same file)."""
    from .lm import greedy_generate

    recs = read_jsonl(target["path"], ("question", "answer"))
    k = int(target.get("num_fewshot", 5))
    shots_src = read_jsonl(target["fewshot_path"], ("question", "answer")) if "fewshot_path" in target else []
    test = recs[: limit or None]
    prompts = []
    for i, r in enumerate(test):
        pool = shots_src or [x for j, x in enumerate(recs) if j != i]
        shots = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in pool[:k])
        prompts.append(f"{shots}Question: {r['question']}\nAnswer:")
    gens = greedy_generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=int(target.get("max_new_tokens", 256)),
        batch_size=int(target.get("batch_size", 8)),
        stop=("Question:", "</s>", "<|im_end|>"),
    )
    return {
        "exact_match": exact_match(gens, [r["answer"] for r in test], extract="gsm8k"),
        "n": float(len(test)),
    }


def evaluate_classification(model: Any, tokenizer: Any, target: dict[str, Any], limit: int | None) -> dict:
    """A sequence-classification model on JSONL ``{"text", "label"}`` (or ``text_a``/``text_b`` pairs), or a
    GLUE task (``glue: cola``; needs the hub): ``{"accuracy", "mcc"}``."""
    import torch

    if "glue" in target:
        from datasets import load_dataset

        ds = load_dataset("nyu-mll/glue", target["glue"], split=target.get("split", "validation"))
        keys = [k for k in ("sentence", "sentence1", "question", "premise") if k in ds.column_names]
        keys2 = [k for k in ("sentence2", "hypothesis") if k in ds.column_names]
        recs = [
            {"text": r[keys[0]], "text_b": r[keys2[0]] if keys2 else None, "label": r["label"]} for r in ds
        ]
    else:
        recs = read_jsonl(target["path"], ("label",))
    recs = recs[: limit or None]
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    preds, gold = [], []
    bs = int(target.get("batch_size", 16))
    with torch.no_grad():
        for i in range(0, len(recs), bs):
            chunk = recs[i : i + bs]
            a = [r.get("text", r.get("text_a", "")) for r in chunk]
            b = [r.get("text_b") for r in chunk]
            enc = tokenizer(
                a,
                b if all(x is not None for x in b) else None,
                padding=True,
                truncation=True,
                max_length=int(target.get("max_length", 256)),
                return_tensors="pt",
            ).to(dev)
            logits = model(**enc).logits
            preds += logits.argmax(-1).tolist()
            gold += [int(r["label"]) for r in chunk]
    model.train(was)
    acc = sum(p == g for p, g in zip(preds, gold)) / len(gold)
    return {"accuracy": acc, "mcc": matthews_corrcoef(gold, preds), "n": float(len(gold))}
