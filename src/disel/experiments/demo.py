"""The demo: teach the shipped stdlib-pretrained model arithmetic, and measure what each method makes it forget.

A recipe over library components: the shipped model (``assets/demo_model``, made by
``scripts/pretrain_demo_model.py``), the arithmetic task (:mod:`disel.experiments.arith`), the method
registry, the shared training core (:func:`disel.training.fit.fit`: the Trainer glue of ``disel train``,
with each method's callbacks), and the evaluation primitives (greedy exact match for the target, token
NLL on held-out stdlib docstrings and source for retention). Gate values are recorded with forward hooks on
the ``DiselGate`` modules.

Every number is reproducible through the pipeline: the demo writes ``OUT/reproduce/`` (the task data of
each seed, the calibration text, and ``sweep.yaml``: a ``disel sweep`` config whose grid is the runs the demo
made, with the same data, order, schedule and checkpoints, and whose evaluation is the demo's two measures,
the same functions: :func:`disel.evaluation.targets.generation_exact_match` and
:func:`disel.evaluation.retention.likelihood_retention`). :func:`compare_with_pipeline` lines the demo's
paths up with the sweep's records.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..assets import DEMO_MODEL, demo_model_dir, load_demo_model
from ..errors import UserError
from ..evaluation.retention import STDLIB_DOMAINS, likelihood_retention, stdlib_retention_texts
from ..evaluation.targets import generation_exact_match
from ..methods import build_model, get_method
from ..methods.gated_lora.layer import DiselGate
from ..training.fit import FitResult, fit
from ..utils.io import atomic_dir, atomic_write_json, atomic_write_text, save_figure
from ..utils.threads import torch_threads
from . import frontier
from .arith import arith_problems, encode_sft

RETENTION_DOMAINS = STDLIB_DOMAINS
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
    # the frontier: evaluate accuracy and retention every `eval_every` steps (and at step 0 and the end;
    # 0: only at the end), on the full test and retention sets
    eval_every: int = 100
    seeds: list[int] | None = (
        None  # several seeds (None: just `seed`); results aggregated at matched accuracy
    )
    ranks: list[int] | None = None  # several ranks (None: just `rank`): forgetting against rank
    matched_accuracy: float | None = None  # compare at this accuracy (None: the largest reached by all runs)
    # lr * (rank_scaled_lr_reference / rank) ** rank_scaled_lr_power for the methods registered as
    # rank-scaled (lora, disel, ...), as `training.rank_scaled_lr` in the pipeline
    rank_scaled_lr: bool = False
    rank_scaled_lr_reference: int = 8
    rank_scaled_lr_power: float = 0.5

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        base = dict(
            steps=12,
            batch_size=8,
            n_test=12,
            n_retention=6,
            n_gate_texts=4,
            retention_max_tokens=64,
            eval_every=4,
        )
        base.update(overrides)
        return cls(**base)


# --------------------------------------------------------------------------------------------------
# Data


def retention_texts(n: int) -> dict[str, list[str]]:
    """Held-out stdlib text of each pretraining domain (modules the model never saw), a fixed sample: the
    pipeline's ``stdlib-likelihood`` retention task reads the same (:func:`stdlib_retention_texts`)."""
    return stdlib_retention_texts(n, RETENTION_DOMAINS)


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
    callbacks: list[Any] | tuple[Any, ...] = (),
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
        callbacks=callbacks,
        desc=desc,
    )


# The target: greedy answers of at most 4 tokens in batches of 16, cut at a newline, scored by their first word
# (arith.exact_match). The same settings are the exact_match target of OUT/reproduce/sweep.yaml.
TARGET_SETTINGS: dict[str, Any] = {
    "max_new_tokens": 4,
    "batch_size": 16,
    "stop": ["\n"],
    "extract": "first_word",
}
RETENTION_BATCH_SIZE = 8


def target_accuracy(model: nn.Module, tok: Any, problems: list, progress: bool = False) -> float:
    """Exact-match accuracy on ``problems``: :func:`generation_exact_match` with :data:`TARGET_SETTINGS`,
    the pipeline's ``exact_match`` target."""
    return generation_exact_match(
        model,
        tok,
        [p.prompt for p in problems],
        [p.answer for p in problems],
        max_new_tokens=TARGET_SETTINGS["max_new_tokens"],
        batch_size=TARGET_SETTINGS["batch_size"],
        stop=tuple(TARGET_SETTINGS["stop"]),
        extract=TARGET_SETTINGS["extract"],
        progress=progress,
    )


def retention(model: nn.Module, tok: Any, texts: dict[str, list[str]], max_tokens: int) -> dict[str, Any]:
    """Per-domain NLL/perplexity and the score (higher is better): exp(-mean NLL over domains), the
    pipeline's ``stdlib-likelihood`` retention task (:func:`likelihood_retention`)."""
    return likelihood_retention(model, tok, texts, max_tokens, RETENTION_BATCH_SIZE)


