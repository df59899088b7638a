"""Domains to record gates on: local text/JSONL files, the standard library, or ``datasets`` names.

A domain is a list of items; an item is raw text (every token counts) or a prompt/response pair (only the
response tokens count, as in the paper's analysis of instruction data). Items are tokenised into sequences
of at most ``max_length`` tokens, each with a mask of the tokens that count (the BOS token never counts).

Specs (``disel gates --domain NAME=SPEC``):
  * ``path.txt`` (or any non-JSON file): one long raw text, cut into ``max_length``-token windows;
  * ``path.jsonl`` / ``path.json``: records with ``text`` (raw) or a prompt field (``prompt``, ``question``,
    ``instruction`` [Alpaca template]) and a response field (``response``, ``output``, ``completion``,
    ``answer``, ``canonical_solution``); a JSON file may also be a list of strings;
  * ``stdlib:docstrings`` / ``stdlib:source``: held-out standard-library docstrings / source chunks;
  * ``hf:NAME[:CONFIG][:SPLIT]``: a ``datasets`` data set (needs the network or a local cache).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

ALPACA = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_KEYS = ("prompt", "question", "instruction")
RESPONSE_KEYS = ("response", "output", "completion", "answer", "canonical_solution")
TEXT_KEYS = ("text", "content", "code")


@dataclass
class Item:
    """Raw text (``prompt`` None) or a prompt/response pair."""

    text: str
    prompt: str | None = None


def _record_to_item(rec: Any, where: str) -> Item:
    if isinstance(rec, str):
        return Item(rec)
    if not isinstance(rec, dict):
        raise UserError(
            f"{where} is a {type(rec).__name__}; use a JSON object with 'text' or prompt/response."
        )
    resp = next((rec[k] for k in RESPONSE_KEYS if isinstance(rec.get(k), str)), None)
    if resp is not None:
        if isinstance(rec.get("prompt"), str):
            return Item(resp, rec["prompt"])
        if isinstance(rec.get("question"), str):
            return Item(resp, rec["question"] + "\n")
        if isinstance(rec.get("instruction"), str):
            instr = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
            return Item(resp, ALPACA.format(instruction=instr))
    text = next((rec[k] for k in TEXT_KEYS if isinstance(rec.get(k), str)), None)
    if text is not None:
        return Item(text)
    raise UserError(
        f"{where} has fields {sorted(rec)}; give it 'text', or a prompt field ({', '.join(PROMPT_KEYS)}) and "
        f"a response field ({', '.join(RESPONSE_KEYS)})."
    )


def load_items(spec: str, limit: int | None = None) -> list[Item]:
    """The items of a domain spec (see the module docstring)."""
    if spec.startswith("stdlib:"):
        from ..data.stdlib import stdlib_spec_texts

        return [Item(t) for t in stdlib_spec_texts(spec)[:limit]]
    if spec.startswith("hf:"):
        return _load_hf(spec[3:], limit)
    path = Path(spec)
    if not path.exists():
        raise UserError(
            f"domain source {spec!r} does not exist; give a .txt/.jsonl file, stdlib:docstrings, "
            "stdlib:source or hf:NAME[:CONFIG][:SPLIT]."
        )
    if path.is_dir():
        raise UserError(f"domain source {spec!r} is a directory; give a .txt, .json or .jsonl file.")
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
        from ..training.data import read_rows  # the one reader of record files, with row-naming errors

        return [_record_to_item(row.data, row.where) for row in read_rows(str(path), max_rows=limit)]
    return [Item(path.read_text(encoding="utf-8", errors="replace"))]


def _load_hf(spec: str, limit: int | None) -> list[Item]:
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 2 else None
    split = parts[-1] if len(parts) > 1 else "test"
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name, missing config
        raise UserError(
            f"could not load the data set hf:{spec} ({type(e).__name__}); check the name."
        ) from None
    items = []
    for i, rec in enumerate(ds):
        if limit is not None and i >= limit:
            break
        items.append(_record_to_item(dict(rec), f"hf:{spec} row {i}"))
    return items


@dataclass
class Encoded:
    ids: list[int]
    mask: list[bool]


def encode_items(
    tokenizer: Any, items: Sequence[Item], max_length: int, max_sequences: int, all_tokens: bool = False
) -> list[Encoded]:
    """Tokenise items into at most ``max_sequences`` sequences of at most ``max_length`` tokens.

    The mask marks the response tokens of prompt/response items (the paper's analysis of what the adapter
    does for the answer), or, with ``all_tokens``, every token but BOS: what compaction needs, since the
    adapter acts on the prompt tokens too and the answer attends to them.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    lead = [bos] if bos is not None else []
    room = max_length - len(lead)
    out: list[Encoded] = []
    for item in items:
        if len(out) >= max_sequences:
            break
        text_ids = tokenizer(item.text, add_special_tokens=False)["input_ids"]
        if item.prompt is None:
            for s in range(0, len(text_ids), room):
                piece = text_ids[s : s + room]
                if len(piece) < 2 or len(out) >= max_sequences:
                    break
                out.append(Encoded(lead + piece, [False] * len(lead) + [True] * len(piece)))
        else:
            p_ids = tokenizer(item.prompt, add_special_tokens=False)["input_ids"]
            ids = (lead + p_ids + text_ids)[:max_length]
            mask = ([False] * len(lead) + [all_tokens] * len(p_ids) + [True] * len(text_ids))[:max_length]
            if any(mask):
                out.append(Encoded(ids, mask))
    return out


def batches(
    encoded: Sequence[Encoded], batch_size: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask, token_mask)`` batches."""
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        width = max(len(e.ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        att = torch.zeros(len(chunk), width, dtype=torch.long)
        tm = torch.zeros(len(chunk), width, dtype=torch.bool)
        for r, e in enumerate(chunk):
            ids[r, : len(e.ids)] = torch.tensor(e.ids)
            att[r, : len(e.ids)] = 1
            tm[r, : len(e.mask)] = torch.tensor(e.mask)
        yield ids, att, tm
