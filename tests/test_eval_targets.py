"""Target metrics through the evaluation API: classification (accuracy, MCC) and HumanEval generation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from disel.evaluation.runner import evaluate_target
from disel.evaluation.targets import matthews_corrcoef
from disel.testing import tiny_model
from disel.testing_tokenizers import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_matthews_correlation_against_the_formula():
    gold = [1, 1, 0, 0, 1, 0, 1, 0]
    pred = [1, 0, 0, 0, 1, 1, 1, 0]
    tp, tn, fp, fn = 3, 3, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corrcoef(gold, pred) == pytest.approx(expected)
    assert matthews_corrcoef(gold, gold) == pytest.approx(1.0)


def test_classification_target_matches_a_direct_computation(tmp_path):
    tok = tiny_tokenizer(128)
    model = tiny_model("roberta", "seq_cls", vocab_size=len(tok))
    rows = [{"text": f"sample number {i} is {'good' if i % 3 else 'bad'}", "label": i % 2} for i in range(20)]
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = evaluate_target(model, tok, {"type": "classification", "path": str(path)}, limit=None)
    with torch.no_grad():
        preds = [int(model(**tok(r["text"], return_tensors="pt")).logits.argmax(-1)) for r in rows]
    gold = [r["label"] for r in rows]
    assert m["n"] == 20
    assert m["accuracy"] == pytest.approx(sum(p == g for p, g in zip(preds, gold)) / 20)
    assert m["mcc"] == pytest.approx(matthews_corrcoef(gold, preds))


def test_humaneval_generation_target_runs_end_to_end():
    tok = tiny_tokenizer(128)
    model = tiny_model("llama", vocab_size=len(tok))
    m = evaluate_target(model, tok, {"type": "humaneval", "max_new_tokens": 8, "workers": 1}, limit=2)
    assert m["n"] == 2.0
    assert m["pass@1"] == 0.0  # a random tiny model writes no working code


@pytest.mark.slow
def test_evaluate_run_of_a_full_fine_tuning_run(tmp_path, tiny_models):
    """A full fine-tuning run dir holds whole models per checkpoint; each loads and scores, delta vs base."""
    from disel.evaluation import evaluate_run
    from disel.results import ResultsStore
    from disel.training.config import config_from_dict
    from disel.training.runner import train

    base = tiny_models.saved("llama")  # the tiny llama and its tokenizer, saved once per session
    data = tmp_path / "text.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(16))
    )
    cfg = config_from_dict(
        {
            "model": {"name": str(base)},
            "method": {"name": "full"},
            "data": {"format": "text", "train": str(data), "max_length": 32},
            "training": {"max_steps": 2, "per_device_batch_size": 8, "save_steps": 1, "lr": 1e-2},
            "output": {"dir": str(tmp_path / "runs")},
        }
    )
    res = train(cfg, progress=False)
    store = ResultsStore(tmp_path / "runs")
    recs = evaluate_run(res.run_dir, {"retention": ["stdlib-ppl"], "limit": 4}, store)
    assert [r["step"] for r in recs] == [1, 2, None]
    assert all(0 < r["retention_score"] <= 1 for r in recs)
    assert any(abs(r["retention_delta"]) > 0 for r in recs)  # lr 1e-2 on every weight moves the model
    assert len(store.records(kind="eval")) == 3 and len(store.records(kind="base_eval")) == 1