def calibration_texts(cfg: DemoConfig) -> list[str]:
    """The pretraining-domain texts of :func:`calibration_batches` (stdlib *train* split), in order."""
    from ..data import stdlib_docstrings, stdlib_source_chunks

    half = max(1, cfg.n_calibration // 2)
    return stdlib_docstrings("train")[:half] + stdlib_source_chunks("train")[:half]


def calibration_batches(tok: Any, cfg: DemoConfig) -> list[dict[str, torch.Tensor]]:
    """Batches of pretraining-domain text (stdlib *train* split, not the held-out retention texts)."""
    rows = []
    for t in calibration_texts(cfg):
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


# --------------------------------------------------------------------------------------------------
# Reproduction through the pipeline (disel sweep / disel report)

REPRODUCE_DIR = "reproduce"
# How close the pipeline's numbers are to the demo's, as measured (docs/demo.md; tests/test_demo_reproduce.py
# checks the exact agreement).
REPRODUCE_CLOSENESS = (
    "Expected agreement: the same numbers, bit for bit, at every checkpoint, on the same machine, torch and "
    "transformers versions and thread count ({threads} torch thread(s), hence `OMP_NUM_THREADS`): no "
    "difference at all was measured (lora and disel over two seeds and two ranks with rank-scaled lr, and "
    "dora, full, lalora, disel+lalora and queryable; docs/demo.md). With another thread count matmuls sum "
    "in another order and training takes another float path: a few steps give differences of about 1e-8, "
    "but over hundreds of steps the paths part like another CPU's (the default demo at 2 threads: "
    "retention 0.0172 vs 0.0163 at step 200, accuracy 0.24 vs 0.29 at step 300), so set the thread count."
)
EXPORT_CLOSENESS = (
    " {methods}: the pipeline evaluates each checkpoint through its export for the original base (a plain "
    "LoRA adapter), the demo the model in memory on the rewritten base, which equals the original only up "
    "to float error: retention differs by about 5e-9, step 0 included (measured on corda)."
)


def _default_optim() -> str:
    """The optimizer ``transformers.TrainingArguments`` picks by default, which :func:`fit` (the demo's
    training) leaves in place: ``adamw_torch_fused`` with torch >= 2.8, else ``adamw_torch``."""
    import dataclasses

    from transformers import TrainingArguments

    value = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "optim")
    return str(getattr(value, "value", value))


def _method_options(cfg: DemoConfig) -> dict[str, Any]:
    """``options`` of every method the demo builds: the gate settings (every gated method reads the "disel"
    section) and ``--extra``."""
    return {
        "disel": {"gate_bias_init": cfg.gate_bias_init, "gate_lr_multiplier": cfg.gate_lr_multiplier},
        **copy.deepcopy(cfg.method_extra),
    }


