"""A small comparison on the shipped demo model: CorDA (KPM, IPM) and CorDA++ beside LoRA and DISeL.

Every method gets the same fine-tuning (arithmetic word problems, the demo's recipe through the shared
training core ``disel.training.fit``, same seed); reported are target NLL (held-out problems), exact-match
accuracy, and retention NLL on held-out stdlib text (the demo model's pretraining domains), all with ``disel.evaluation.token_nll``.
KPM calibrates on pretraining-domain text (what must be kept), IPM on the task's training problems.

Run: ``python -m disel.experiments.corda_compare --out DIR [--steps 150]``.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from ..evaluation.lm import token_nll
from ..utils.io import atomic_write_json, atomic_write_text

VARIANTS: dict[str, tuple[str, str | None]] = {
    "lora": ("lora", None),
    "disel": ("disel", None),
    "corda-kpm": ("corda", "kpm"),
    "corda-ipm": ("corda", "ipm"),
    "corda++-kpm": ("corda++", "kpm"),
    "corda++-ipm": ("corda++", "ipm"),
    "disel+corda": ("disel+corda", None),
}


def text_batches(tok: Any, texts: list[str], max_length: int = 128, batch_size: int = 8) -> list[dict]:
    """Padded, model-ready batches (input_ids, attention_mask) of ``texts``."""
    out = []
    for i in range(0, len(texts), batch_size):
        seqs = [
            [tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]][:max_length]
            for t in texts[i : i + batch_size]
        ]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def run(out_dir: Path, steps: int, rank: int, n_calib: int, variants: list[str]) -> dict[str, Any]:
    from ..assets import load_demo_model
    from ..data.stdlib import stdlib_docstrings, stdlib_source_chunks
    from ..methods import MethodOptions, build_model
    from ..methods.corda import corda_info, original_base
    from .arith import arith_problems, encode_sft
    from .demo import DemoConfig, finetune, retention_texts, target_accuracy

    torch.set_num_threads(2)
    cfg = DemoConfig(steps=steps, rank=rank)
    base, tok = load_demo_model()
    train_rows = encode_sft(arith_problems("train", 2000, seed=cfg.seed), tok)
    test = arith_problems("test", cfg.n_test, seed=cfg.seed)
    target_texts = [f"{p.prompt}{p.answer}" for p in test]
    ret_texts = retention_texts(cfg.n_retention)
    rng = random.Random(0)
    keep = rng.sample(stdlib_docstrings("train"), n_calib // 2) + rng.sample(
        stdlib_source_chunks("train"), n_calib // 2
    )
    task = [f"{p.prompt}{p.answer}" for p in arith_problems("train", n_calib, seed=cfg.seed + 1)]
    calib = {"kpm": text_batches(tok, keep), "ipm": text_batches(tok, task)}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        ret = {
            d: token_nll(model, tok, t, max_length=cfg.retention_max_tokens)["nll"]
            for d, t in ret_texts.items()
        }
        return {
            "target_nll": token_nll(model, tok, target_texts)["nll"],
            "accuracy": target_accuracy(model, tok, test),
            "retention_nll": sum(ret.values()) / len(ret),
            **{f"retention_nll_{d}": v for d, v in ret.items()},
        }

    results: dict[str, Any] = {"settings": {"steps": steps, "rank": rank, "lr": cfg.lr, "n_calib": n_calib}}
    results["base"] = evaluate(base)
    for name in variants:
        method, mode = VARIANTS[name]
        torch.manual_seed(cfg.seed)
        model, _ = load_demo_model()
        t0 = time.time()
        opts = MethodOptions(
            rank=rank,
            target_modules=cfg.target_modules,
            calibration=lambda: calib["kpm"],  # knowledge to keep (KPM)
            task_calibration=lambda: calib["ipm"],  # the task (IPM)
            options={"corda": {"mode": mode, "progress": False}} if mode else {},
        )
        model = build_model(model, method, opts)
        row: dict[str, Any] = {"build_seconds": time.time() - t0}
        if mode:
            with original_base(model):  # sanity: the recovered base is the base
                row["recovered_base_retention_nll"] = evaluate(model)["retention_nll"]
            row["corda"] = corda_info(model).summary()
        fitted = finetune(model, train_rows, cfg, cfg.lr, tok.pad_token_id, method=method, desc=name)
        row["train_loss"], row["final_train_loss"] = fitted.train_loss, fitted.final_loss
        row.update(evaluate(model))
        row["retention_delta_nll"] = row["retention_nll"] - results["base"]["retention_nll"]
        results[name] = row
        print(
            f"{name}: target_nll={row['target_nll']:.4f} retention_nll={row['retention_nll']:.4f}", flush=True
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "corda_compare.json", results)
    lines = [
        f"CorDA comparison on the demo model ({steps} steps, rank {rank}, lr {cfg.lr}).",
        "",
        "| method | target NLL | accuracy | retention NLL | Δ retention NLL vs base |",
        "|---|---|---|---|---|",
        f"| base | {results['base']['target_nll']:.4f} | {results['base']['accuracy']:.2f} | "
        f"{results['base']['retention_nll']:.4f} | 0 |",
    ]
    for name in variants:
        r = results[name]
        lines.append(
            f"| {name} | {r['target_nll']:.4f} | {r['accuracy']:.2f} | {r['retention_nll']:.4f} | "
            f"{r['retention_delta_nll']:+.4f} |"
        )
    atomic_write_text(out_dir / "corda_compare.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    assert all(math.isfinite(results[n]["target_nll"]) for n in variants)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("corda_compare"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--n-calib", type=int, default=96, help="calibration texts per mode")
    p.add_argument(
        "--methods", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    a = p.parse_args(argv)
    run(a.out, a.steps, a.rank, a.n_calib, [m for m in a.methods.split(",") if m])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
