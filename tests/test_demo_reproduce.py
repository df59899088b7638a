"""`disel demo`'s numbers through the pipeline: the sweep config it writes reproduces them exactly.

A quick demo writes ``OUT/reproduce/sweep.yaml``; running that sweep in process (training through
``disel.training.runner.train``, evaluating every checkpoint through ``disel.evaluation.evaluate_run``) gives
the demo's accuracy and retention at every checkpoint, bit for bit, on the same thread count. Step 0 of the
demo (the freshly built adapter) is the base model's evaluation in the pipeline: LoRA and DISeL start as
the base exactly (their B factors are zero). A changed learning rate in the config no longer reproduces.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import yaml

from disel.errors import UserError
from disel.evaluation.retention import LIKELIHOOD_TASK, resolve_retention, score_of
from disel.evaluation.targets import exact_match, first_word
from disel.experiments.demo import (
    DemoConfig,
    compare_with_pipeline,
    method_lr,
    reproduction_config,
    run_demo,
)
from disel.experiments.sweep import expand_grid, run_sweep
from disel.training.config import config_from_dict, load_config, with_overrides
from disel.utils.threads import torch_threads


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A quick demo (lora, disel; 12 steps, evaluated every 4; lr 4e-3, at which both answer some test
    questions by the end) and its written sweep, run in process."""
    out = tmp_path_factory.mktemp("demo")
    with torch_threads(1):
        results = run_demo(DemoConfig.quick(methods=["lora", "disel"], lr=4e-3), out, log=lambda _: None)
        cfg = load_config(out / "reproduce" / "sweep.yaml")
        summary = run_sweep(cfg, progress=False)
    return out, results, cfg, summary


def test_the_written_sweep_reproduces_every_checkpoint_exactly(reproduced):
    out, results, cfg, summary = reproduced
    assert sorted(summary.trained) == ["disel-r8-s0", "lora-r8-s0"]
    cmp = compare_with_pipeline(results, cfg.results_path)
    assert cmp["missing"] == []
    # every point of both paths (step 0, 4, 8 and the end), the end twice (checkpoint-12 and final)
    assert len(cmp["points"]) == 2 * 5
    for p in cmp["points"]:
        assert p["pipeline"] == p["demo"], p  # exact: the same floats
    assert cmp["max_abs_diff"] == {"target_accuracy": 0.0, "retention": 0.0}
    # not trivially equal: both learned some answers, training moved retention (LoRA most), and every
    # number is a real likelihood
    for r in results["runs"]:
        assert r["path"][0]["target_accuracy"] == 0.0 < r["path"][-1]["target_accuracy"], r["method"]
    lora = next(r for r in results["runs"] if r["method"] == "lora")
    assert lora["path"][-1]["retention"] < lora["path"][0]["retention"] - 1e-3
    assert all(0.0 < p["demo"]["retention"] < 1.0 for p in cmp["points"])
    assert len({p["demo"]["retention"] for p in cmp["points"]}) >= 6


def test_the_report_names_the_commands_and_the_report_lists_the_checkpoints(reproduced):
    out, results, cfg, _ = reproduced
    report = (out / "report.md").read_text()
    assert "## Reproduce" in report
    for command in results["reproduce"]["commands"]:
        assert command in report
    assert f"disel sweep {out / 'reproduce' / 'sweep.yaml'}" in report
    assert json.loads((out / "results.json").read_text())["reproduce"]["config"].endswith("sweep.yaml")
    from disel.report import make_report

    files = make_report(cfg.results_path, out / "reproduce" / "report")
    summary = json.loads(files["json"].read_text())
    lora = next(r for r in summary["checkpoints"] if r["method"] == "lora")
    end = next(r for r in results["runs"] if r["method"] == "lora")["path"][-1]
    final = lora["points"][-1]
    assert final["checkpoint"] == "final" and final["retention_score"] == end["retention"]
    assert repr(end["retention"]) in files["table"].read_text()


def test_a_changed_learning_rate_does_not_reproduce(reproduced):
    out, results, cfg, _ = reproduced
    lora = next(c for c in expand_grid(cfg) if c.method.name == "lora")
    other = with_overrides(lora, [("training.lr", lora.training.lr * 2), ("output.run_id", "lora-lr2")])
    from disel.evaluation import evaluate_run
    from disel.training.runner import train

    with torch_threads(1):
        train(other, progress=False)
        recs = evaluate_run(other.run_dir, other.eval, None)
    end = next(r for r in results["runs"] if r["method"] == "lora")["path"][-1]
    final = next(r for r in recs if r["step"] is None)
    assert final["retention_score"] != end["retention"]
    assert abs(final["retention_score"] - end["retention"]) > 1e-5


# --------------------------------------------------------------------------------------------------
# The pieces: the grid the demo writes, the pipeline's new options