def reproduction_config(
    cfg: DemoConfig, seeds: list[int], ranks: list[int], root: str | Path, model: str | None = None
) -> dict[str, Any]:
    """A ``disel sweep`` config (a plain dict) that trains and evaluates exactly the runs of a demo.

    ``root`` holds the task data of each seed (``data/s<SEED>/arith_{train,test}.jsonl``, as
    :func:`save_task_data` writes it) and ``calibration.jsonl``; runs go to ``root/runs``. The training is
    :func:`finetune`'s: the same examples in the same order (BOS first, loss on the answer), ``max_steps``,
    batch, lr (``method_lr``: ``lr_full`` for full fine-tuning, rank-scaled when ``rank_scaled_lr``; the
    gates at that lr x ``gate_lr_multiplier``), ``warmup_steps`` then cosine, clipping, seed, the Trainer's
    default optimizer and float32; a checkpoint every ``eval_every`` steps. The evaluation is the demo's:
    the ``exact_match`` target with :data:`TARGET_SETTINGS` on the seed's test questions and the
    ``stdlib-likelihood`` retention task on ``n_retention`` texts per domain of ``retention_max_tokens``
    tokens. The grid is methods x ranks x seeds; since each seed has its own data and a method or rank may
    have its own lr, it is a list of blocks (see :mod:`disel.experiments.sweep`) unless one block says it all.
    """
    root = Path(root)

    def data(seed: int, split: str) -> str:
        return str(root / "data" / f"s{seed}" / f"arith_{split}.jsonl")

    # (lr, methods) -> ranks: methods that share an lr at a rank train in one block
    groups: dict[tuple[float, tuple[str, ...]], list[int]] = {}
    for rank in ranks:
        by_lr: dict[float, list[str]] = {}
        for name in cfg.methods:
            by_lr.setdefault(method_lr(name, replace(cfg, rank=rank)), []).append(name)
        for lr, names in by_lr.items():
            groups.setdefault((lr, tuple(names)), []).append(rank)
    (lr0, names0), ranks0 = next(iter(groups.items()))
    blocks = [
        {
            "method": list(names),
            "method.rank": list(rks),
            "seed": seed,
            "training.lr": lr,
            "data.train": data(seed, "train"),
            "eval.target.path": data(seed, "test"),
        }
        for seed in seeds
        for (lr, names), rks in groups.items()
    ]
    grid: Any = (
        {"method": list(names0), "method.rank": list(ranks0), "seed": [seeds[0]]}
        if len(blocks) == 1
        else blocks
    )
    every = cfg.eval_every if cfg.eval_every > 0 else cfg.steps
    return {
        "model": {"name": model or DEMO_MODEL},
        "method": {
            "name": names0[0],
            "rank": ranks0[0],
            "target_modules": copy.deepcopy(cfg.target_modules),
            "options": _method_options(cfg),
            # methods that read data at build time: the demo's pretraining-domain texts and first problems
            "calibration": str(root / "calibration.jsonl"),
            "calibration_samples": cfg.n_calibration,
            "calibration_max_length": cfg.retention_max_tokens,
            "calibration_batch_size": 8,
        },
        "data": {
            "format": "instruction",
            "train": data(seeds[0], "train"),
            "template": "{instruction}",  # the prompts already carry the template
            "instruction_field": "prompt",
            "input_field": None,
            "response_field": "answer",
            "max_length": 128,  # arith.encode_sft's
        },
        "training": {
            "seed": seeds[0],
            "max_steps": cfg.steps,
            "lr": lr0,
            "scheduler": "cosine",
            "warmup_steps": cfg.warmup_steps,
            "per_device_batch_size": cfg.batch_size,
            "gradient_accumulation_steps": 1,
            "weight_decay": cfg.weight_decay,
            "max_grad_norm": 1.0,
            "optim": _default_optim(),
            "bf16": False,
            "save_steps": every,
        },
        "eval": {
            "retention": [
                {
                    "task": "stdlib-likelihood",
                    "n": cfg.n_retention,
                    "max_length": cfg.retention_max_tokens,
                    "batch_size": RETENTION_BATCH_SIZE,
                }
            ],
            "target": {
                "type": "exact_match",
                "path": data(seeds[0], "test"),
                **copy.deepcopy(TARGET_SETTINGS),
            },
            "limit": None,
        },
        "output": {"dir": str(root / "runs")},
        "grid": grid,
    }


def reproduce_commands(out: Path, threads: int | None) -> list[str]:
    """The commands that rerun the demo through the pipeline (paths as the demo was given them)."""
    rep = out / REPRODUCE_DIR
    env = f"OMP_NUM_THREADS={threads} " if threads else ""
    return [
        f"{env}disel sweep {rep / 'sweep.yaml'}",
        f"disel report {rep / 'runs' / 'results.sqlite'} --out {rep / 'report'}",
    ]


