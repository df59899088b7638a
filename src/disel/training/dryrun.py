"""Dry runs: check a config end to end in seconds, with a tiny model and a few rows of generated data.

``disel train CONFIG --dry-run`` keeps every setting of the config (method, optimiser, schedule, gradient
checkpointing, data format and field names, ...) and swaps in a tiny randomly initialised model of the same
family, a small tokenizer and a handful of rows with the config's field names, for two optimizer steps.
Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Config, with_overrides


def _arch(cfg: Config) -> str:
    name = cfg.model.name.lower()
    if cfg.task == "seq_cls":
        return "bert" if "bert" in name and "roberta" not in name else "roberta"
    for arch in ("mistral", "qwen2", "gpt2"):
        if arch in name:
            return arch
    return "llama"


def _rows(cfg: Config, n: int) -> list[dict[str, Any]]:
    d = cfg.data
    rows = []
    for i in range(n):
        if d.format == "instruction":
            rows.append(
                {d.instruction_field: f"What is {i} plus {i + 1}?", d.response_field: f"It is {2 * i + 1}."}
            )
        elif d.format == "classification":
            row = {f: f"sentence {i} is {'good' if i % 2 else 'bad'}" for f in d.text_fields}
            row[d.label_field] = i % 2
            rows.append(row)
        else:
            rows.append({d.text_field: f"def f{i}(x):\n    return x + {i}\n"})
    return rows


def dry_run_config(cfg: Config, workdir: str | Path, steps: int = 2) -> Config:
    """``cfg`` with a tiny model and generated data under ``workdir``, for ``steps`` optimizer steps."""
    from ..testing import tiny_model
    from ..testing_tokenizers import tiny_tokenizer

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(128)
    arch = _arch(cfg)
    model_dir = work / f"tiny-{arch}-{cfg.task}"
    if not (model_dir / "config.json").is_file():
        model = tiny_model(arch, cfg.task, vocab_size=len(tok))
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    data_file = work / f"dry-{cfg.data.format}.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in _rows(cfg, 16)), encoding="utf-8")
    overrides: list[tuple[str, Any]] = [
        ("model.name", str(model_dir)),
        ("model.tokenizer", None),
        ("model.dtype", "float32"),
        ("model.num_labels", None),
        ("data.train", str(data_file)),
        ("data.validation", None),
        ("data.validation_split", None),
        ("data.dataset_config", None),
        ("data.max_samples", None),
        ("data.max_length", min(cfg.data.max_length, 256)),  # the tiny models have 256 positions
        ("training.max_steps", steps),
        ("training.per_device_batch_size", 2),
        ("training.gradient_accumulation_steps", 1),
        ("training.effective_batch_size", None),
        ("training.save_steps", 1),
        ("training.save_total_limit", None),
        ("training.logging_steps", 1),
        ("training.deepspeed", None),
        ("training.fsdp", ""),
        ("training.report_to", "none"),
        ("output.dir", str(work / "runs")),
        ("output.run_dir", None),
        ("output.results", None),
    ]
    return with_overrides(cfg, overrides)