def test_the_grid_is_every_method_rank_and_seed_with_its_own_data_and_lr(tmp_path):
    dc = DemoConfig.quick(methods=["lora", "disel", "full"], rank_scaled_lr=True)
    config = reproduction_config(dc, [0, 1], [4, 8], tmp_path)
    runs = expand_grid(config_from_dict(config))
    got = {(c.method.name, c.method.rank, c.training.seed) for c in runs}
    assert got == {(m, r, s) for m in dc.methods for r in (4, 8) for s in (0, 1)}
    assert len(runs) == len(got) == 12
    for c in runs:
        s, r = c.training.seed, c.method.rank
        assert c.run_id == f"{c.method.name}-r{r}-s{s}"
        assert c.training.lr == method_lr(c.method.name, replace(dc, rank=r))
        assert (
            not c.training.rank_scaled_lr
        )  # the lr is written out: the gates' lr follows it, as in the demo
        assert c.data.train == str(tmp_path / "data" / f"s{s}" / "arith_train.jsonl")
        assert c.eval["target"]["path"] == str(tmp_path / "data" / f"s{s}" / "arith_test.jsonl")
        assert c.training.warmup_steps == dc.warmup_steps and c.training.save_steps == dc.eval_every
        assert c.training.max_steps == dc.steps and c.training.per_device_batch_size == dc.batch_size
    # one seed, one lr: a plain product grid
    plain = reproduction_config(DemoConfig.quick(), [0], [8], tmp_path)
    assert plain["grid"] == {"method": ["lora", "disel"], "method.rank": [8], "seed": [0]}
    yaml.safe_load(yaml.safe_dump(plain))  # the config is plain data


def test_grid_blocks_settings_and_ids(tmp_path):
    base = {
        "model": {"name": "m"},
        "method": {"name": "disel", "rank": 2},
        "data": {"format": "instruction", "train": "x.jsonl"},
        "training": {"max_steps": 2},
        "output": {"dir": str(tmp_path)},
    }
    cfg = config_from_dict(
        {
            **base,
            "grid": [
                {"method": ["lora", "disel"], "seed": 0, "data.train": "a.jsonl", "lr": 1e-3},
                {
                    "method": ["lora"],
                    "seed": 1,
                    "data.train": "b.jsonl",
                    "method.target_modules": [["q_proj"]],
                },
            ],
        }
    )
    runs = {c.run_id: c for c in expand_grid(cfg)}
    assert sorted(runs) == ["disel-r2-s0", "lora-r2-s0", "lora-r2-s1-target_modulesq_proj"]
    assert runs["lora-r2-s0"].data.train == "a.jsonl" and runs["lora-r2-s0"].training.lr == 1e-3
    s1 = runs["lora-r2-s1-target_modulesq_proj"]  # a list is an axis, in the id; a single value is not
    assert s1.data.train == "b.jsonl" and s1.training.lr == 2e-4 and s1.method.target_modules == ["q_proj"]
    twice = config_from_dict({**base, "grid": [{"method": ["lora"]}, {"method": ["lora"], "lr": 1e-3}]})
    with pytest.raises(UserError, match="twice"):
        expand_grid(twice)
    with pytest.raises(UserError, match="grid"):
        config_from_dict({**base, "grid": [{"method": []}]})


def test_warmup_steps_is_a_number_of_steps_and_unset_leaves_the_fingerprint_alone(tmp_path):
    from disel.training.runner import training_arguments

    d = {
        "model": {"name": "m"},
        "method": {"name": "lora"},
        "data": {"format": "instruction", "train": "x.jsonl"},
        "training": {"max_steps": 600},
    }
    unset, ten = (
        config_from_dict(d),
        config_from_dict({**d, "training": {"max_steps": 600, "warmup_steps": 10}}),
    )
    assert training_arguments(ten, tmp_path, 1, False).get_warmup_steps(600) == 10
    assert training_arguments(unset, tmp_path, 1, False).get_warmup_steps(600) == 12  # 2% of 600
    assert unset.fingerprint() != ten.fingerprint()
    with pytest.raises(UserError, match="warmup_steps"):
        config_from_dict({**d, "training": {"warmup_steps": -1}})


def test_first_word_rule_and_likelihood_task_options():
    assert first_word(" 19. apples") == "19" and first_word("  ") is None
    assert exact_match(["19.", "190", "", "1 9"], ["19"] * 4, extract="first_word") == 0.25
    (ref,) = resolve_retention([{"task": LIKELIHOOD_TASK, "n": 6, "max_length": 64}])
    assert ref.metric == "likelihood" and ref.extra["likelihood"] == {
        "n": 6,
        "max_length": 64,
        "batch_size": 8,
    }
    assert resolve_retention([LIKELIHOOD_TASK])[0].extra["likelihood"]["n"] == 48
    assert score_of("likelihood", 0.03) == 0.03  # the score is the likelihood itself
    for bad in ({"n": 0}, {"max_len": 3}, {"n": True}):
        with pytest.raises(UserError, match=LIKELIHOOD_TASK):
            resolve_retention([{"task": LIKELIHOOD_TASK, **bad}])
    assert math.isfinite(ref.extra["likelihood"]["max_length"])


def test_the_base_evaluation_is_cached_per_target(tmp_path, monkeypatch):
    """Runs of one sweep with their own test sets (one per seed) each compare with the base on theirs."""
    from disel.evaluation import runner
    from disel.results import ResultsStore

    computed = []

    def fake_base(base, spec, task, tokenizer):
        computed.append(spec["target"]["path"])
        return {
            "target_score": len(computed),
            "retention_score": 0.5,
            "retention": {},
            "spec_key": runner._spec_key(spec),
            "target_key": runner.target_key(spec),
        }

    monkeypatch.setattr(runner, "_compute_base", fake_base)
    store = ResultsStore(tmp_path / "s.sqlite")
    specs = [
        {"retention": [LIKELIHOOD_TASK], "target": {"type": "exact_match", "path": f"s{i}.jsonl"}}
        for i in (0, 1)
    ]
    first = [runner.base_eval("m", spec, store)["target_score"] for spec in specs]
    again = [runner.base_eval("m", spec, store)["target_score"] for spec in specs]
    assert first == again == [1, 2] and computed == ["s0.jsonl", "s1.jsonl"]
    assert len(store.records(kind="base_eval")) == 2
