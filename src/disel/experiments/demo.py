"""The demo: teach the shipped stdlib-pretrained model arithmetic, and measure what each method makes it forget.

A recipe over library components: the shipped model (``assets/demo_model``, made by
``scripts/pretrain_demo_model.py``), the arithmetic task (:mod:`disel.experiments.arith`), the method
registry, the shared training core (:func:`disel.training.fit.fit`: the Trainer glue of ``disel train``,
with each method's callbacks), and the evaluation primitives (greedy exact match for the target, token
NLL on held-out stdlib docstrings and source for retention). Gate values are recorded with forward hooks on
the ``DiselGate`` modules.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..assets import demo_model_dir, load_demo_model
from ..errors import UserError
from ..evaluation.lm import greedy_generate, token_nll
from ..methods import build_model, get_method
from ..methods.gated_lora.layer import DiselGate
from ..training.fit import FitResult, fit
from ..utils.io import atomic_dir, atomic_write_json, atomic_write_text, save_figure
from ..utils.threads import torch_threads
from .arith import arith_problems, encode_sft, exact_match

RETENTION_DOMAINS = ("docstrings", "source")
RETENTION_SCORE = "mean per-token likelihood exp(-NLL) on held-out stdlib text (mean of the domains' NLL)"


@dataclass
class DemoConfig:
    """Every setting of the demo; the defaults are the full demo, :meth:`quick` the CI-sized one."""

    methods: list[str] = field(default_factory=lambda: ["lora", "disel"])
    rank: int = 8
    seed: int = 0
    steps: int = 600
    batch_size: int = 16
    lr: float = 1.5e-3
    lr_full: float = 3e-4  # full fine-tuning moves every weight: a smaller step, as usual
    warmup_steps: int = 10
    weight_decay: float = 0.0
    gate_bias_init: float = -5.0  # the paper advises -5 to -7 for small data sets
    gate_lr_multiplier: float = (
        1.0  # the paper's "main knob": 1x kept the gates most selective here (docs/demo.md)
    )
    target_modules: str | list[str] = "all-linear"
    max_value: int = 9  # operands of the word problems (0-9: answers 0-18)
    # "word" problems ("Tom has 6 apples and buys 3 more..."), "short" ("What is 6 plus 3?") or "count" (a +/- 1)
    style: str = "short"
    # test problems: unseen question texts over the trained facts and wordings ("question"), unseen arithmetic
    # facts ("fact") or unseen templates/names/objects ("wording"); see disel.experiments.arith
    holdout: str = "question"
    # prompt format: "qa" ("Question: ...\nAnswer: ") or "alpaca" (the Alpaca instruction template)
    template: str = "qa"
    n_test: int = 100
    n_retention: int = 48  # held-out texts per pretraining domain
    retention_max_tokens: int = 128
    n_gate_texts: int = 32  # texts per domain for the gate histogram
    n_calibration: int = 32  # pretraining texts for methods that read data at build time (lalora, corda)
    method_extra: dict[str, Any] = field(
        default_factory=dict
    )  # MethodOptions.options by method name, e.g. {"lalora": {"lam": 3}}
    threads: int | None = 1  # one thread: tiny matmuls gain little from more, and shared cores lose a lot
    model: str | None = None  # a local model directory instead of the shipped one
    # also write each method's adapter (OUT/adapters/NAME) and the task data (OUT/data/*.jsonl), for
    # `disel gates` / `disel compact` / `disel eval` on what the demo trained
    save_adapters: bool = False

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        base = dict(steps=12, batch_size=8, n_test=12, n_retention=6, n_gate_texts=4, retention_max_tokens=64)
        base.update(overrides)
        return cls(**base)


# --------------------------------------------------------------------------------------------------
# Data


def retention_texts(n: int) -> dict[str, list[str]]:
    """Held-out stdlib text of each pretraining domain (modules the model never saw), a fixed sample."""
    from ..data.stdlib import stdlib_docstrings, stdlib_source_chunks

    pools = {"docstrings": stdlib_docstrings("heldout"), "source": stdlib_source_chunks("heldout")}
    out = {}
    for name, pool in pools.items():
        idx = sorted(random.Random(f"retention:{name}").sample(range(len(pool)), min(n, len(pool))))
        out[name] = [pool[i] for i in idx]
    return out


def _collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------------------
# Training and evaluation


def finetune(
    model: nn.Module,
    rows: list[dict[str, list[int]]],
    cfg: DemoConfig,
    lr: float,
    pad_id: int,
    method: str | None = None,
    desc: str = "train",
) -> FitResult:
    """The demo's fine-tuning through the shared training core (:func:`disel.training.fit.fit`, the Trainer
    glue of ``disel train``): ``cfg.steps`` steps of ``cfg.batch_size`` problems, AdamW over DISeL's groups
    (gates at their own LR, no decay), warmup then cosine, gradients clipped to 1, the model's regularisers
    and ``method``'s callbacks (AdaLoRA's allocation, ...)."""
    return fit(
        model,
        rows,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=lr,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=1.0,
        seed=cfg.seed,
        method=method,
        pad_token_id=pad_id,
        desc=desc,
    )


def target_accuracy(model: nn.Module, tok: Any, problems: list, progress: bool = False) -> float:
    preds = greedy_generate(
        model, tok, [p.prompt for p in problems], max_new_tokens=4, stop=("\n",), progress=progress
    )
    return sum(exact_match(y, p.answer) for y, p in zip(preds, problems, strict=True)) / len(problems)


def retention(model: nn.Module, tok: Any, texts: dict[str, list[str]], max_tokens: int) -> dict[str, Any]:
    """Per-domain NLL/perplexity and the score (higher is better): exp(-mean NLL over domains)."""
    per = {d: token_nll(model, tok, t, max_length=max_tokens) for d, t in texts.items()}
    mean_nll = sum(v["nll"] for v in per.values()) / len(per)
    return {
        "score": math.exp(-mean_nll),
        "domains": {d: {"nll": v["nll"], "ppl": v["ppl"]} for d, v in per.items()},
    }


def calibration_batches(tok: Any, cfg: DemoConfig) -> list[dict[str, torch.Tensor]]:
    """Batches of pretraining-domain text (stdlib *train* split, not the held-out retention texts)."""
    from ..data import stdlib_docstrings, stdlib_source_chunks

    half = max(1, cfg.n_calibration // 2)
    texts = stdlib_docstrings("train")[:half] + stdlib_source_chunks("train")[:half]
    rows = []
    for t in texts:
        ids = [tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]][: cfg.retention_max_tokens]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return [_collate(rows[i : i + 8], tok.pad_token_id) for i in range(0, len(rows), 8)]


def save_trained(model: nn.Module, tok: Any, path: Path) -> None:
    """Save what a method trained so that it loads on the ORIGINAL shipped model in one call.

    CorDA rewrites the base weights to a residual, so its own adapter only fits that residual: it is
    exported as a plain LoRA adapter for the original base instead (PEFT's conversion)."""
    if getattr(model, "_corda_info", None) is not None:
        from ..methods.corda import export_to_lora

        export_to_lora(model, path)
        tok.save_pretrained(str(path))
        return
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))


