"""Masked-LM retention for encoders (the paper's RoBERTa setting).

Forgetting is the masked-LM perplexity of the fine-tuned ENCODER read out through the ORIGINAL pretrained
MLM head (the fine-tuned model has a classification head instead): hidden states of the fine-tuned encoder
go into the untouched head of the pretrained ``*ForMaskedLM`` model. Masking is deterministic (15% of the
non-special tokens of each text, from a seeded generator, at least one per text; masked positions become
the mask token), so two models are scored on exactly the same positions.

Corpora: ``wikitext2`` (WikiText-2 raw validation), ``bookcorpusopen``, ``ccnews`` (fixed-seed samples via
``datasets``; these need the hub), ``stdlib`` (held-out standard-library docstrings, offline) or a path to a
local text file (paragraphs separated by blank lines).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

HUB_CORPORA: dict[str, tuple[str, str | None, str, str]] = {
    # name -> (dataset id, config, split, text column)
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", "text"),
    "bookcorpusopen": ("lucadiliello/bookcorpusopen", None, "train", "text"),
    "ccnews": ("vblagoje/cc_news", None, "train", "text"),
}


def corpus_texts(name: str, n: int = 200, seed: int = 0, max_chars: int = 2000) -> list[str]:
    """``n`` texts of a named corpus or a local file, chosen with a fixed seed."""
    p = Path(name).expanduser()
    if name == "stdlib":
        from ..data.stdlib import stdlib_docstrings

        texts = stdlib_docstrings("heldout")
    elif p.exists():
        from ..data.sources import read_text_file

        raw = read_text_file(p)
        texts = [t.strip() for t in raw.split("\n\n") if t.strip()]
    elif name in HUB_CORPORA:
        from datasets import load_dataset

        ds_id, cfg, split, col = HUB_CORPORA[name]
        ds = load_dataset(ds_id, cfg, split=split, streaming=name != "wikitext2")
        if name == "wikitext2":
            texts = [t.strip() for t in ds[col] if len(t.strip()) > 100]
        else:
            texts = [r[col] for _, r in zip(range(20 * n), ds.shuffle(seed=seed, buffer_size=10_000))]
    else:
        raise UserError(
            f"MLM corpus {name!r} is unknown: use stdlib, {', '.join(HUB_CORPORA)} or a text file path."
        )
    texts = [t[:max_chars] for t in texts if len(t.split()) >= 4]
    if not texts:
        raise UserError(f"MLM corpus {name!r} has no text of four or more words: use another corpus.")
    if len(texts) > n:
        texts = random.Random(seed).sample(texts, n)
    return texts


def mlm_head(mlm_model: nn.Module) -> nn.Module:
    """The MLM head of a ``*ForMaskedLM`` model: its one child besides the encoder."""
    prefix = mlm_model.base_model_prefix
    heads = [m for n, m in mlm_model.named_children() if n != prefix]
    if len(heads) != 1:
        raise UserError(f"{type(mlm_model).__name__} is not a masked-LM model with one head: pass one.")
    return heads[0]


def encoder_of(model: nn.Module) -> nn.Module:
    """The transformer encoder of a (possibly PEFT-wrapped) HF model, e.g. ``model.roberta``."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(hf, "base_model_prefix", "")
    enc = getattr(hf, prefix, None)
    return enc if isinstance(enc, nn.Module) else hf


def mask_batch(ids: list[int], special: set[int], mask_id: int, rate: float, seed: int) -> list[int]:
    """Positions to mask in one sequence: ``rate`` of the non-special tokens (at least one), seeded."""
    cand = [i for i, t in enumerate(ids) if t not in special]
    if not cand:
        return []
    k = max(1, round(rate * len(cand)))
    return sorted(random.Random(seed).sample(cand, k))


@torch.no_grad()
def mlm_perplexity(
    model: nn.Module,
    head: nn.Module,
    tokenizer: Any,
    texts: list[str],
    rate: float = 0.15,
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 16,
) -> dict[str, float]:
    """exp(mean NLL at masked positions) of ``model``'s encoder read by ``head``: ``{"ppl", "nll", "n"}``."""
    if tokenizer.mask_token_id is None:
        raise UserError("The tokenizer has no mask token: MLM perplexity needs an encoder tokenizer.")
    enc_mod = encoder_of(model)
    was = (enc_mod.training, head.training)
    enc_mod.eval()
    head.eval()
    dev = next(enc_mod.parameters()).device
    special = set(tokenizer.all_special_ids)
    total, count = 0.0, 0
    for b in range(0, len(texts), batch_size):
        batch = texts[b : b + batch_size]
        enc = tokenizer(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        ids = enc["input_ids"].clone()
        labels = torch.full_like(ids, -100)
        for r in range(ids.shape[0]):
            row = [t for t, m in zip(ids[r].tolist(), enc["attention_mask"][r].tolist()) if m]
            for pos in mask_batch(row, special, tokenizer.mask_token_id, rate, seed * 1_000_003 + b + r):
                labels[r, pos] = ids[r, pos]
                ids[r, pos] = tokenizer.mask_token_id
        kwargs = {"input_ids": ids.to(dev), "attention_mask": enc["attention_mask"].to(dev)}
        hidden = enc_mod(**kwargs)[0]
        logits = head(hidden).float()
        lab = labels.to(dev)
        nll = nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), lab.view(-1), reduction="sum")
        total += float(nll)
        count += int((lab != -100).sum())
    enc_mod.train(was[0])
    head.train(was[1])
    if count == 0:
        raise UserError("No token could be masked: pass longer texts.")
    return {"ppl": math.exp(total / count), "nll": total / count, "n": float(count)}


def load_original_head(base: str | nn.Module) -> nn.Module:
    """The MLM head of the pretrained model ``base`` (hub id, local dir or an MLM model object)."""
    if isinstance(base, nn.Module):
        return mlm_head(base)
    from transformers import AutoModelForMaskedLM

    try:
        mlm = AutoModelForMaskedLM.from_pretrained(base)
    except OSError as e:
        raise UserError(
            f"Cannot load the pretrained MLM model {base!r} ({e}): pass its hub id or directory."
        ) from e
    return mlm_head(mlm)
