"""Evaluation in units: each (run, checkpoint, metric) is stored when done, a rerun finishes exactly the
missing ones (and loads nothing when none is), `disel report` names an incomplete evaluation; `disel eval`
of a run uses the run's own spec and store, of an adapter records its method and rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import disel.loading
from disel.cli import main
from disel.evaluation import runner
from disel.evaluation.runner import LazyStore, evaluate_run, plan_units, run_store_path
from disel.report import PLAN_KIND, UNIT_KIND, incomplete_runs, make_report, summarize
from disel.results import ResultsStore
from disel.testing import tiny_model
from disel.testing_tokenizers import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [("1+1=", "2"), ("2+2=", "4")]
REAL_UNIT, REAL_LOAD, REAL_TOKENIZER = (
    runner._evaluate_unit,
    disel.loading.load_model,
    disel.loading.load_tokenizer,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DISEL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "eval-cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base, a DISeL and a LoRA adapter of it (gates open, so the adapters change the model)."""
    import peft

    import disel

    root = tmp_path_factory.mktemp("units")
    tok = tiny_tokenizer(128)
    tiny_model("llama", vocab_size=128).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    configs = {
        "disel": disel.DiselConfig(r=4, target_modules=["q_proj", "v_proj"], gate_bias_init=0.0),
        "lora": peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    }
    for name, cfg in configs.items():
        pm = peft.get_peft_model(tiny_model("llama", vocab_size=128), cfg)
        pm.peft_config["default"].base_model_name_or_path = str(root / "base")
        pm.save_pretrained(root / name)
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in PAIRS))
    return root


def _spec(models: Path) -> dict:
    return {
        "retention": ["stdlib-ppl"],
        "n_docs": 2,
        "max_length": 64,
        "target": {"type": "exact_match", "path": str(models / "qa.jsonl"), "max_new_tokens": 2},
    }


def _run_dir(root: Path, models: Path, **config) -> Path:
    """A run directory laid out as `disel train` writes it: run.json, two checkpoints and final/."""
    import shutil

    run = root / "runs" / "disel-r4-s0"
    for d in ("checkpoint-1", "checkpoint-2", "final"):
        shutil.copytree(models / "disel", run / d)
    info = {
        "run_id": "disel-r4-s0",
        "run_key": "disel-r4-s0#abc123",
        "method": "disel",
        "rank": 4,
        "seed": 0,
        "model": str(models / "base"),
        "task": "causal_lm",
        "status": "finished",
        "config": {"output": {"dir": "runs"}, **config},
    }
    (run / "run.json").write_text(json.dumps(info))
    return run


