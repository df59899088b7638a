"""A small, offline, end-to-end check of the gate analysis and compaction (``python -m disel.experiments.gates_demo``).

1. a tiny Llama (built from a config) is pretrained briefly on standard-library docstrings and source;
2. it is fine-tuned with DISeL on one domain: arithmetic strings (``"37+58=95\\n..."``);
3. gates are recorded on held-out arithmetic, English docstrings and Python source: the paper's figure-4
   effect is that they open more on the fine-tuning domain; the per-sequence domain score's AUROC says how
   well the gates alone tell the domains apart;
4. the adapter is compacted on arithmetic calibration data and compared with the original on held-out text.

Everything is seeded; sizes are small enough for CPU (a minute or two with the defaults).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

ARITH_OPS = ("+", "-", "*")


def arithmetic_texts(n: int, seed: int, per_text: int = 8) -> list[str]:
    """``n`` texts of ``per_text`` lines ``a op b = c`` with small operands."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lines = []
        for _ in range(per_text):
            a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice(ARITH_OPS)
            c = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{a}{op}{b}={c}")
        out.append("\n".join(lines) + "\n")
    return out


def _windows(tokenizer: Any, texts: list[str], length: int) -> torch.Tensor:
    """Pack texts (each starting with BOS) into ``length``-token rows."""
    ids: list[int] = []
    for t in texts:
        ids += [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"]]
    rows = len(ids) // length
    return torch.tensor(ids[: rows * length]).view(rows, length)


def _examples(windows: torch.Tensor) -> list[dict[str, list[int]]]:
    """One causal-LM training example (loss on every token) per packed window."""
    return [{"input_ids": row, "labels": list(row)} for row in windows.tolist()]


def build_trained_adapter(
    workdir: str | Path,
    layers: int = 6,
    hidden: int = 64,
    rank: int = 8,
    pretrain_steps: int = 200,
    finetune_steps: int = 300,
    seq_len: int = 96,
    batch: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Pretrain a tiny base, DISeL-fine-tune it on arithmetic; save base (``base/``) and adapter (``adapter/``)."""
    import peft

    from ..data.stdlib import stdlib_docstrings, stdlib_source_chunks
    from ..methods.gated_lora import DiselConfig
    from ..testing import tiny_model
    from ..testing_tokenizers import tiny_tokenizer
    from ..training.fit import fit

    workdir = Path(workdir)
    torch.manual_seed(seed)
    tok = tiny_tokenizer(256)
    model = tiny_model("llama", seed=seed, vocab_size=256, hidden=hidden, layers=layers)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 0
    general = stdlib_docstrings("train")[:400] + stdlib_source_chunks("train")[:400]
    random.Random(seed).shuffle(general)
    # both trainings go through the shared training core (the Trainer glue of `disel train`): AdamW, a short
    # linear warmup then cosine, gradients clipped to 1
    pre = fit(
        model,
        _examples(_windows(tok, general, seq_len)),
        steps=pretrain_steps,
        batch_size=batch,
        lr=3e-3,
        warmup_steps=max(1, pretrain_steps // 20),
        weight_decay=0.01,
        seed=seed,
        pad_token_id=tok.pad_token_id,
        desc="pretrain",
    )
    model.save_pretrained(workdir / "base")
    tok.save_pretrained(workdir / "base")
    cfg = DiselConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", gate_bias_init=-3.0)
    pm = peft.get_peft_model(model, cfg)
    ft = fit(
        pm,
        _examples(_windows(tok, arithmetic_texts(600, seed + 1), seq_len)),
        steps=finetune_steps,
        batch_size=batch,
        lr=2e-3,
        gate_lr=1e-2,
        warmup_steps=max(1, finetune_steps // 20),
        seed=seed,
        method="disel",
        pad_token_id=tok.pad_token_id,
        desc="disel",
    )
    pm.peft_config["default"].base_model_name_or_path = str(workdir / "base")
    pm.save_pretrained(workdir / "adapter")
    tok.save_pretrained(workdir / "adapter")
    return {
        "pretrain_loss": pre.final_loss,
        "finetune_loss": ft.final_loss,
        "base": str(workdir / "base"),
        "adapter": str(workdir / "adapter"),
    }


def write_domains(workdir: str | Path, n: int = 60, seed: int = 123) -> dict[str, str]:
    """Held-out domain files: arithmetic (JSONL, raw text), docstrings and source (held-out stdlib)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    arith = workdir / "arith_heldout.jsonl"
    arith.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in arithmetic_texts(n, seed)), encoding="utf-8"
    )
    calib = workdir / "arith_calib.jsonl"
    calib.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in arithmetic_texts(n, seed + 7)), encoding="utf-8"
    )
    return {
        "arithmetic": str(arith),
        "docstrings": "stdlib:docstrings",
        "source": "stdlib:source",
        "_calib": str(calib),
    }


def main(argv: list[str] | None = None) -> int:
    from ..analysis.api import compact_adapter, gates_report
    from ..loading import load_adapter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="gates_demo")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)"
    )
    ap.add_argument(
        "--merge-static",
        action="store_true",
        help="also merge the always-open components into the base weights (disel compact --merge-static)",
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    wd = Path(a.workdir)
    if (wd / "compact").exists():
        shutil.rmtree(wd / "compact")
    info = build_trained_adapter(
        wd, a.layers, a.hidden, a.rank, pretrain_steps=a.pretrain_steps, finetune_steps=a.finetune_steps
    )
    print(json.dumps(info, indent=1))
    doms = write_domains(wd)
    calib = doms.pop("_calib")
    model, tok, _ = load_adapter(info["adapter"])
    report = gates_report(model, tok, doms, wd / "gates", target="arithmetic", max_sequences=60)
    print(json.dumps({"auroc": report.get("auroc", {}).get(report["score"], {})}, indent=1))
    compaction = compact_adapter(
        info["adapter"],
        [calib],
        wd / "compact",
        heldout=doms["arithmetic"],
        max_sequences=60,
        merge_static=a.merge_static,
    )
    print(json.dumps({k: compaction[k] for k in ("counts", "cost", "fidelity")}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
