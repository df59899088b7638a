"""Two primitives every evaluation here builds on: mean token NLL of texts, and batched greedy decoding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_nll(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
    add_bos: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """Mean negative log-likelihood per predicted token over ``texts`` (each truncated to ``max_length``).

    Returns ``{"nll", "ppl", "tokens", "bits_per_byte"}``; ``ppl = exp(nll)``. Token-weighted, so the same
    number lm-eval's ``loglikelihood_rolling`` gives for texts that fit in one window.
    """
    if not texts:
        raise ValueError("token_nll got no texts; pass at least one non-empty string.")
    was_training = model.training
    model.eval()
    dev = _device(model)
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    total_nll, total_tok, total_bytes = 0.0, 0, 0
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="nll", disable=not progress, leave=False):
        seqs = []
        for i in idx:
            ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
            if bos is not None:
                ids = [bos, *ids]
            ids = ids[:max_length]
            if len(ids) < 2:
                continue
            seqs.append(ids)
            total_bytes += len(tokenizer.decode(ids[1:] if bos is not None else ids).encode("utf-8"))
        if not seqs:
            continue
        width = max(map(len, seqs))
        input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            input_ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = input_ids[:, 1:]
        nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        m = mask[:, 1:].float()
        total_nll += float((nll * m).sum())
        total_tok += int(m.sum())
    model.train(was_training)
    if total_tok == 0:
        raise ValueError("token_nll found no text with two or more tokens; pass longer texts.")
    mean = total_nll / total_tok
    return {
        "nll": mean,
        "ppl": math.exp(mean),
        "tokens": float(total_tok),
        "bits_per_byte": total_nll / math.log(2) / max(total_bytes, 1),
    }


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop: Sequence[str] = (),
    progress: bool = False,
) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches), cut at the first ``stop`` string."""
    was_training = model.training
    model.eval()
    dev = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    outs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="generate", disable=not progress, leave=False):
        enc = [tokenizer(prompts[i], add_special_tokens=False)["input_ids"] for i in idx]
        bos = tokenizer.bos_token_id
        if bos is not None:
            enc = [[bos, *e] for e in enc]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros(len(enc), width, dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, width - len(e) :] = torch.tensor(e)
            mask[r, width - len(e) :] = 1
        gen = model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for r, i in enumerate(idx):
            text = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
            for s in stop:
                cut = text.find(s)
                if cut >= 0:
                    text = text[:cut]
            outs[i] = text
    model.train(was_training)
    return outs
