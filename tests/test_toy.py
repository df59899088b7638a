"""The toy regression of the paper's section 2: theory against Monte Carlo, learned methods against it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from disel.cli import main
from disel.errors import UserError
from disel.experiments import toy
from disel.experiments.toy import ToyConfig

SMALL = dict(dim=4, out_dim=4, rank=1, samples=8192, eval_samples=20_000, steps=600)


def _random_spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.3 * torch.eye(d, dtype=torch.float64)


def test_best_fixed_formula_matches_least_squares_and_halves_delta():
    g = torch.Generator().manual_seed(0)
    d, o, n = 5, 3, 200_000
    delta = torch.randn(o, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, d, generator=g, dtype=torch.float64
    )
    # General case: different means and covariances, so M_FT != M_PT.
    mu_ft, mu_pt = (
        torch.randn(d, generator=g, dtype=torch.float64),
        torch.randn(d, generator=g, dtype=torch.float64),
    )
    cov_ft, cov_pt = _random_spd(d, g), _random_spd(d, g)
    x_ft = mu_ft + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov_ft).T
    x_pt = mu_pt + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov_pt).T
    m_ft, m_pt = toy.second_moment(mu_ft, cov_ft), toy.second_moment(mu_pt, cov_pt)
    c = toy.best_fixed_correction(delta, m_ft, m_pt)
    # Least squares on the mixture: residual targets Δx on FT inputs, 0 on PT inputs.
    x = torch.cat([x_ft, x_pt])
    r = torch.cat([x_ft @ delta.T, torch.zeros(n, o, dtype=torch.float64)])
    c_ls = torch.linalg.lstsq(x, r).solution.T
    assert torch.allclose(c, c_ls, atol=0.02 * float(delta.abs().max()))
    # The analytic loss equals the Monte Carlo loss of the same C.
    exact = toy.fixed_correction_loss(c, delta, m_ft, m_pt)
    mc_ft = float((x_ft @ (c - delta).T).pow(2).mean())
    mc_pt = float((x_pt @ c.T).pow(2).mean())
    assert exact["mse_ft"] == pytest.approx(mc_ft, rel=0.02)
    assert exact["mse_pt"] == pytest.approx(mc_pt, rel=0.02)
    # No other fixed C does better on the mixture.
    for _ in range(5):
        other = c + 0.05 * torch.randn(o, d, generator=g, dtype=torch.float64)
        assert toy.fixed_correction_loss(other, delta, m_ft, m_pt)["mse_mix"] > exact["mse_mix"]
    # Equal second moments (means ±μ, one covariance): C* = Δ/2, equal losses on both populations.
    m = toy.second_moment(mu_ft, cov_ft)
    m_neg = toy.second_moment(-mu_ft, cov_ft)
    c_half = toy.best_fixed_correction(delta, m, m_neg)
    assert torch.allclose(c_half, delta / 2, atol=1e-12)
    half = toy.fixed_correction_loss(c_half, delta, m, m_neg)
    assert half["mse_ft"] == pytest.approx(half["mse_pt"], rel=1e-12)


def test_bayes_gate_is_the_gaussian_posterior_and_minimises_the_loss():
    g = torch.Generator().manual_seed(1)
    d = 4
    cov = _random_spd(d, g)
    mu_ft, mu_pt = (
        torch.randn(d, generator=g, dtype=torch.float64),
        torch.randn(d, generator=g, dtype=torch.float64),
    )
    w, c = toy.bayes_gate_parameters(mu_ft, mu_pt, cov)
    x = torch.randn(1000, d, generator=g, dtype=torch.float64) * 2
    lp_ft = torch.distributions.MultivariateNormal(mu_ft, cov).log_prob(x)
    lp_pt = torch.distributions.MultivariateNormal(mu_pt, cov).log_prob(x)
    assert torch.allclose(toy.posterior_ft(x, w, c), torch.sigmoid(lp_ft - lp_pt), atol=1e-10)
    # Means differing only in sign give c = 0.
    assert toy.bayes_gate_parameters(mu_ft, -mu_ft, cov)[1] == pytest.approx(0.0, abs=1e-12)

    cfg = ToyConfig(dim=4, out_dim=3, rank=2, covariance="random", eval_samples=50_000).validate()
    problem = toy.make_problem(cfg)
    # separation is the Mahalanobis distance between the means.
    diff = problem.mu_ft - problem.mu_pt
    assert float(torch.sqrt(diff @ torch.linalg.solve(problem.cov, diff))) == pytest.approx(cfg.separation)
    gen = torch.Generator().manual_seed(5)
    x_ft, x_pt = problem.sample(50_000, "ft", gen), problem.sample(50_000, "pt", gen)
    bayes = toy.bayes_loss_mc(problem, x_ft, x_pt)
    wb, cb = toy.bayes_gate_parameters(problem.mu_ft, problem.mu_pt, problem.cov)

    def gated_loss(wv: torch.Tensor, cv: float) -> float:
        e_ft = (1 - toy.posterior_ft(x_ft, wv, cv))[:, None] * (x_ft @ problem.delta.T)
        e_pt = toy.posterior_ft(x_pt, wv, cv)[:, None] * (x_pt @ problem.delta.T)
        return 0.5 * float(e_ft.pow(2).mean() + e_pt.pow(2).mean())

    assert gated_loss(wb, cb) == pytest.approx(bayes["mse_mix"], rel=1e-12)
    for wv, cv in [(0.7 * wb, cb), (1.4 * wb, cb), (wb, cb + 0.5), (wb.flip(0), cb)]:
        assert gated_loss(wv, cv) > bayes["mse_mix"]
    # Far below the best fixed correction, and the real DISeL layer at the exact gate realises it.
    th = toy.theory(problem, x_ft, x_pt)
    assert th["bayes"]["mse_mix"] < 0.5 * th["best_fixed"]["mse_mix"]
    model = toy.build_method(problem, "disel", cfg)
    toy.set_disel_to_bayes(model, problem)
    realised = toy.evaluate(model, problem, x_ft, x_pt)
    for k in toy.POPS:
        assert realised[k] == pytest.approx(bayes[k], rel=1e-9)


@pytest.mark.slow
def test_learned_methods_reach_the_theory_at_small_size():
    result = toy.run_toy(ToyConfig(**SMALL, seed=0))
    best, bayes = result["theory"]["best_fixed"], result["theory"]["bayes"]
    for method in ("full", "lora"):
        for k in ("mse_ft", "mse_pt"):
            assert result["methods"][method][k] == pytest.approx(best[k], rel=0.05), (method, k)
    disel = result["methods"]["disel"]["mse_mix"]
    assert disel <= 1.10 * bayes["mse_mix"]
    assert disel < 0.5 * best["mse_mix"]
    assert result["gate_correlation"] > 0.95
    assert min(result["gates"]["cosine_w"]) > 0.9


def test_deterministic_under_seed_and_seed_matters():
    cfg = dict(dim=4, out_dim=4, rank=1, samples=256, eval_samples=500, steps=30)
    a = toy.run_toy(ToyConfig(**cfg, seed=3))
    b = toy.run_toy(ToyConfig(**cfg, seed=3))
    c = toy.run_toy(ToyConfig(**cfg, seed=4))
    assert json.dumps(a) == json.dumps(b)
    assert a["methods"]["disel"] != c["methods"]["disel"]


@pytest.mark.parametrize(
    "bad",
    [
        dict(dim=0),
        dict(rank=5, dim=4, out_dim=4),
        dict(separation=-1.0),
        dict(separation=math.nan),
        dict(steps=0),
        dict(samples=3),
        dict(lr=0.0),
        dict(covariance="diagonal"),
        dict(gate_delay=1.0),
        dict(dim=2.5),
    ],
)
def test_bad_config_raises_user_error(bad):
    with pytest.raises(UserError):
        toy.run_toy(ToyConfig(**bad))


def test_cli_json_files_and_errors(tmp_path, capsys):
    small = ["--dim", "4", "--out-dim", "4", "--rank", "1", "--samples", "512", "--eval-samples", "2000"]
    rc = main(["toy", *small, "--steps", "200", "--seed", "1", "--json", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out)
    assert set(data["methods"]) == {"full", "lora", "disel"}
    for group in (data["methods"]["full"], data["methods"]["disel"], data["theory"]["bayes"]):
        assert set(toy.POPS) <= set(group) and all(math.isfinite(group[k]) for k in toy.POPS)
    assert set(data["theory"]) >= {"best_fixed", "bayes"}
    assert -1.0 <= data["gate_correlation"] <= 1.0
    assert data["config"]["dim"] == 4 and data["config"]["seed"] == 1
    assert json.loads((tmp_path / "toy.json").read_text()) == data
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rc = main(["toy", *small, "--steps", "20", "--sweep", "1,3", "--json", "--out", str(tmp_path)])
    sweep = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["separation"] for r in sweep["sweep"]] == [1.0, 3.0]
    assert all(r["bayes"] < r["best_fixed"] for r in sweep["sweep"])
    assert (tmp_path / "toy_sweep.png").exists() and (tmp_path / "toy_sweep.json").exists()

    assert main(["toy", "--rank", "0"]) == 2
    assert "rank=0" in capsys.readouterr().err
    assert main(["toy", "--sweep", "1,abc"]) == 2
    assert "--sweep" in capsys.readouterr().err
