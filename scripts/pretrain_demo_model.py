"""Pretrain the small causal LM that `disel demo` ships, from scratch, on the standard library's text.

Why: the demo must run on a fresh clone without network, so it needs a pretrained model whose pretraining
data we know exactly (to measure what fine-tuning makes it forget). Anyone can rerun this script:

    python scripts/pretrain_demo_model.py --steps 1500 --out src/disel/assets/demo_model

It trains (1) a byte-level BPE tokenizer whose digits are single tokens (helps arithmetic), then (2) a small
Llama-style model on packed 256-token windows of the ``train`` split of ``disel.data.stdlib`` (docstrings and
source), and saves safetensors weights, the tokenizer and ``pretrain.json`` (settings and held-out NLL).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_tokenizer(texts: list[str], vocab_size: int, context: int = 256):
    """Byte-level BPE with every digit its own pre-token, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=context
    )


def build_model(vocab_size: int, hidden: int, layers: int, heads: int, context: int, tok, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def pack(texts: list[str], tok, context: int) -> torch.Tensor:
    """Concatenate ``<bos> text <eos>`` documents and cut them into ``context``-token windows."""
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream += [tok.bos_token_id, *ids, tok.eos_token_id]
    n = len(stream) // context
    return torch.tensor(stream[: n * context]).view(n, context)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="src/disel/assets/demo_model")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop early (cosine still spans --steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", default=None, help="also append progress lines to this file")
    args = ap.parse_args()

    from disel.data.stdlib import stdlib_docstrings, stdlib_source_chunks
    from disel.evaluation import lm as lm_eval

    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg: str) -> None:
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(line + "\n")

    docs, src = stdlib_docstrings("train"), stdlib_source_chunks("train")
    texts = docs + src
    random.Random(args.seed).shuffle(texts)
    log(f"train texts: {len(docs)} docstrings, {len(src)} source chunks")
    tok = train_tokenizer(texts, args.vocab, args.context)
    data = pack(texts, tok, args.context)
    log(f"tokenizer vocab {len(tok)}; {data.numel()} train tokens in {len(data)} windows")

    model = build_model(len(tok), args.hidden, args.layers, args.heads, args.context, tok, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    g = torch.Generator().manual_seed(args.seed)
    model.train()
    step, ema = 0, None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(len(data), (args.batch,), generator=g)
        batch = data[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        cur = loss.item()
        ema = cur if ema is None else 0.98 * ema + 0.02 * cur
        if step % 25 == 0 or step == args.steps - 1:
            log(f"step {step}/{args.steps} loss {ema:.3f} lr {lr_at(step):.2e}")
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            log(f"time budget reached at step {step}")
            break
    model.eval()

    held = {
        "docstrings": stdlib_docstrings("heldout")[:200],
        "source": stdlib_source_chunks("heldout")[:200],
    }
    heldout = {k: lm_eval.token_nll(model, tok, v, max_length=args.context) for k, v in held.items()}
    log("held-out NLL: " + ", ".join(f"{k} {v['nll']:.3f}" for k, v in heldout.items()))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".demo_model."))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    info = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "log")},
        "steps_done": step + 1,
        "parameters": n_params,
        "train_tokens_available": int(data.numel()),
        "tokens_seen": int((step + 1) * args.batch * args.context),
        "train_minutes": round((time.time() - t0) / 60, 2),
        "final_train_loss_ema": ema,
        "heldout_first_200": heldout,
        "torch": torch.__version__,
    }
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    tmp.chmod(0o755)  # mkdtemp makes it private; the package data must be readable by everyone
    for f in tmp.iterdir():
        f.chmod(0o644)
    if out.exists():
        old = out.with_name(out.name + ".old")
        out.rename(old)
        tmp.rename(out)
        import shutil

        shutil.rmtree(old)
    else:
        tmp.rename(out)
    log(f"saved to {out}")


if __name__ == "__main__":
    main()