class Counter:
    """Spy on the unit evaluation and the model loads; ``fail_at`` raises KeyboardInterrupt (a kill)."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.units: list[tuple] = []
        self.loads = 0
        real_unit, real_load = REAL_UNIT, REAL_LOAD

        def unit(model, tok, spec, retention, name):
            if fail_at is not None and len(self.units) + 1 == fail_at:
                raise KeyboardInterrupt
            self.units.append((getattr(model, "_ckpt", None), name))
            return real_unit(model, tok, spec, retention, name)

        def load(path, *a, **kw):
            self.loads += 1
            model, tok, info = real_load(path, *a, **kw)
            model._ckpt = Path(path).name
            return model, tok, info

        monkeypatch.setattr(runner, "_evaluate_unit", unit)
        monkeypatch.setattr(disel.loading, "load_model", load)
        monkeypatch.setattr(disel.loading, "load_tokenizer", REAL_TOKENIZER)


def test_a_killed_evaluation_resumes_with_exactly_the_missing_units(tmp_path, models, monkeypatch):
    run = _run_dir(tmp_path, models)
    spec = _spec(models)
    store = ResultsStore(tmp_path / "store.sqlite")
    units = plan_units(spec)
    assert list(units) == ["retention:stdlib-ppl", "target"]

    killed = Counter(monkeypatch, fail_at=4)  # killed in the middle of checkpoint-2
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run, spec, store)
    key = "disel-r4-s0#abc123"
    done = [(r["step"], r["unit"]) for r in store.records(kind=UNIT_KIND, run_id=key)]
    assert done == [(1, "retention:stdlib-ppl"), (1, "target"), (2, "retention:stdlib-ppl")]
    assert [r["step"] for r in store.records(kind="eval", run_id=key)] == [1]
    assert killed.units == [("checkpoint-1", u) for u in units] + [("checkpoint-2", "retention:stdlib-ppl")]
    for rec in store.records(kind=UNIT_KIND):
        assert rec["run_dir"] == str(run.resolve()) and rec["run_key"] == key and rec["unit_key"]

    # the report says so, naming the run and what is missing
    assert incomplete_runs(store) == {key: {"checkpoint-2": ["target"], "final": list(units)}}
    notes: list[str] = []
    files = make_report(store.path, tmp_path / "report", log=notes.append)
    assert len(notes) == 1 and notes[0].startswith(f"run {key}: evaluation incomplete, missing ")
    assert "checkpoint-2 (target); final (all metrics)" in notes[0]
    row = summarize(store)[0]
    assert (row.method, row.rank, row.n, row.incomplete) == ("disel", 4, 1, 1)
    assert "| 1 |\n" in files["table"].read_text()  # the "incomplete runs" column
    assert json.loads(files["json"].read_text())["incomplete"] == {
        key: {"checkpoint-2": ["target"], "final": list(units)}
    }

    rerun = Counter(monkeypatch)
    recs = evaluate_run(run, spec, store)
    assert rerun.units == [("checkpoint-2", "target"), ("final", "retention:stdlib-ppl"), ("final", "target")]
    assert rerun.loads == 2  # checkpoint-1 is not loaded again
    assert [r["step"] for r in recs] == [1, 2, None]
    assert len(store.records(kind=UNIT_KIND, run_id=key)) == 6
    assert len(store.records(kind="base_eval")) == 1 and len(store.records(kind=PLAN_KIND)) == 1
    base = store.records(kind="base_eval")[0]
    for r in recs:
        assert r["run_id"] == "disel-r4-s0" and r["run_key"] == key and r["run_dir"] == str(run.resolve())
        assert r["retention_delta"] == pytest.approx(r["retention_score"] - base["retention_score"])
        assert r["target"]["n"] == 2.0
    assert incomplete_runs(store) == {}

    # everything done: nothing is loaded, nothing evaluated, nothing written
    def refuse(*a, **kw):
        raise AssertionError("no model may load when no unit is missing")

    monkeypatch.setattr(disel.loading, "load_model", refuse)
    monkeypatch.setattr(disel.loading, "load_tokenizer", refuse)
    n_records = len(store.records())
    again = evaluate_run(run, spec, store)
    assert [r["retention_score"] for r in again] == [r["retention_score"] for r in recs]
    assert len(store.records()) == n_records

    # another target redoes the target units only, retention is kept
    other = tmp_path / "qa2.jsonl"
    other.write_text(json.dumps({"prompt": "3+3=", "answer": "6"}) + "\n")
    spy = Counter(monkeypatch)
    evaluate_run(run, {**spec, "target": {"type": "exact_match", "path": str(other)}}, store)
    assert [u for _, u in spy.units] == ["target"] * 3
    assert incomplete_runs(store) == {}


def test_eval_of_a_run_dir_uses_its_own_spec_and_store(tmp_path, models, monkeypatch):
    spec = {**_spec(models), "target": None}
    run = _run_dir(tmp_path / "train", models, eval=spec)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run_store_path(run, json.loads((run / "run.json").read_text())) == run.parent / "results.sqlite"
    assert main(["eval", str(run), "--json"]) == 0
    assert not (elsewhere / "results").exists()  # not the cwd's ./results
    store = ResultsStore(run.parent / "results.sqlite")
    recs = store.records(kind="eval", run_id="disel-r4-s0#abc123")
    assert [r["step"] for r in recs] == [1, 2, None]
    assert all(r["method"] == "disel" and r["rank"] == 4 and r["target"] == {} for r in recs)
    assert {r["unit"] for r in store.records(kind=UNIT_KIND)} == {"retention:stdlib-ppl"}  # the run's spec
    # the report of a run evaluated without a target: retention only, the target named as missing
    notes: list[str] = []
    files = make_report(store.path, tmp_path / "rep", log=notes.append)
    table = files["table"].read_text()
    assert "| disel | 4 | 1 | – (no target) |" in table
    assert notes == [
        "disel r4: target missing for disel-r4-s0#abc123 (evaluated without a target): retention only, at the "
        "final checkpoint, and not in the trade-off plot."
    ]


def test_run_store_path_follows_the_training_config(tmp_path):
    run = tmp_path / "project" / "out" / "r1"
    info = {"run_id": "r1", "config": {"output": {"dir": "out", "results": "res/store.sqlite"}}}
    assert run_store_path(run, info) == tmp_path / "project" / "res" / "store.sqlite"
    info["config"]["output"]["results"] = str(tmp_path / "abs.sqlite")
    assert run_store_path(run, info) == tmp_path / "abs.sqlite"
    assert run_store_path(run, {"run_id": "r1"}) == (run.parent / "results.sqlite").resolve()
    info = {"run_id": "r1", "config": {"output": {"dir": "out", "run_dir": "out/r1"}}}
    assert run_store_path(run, info) == tmp_path / "project" / "out" / "results.sqlite"


def test_lazy_store_creates_nothing_until_written(tmp_path):
    store = LazyStore(tmp_path / "s")
    assert store.records() == [] and store.latest("eval", "x") is None and not store.has("eval", "x")
    assert not (tmp_path / "s").exists()
    store.put("eval", "x", {"a": 1})
    assert (tmp_path / "s" / "results.sqlite").is_file() and store.latest("eval", "x")["a"] == 1


def test_eval_of_adapters_records_method_and_rank_and_report_keeps_them_apart(tmp_path, models, capsys):
    store = tmp_path / "store"
    common = ["--retention", "stdlib-ppl", "--limit", "1", "--store", str(store)]
    for name in ("disel", "lora"):
        assert main(["eval", str(models / name), *common]) == 0
    recs = ResultsStore(store).records(kind="eval")
    assert [(r["method"], r["rank"]) for r in recs] == [("disel", 4), ("lora", 2)]
    assert all("run_dir" in r and r["run_id"].startswith("path:") for r in recs)
    capsys.readouterr()
    assert main(["report", str(store), "--out", str(tmp_path / "rep")]) == 0
    assert capsys.readouterr().err.count("target missing") == 2  # the report does not crash without targets
    rows = json.loads((tmp_path / "rep" / "summary.json").read_text())["rows"]
    assert sorted((r["method"], r["rank"], r["n"]) for r in rows) == [("disel", 4, 1), ("lora", 2, 1)]
    assert all(r["target_mean"] is None and r["retention_mean"] > 0 for r in rows)
    # --method overrides what the adapter says (the record of that adapter path is replaced)
    assert main(["eval", str(models / "lora"), *common, "--method", "lora-custom"]) == 0
    recs = ResultsStore(store).records(kind="eval")
    assert sorted((r["method"], r["rank"]) for r in recs) == [("disel", 4), ("lora-custom", 2)]
