"""A small LaLoRA experiment: does the Laplace penalty trade learning for retention, and does it add to DISeL?

Setting (all offline, CPU, minutes): a tiny Llama-style causal LM is pretrained from scratch on English
docstrings of the standard library (the *source* domain); it is then fine-tuned on Python source code (the
*target* domain) with LoRA and DISeL, each with LaLoRA's penalty at several lambda. Retention = token NLL
on held-out docstrings (lower is better), target = token NLL on held-out code. The curvature is estimated on
training-split docstrings (a surrogate of the source data, disjoint from the retention texts).

    python -m disel.experiments.lalora_compare --out runs/lalora_experiment

Writes ``lambda_sweep.json``/``.png`` (target vs retention per method) and ``results.md``.
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..data.stdlib import stdlib_docstrings, stdlib_source_chunks
from ..evaluation.lm import token_nll
from ..methods.lalora.penalty import load_curvature, save_curvature
from ..methods.registry import MethodOptions, build_model
from ..testing import tiny_model
from ..testing_tokenizers import tiny_tokenizer
from ..training.fit import fit
from ..utils.io import atomic_write_text
from .lalora_sweep import batch_rows, train_plain, write_sweep


def pack(
    tok: Any, texts: list[str], seq: int, bsz: int, n_batches: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Concatenate tokenized texts (each after a BOS) and cut ``n_batches`` batches of ``bsz x seq``."""
    rng = random.Random(seed)
    texts = list(texts)
    rng.shuffle(texts)
    stream: list[int] = []
    need = n_batches * bsz * seq
    for t in texts:
        stream += [tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]]
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError("not enough text for the requested batches")
    ids = torch.tensor(stream[:need]).view(n_batches, bsz, seq)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in ids]


def pretrain(tok: Any, texts: list[str], steps: int, seed: int = 0) -> torch.nn.Module:
    model = tiny_model(
        "llama",
        seed=seed,
        vocab_size=len(tok),
        hidden=64,
        layers=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    # one epoch of packed windows through the shared training core: AdamW (decay 0.01), 10% warmup, cosine
    fit(
        model,
        batch_rows(pack(tok, texts, seq=64, bsz=16, n_batches=steps, seed=seed)),
        steps=steps,
        batch_size=16,
        lr=3e-3,
        warmup_steps=max(1, steps // 10),
        weight_decay=0.01,
        seed=seed,
        pad_token_id=0,
        desc="pretrain",
    )
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run(
    out_dir: str | Path,
    lams: list[float],
    methods: list[str],
    pretrain_steps: int = 600,
    ft_steps: int = 150,
    rank: int = 8,
    lr: float = 2e-3,
    curvature: str = "kfac",
    n_eval: int = 64,
    ft_batch: int = 16,
    seed: int = 0,
    log: Any = print,
) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    t0 = time.time()
    tok = tiny_tokenizer(384)
    src_train, src_held = stdlib_docstrings("train"), stdlib_docstrings("heldout")
    tgt_train, tgt_held = stdlib_source_chunks("train"), stdlib_source_chunks("heldout")
    base = pretrain(tok, src_train, pretrain_steps, seed)
    rng = random.Random(seed)
    ret_texts = rng.sample(src_held, n_eval)
    tgt_texts = rng.sample(tgt_held, n_eval)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {
            "target": token_nll(model, tok, tgt_texts, max_length=128)["nll"],
            "retention": token_nll(model, tok, ret_texts, max_length=128)["nll"],
        }

    base_m = evaluate(base)
    log(
        f"pretrained in {time.time() - t0:.0f}s: target NLL {base_m['target']:.3f}, retention {base_m['retention']:.3f}"
    )
    train = pack(tok, tgt_train, seq=64, bsz=ft_batch, n_batches=40, seed=seed + 1)
    calib = pack(tok, src_train, seq=64, bsz=16, n_batches=8, seed=seed + 2)
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            cdir = Path(tmp) / method
            opts = dict(
                rank=rank,
                calibration=lambda: calib,
                options={"lalora": {"curvature": curvature, "n_batches": 8}},
            )
            torch.manual_seed(seed)
            est = build_model(
                copy.deepcopy(base),
                f"{method}+lalora" if method == "disel" else "lalora",
                MethodOptions(**opts),
            )
            save_curvature(est, cdir)
            for lam in lams:
                torch.manual_seed(seed)
                model = build_model(copy.deepcopy(base), method, MethodOptions(rank=rank))
                reg = load_curvature(model, cdir, lam=lam)
                losses = train_plain(model, train, steps=ft_steps, lr=lr, seed=seed, method=method)
                m = evaluate(model)
                pt = {
                    "label": method if lam == 0 else f"{method}+lalora",
                    "method": method,
                    "lam": lam,
                    **m,
                    "retention_delta": m["retention"] - base_m["retention"],
                    "target_delta": m["target"] - base_m["target"],
                    "distance": reg.distance(),
                    "final_train_loss": losses[-1],
                }
                points.append(pt)
                log(
                    f"{method:6s} lam={lam:<8g} target {m['target']:.3f} retention {m['retention']:.3f} "
                    f"(+{pt['retention_delta']:.3f}) |theta-theta0|={pt['distance']:.3f}"
                )
    for p in points:  # one curve per method (lambda = 0 is the method alone)
        p["label"] = p["method"]
    write_sweep(
        points,
        out_dir,
        title="LaLoRA lambda sweep (tiny LM: docstrings -> code)",
        x_label="target NLL on held-out code (lower = learned more)",
        y_label="retention NLL on held-out docstrings (lower = forgot less)",
    )
    lines = [
        "# LaLoRA experiment",
        "",
        f"Base: target NLL {base_m['target']:.3f}, retention NLL {base_m['retention']:.3f}. "
        f"{ft_steps} steps of batch {ft_batch}x64, rank {rank}, lr {lr}, curvature {curvature}. Total {time.time() - t0:.0f}s.",
        "",
        "| method | lambda | target NLL | retention NLL | retention increase | ‖θ−θ0‖ |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['method']} | {p['lam']:g} | {p['target']:.3f} | {p['retention']:.3f} | "
            f"{p['retention_delta']:+.3f} | {p['distance']:.3f} |"
        )
    atomic_write_text(Path(out_dir) / "results.md", "\n".join(lines) + "\n")
    return points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/lalora_experiment")
    ap.add_argument("--lams", default="0,1,10,100,1000")
    ap.add_argument("--methods", default="lora,disel")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--ft-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--curvature", default="kfac", choices=["diag", "kfac"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run(
        a.out,
        [float(x) for x in a.lams.split(",")],
        a.methods.split(","),
        pretrain_steps=a.pretrain_steps,
        ft_steps=a.steps,
        rank=a.rank,
        lr=a.lr,
        curvature=a.curvature,
        ft_batch=a.ft_batch,
        seed=a.seed,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