def save_task_data(out: Path, cfg: DemoConfig) -> None:
    """The demo's train and test problems as ``{"prompt", "answer"}`` JSONL: training data for ``disel train``
    (``response_field: answer``), the exact-match target of ``disel eval``, a domain for ``disel gates``."""
    task = dict(holdout=cfg.holdout, style=cfg.style, template=cfg.template)
    for split, n in (("train", cfg.steps * cfg.batch_size), ("test", cfg.n_test)):
        rows = arith_problems(split, n, cfg.seed, cfg.max_value, **task)
        atomic_write_text(
            out / f"arith_{split}.jsonl",
            "".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in rows),
        )


def gate_stats(model: nn.Module, tok: Any, texts: dict[str, list[str]], max_tokens: int) -> dict[str, Any]:
    """Gate statistics per domain (every token of each text), with disel.analysis's streaming recorder."""
    from ..analysis.api import pad_id, record_gates
    from ..analysis.domains import Item, encode_items

    if not any(isinstance(m, DiselGate) for m in model.modules()):
        raise UserError("The model has no DISeL gates to record; record gates only for the 'disel' method.")
    out = {}
    for domain, domain_texts in texts.items():
        enc = encode_items(tok, [Item(t) for t in domain_texts], max_tokens, len(domain_texts))
        out[domain] = record_gates(model, enc, pad_id(tok), batch_size=8, bins=40, desc=domain)
    return out


