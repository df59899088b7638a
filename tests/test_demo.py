"""`disel demo --quick` end to end on the shipped model: files, JSON schema, finite numbers in range."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest

from disel.cli import main
from disel.experiments.demo import demo_model_dir, load_demo_model


def test_shipped_model_is_found_and_loads_offline():
    path = demo_model_dir()
    assert (path / "model.safetensors").is_file()
    model, tok = load_demo_model(path)
    n = sum(p.numel() for p in model.parameters())
    assert 500_000 < n < 10_000_000
    # digits are single tokens (the arithmetic task relies on it)
    assert len(tok("1234", add_special_tokens=False)["input_ids"]) == 4
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id is not None


def _finite_in(x, lo, hi):
    return isinstance(x, int | float) and math.isfinite(x) and lo <= x <= hi


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--methods", "lora,disel", "--seed", "1"]) == 0
    for name in ("report.md", "results.json", "tradeoff.png", "gates.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"base", "methods", "gates", "wall_seconds"}
    assert _finite_in(res["base"]["retention"], 0.0, 1.0) and res["base"]["retention"] > 0
    assert _finite_in(res["base"]["target_accuracy"], 0.0, 1.0)
    assert set(res["methods"]) == {"lora", "disel"}
    for name, r in res["methods"].items():
        assert _finite_in(r["retention"], 0.0, 1.0) and r["retention"] > 0, name
        assert _finite_in(r["target_accuracy"], 0.0, 1.0), name
        assert r["rank"] == 8
    assert set(res["gates"]) == {"arithmetic", "docstrings", "source"} and res["gates_method"] == "disel"
    assert all(_finite_in(v, 0.0, 1.0) for v in res["gates"].values())
    assert set(res["gate_auroc"]) == {"docstrings", "source"}
    assert all(_finite_in(v, 0.0, 1.0) for v in res["gate_auroc"].values())
    assert _finite_in(res["wall_seconds"], 0.0, 1e6) and res["wall_seconds"] > 0
    report = (out / "report.md").read_text()
    assert "exp(-NLL)" in report and "| lora" in report and "| disel" in report
    # the comparison sentence is computed from the same numbers as results.json
    b, lo, di = res["base"]["retention"], res["methods"]["lora"], res["methods"]["disel"]
    ratio = (b - di["retention"]) / (b - lo["retention"])
    word = "smaller" if ratio < 1 else "larger"
    assert f"- disel: retention loss {abs(1 - ratio):.0%} {word} than lora's" in report


def test_demo_rejects_unknown_method(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "x"), "--methods", "lora,nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "flag", [["--rank", "0"], ["--steps", "-1"], ["--methods", ","], ["--lr", "0"], ["--max-value", "1"]]
)
def test_demo_rejects_bad_numbers(tmp_path, flag):
    assert main(["demo", "--quick", "--out", str(tmp_path / "y"), *flag]) == 2


def test_demo_runs_the_data_reading_and_routed_methods(tmp_path):
    """LaLoRA and CorDA read pretraining-domain calibration text at build time; Queryable LoRA routes."""

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--methods", "lalora,corda,queryable"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"lalora", "corda", "queryable"}
    for name, r in res["methods"].items():
        assert 0.0 < r["retention"] <= 1.0 and r["trainable_parameters"] > 0, name
    assert res["gates"] == {}  # no DISeL adapter among them: no gate histogram


@pytest.mark.parametrize("extra", ["{not json", "[1, 2]"])
def test_demo_rejects_bad_extra(tmp_path, capsys, extra):
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--extra", extra]) == 2
    assert "--extra" in capsys.readouterr().err
    assert not (tmp_path / "d" / "results.json").exists()


def test_demo_saves_adapters_that_reload_to_the_same_scores(tmp_path):
    """Each saved adapter loads on the ORIGINAL shipped model in one call and reproduces the demo's scores
    (CorDA's is exported to plain LoRA, since its own adapter only fits the rewritten residual base)."""
    from peft import PeftConfig, PeftModel

    import disel
    from disel.experiments.arith import Problem
    from disel.experiments.demo import retention, retention_texts, target_accuracy

    out = tmp_path / "demo"
    args = [
        "demo",
        "--quick",
        "--out",
        str(out),
        "--methods",
        "disel,corda",
        "--save-adapters",
        "--steps",
        "20",
    ]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    test_rows = [json.loads(x) for x in (out / "data" / "arith_test.jsonl").read_text().splitlines()]
    assert len(test_rows) == cfg["n_test"]
    assert len((out / "data" / "arith_train.jsonl").read_text().splitlines()) == 20 * cfg["batch_size"]
    problems = [Problem(r["prompt"], r["answer"], "+", 0, 0, template="{instruction}") for r in test_rows]
    kinds = {"disel": disel.DiselConfig, "corda": peft.LoraConfig}
    for name, kind in kinds.items():
        adapter = out / "adapters" / name
        assert isinstance(PeftConfig.from_pretrained(str(adapter)), kind), name
        base, tok = load_demo_model()
        model = PeftModel.from_pretrained(base, str(adapter))
        assert target_accuracy(model, tok, problems) == res["methods"][name]["target_accuracy"], name
        # the retention score (a float that moved during training) is reproduced by the reloaded adapter
        score = retention(model, tok, retention_texts(cfg["n_retention"]), cfg["retention_max_tokens"])[
            "score"
        ]
        assert score == pytest.approx(res["methods"][name]["retention"], rel=1e-4), name
        assert score != pytest.approx(res["base"]["retention"], rel=1e-4), name
    assert not list((out / "adapters").glob(".*"))  # no temporary folders left behind


def test_demo_records_the_gates_of_a_combined_method_when_plain_disel_is_absent(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--methods", "lora,disel+lalora", "--steps", "4"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["gates_method"] == "disel+lalora"
    assert set(res["gates"]) == {"arithmetic", "docstrings", "source"}
    assert (out / "gates.png").is_file()
    assert "## Gates of `disel+lalora` by domain" in (out / "report.md").read_text()
    # no gated method at all: no gate section, and the JSON says so
    out2 = tmp_path / "demo2"
    assert main(["demo", "--quick", "--out", str(out2), "--methods", "lora", "--steps", "2"]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["gates"] == {} and res2["gates_method"] is None and not (out2 / "gates.png").exists()


def test_checkpoint_evaluation_does_not_change_training():
    """Evaluating inside training (eval mode, RNG consumed by the evaluation) leaves the losses identical,
    records the asked steps, and hands the model back in train mode."""
    import random

    import numpy as np
    import torch
    from transformers import TrainerCallback

    from disel.experiments.arith import arith_problems, encode_sft
    from disel.experiments.demo import checkpoint_callback, checkpoint_steps
    from disel.methods import build_model
    from disel.training.fit import fit

    base, tok = load_demo_model()
    rows = encode_sft(
        arith_problems("train", 20, 0, 9, holdout="question", style="short", template="qa"), tok
    )
    assert checkpoint_steps(12, 4) == [4, 8] and checkpoint_steps(12, 0) == []

    class Modes(TrainerCallback):
        def __init__(self, model):
            self.model, self.modes = model, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.modes.append(self.model.training)

    def train(with_eval: bool):
        torch.manual_seed(0)
        model = build_model(copy.deepcopy(base), "disel", rank=4, target_modules="all-linear")
        seen = []

        def evaluate(m):
            seen.append(m.training)
            torch.rand(100), random.random(), np.random.rand()  # an evaluation that draws random numbers
            return {"target_accuracy": 0.0, "retention": float(sum(p.sum() for p in m.parameters()))}

        modes = Modes(model)
        cbs = [modes, checkpoint_callback(model, [3, 6], evaluate)] if with_eval else [modes]
        # 20 examples, batches of 8, 9 steps: several epochs, each reshuffled from the RNG
        res = fit(model, rows, steps=9, batch_size=8, lr=3e-3, seed=0, progress=False, callbacks=cbs)
        return res, cbs, seen, modes.modes

    plain, _, _, _ = train(False)
    evald, cbs, seen, modes = train(True)
    assert evald.losses == plain.losses
    assert [p["step"] for p in cbs[1].points] == [3, 6]
    assert seen == [False, False] and all(modes) and len(modes) == 9
    assert cbs[1].points[0]["retention"] != cbs[1].points[1]["retention"]  # evaluated the moving model


def test_demo_frontier_seeds_and_ranks(tmp_path):
    """--seeds and --ranks: a path per run (step 0, every --eval-every, the end), the matched-accuracy
    summary and the rank table, both plots, and the report's sentences from the same numbers."""
    from disel.experiments import frontier

    out = tmp_path / "demo"
    args = ["demo", "--quick", "--out", str(out), "--seeds", "0,1", "--ranks", "2,4", "--steps", "12"]
    assert main([*args, "--eval-every", "5"]) == 0
    res = json.loads((out / "results.json").read_text())
    for name in ("tradeoff.png", "retention_over_steps.png", "rank.png", "gates.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert res["seeds"] == [0, 1] and res["ranks"] == [2, 4]
    runs = res["runs"]
    assert sorted((r["seed"], r["rank"], r["method"]) for r in runs) == sorted(
        (s, k, m) for s in (0, 1) for k in (2, 4) for m in ("lora", "disel")
    )
    b = res["base"]["retention"]
    for r in runs:
        assert [p["step"] for p in r["path"]] == [0, 5, 10, 12]
        assert r["path"][-1]["retention"] == r["retention"]
        assert r["path"][-1]["target_accuracy"] == r["target_accuracy"]
        # LoRA's B starts at zero and DISeL's gates at sigmoid(-5): step 0 is (nearly) the base model
        assert r["path"][0]["retention"] == pytest.approx(b, rel=1e-2)
    assert res["methods"]["lora"]["rank"] == 2 and res["methods"]["lora"]["seed"] == 0
    fr = res["frontier"]["by_rank"]["4"]
    paths = {
        m: {
            r["seed"]: [(p["target_accuracy"], p["retention"]) for p in r["path"]]
            for r in runs
            if r["rank"] == 4 and r["method"] == m
        }
        for m in ("lora", "disel")
    }
    again = frontier.summarize(paths, b)
    assert fr["accuracy"] == pytest.approx(again["accuracy"])
    assert fr["sentence"] == again["sentence"]
    report = (out / "report.md").read_text()
    assert f"**{fr['sentence']}**" in report and "## Forgetting against rank" in report
    rank = res["frontier"]["rank"]
    assert set(rank["methods"]) == {"lora", "disel"} and set(rank["methods"]["lora"]) == {"2", "4"}
    lora4 = rank["methods"]["lora"]["4"]
    ends = [b - r["retention"] for r in runs if r["rank"] == 4 and r["method"] == "lora"]
    assert lora4["forgetting_end"]["mean"] == pytest.approx(sum(ends) / 2)
    assert lora4["trainable_parameters"] > rank["methods"]["lora"]["2"]["trainable_parameters"]
    assert f"**{rank['sentence']}**" in report


@pytest.mark.parametrize(
    "flag",
    [
        ["--seeds", "0,0"],
        ["--seeds", "x"],
        ["--seeds", "0"],
        ["--ranks", "4,0"],
        ["--eval-every", "-1"],
        ["--matched-accuracy", "1.5"],
    ],
)
def test_demo_rejects_bad_frontier_flags(tmp_path, flag):
    assert main(["demo", "--quick", "--out", str(tmp_path / "z"), *flag]) == 2
    assert not (tmp_path / "z").exists()


def test_rank_scaled_lr():
    from disel.experiments.demo import DemoConfig, method_lr

    cfg = DemoConfig(rank=32, rank_scaled_lr=True)
    assert method_lr("lora", cfg) == pytest.approx(cfg.lr * 0.5)
    assert method_lr("full", cfg) == cfg.lr_full
    assert method_lr("lora", DemoConfig(rank=32)) == cfg.lr
