"""The Queryable LoRA paper's noisy non-linear regression (disel toy --task nonlinear)."""

from __future__ import annotations

import json

import pytest

from disel.errors import UserError
from disel.experiments.nonlinear import NonlinearConfig, format_table, match_ranks, run_nonlinear

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(seeds=1, steps=60, train_samples=300, test_samples=300, hidden=16)


def test_methods_get_equal_parameter_budgets():
    from disel.experiments.nonlinear import _task

    cfg = NonlinearConfig(**SMALL)
    ranks = match_ranks(cfg, _task(cfg, 0)["f0"])
    budget = ranks["lora"][1]
    assert ranks["lora"][0] == cfg.budget_rank
    for method, (rank, n) in ranks.items():
        assert rank >= 1 and n <= budget, method
        assert n > 0.6 * budget, f"{method} is far below the budget ({n} vs {budget})"


def test_every_method_improves_on_the_base_and_runs_are_deterministic():
    a = run_nonlinear(NonlinearConfig(**SMALL))
    b = run_nonlinear(NonlinearConfig(**SMALL))
    for name, m in a["methods"].items():
        assert m["test_mse_mean"] < a["base_test_mse"], name
        assert m["test_mse_mean"] == b["methods"][name]["test_mse_mean"]
    assert set(a["methods"]) == {"lora", "disel", "queryable"}
    assert "| queryable |" in format_table(a)


def test_bad_config():
    with pytest.raises(UserError, match="steps=0"):
        NonlinearConfig(steps=0)
    with pytest.raises(UserError, match="top_k=5"):
        NonlinearConfig(top_k=5, num_atoms=4)


def test_cli_json(capsys, monkeypatch):
    from disel.cli import main
    from disel.experiments import nonlinear

    monkeypatch.setattr(nonlinear, "NonlinearConfig", lambda seed=0: NonlinearConfig(seed=seed, **SMALL))
    assert main(["toy", "--task", "nonlinear", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "nonlinear" and out["methods"]["queryable"]["trainable_params"] > 0
