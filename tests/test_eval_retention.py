"""Retention through lm-eval (offline suites), agreement with a direct computation, run-dir evaluation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from disel.cli import main
from disel.errors import UserError
from disel.evaluation import best_checkpoint, evaluate_model, evaluate_run, token_nll
from disel.evaluation.retention import PAPER_SUITE, offline_task, resolve_retention, task_data_path
from disel.results import ResultsStore
from disel.testing import tiny_model
from disel.testing_tokenizers import tiny_tokenizer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISEL_CACHE_DIR", str(tmp_path / "cache"))


def test_paper_preset_resolves_to_the_papers_suite():
    refs = resolve_retention(["paper"])
    assert [r.name for r in refs] == [
        "hellaswag", "winogrande", "arc_challenge", "arc_easy", "lambada_openai", "boolq", "piqa",
        "triviaqa", "openbookqa", "sciq", "mmlu", "medqa_4options", "commonsense_qa", "nq_open",
    ]  # fmt: skip
    metrics = {r.name: r.metric for r in refs}
    assert (
        metrics["hellaswag"] == "acc_norm"
        and metrics["winogrande"] == "acc"
        and metrics["piqa"] == "acc_norm"
    )
    assert metrics["mmlu"] == "acc" and metrics["triviaqa"] == "exact_match"
    assert {r.num_fewshot for r in refs} == {5} and all(r.hub for r in refs)
    # every name is a task or group that this lm-eval version defines
    root = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    defined = set()
    for y in root.rglob("*.yaml"):
        for line in y.read_text(errors="replace").splitlines():
            if line.startswith(("task: ", "group: ")):
                defined.add(line.split(":", 1)[1].strip())
    assert {t for t, _, _ in PAPER_SUITE} <= defined


def test_offline_tasks_are_real_and_honest():
    ref = offline_task("stdlib-nextline", 20)
    items = [json.loads(x) for x in task_data_path(ref).read_text().splitlines()]
    assert len(items) == 20
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        true = it["choices"][it["label"]]
        indent = true[: len(true) - len(true.lstrip())]
        assert all(c.startswith(indent) for c in it["choices"])
    assert len({it["label"] for it in items}) > 1  # the answer is not always in the same slot


@pytest.mark.slow
def test_lm_eval_perplexity_agrees_with_direct_computation():
    tok = tiny_tokenizer(128)
    model = tiny_model("llama", vocab_size=128, max_position_embeddings=1024)
    p = evaluate_model(model, tok, {"retention": ["stdlib-ppl"], "n_docs": 5, "max_length": 1024})
    texts = [
        json.loads(x)["text"] for x in task_data_path(offline_task("stdlib-ppl", 5)).read_text().splitlines()
    ]
    assert max(len(tok(t)["input_ids"]) for t in texts) < 1023  # one window each: same quantity
    direct = token_nll(model, tok, texts, max_length=1024)
    assert p["retention_metrics"]["stdlib-ppl"] == "bits_per_byte"
    assert p["retention"]["stdlib-ppl"] == pytest.approx(direct["bits_per_byte"], rel=1e-5)
    assert p["retention_score"] == pytest.approx(2 ** -direct["bits_per_byte"], rel=1e-5)


def _train_steps(model, tok, texts, steps, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    enc = tok(texts, return_tensors="pt", padding=True)
    model.train()
    for _ in range(steps):
        out = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.slow
def test_run_dir_eval_saved_adapter_matches_in_memory(tmp_path, capsys, tiny_models, tiny_tok):
    from transformers import AutoModelForCausalLM

    from disel.methods.registry import build_model

    tok = tiny_tok
    base_dir = tiny_models.saved("llama")  # the tiny llama and its tokenizer, saved once per session

    model = build_model(
        AutoModelForCausalLM.from_pretrained(base_dir), "disel", rank=4, options={"gate_bias_init": 0.0}
    )
    data = tmp_path / "target.jsonl"
    pairs = [("1+1=", "2"), ("2+2=", "4"), ("3+3=", "6")]
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    spec = {
        "retention": ["stdlib-ppl"],
        "n_docs": 2,
        "max_length": 256,
        "target": {"type": "exact_match", "path": str(data), "max_new_tokens": 3},
    }
    run = tmp_path / "run"
    texts = ["1+1=2\n", "2+2=4\n", "3+3=6\n"]
    in_memory = {}
    _train_steps(model, tok, texts, 3)
    model.save_pretrained(run / "checkpoint-3")
    in_memory[3] = evaluate_model(model, tok, spec)
    (run / "run.json").write_text(
        json.dumps({"run_id": "r1", "method": "disel", "rank": 4, "seed": 0, "model": str(base_dir),
                    "task": "causal_lm", "status": "finished", "config": {}})
    )  # fmt: skip
    store = ResultsStore(tmp_path / "store")
    recs = evaluate_run(run, spec, store)
    assert [r["step"] for r in recs] == [3]
    for r in recs[:1]:
        mem = in_memory[r["step"]]
        assert r["retention"]["stdlib-ppl"] == pytest.approx(mem["retention"]["stdlib-ppl"], rel=1e-6)
        assert r["target"] == mem["target"]
    base = store.records(kind="base_eval", run_id=f"base:{base_dir}")
    assert len(base) == 1
    for r in recs:
        assert r["retention_delta"] == pytest.approx(r["retention_score"] - base[0]["retention_score"])
    assert recs[0]["retention_delta"] != 0.0  # the gates are open: the adapter changed the model
    assert len(store.records(kind="eval", run_id="r1")) == 1
    assert best_checkpoint(recs) is recs[0]
    # the CLI on the saved adapter: same numbers, the base comes from the cache (no second base_eval record)
    spec_file = tmp_path / "spec.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(spec))
    assert (
        main(
            [
                "eval",
                str(run / "checkpoint-3"),
                "--spec",
                str(spec_file),
                "--store",
                str(tmp_path / "store"),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    cli = out["records"][-1]
    assert cli["retention"]["stdlib-ppl"] == pytest.approx(in_memory[3]["retention"]["stdlib-ppl"], rel=1e-6)
    assert len(store.records(kind="base_eval", run_id=f"base:{base_dir}")) == 1


def test_best_checkpoint_is_chosen_by_target_then_retention():
    recs = [
        {"step": 10, "target_score": 0.4, "retention_score": 0.9},
        {"step": 20, "target_score": 0.6, "retention_score": 0.5},
        {"step": 30, "target_score": 0.6, "retention_score": 0.7},
        {"step": None, "target_score": 0.5, "retention_score": 0.99},
    ]
    assert best_checkpoint(recs)["step"] == 30
    with pytest.raises(UserError, match="target score"):
        best_checkpoint([{"step": 1, "target_score": None}])


def test_bad_spec_is_one_clear_error(tmp_path):
    from disel.evaluation import load_spec

    with pytest.raises(UserError, match="Unknown eval spec key"):
        load_spec({"retension": ["offline"]})
    with pytest.raises(UserError, match="target"):
        load_spec({"target": {"type": "bleu"}})
    assert main(["eval", str(tmp_path / "missing"), "--store", str(tmp_path / "s")]) == 2