# --------------------------------------------------------------------------------------------------
# The recipe


def run_demo(cfg: DemoConfig, out_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune the shipped model with each method, evaluate, and write report.md, PNGs and results.json.

    Runs on ``cfg.threads`` torch threads and restores the caller's count afterwards."""
    with torch_threads(cfg.threads):
        return _run_demo(cfg, out_dir, log)


def _run_demo(cfg: DemoConfig, out_dir: str | Path, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.time()
    for m in cfg.methods:
        get_method(m)  # unknown names fail before any work
    if not cfg.methods:
        raise UserError("--methods is empty: name at least one method, e.g. lora,disel.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a directory path.")

    model_dir = Path(cfg.model) if cfg.model else demo_model_dir()
    if not (model_dir / "config.json").is_file():
        raise UserError(
            f"--model {model_dir} is not a model directory: pass a folder made by save_pretrained."
        )
    base_model, tok = load_demo_model(model_dir)
    n_train = cfg.steps * cfg.batch_size
    task = dict(holdout=cfg.holdout, style=cfg.style, template=cfg.template)
    train = encode_sft(arith_problems("train", n_train, cfg.seed, cfg.max_value, **task), tok)
    test = arith_problems("test", cfg.n_test, cfg.seed, cfg.max_value, **task)
    log(f"[demo] loading held-out stdlib text ({cfg.n_retention} texts per domain)")
    held = retention_texts(cfg.n_retention)
    # Gates are read on every token: the arithmetic prompt and answer, and the raw held-out text.
    gate_texts = {"arithmetic": [p.prompt + p.answer for p in test[: cfg.n_gate_texts]]}
    gate_texts.update({d: t[: cfg.n_gate_texts] for d, t in held.items()})

    log("[demo] evaluating the base model")
    base_ret = retention(base_model, tok, held, cfg.retention_max_tokens)
    base = {"retention": base_ret["score"], "target_accuracy": target_accuracy(base_model, tok, test)}
    base_detail = {"retention_domains": base_ret["domains"]}
    log(f"[demo] base: accuracy {base['target_accuracy']:.3f}, retention {base['retention']:.4f}")

    methods: dict[str, dict[str, Any]] = {}
    gate_samples: dict[str, Any] = {}
    gate_method = ""
    for name in cfg.methods:
        t_m = time.time()
        torch.manual_seed(cfg.seed)
        model = build_model(
            copy.deepcopy(base_model),  # every method starts from the same untouched base
            name,
            rank=cfg.rank,
            target_modules=cfg.target_modules,
            task_type="CAUSAL_LM",
            total_steps=cfg.steps,
            # every gated method (disel, disel+lalora, disel+corda) reads the "disel" section
            options={
                "disel": {"gate_bias_init": cfg.gate_bias_init, "gate_lr_multiplier": cfg.gate_lr_multiplier},
                **copy.deepcopy(cfg.method_extra),
            },
            # methods that read data at build time (LaLoRA's curvature, CorDA's covariance) see the
            # pretraining domains: the knowledge to keep
            calibration=lambda: calibration_batches(tok, cfg),
            # ... and methods that preview the task (CorDA's IPM) read the first training problems
            task_calibration=lambda: [
                _collate(train[i : i + 8], tok.pad_token_id)
                for i in range(0, min(len(train), cfg.n_calibration), 8)
            ],
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lr = cfg.lr_full if name == "full" else cfg.lr
        fitted = finetune(model, train, cfg, lr, tok.pad_token_id, method=name, desc=f"train {name}")
        acc = target_accuracy(model, tok, test)
        ret = retention(model, tok, held, cfg.retention_max_tokens)
        methods[name] = {
            "retention": ret["score"],
            "target_accuracy": acc,
            "rank": cfg.rank,
            "retention_domains": ret["domains"],
            "retention_ratio": math.exp(
                sum(base_ret["domains"][d]["nll"] - ret["domains"][d]["nll"] for d in held) / len(held)
            ),
            "train_loss": fitted.train_loss,  # mean over the run, as `disel train` records it
            "final_train_loss": fitted.final_loss,
            "trainable_parameters": trainable,
            "lr": lr,
            "seconds": round(time.time() - t_m, 1),
        }
        # gates of plain DISeL, or else of the first gated method (disel+lalora, disel+corda, ...)
        gated = any(isinstance(m, DiselGate) for m in model.modules())
        if gated and (name == "disel" or (not gate_method and "disel" not in cfg.methods)):
            gate_samples = gate_stats(model, tok, gate_texts, cfg.retention_max_tokens)
            gate_method = name
        if cfg.save_adapters:
            save_trained(model, tok, out / "adapters" / name)
        log(
            f"[demo] {name}: accuracy {acc:.3f}, retention {ret['score']:.4f} "
            f"(base {base['retention']:.4f}), {methods[name]['seconds']}s"
        )

    results = {
        "base": {**base, **base_detail},
        "methods": methods,
        "gates": {d: float(st.group()["mean"]) for d, st in gate_samples.items()},
        "gates_method": gate_method or None,
        "gate_auroc": _gate_auroc(gate_samples),
        "wall_seconds": round(time.time() - t0, 1),
        "retention_score": RETENTION_SCORE,
        "config": asdict(cfg),
        "model": json.loads((model_dir / "pretrain.json").read_text())
        if (model_dir / "pretrain.json").exists()
        else {},
    }
    if cfg.save_adapters:
        save_task_data(out / "data", cfg)
    write_report(results, gate_samples, out)
    results["wall_seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "results.json", results)
    log(f"[demo] wrote {out / 'report.md'} in {results['wall_seconds']}s")
    return results


# --------------------------------------------------------------------------------------------------
# Report


def _gate_auroc(stats: dict[str, Any]) -> dict[str, float]:
    """AUROC of the per-sequence gate score (mean gate over middle/late layers), arithmetic vs each domain."""
    if "arithmetic" not in stats:
        return {}
    from ..analysis.api import domain_report

    return domain_report(stats, target="arithmetic")["auroc"]["mid_late"]


_STYLES = {
    "short": 'short questions such as "What is 6 plus 3?"',
    "word": 'word problems such as "Tom has 6 apples and buys 3 more. How many apples does Tom have?"',
    "count": 'counting questions such as "What number comes after 6?"',
}
_TEMPLATES = {"qa": 'prompt "Question: ...\\nAnswer: "', "alpaca": "Alpaca instruction template"}
_HOLDOUTS = {
    "question": "test questions never seen verbatim in training, over the trained facts and wordings",
    "wording": "test problems worded with templates, names and objects unseen in training",
    "fact": "test facts unseen in training",
}


def _comparison(base: dict[str, Any], methods: dict[str, Any], reference: str = "lora") -> list[str]:
    """One sentence per method: its retention loss against the reference's, beside both accuracies."""
    if reference not in methods:
        return []
    ref = methods[reference]
    ref_loss = base["retention"] - ref["retention"]
    out = []
    for name, r in methods.items():
        if name == reference or ref_loss <= 0:
            continue
        ratio = (base["retention"] - r["retention"]) / ref_loss
        word = "smaller" if ratio < 1 else "larger"
        out.append(
            f"- {name}: retention loss {abs(1 - ratio):.0%} {word} than {reference}'s "
            f"(accuracy {r['target_accuracy']:.2f} vs {ref['target_accuracy']:.2f})."
        )
    return [*out, ""] if out else []


def write_report(results: dict[str, Any], gate_samples: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    base, methods = results["base"], results["methods"]

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([base["retention"]], [base["target_accuracy"]], marker="*", s=160, color="black", label="base")
    for name, r in methods.items():
        ax.scatter([r["retention"]], [r["target_accuracy"]], s=70, label=f"{name} (r={r['rank']})")
    ax.axvline(base["retention"], color="grey", ls=":", lw=1)
    ax.set_xlabel("retention: exp(-NLL) on held-out stdlib text (higher = less forgetting)")
    ax.set_ylabel("arithmetic exact-match accuracy")
    ax.set_title("Target accuracy vs retention")
    ax.legend(fontsize=8)
    save_figure(fig, out / "tradeoff.png", dpi=110, bbox_inches="tight")

    files = ["tradeoff.png"]
    if gate_samples:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for d, st in gate_samples.items():
            g = st.group()
            edges = torch.linspace(0, 1, st.bins + 1).tolist()
            ax.stairs(g["hist"], edges, lw=1.6, label=f"{d} (mean {g['mean']:.3f})")
        ax.set_yscale("log")
        ax.set_xlabel("DISeL gate value sigmoid(W_g x + b_g)")
        ax.set_ylabel("fraction of (token, gate) values")
        ax.set_title("Gate values by domain")
        ax.legend(fontsize=8)
        save_figure(fig, out / "gates.png", dpi=110, bbox_inches="tight")
        files.append("gates.png")

    cfg = results["config"]
    lines = [
        "# disel demo",
        "",
        "The shipped stdlib-pretrained model "
        f"({results['model'].get('parameters', 0) / 1e6:.2f}M parameters) was fine-tuned on arithmetic "
        f"problems ({_STYLES.get(cfg.get('style', 'word'), cfg.get('style'))}, operands 0-{cfg['max_value']}, "
        f"{_TEMPLATES.get(cfg.get('template', 'alpaca'), cfg.get('template'))}; "
        f"{_HOLDOUTS.get(cfg.get('holdout', 'fact'), cfg.get('holdout'))}) for {cfg['steps']} steps of "
        f"{cfg['batch_size']} examples, rank {cfg['rank']}, seed {cfg['seed']}.",
        "",
        f"- Target: exact-match accuracy of greedy answers on {cfg['n_test']} test problems.",
        f"- Retention: {results['retention_score']}; {cfg['n_retention']} texts per domain, "
        f"{cfg['retention_max_tokens']} tokens each. `ratio` = base perplexity / perplexity (1 = nothing lost).",
        "",
        "| model | accuracy | retention | retention loss | ratio | ppl docstrings | ppl source | trainable | s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| base | {base['target_accuracy']:.3f} | {base['retention']:.4f} | 0 | 1.000 | "
        f"{base['retention_domains']['docstrings']['ppl']:.2f} | {base['retention_domains']['source']['ppl']:.2f}"
        " | 0 | |",
    ]
    for name, r in methods.items():
        dom = r["retention_domains"]
        lines.append(
            f"| {name} (r={r['rank']}, lr={r['lr']:g}) | {r['target_accuracy']:.3f} | {r['retention']:.4f} | "
            f"{base['retention'] - r['retention']:.4f} | {r['retention_ratio']:.3f} | {dom['docstrings']['ppl']:.2f} | "
            f"{dom['source']['ppl']:.2f} | {r['trainable_parameters']:,} | {r['seconds']} |"
        )
    lines += ["", *_comparison(base, methods), "![trade-off](tradeoff.png)", ""]
    if results["gates"]:
        lines += [
            f"## Gates of `{results.get('gates_method') or 'disel'}` by domain",
            "",
            "Mean post-sigmoid gate value over every gate, rank-one component and token (recorded with "
            "`disel.analysis.GateRecorder`), and the AUROC of the per-sequence gate score (mean gate over the "
            "middle and late layers) for telling arithmetic from each domain:",
            "",
            "| domain | mean gate | AUROC arithmetic vs domain |",
            "|---|---|---|",
            *[
                f"| {d} | {v:.4f} | "
                + (f"{results['gate_auroc'][d]:.3f}" if d in results["gate_auroc"] else "–")
                + " |"
                for d, v in results["gates"].items()
            ],
            "",
            "![gates](gates.png)",
            "",
        ]
    lines.append(f"Wall time: {results['wall_seconds']:.0f} s (torch threads: {cfg['threads']}).")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
