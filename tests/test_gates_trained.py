"""The paper's figure-4 effect on a tiny trained model: gates open more on the fine-tuning domain.

A tiny Llama is pretrained briefly on standard-library text, fine-tuned with DISeL on arithmetic strings,
then recorded on held-out arithmetic, English docstrings and Python source.
"""

from __future__ import annotations

from disel.analysis.api import domain_report, load_adapter, pad_id, record_gates
from disel.analysis.domains import encode_items, load_items
from disel.experiments.gates_demo import build_trained_adapter, write_domains


def test_gates_open_more_on_the_fine_tuning_domain(tmp_path, one_thread):
    info = build_trained_adapter(
        tmp_path, layers=3, hidden=32, rank=4, pretrain_steps=80, finetune_steps=150, seq_len=64, batch=16
    )
    model, tok, _ = load_adapter(info["adapter"])
    domains = write_domains(tmp_path, n=24)
    domains.pop("_calib")
    stats = {}
    for name, spec in domains.items():
        enc = encode_items(tok, load_items(spec, limit=100), max_length=64, max_sequences=24)
        stats[name] = record_gates(model, enc, pad_id(tok), batch_size=8)
    rep = domain_report(stats, target="arithmetic")
    means = {n: d["by_band"] for n, d in rep["domains"].items()}
    for band in ("middle", "late"):
        for other in ("docstrings", "source"):
            assert means["arithmetic"][band]["mean"] > means[other][band]["mean"], (band, other, means)
    for other in ("docstrings", "source"):
        assert rep["auroc"]["mid_late"][other] > 0.9, rep["auroc"]
