"""Tokenise a domain's items for gate recording: sequences with a mask of the tokens that count.

A domain is a list of :class:`~disel.data.sources.Item` (read by :func:`disel.data.sources.load_items` from
any source of its grammar); an item is raw text (every token counts) or a prompt/response pair (only the
response tokens count, as in the paper's analysis of instruction data). The BOS token never counts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.sources import Item, load_items

__all__ = ["Encoded", "Item", "batches", "encode_items", "load_items"]


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