def _yaml(data: Any) -> str:
    """YAML of plain data: lists of scalars on one line, strings with a newline in double quotes
    (``stop: ["\\n"]``, not a folded block)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> Any:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)

    def seq(dumper: yaml.SafeDumper, value: list) -> Any:
        flat = all(not isinstance(v, dict | list) for v in value)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flat)

    Dumper.add_representer(str, text)
    Dumper.add_representer(list, seq)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, width=110)


def write_reproduction(
    out: Path, cfg: DemoConfig, seeds: list[int], ranks: list[int], model: str | None = None
) -> dict[str, Any]:
    """Write ``OUT/reproduce/``: each seed's task data, the calibration text and ``sweep.yaml``
    (:func:`reproduction_config`, checked by the pipeline's own config reader); what the report says of it."""
    from ..training.config import config_from_dict

    rep = out / REPRODUCE_DIR
    root = rep.resolve()
    for seed in seeds:
        save_task_data(rep / "data" / f"s{seed}", replace(cfg, seed=seed))
    atomic_write_text(
        rep / "calibration.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in calibration_texts(cfg))
    )
    config = reproduction_config(cfg, seeds, ranks, root, model)
    config_from_dict(config)  # a config the pipeline rejects is a bug here, not the user's
    commands = reproduce_commands(out, cfg.threads)
    header = (
        "# Written by `disel demo`: its runs through the pipeline (disel sweep, then disel report).\n"
        + "".join(f"#   {c}\n" for c in commands)
        + "# Paths are absolute: after moving this directory, edit them (data, eval target, output).\n"
    )
    atomic_write_text(rep / "sweep.yaml", header + _yaml(config))
    return {"dir": str(rep), "config": str(rep / "sweep.yaml"), "commands": commands}


def pipeline_paths(store_path: str | Path) -> dict[tuple[str, int, int], list[dict[str, Any]]]:
    """The sweep's evaluations as demo paths: ``{(method, rank, seed): [{"step", "target_accuracy",
    "retention", "checkpoint"}]}`` from the report's :func:`~disel.report.checkpoint_paths`: step 0 is the
    base model's evaluation under the run's spec (the demo's step 0 is the freshly built adapter, which
    computes the base's function for the methods registered ``starts_as_base``), then every
    ``checkpoint-<step>``, then ``final`` at the run's ``max_steps``."""
    from ..evaluation.runner import cached_base_eval
    from ..report import checkpoint_paths
    from ..results import ResultsStore
    from ..rundir import read_run_file

    store = ResultsStore(store_path)
    out: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for run in checkpoint_paths(store):
        info = read_run_file(run["run_dir"]) if run.get("run_dir") else None
        info = info or {}
        cfg = info.get("config") or {}
        steps = int((cfg.get("training") or {}).get("max_steps") or info.get("global_step") or 0)
        base = cached_base_eval(store, str(info.get("model")), cfg.get("eval") or {}) if info else None
        points = []
        if base is not None:
            points.append(
                {
                    "step": 0,
                    "target_accuracy": base["target_score"],
                    "retention": base["retention_score"],
                    "checkpoint": "base",
                }
            )
        for pt in run["points"]:
            points.append(
                {
                    "step": steps if pt["step"] is None else int(pt["step"]),
                    "target_accuracy": pt["target_score"],
                    "retention": pt["retention_score"],
                    "checkpoint": pt["checkpoint"],
                }
            )
        out[(str(run["method"]), int(run["rank"]), int(run["seed"]))] = points
    return out


def compare_with_pipeline(results: dict[str, Any], store_path: str | Path) -> dict[str, Any]:
    """Line the demo's paths (``results["runs"]``) up with the pipeline's (:func:`pipeline_paths`) point by
    point (the pipeline's ``checkpoint-<max_steps>`` and ``final`` both meet the demo's end point):
    ``{"points": [{"method", "rank", "seed", "step", "checkpoint", "demo", "pipeline"}], "missing": [...],
    "max_abs_diff": {"target_accuracy", "retention"}}``."""
    pipe = pipeline_paths(store_path)
    points: list[dict[str, Any]] = []
    missing: list[str] = []
    for run in results["runs"]:
        key = (run["method"], int(run["rank"]), int(run["seed"]))
        theirs = pipe.get(key)
        if theirs is None:
            missing.append(f"{key[0]} r{key[1]} seed {key[2]}: no pipeline run")
            continue
        by_step: dict[int, list[dict[str, Any]]] = {}
        for q in theirs:
            by_step.setdefault(q["step"], []).append(q)
        for p in run["path"]:
            if p["step"] not in by_step:
                missing.append(f"{key[0]} r{key[1]} seed {key[2]}: no pipeline point at step {p['step']}")
            for q in by_step.get(p["step"], []):
                points.append(
                    {
                        "method": key[0],
                        "rank": key[1],
                        "seed": key[2],
                        "step": p["step"],
                        "checkpoint": q["checkpoint"],
                        "demo": {k: p[k] for k in ("target_accuracy", "retention")},
                        "pipeline": {k: q[k] for k in ("target_accuracy", "retention")},
                    }
                )
    diff = {
        k: max((abs(x["demo"][k] - x["pipeline"][k]) for x in points), default=float("nan"))
        for k in ("target_accuracy", "retention")
    }
    return {"points": points, "missing": missing, "max_abs_diff": diff}


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


def checkpoint_steps(steps: int, every: int) -> list[int]:
    """The training steps at which the frontier is evaluated inside training: every ``every`` steps before
    the last (step 0 and the end are evaluated outside the Trainer)."""
    return list(range(every, steps, every)) if every > 0 else []


def checkpoint_callback(model: nn.Module, at: list[int], evaluate: Callable[[nn.Module], dict[str, float]]):
    """A ``TrainerCallback`` that calls ``evaluate(model)`` after the optimizer steps in ``at`` and records
    ``{"step", **evaluate(model)}`` in its ``points``.

    Evaluation runs in eval mode under ``no_grad`` and gives the mode back; the RNG states (torch CPU and
    CUDA, ``random``, numpy) are restored afterwards, so the evaluations change neither the batch order nor
    anything else of the training (tests/test_demo.py checks the losses are identical with and without)."""
    from transformers import TrainerCallback

    wanted = set(at)

    class CheckpointEval(TrainerCallback):
        points: list[dict[str, float]]

        def __init__(self) -> None:
            self.points = []

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
            if state.global_step not in wanted:
                return
            import numpy as np

            states = (
                torch.get_rng_state(),
                torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                random.getstate(),
                np.random.get_state(),
            )
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    self.points.append({"step": int(state.global_step), **evaluate(model)})
            finally:
                model.train(was_training)
                torch.set_rng_state(states[0])
                if states[1] is not None:
                    torch.cuda.set_rng_state_all(states[1])
                random.setstate(states[2])
                np.random.set_state(states[3])

    return CheckpointEval()


def method_lr(name: str, cfg: DemoConfig) -> float:
    """The learning rate of ``name`` at ``cfg.rank``: ``lr_full`` for full fine-tuning, else ``lr``, rank-scaled
    when ``cfg.rank_scaled_lr`` and the method is registered as rank-scaled."""
    if name == "full":
        return cfg.lr_full
    if cfg.rank_scaled_lr and get_method(name).rank_scaled_lr:
        return cfg.lr * (cfg.rank_scaled_lr_reference / cfg.rank) ** cfg.rank_scaled_lr_power
    return cfg.lr


def _run_demo(cfg: DemoConfig, out_dir: str | Path, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.time()
    for m in cfg.methods:
        get_method(m)  # unknown names fail before any work
    if not cfg.methods:
        raise UserError("--methods is empty: name at least one method, e.g. lora,disel.")
    seeds = list(cfg.seeds) if cfg.seeds else [cfg.seed]
    ranks = list(cfg.ranks) if cfg.ranks else [cfg.rank]
    if len(set(seeds)) != len(seeds) or len(set(ranks)) != len(ranks):
        raise UserError(f"--seeds {seeds} / --ranks {ranks} repeat a value: list each once.")
    if any(r < 1 for r in ranks):
        raise UserError(f"--ranks {ranks} has a rank below 1: use positive integers such as 4,16,64.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a directory path.")

    model_dir = Path(cfg.model) if cfg.model else demo_model_dir()
    if not (model_dir / "config.json").is_file():
        raise UserError(
            f"--model {model_dir} is not a model directory: pass a folder made by save_pretrained."
        )
    base_model, tok = load_demo_model(model_dir)
    log(f"[demo] loading held-out stdlib text ({cfg.n_retention} texts per domain)")
    held = retention_texts(cfg.n_retention)
    log("[demo] evaluating the base model")
    base_ret = retention(base_model, tok, held, cfg.retention_max_tokens)

    runs: list[dict[str, Any]] = []
    base_by_seed: dict[int, dict[str, float]] = {}
    gate_samples: dict[str, Any] = {}
    gate_method = ""
    for seed in seeds:
        scfg = replace(cfg, seed=seed)
        n_train = cfg.steps * cfg.batch_size
        task = dict(holdout=cfg.holdout, style=cfg.style, template=cfg.template)
        train = encode_sft(arith_problems("train", n_train, seed, cfg.max_value, **task), tok)
        test = arith_problems("test", cfg.n_test, seed, cfg.max_value, **task)
        base_by_seed[seed] = {
            "retention": base_ret["score"],
            "target_accuracy": target_accuracy(base_model, tok, test),
        }
        log(
            f"[demo] base (seed {seed}): accuracy {base_by_seed[seed]['target_accuracy']:.3f}, "
            f"retention {base_ret['score']:.4f}"
        )
        for rank in ranks:
            rcfg = replace(scfg, rank=rank)
            first = seed == seeds[0] and rank == ranks[0]
            for name in cfg.methods:
                rec, model = _train_method(name, rcfg, base_model, tok, train, test, held, base_ret, log)
                runs.append(rec)
                # gates of plain DISeL, or else of the first gated method (disel+lalora, disel+corda, ...)
                gated = any(isinstance(m, DiselGate) for m in model.modules())
                if first and gated and (name == "disel" or (not gate_method and "disel" not in cfg.methods)):
                    # Gates are read on every token: the arithmetic prompt and answer, and the held-out text.
                    gate_texts = {"arithmetic": [p.prompt + p.answer for p in test[: cfg.n_gate_texts]]}
                    gate_texts.update({d: t[: cfg.n_gate_texts] for d, t in held.items()})
                    gate_samples = gate_stats(model, tok, gate_texts, cfg.retention_max_tokens)
                    gate_method = name
                if first and cfg.save_adapters:
                    save_trained(model, tok, out / "adapters" / name)
                del model

    first_runs = [r for r in runs if r["seed"] == seeds[0] and r["rank"] == ranks[0]]
    results = {
        "base": {**base_by_seed[seeds[0]], "retention_domains": base_ret["domains"]},
        "base_by_seed": {str(s): b for s, b in base_by_seed.items()},
        "methods": {r["method"]: r for r in first_runs},
        "runs": runs,
        "seeds": seeds,
        "ranks": ranks,
        "frontier": _frontiers(runs, base_ret["score"], ranks, cfg),
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
        save_task_data(out / "data", replace(cfg, seed=seeds[0]))
    model_ref = str(model_dir.resolve()) if cfg.model else None
    results["reproduce"] = write_reproduction(out, cfg, seeds, ranks, model_ref)
    write_report(results, gate_samples, out)
    results["wall_seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "results.json", results)
    log(f"[demo] wrote {out / 'report.md'} in {results['wall_seconds']}s")
    return results


def _train_method(
    name: str,
    cfg: DemoConfig,
    base_model: nn.Module,
    tok: Any,
    train: list[dict[str, list[int]]],
    test: list,
    held: dict[str, list[str]],
    base_ret: dict[str, Any],
    log: Callable[[str], None],
) -> tuple[dict[str, Any], nn.Module]:
    """Build ``name`` at ``cfg.rank`` on a copy of the base, train it with the frontier evaluated along the
    way, and return its record and the trained model."""
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
        options=_method_options(cfg),
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
    lr = method_lr(name, cfg)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {
            "target_accuracy": target_accuracy(m, tok, test),
            "retention": retention(m, tok, held, cfg.retention_max_tokens)["score"],
        }

    was_training = model.training
    model.eval()
    with torch.no_grad():
        start = {"step": 0, **evaluate(model)}
    model.train(was_training)
    checkpoints = checkpoint_callback(model, checkpoint_steps(cfg.steps, cfg.eval_every), evaluate)
    fitted = finetune(
        model,
        train,
        cfg,
        lr,
        tok.pad_token_id,
        method=name,
        callbacks=[checkpoints],
        desc=f"train {name} r={cfg.rank} seed {cfg.seed}",
    )
    acc = target_accuracy(model, tok, test)
    ret = retention(model, tok, held, cfg.retention_max_tokens)
    path = [
        start,
        *checkpoints.points,
        {"step": cfg.steps, "target_accuracy": acc, "retention": ret["score"]},
    ]
    rec = {
        "method": name,
        "seed": cfg.seed,
        "rank": cfg.rank,
        "retention": ret["score"],
        "target_accuracy": acc,
        "retention_domains": ret["domains"],
        "retention_ratio": math.exp(
            sum(base_ret["domains"][d]["nll"] - ret["domains"][d]["nll"] for d in held) / len(held)
        ),
        "path": path,
        "train_loss": fitted.train_loss,  # mean over the run, as `disel train` records it
        "final_train_loss": fitted.final_loss,
        "trainable_parameters": trainable,
        "lr": lr,
        "seconds": round(time.time() - t_m, 1),
    }
    log(
        f"[demo] {name} r={cfg.rank} seed {cfg.seed}: accuracy {acc:.3f}, retention {ret['score']:.4f} "
        f"(base {base_ret['score']:.4f}), {rec['seconds']}s"
    )
    return rec, model


def _points(run: dict[str, Any]) -> list[tuple[float, float]]:
    return [(p["target_accuracy"], p["retention"]) for p in run["path"]]


def _frontiers(runs: list[dict[str, Any]], base_retention: float, ranks: list[int], cfg: DemoConfig) -> dict:
    """Matched-accuracy summaries: per rank (over seeds), and, with several ranks, forgetting against rank at
    one accuracy reached by every run of every rank."""
    per_rank = {}
    for rank in ranks:
        paths: dict[str, dict[int, list]] = {}
        for r in runs:
            if r["rank"] == rank:
                paths.setdefault(r["method"], {})[r["seed"]] = _points(r)
        per_rank[str(rank)] = frontier.summarize(paths, base_retention, cfg.matched_accuracy)
    out: dict[str, Any] = {"by_rank": per_rank}
    if len(ranks) > 1:
        acc, how = frontier.matched_accuracy([_points(r) for r in runs], cfg.matched_accuracy)
        table = {}
        for rank in ranks:
            for m in cfg.methods:
                sel = [r for r in runs if r["rank"] == rank and r["method"] == m]
                at = [frontier.retention_at(_points(r), acc) for r in sel]
                table.setdefault(m, {})[str(rank)] = {
                    "accuracy_end": frontier.stats([r["target_accuracy"] for r in sel]),
                    "forgetting_end": frontier.stats([base_retention - r["retention"] for r in sel]),
                    "forgetting_matched": frontier.stats([base_retention - v for v in at if v is not None]),
                    "trainable_parameters": sel[0]["trainable_parameters"],
                    "lr": sel[0]["lr"],
                }
        out["rank"] = {"accuracy": acc, "how": how, "methods": table}
        out["rank"]["sentence"] = _rank_sentence(out["rank"], ranks)
    return out


def _rank_sentence(rank: dict[str, Any], ranks: list[int]) -> str:
    lo, hi = str(ranks[0]), str(ranks[-1])
    parts = []
    for m, by_rank in rank["methods"].items():
        for key, label in (("forgetting_end", "at the end"), ("forgetting_matched", "at matched accuracy")):
            a, b = by_rank[lo][key]["mean"], by_rank[hi][key]["mean"]
            if not (math.isfinite(a) and math.isfinite(b)):
                continue
            growth = f" (×{b / a:.1f})" if a > 0 else ""
            parts.append(f"{m}'s forgetting {label} goes from {a:.4f} to {b:.4f}{growth}")
    return f"From rank {lo} to {hi}, " + "; ".join(parts) + f" (matched accuracy {rank['accuracy']:.2f})."


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


def _stat(st: dict[str, float], digits: int = 4) -> str:
    if not st["n"]:
        return "–"
    if st["n"] == 1:
        return f"{st['mean']:.{digits}f}"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f} ({st['min']:.{digits}f}–{st['max']:.{digits}f})"


def _frontier_lines(results: dict[str, Any]) -> list[str]:
    cfg, seeds = results["config"], results["seeds"]
    every = cfg["eval_every"] or cfg["steps"]
    lines = [
        "## Frontier: retention at matched accuracy",
        "",
        f"Every run was evaluated at step 0, every {every} steps and at the end (the full test and retention "
        "sets each time). `tradeoff.png` draws each run's path in the accuracy-retention plane (checkpoints "
        "marked, the end larger, base as a star); `retention_over_steps.png` retention and accuracy against "
        "the step. Retention at matched accuracy is read off each path by linear interpolation on the segment "
        "where it first reaches that accuracy"
        + (f"; seeds {', '.join(map(str, seeds))}: mean ± std (min–max)." if len(seeds) > 1 else "."),
        "",
    ]
    for rank, fr in results["frontier"]["by_rank"].items():
        lines += [
            f"Rank {rank}: matched accuracy **{fr['accuracy']:.2f}** ({fr['how']}).",
            "",
            "| method | retention at matched accuracy | retention loss | by seed |",
            "|---|---|---|---|",
        ]
        for m, rec in fr["methods"].items():
            by_seed = ", ".join("–" if v is None else f"{v:.4f}" for v in rec["by_seed"].values())
            lines.append(f"| {m} | {_stat(rec['retention'])} | {rec['loss']:.4f} | {by_seed} |")
        lines += ["", f"**{fr['sentence']}**", ""]
    lines += ["![trade-off](tradeoff.png)", "", "![retention over steps](retention_over_steps.png)", ""]
    return lines


def _rank_lines(results: dict[str, Any]) -> list[str]:
    rank = results["frontier"].get("rank")
    if not rank:
        return []
    lines = [
        "## Forgetting against rank",
        "",
        f"Forgetting = base retention − retention, at the end of training and at accuracy {rank['accuracy']:.2f} "
        f"({rank['how']}, over every rank, method and seed).",
        "",
        "| rank | method | lr | trainable | accuracy (end) | forgetting (end) | forgetting at matched accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["ranks"]:
        for m, by_rank in rank["methods"].items():
            x = by_rank[str(r)]
            lines.append(
                f"| {r} | {m} | {x['lr']:.3g} | {x['trainable_parameters']:,} | {_stat(x['accuracy_end'], 2)} | "
                f"{_stat(x['forgetting_end'])} | {_stat(x['forgetting_matched'])} |"
            )
    return [*lines, "", f"**{rank['sentence']}**", "", "![rank](rank.png)", ""]


def _reproduce_lines(results: dict[str, Any]) -> list[str]:
    rep = results.get("reproduce")
    if not rep:
        return []
    threads = results["config"].get("threads")
    exported = [m for m in results["config"]["methods"] if get_method(m).export is not None]
    return [
        "## Reproduce",
        "",
        f"`{rep['config']}` is a `disel sweep` config of exactly these runs (every method × rank × seed, the "
        "same task data in the same order, steps, batch, learning rates, gate settings, warmup and schedule, "
        "a checkpoint at every evaluation step) whose evaluation is this report's two measures (the "
        "`exact_match` target with `extract: first_word` on the same test questions; the `stdlib-likelihood` "
        "retention task on the same held-out texts and token budget). Through the pipeline:",
        "",
        "```bash",
        *rep["commands"],
        "```",
        "",
        "`summary.json` / `summary.md` of the report list every run's accuracy and retention at each "
        "checkpoint (the demo's step 0 is the base model's row: the methods start as the base); "
        "`disel.experiments.demo.compare_with_pipeline(results, store_path)` lines them up with `results.json`'s "
        "paths. "
        + REPRODUCE_CLOSENESS.format(threads=threads or "the same")
        + (EXPORT_CLOSENESS.format(methods=", ".join(exported)) if exported else ""),
        "",
    ]


def write_report(results: dict[str, Any], gate_samples: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    base, methods = results["base"], results["methods"]
    cfg = results["config"]

    runs, seeds, ranks = results["runs"], results["seeds"], results["ranks"]
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in runs))}
    styles = {rk: ls for rk, ls in zip(ranks, ["-", "--", ":", "-."] * 4, strict=False)}

    def _label(r: dict[str, Any], shown: set) -> str | None:
        key = (r["method"], r["rank"])
        if key in shown:
            return None
        shown.add(key)
        return f"{r['method']} (r={r['rank']})"

    # the frontier: each run's path through the plane, checkpoints marked, the end larger
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(
        [base["retention"]],
        [base["target_accuracy"]],
        marker="*",
        s=200,
        color="black",
        label="base",
        zorder=5,
    )
    shown: set = set()
    for r in runs:
        xs = [p["retention"] for p in r["path"]]
        ys = [p["target_accuracy"] for p in r["path"]]
        alpha = 1.0 if r["seed"] == seeds[0] else 0.45
        c, ls = colors[r["method"]], styles[r["rank"]]
        ax.plot(xs, ys, ls, marker="o", ms=3.5, color=c, alpha=alpha, label=_label(r, shown))
        ax.scatter(xs[-1:], ys[-1:], s=60, color=c, alpha=alpha, edgecolor="black", zorder=4)
    for fr in results["frontier"]["by_rank"].values():
        if math.isfinite(fr["accuracy"]):
            ax.axhline(fr["accuracy"], color="grey", ls=":", lw=1)
    ax.axvline(base["retention"], color="grey", ls=":", lw=1)
    ax.set_xlabel("retention: exp(-NLL) on held-out stdlib text (higher = less forgetting)")
    ax.set_ylabel("arithmetic exact-match accuracy")
    ax.set_title(
        f"Accuracy-retention paths (every {cfg['eval_every'] or cfg['steps']} steps"
        + (f", {len(seeds)} seeds" if len(seeds) > 1 else "")
        + "; dotted: matched accuracy)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    save_figure(fig, out / "tradeoff.png", dpi=110, bbox_inches="tight")

    # the paper's figure 6: retention (and accuracy) over training steps
    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    shown = set()
    for r in runs:
        steps = [p["step"] for p in r["path"]]
        alpha = 1.0 if r["seed"] == seeds[0] else 0.45
        c, ls = colors[r["method"]], styles[r["rank"]]
        lab = _label(r, shown)
        ax_r.plot(
            steps, [p["retention"] for p in r["path"]], ls, marker="o", ms=3, color=c, alpha=alpha, label=lab
        )
        ax_a.plot(
            steps, [p["target_accuracy"] for p in r["path"]], ls, marker="o", ms=3, color=c, alpha=alpha
        )
    ax_r.axhline(base["retention"], color="black", ls=":", lw=1, label="base")
    ax_r.set_xlabel("training step")
    ax_r.set_ylabel("retention exp(-NLL), held-out stdlib text")
    ax_r.set_title("Retention over training")
    ax_r.legend(fontsize=8)
    ax_a.set_xlabel("training step")
    ax_a.set_ylabel("arithmetic exact-match accuracy")
    ax_a.set_title("Target accuracy over training")
    save_figure(fig, out / "retention_over_steps.png", dpi=110, bbox_inches="tight")

    rank_fr = results["frontier"].get("rank")
    if rank_fr:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, key, title in (
            (axes[0], "forgetting_end", "at the end of training"),
            (axes[1], "forgetting_matched", f"at matched accuracy {rank_fr['accuracy']:.2f}"),
        ):
            for m, by_rank in rank_fr["methods"].items():
                rk = [int(k) for k in by_rank]
                st = [by_rank[k][key] for k in by_rank]
                mean = [x["mean"] for x in st]
                err = [[x["mean"] - x["min"] for x in st], [x["max"] - x["mean"] for x in st]]
                ax.errorbar(rk, mean, yerr=err, marker="o", capsize=3, color=colors[m], label=m)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ranks, [str(x) for x in ranks])
            ax.set_xlabel("rank")
            ax.set_title(f"Forgetting {title}", fontsize=10)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("forgetting: base retention − retention")
        save_figure(fig, out / "rank.png", dpi=110, bbox_inches="tight")

    files = ["tradeoff.png", "retention_over_steps.png", *(["rank.png"] if rank_fr else [])]
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

    lines = [
        "# disel demo",
        "",
        "The shipped stdlib-pretrained model "
        f"({results['model'].get('parameters', 0) / 1e6:.2f}M parameters) was fine-tuned on arithmetic "
        f"problems ({_STYLES.get(cfg.get('style', 'word'), cfg.get('style'))}, operands 0-{cfg['max_value']}, "
        f"{_TEMPLATES.get(cfg.get('template', 'alpaca'), cfg.get('template'))}; "
        f"{_HOLDOUTS.get(cfg.get('holdout', 'fact'), cfg.get('holdout'))}) for {cfg['steps']} steps of "
        f"{cfg['batch_size']} examples, rank {', '.join(map(str, results['ranks']))}, "
        f"seed {', '.join(map(str, results['seeds']))}"
        + (
            f" (the table: rank {results['ranks'][0]}, seed {results['seeds'][0]})."
            if len(results["runs"]) > len(methods)
            else "."
        ),
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
    lines += ["", *_comparison(base, methods), *_frontier_lines(results), *_rank_lines(results)]
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
    lines += _reproduce_lines(results)
    lines.append(f"Wall time: {results['wall_seconds']:.0f} s (torch threads: {cfg['threads']}).")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
