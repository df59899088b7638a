"""The paper's toy argument (section 2, appendix I): why a fixed low-rank update must forget.

Two input populations share a frozen linear map W0. On fine-tuning (FT) inputs the target is
``y = W0 x + Δ x``; on pre-training (PT) inputs it stays ``y = W0 x``. Inputs are Gaussian with one
covariance Σ and means ``±μ`` (they differ only in sign). Training sees a 50/50 mixture.

* Any *fixed* correction C (full fine-tuning, LoRA) is a compromise: the best one is
  ``C* = Δ M_FT (M_FT + M_PT)⁻¹`` with second moments ``M = Σ + μμᵀ``; here the M are equal, so
  ``C* = Δ/2``: half the fix on FT inputs, half a wrong fix on PT inputs.
* The Bayes-optimal *input-dependent* correction is ``p(FT|x) Δ x`` with
  ``p(FT|x) = sigmoid(w·x + c)``, ``w = Σ⁻¹(μ_FT − μ_PT)``,
  ``c = −½(μ_FTᵀΣ⁻¹μ_FT − μ_PTᵀΣ⁻¹μ_PT)``. A DISeL layer of rank(Δ) with every gate equal to that
  sigmoid represents it exactly.

This module builds the problem, computes the theory and trains the real methods (full fine-tuning, PEFT
LoRA, and the ``disel`` layer through ``peft.get_peft_model`` + :func:`disel.build_optimizer`).
Best-fixed losses are analytic; the Bayes loss has no closed form and is a Monte Carlo average over the
same fresh evaluation samples that score the learned methods (common random numbers, so the comparison
is sharp).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..utils.threads import torch_threads
from ..utils.validate import check_finite, check_int

METHODS: tuple[str, ...] = ("full", "lora", "disel")
POPS: tuple[str, ...] = ("mse_ft", "mse_pt", "mse_mix")
DEFAULT_SWEEP: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ToyConfig:
    """Sizes and training knobs of the toy; defaults show the effect clearly in a few CPU seconds.

    ``separation`` is the distance between the two means in the metric of Σ (the Mahalanobis distance
    ``‖Σ^{-1/2}(μ_FT − μ_PT)‖``; with the default identity covariance it is the Euclidean distance).
    ``samples`` and ``eval_samples`` count inputs per population. With ``mirror`` (default) the PT training
    inputs are the mirror images −x of the FT training inputs x (−x is an exact PT sample since the means
    differ only in sign): the two training populations then have exactly equal empirical second moments,
    so the finite-sample best fixed correction is exactly Δ/2 and sampling noise does not blur the
    comparison with the theory. Evaluation samples are always independent.

    Why these defaults: d = 8 and rank(Δ) = 2 keep the adapters small enough that 8192 inputs per
    population leave little overfitting (DISeL lands within ~3% of the Bayes loss over seeds 0-11);
    separation 3 puts the Bayes loss 5-10x below the best fixed one while the populations still overlap.
    Training is full-batch AdamW in float64 for 600 steps (10% linear warmup, cosine decay), gates at
    ``gate_lr`` = 2.5x ``lr`` through :func:`disel.build_optimizer`. The gate bias starts at −1
    (sigmoid ≈ 0.27, mostly closed) and the gates' LR stays at 0 for the first ``gate_delay`` = 10% of the
    steps: U starts at 0, so early gate gradients are tiny and Adam's normalisation turns them into full
    steps in arbitrary directions; with −3 and no delay about 1 run in 10 (small sizes: 3 in 16) left a
    gate shut in a wrong direction within this short budget.
    """

    dim: int = 8
    out_dim: int = 8
    rank: int = 2
    separation: float = 3.0
    samples: int = 8192
    eval_samples: int = 50_000
    steps: int = 600
    lr: float = 0.02
    gate_lr: float = 0.05
    gate_bias_init: float = -1.0
    warmup: float = 0.1
    gate_delay: float = 0.1
    covariance: str = "identity"
    mirror: bool = True
    seed: int = 0

    def validate(self) -> ToyConfig:
        def need_int(name: str, lo: int, hi: int, fix: str) -> None:
            check_int(name, getattr(self, name), lo, hi, problem="is out of range", fix=fix)

        need_int("dim", 2, 512, "use an integer dimension from 2 to 512 (default 8)")
        need_int("out_dim", 1, 512, "use an integer output dimension from 1 to 512 (default 8)")
        need_int(
            "rank",
            1,
            min(self.dim, self.out_dim) if isinstance(self.dim, int) and isinstance(self.out_dim, int) else 1,
            f"use a rank from 1 to min(dim, out_dim) = {min(self.dim, self.out_dim)} (default 2)",
        )
        need_int("samples", 16, 10_000_000, "use at least 16 training samples per population (default 8192)")
        need_int("eval_samples", 100, 10_000_000, "use at least 100 evaluation samples per population")
        need_int("steps", 1, 1_000_000, "use a positive number of optimisation steps (default 600)")
        need_int("seed", 0, 2**31 - 1, "use a non-negative integer seed below 2**31")
        for name in ("separation", "lr", "gate_lr", "gate_bias_init", "warmup", "gate_delay"):
            check_finite(name, getattr(self, name))
        if not 0.0 < self.separation <= 50.0:
            raise UserError(
                f"separation={self.separation!r} is out of range: use a distance between the means in (0, 50]."
            )
        if not 0.0 <= self.gate_delay < 1.0:
            raise UserError(
                f"gate_delay={self.gate_delay!r} is out of range: use a fraction of the steps in [0, 1)."
            )
        if not 0.0 <= self.warmup < 1.0:
            raise UserError(f"warmup={self.warmup!r} is out of range: use a fraction of the steps in [0, 1).")
        for name in ("lr", "gate_lr"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)!r} must be positive: pass e.g. 0.02.")
        if self.covariance not in ("identity", "random"):
            raise UserError(f"covariance={self.covariance!r} is unknown: use 'identity' or 'random'.")
        if not isinstance(self.mirror, bool):
            raise UserError(f"mirror={self.mirror!r} must be True or False.")
        return self


# ---------------------------------------------------------------------------------------------- problem
@dataclass
class ToyProblem:
    """The regression: frozen W0 (out×d), low-rank Δ (out×d), means μ_FT = +μ, μ_PT = −μ, covariance Σ."""

    w0: torch.Tensor
    delta: torch.Tensor
    mu_ft: torch.Tensor
    mu_pt: torch.Tensor
    cov: torch.Tensor
    delta_up: torch.Tensor  # Δ = delta_up @ delta_down, shapes (out×k) and (k×d)
    delta_down: torch.Tensor

    @property
    def chol(self) -> torch.Tensor:
        return torch.linalg.cholesky(self.cov)

    def sample(self, n: int, population: str, gen: torch.Generator) -> torch.Tensor:
        mu = self.mu_ft if population == "ft" else self.mu_pt
        z = torch.randn(n, mu.numel(), generator=gen, dtype=torch.float64)
        return mu + z @ self.chol.T

    def target(self, x: torch.Tensor, population: str) -> torch.Tensor:
        y = x @ self.w0.T
        return y + x @ self.delta.T if population == "ft" else y


def make_problem(cfg: ToyConfig) -> ToyProblem:
    """Draw W0, Δ (rank ``cfg.rank``), Σ and the mean direction from ``cfg.seed``.

    Only the length of μ depends on ``separation``, so a sweep moves the same populations apart.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    d, o, k = cfg.dim, cfg.out_dim, cfg.rank
    w0 = torch.randn(o, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    up = torch.randn(o, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    down = torch.randn(k, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    if cfg.covariance == "random":
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        eig = torch.exp(
            torch.empty(d, dtype=torch.float64).uniform_(math.log(0.5), math.log(2.0), generator=g)
        )
        cov = (q * eig) @ q.T
        cov = (cov + cov.T) / 2
    else:
        cov = torch.eye(d, dtype=torch.float64)
    direction = torch.randn(d, generator=g, dtype=torch.float64)
    # Scale μ so that the Mahalanobis distance between +μ and −μ equals the separation.
    maha = torch.sqrt(direction @ torch.linalg.solve(cov, direction))
    mu = direction * (cfg.separation / 2.0) / maha
    return ToyProblem(w0=w0, delta=up @ down, mu_ft=mu, mu_pt=-mu, cov=cov, delta_up=up, delta_down=down)


# ----------------------------------------------------------------------------------------------- theory
def second_moment(mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """E[x xᵀ] = Σ + μμᵀ."""
    return cov + torch.outer(mu, mu)


def best_fixed_correction(
    delta: torch.Tensor, m_ft: torch.Tensor, m_pt: torch.Tensor, pi_ft: float = 0.5
) -> torch.Tensor:
    """argmin_C of the mixture loss: ``Δ π M_FT (π M_FT + (1−π) M_PT)⁻¹`` (Δ/2 when M_FT = M_PT, π = ½).

    Setting the gradient of ``π tr((C−Δ)M_FT(C−Δ)ᵀ) + (1−π) tr(C M_PT Cᵀ)`` to zero gives it.
    """
    a = pi_ft * m_ft
    s = a + (1.0 - pi_ft) * m_pt
    # C = Δ A S⁻¹ with S symmetric  <=>  S Cᵀ = A Δᵀ
    return torch.linalg.solve(s, a @ delta.T).T


def fixed_correction_loss(
    c: torch.Tensor, delta: torch.Tensor, m_ft: torch.Tensor, m_pt: torch.Tensor, pi_ft: float = 0.5
) -> dict[str, float]:
    """Exact MSE (mean over outputs) of ``W0 + C`` on each population and on the mixture."""
    out = delta.shape[0]
    e = c - delta
    ft = float(torch.trace(e @ m_ft @ e.T)) / out
    pt = float(torch.trace(c @ m_pt @ c.T)) / out
    return {"mse_ft": ft, "mse_pt": pt, "mse_mix": pi_ft * ft + (1.0 - pi_ft) * pt}


def bayes_gate_parameters(
    mu_ft: torch.Tensor, mu_pt: torch.Tensor, cov: torch.Tensor, pi_ft: float = 0.5
) -> tuple[torch.Tensor, float]:
    """(w, c) with p(FT|x) = sigmoid(w·x + c) for two Gaussians of equal covariance.

    ``w = Σ⁻¹(μ_FT − μ_PT)``, ``c = −½(μ_FTᵀΣ⁻¹μ_FT − μ_PTᵀΣ⁻¹μ_PT) + log(π/(1−π))`` (the prior term is
    0 for the 50/50 mixture).
    """
    w = torch.linalg.solve(cov, mu_ft - mu_pt)
    c = -0.5 * (mu_ft @ torch.linalg.solve(cov, mu_ft) - mu_pt @ torch.linalg.solve(cov, mu_pt))
    return w, float(c) + math.log(pi_ft / (1.0 - pi_ft))


def posterior_ft(x: torch.Tensor, w: torch.Tensor, c: float) -> torch.Tensor:
    return torch.sigmoid(x @ w + c)


def bayes_loss_mc(
    problem: ToyProblem, x_ft: torch.Tensor, x_pt: torch.Tensor, pi_ft: float = 0.5
) -> dict[str, float]:
    """Monte Carlo MSE of the Bayes-optimal correction p(FT|x)Δx on the given (fresh) samples.

    On FT inputs the error is (1−p)Δx, on PT inputs pΔx: the loss is non-zero only where the
    populations overlap.
    """
    w, c = bayes_gate_parameters(problem.mu_ft, problem.mu_pt, problem.cov, pi_ft)
    out = problem.delta.shape[0]
    p_ft = posterior_ft(x_ft, w, c)
    p_pt = posterior_ft(x_pt, w, c)
    ft = float(((1 - p_ft) ** 2 * (x_ft @ problem.delta.T).pow(2).sum(1)).mean()) / out
    pt = float((p_pt**2 * (x_pt @ problem.delta.T).pow(2).sum(1)).mean()) / out
    return {"mse_ft": ft, "mse_pt": pt, "mse_mix": pi_ft * ft + (1.0 - pi_ft) * pt}


# ----------------------------------------------------------------------------------------------- models
class FrozenLinear(nn.Module):
    """The 'pretrained model': one bias-free linear layer holding W0 (the adapters' target is ``linear``)."""

    def __init__(self, w0: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(w0.shape[1], w0.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(w0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def build_method(problem: ToyProblem, method: str, cfg: ToyConfig) -> nn.Module:
    """A model for ``method``: full fine-tuning (W0 itself trainable), PEFT LoRA, or the DISeL layer."""
    import peft

    import disel  # noqa: F401  (registers the DISEL peft type)
    from disel import DiselConfig

    base = FrozenLinear(problem.w0)
    if method == "full":
        return base
    if method == "lora":
        cfg_l = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=["linear"], lora_dropout=0.0)
        return peft.get_peft_model(base, cfg_l)
    if method == "disel":
        cfg_d = DiselConfig(
            r=cfg.rank,
            lora_alpha=cfg.rank,
            target_modules=["linear"],
            lora_dropout=0.0,
            gate_bias_init=cfg.gate_bias_init,
            gate_lr_multiplier=cfg.gate_lr / cfg.lr,
        )
        return peft.get_peft_model(base, cfg_d)
    raise UserError(f"method={method!r} is unknown: use one of {', '.join(METHODS)}.")


def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ToyConfig,
    desc: str = "",
    progress: bool = False,
) -> list[float]:
    """Full-batch AdamW (no decay) with :func:`disel.build_optimizer` groups, linear warmup, cosine decay."""
    from disel import build_optimizer

    opt = build_optimizer(model, lr=cfg.lr, gate_lr=cfg.gate_lr, weight_decay=0.0)
    warm = int(round(cfg.warmup * cfg.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(step - warm, cfg.steps - warm) / max(1, cfg.steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    delay = int(round(cfg.gate_delay * cfg.steps))

    def gate_factor(step: int) -> float:
        # Gates hold still until the low-rank factors point somewhere useful (see ToyConfig).
        return 0.0 if step < delay else factor(step)

    lambdas = [gate_factor if g.get("name") == "gates" else factor for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    losses: list[float] = []
    it: Sequence[int] | Any = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc or "train", leave=False, mininterval=0.5, disable=None)
    model.train()
    for _ in it:
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor],
    problem: ToyProblem,
    x_ft: torch.Tensor,
    x_pt: torch.Tensor,
    pi_ft: float = 0.5,
) -> dict[str, float]:
    ft = float((model(x_ft) - problem.target(x_ft, "ft")).pow(2).mean())
    pt = float((model(x_pt) - problem.target(x_pt, "pt")).pow(2).mean())
    return {"mse_ft": ft, "mse_pt": pt, "mse_mix": pi_ft * ft + (1.0 - pi_ft) * pt}


def disel_layer(model: nn.Module) -> nn.Module:
    from disel import DiselLinear

    layers = [m for m in model.modules() if isinstance(m, DiselLinear)]
    if len(layers) != 1:
        raise RuntimeError(f"expected one DISeL layer in the toy model, found {len(layers)}")
    return layers[0]


@torch.no_grad()
def set_disel_to_bayes(model: nn.Module, problem: ToyProblem) -> None:
    """Write the exact Bayes solution into a DISeL model: U D = Δ and every gate = sigmoid(w·x + c)."""
    layer = disel_layer(model)
    name = layer.active_adapters[0]
    w, c = bayes_gate_parameters(problem.mu_ft, problem.mu_pt, problem.cov)
    scaling = layer.scaling[name]
    layer.lora_A[name].weight.copy_(problem.delta_down)
    layer.lora_B[name].weight.copy_(problem.delta_up / scaling)
    gate = layer.lora_gate[name]
    if gate.proj is not None or gate.logit_scale:
        raise RuntimeError("set_disel_to_bayes needs a plain gate (no bottleneck, no logit scaling)")
    gate.weight.copy_(w.expand_as(gate.weight))
    gate.bias.fill_(c)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else float("nan")


@torch.no_grad()
def gate_report(model: nn.Module, problem: ToyProblem, x: torch.Tensor) -> dict[str, Any]:
    """How close the learned gates are to the Bayes gate p(FT|x), on fresh inputs ``x`` (both populations).

    ``pearson`` is the Pearson correlation of each component's gate with p(FT|x); ``cosine_w`` the cosine
    between each gate weight row and w = Σ⁻¹(μ_FT − μ_PT); also the learned weights' norms and biases
    beside the exact ones.
    """
    layer = disel_layer(model)
    name = layer.active_adapters[0]
    gate = layer.lora_gate[name]
    w, c = bayes_gate_parameters(problem.mu_ft, problem.mu_pt, problem.cov)
    p = posterior_ft(x, w, c)
    g = gate(x)  # (n, r)
    pearson = [_pearson(g[:, i], p) for i in range(g.shape[1])]
    weight = gate.weight if gate.proj is None else gate.weight @ gate.proj.weight
    weight = weight * gate.input_scale
    cos = [float(weight[i] @ w / (weight[i].norm() * w.norm()).clamp_min(1e-300)) for i in range(g.shape[1])]
    return {
        "pearson": pearson,
        "pearson_mean": sum(pearson) / len(pearson),
        "pearson_min": min(pearson),
        "mean_abs_error": float((g - p[:, None]).abs().mean()),
        "cosine_w": cos,
        "learned_weight_norm": [float(weight[i].norm()) for i in range(g.shape[1])],
        "learned_bias": [float(b) for b in gate.bias],
        "exact_weight_norm": float(w.norm()),
        "exact_bias": c,
    }


# ----------------------------------------------------------------------------------------------- runner
def _data(problem: ToyProblem, cfg: ToyConfig) -> dict[str, torch.Tensor]:
    g_train = torch.Generator().manual_seed(cfg.seed + 1)
    g_eval = torch.Generator().manual_seed(cfg.seed + 2)
    x_ft = problem.sample(cfg.samples, "ft", g_train)
    # x ~ N(μ, Σ)  =>  −x ~ N(−μ, Σ) = the PT population.
    x_pt = -x_ft if cfg.mirror else problem.sample(cfg.samples, "pt", g_train)
    x = torch.cat([x_ft, x_pt])
    y = torch.cat([problem.target(x_ft, "ft"), problem.target(x_pt, "pt")])
    return {
        "x": x,
        "y": y,
        "eval_ft": problem.sample(cfg.eval_samples, "ft", g_eval),
        "eval_pt": problem.sample(cfg.eval_samples, "pt", g_eval),
    }


def theory(problem: ToyProblem, x_ft: torch.Tensor, x_pt: torch.Tensor) -> dict[str, Any]:
    """Best fixed correction (analytic) and Bayes-optimal correction (Monte Carlo on x_ft, x_pt)."""
    m_ft = second_moment(problem.mu_ft, problem.cov)
    m_pt = second_moment(problem.mu_pt, problem.cov)
    c_star = best_fixed_correction(problem.delta, m_ft, m_pt)
    w, c = bayes_gate_parameters(problem.mu_ft, problem.mu_pt, problem.cov)
    base = fixed_correction_loss(torch.zeros_like(problem.delta), problem.delta, m_ft, m_pt)
    rel = float((c_star - problem.delta / 2).norm() / problem.delta.norm())
    return {
        "best_fixed": fixed_correction_loss(c_star, problem.delta, m_ft, m_pt),
        "bayes": bayes_loss_mc(problem, x_ft, x_pt),
        "base_model": base,
        "best_fixed_minus_half_delta_rel": rel,
        "bayes_gate": {"w": [float(v) for v in w], "c": c, "w_norm": float(w.norm())},
        "methods": {"best_fixed": "analytic", "bayes": "monte_carlo", "mc_samples_per_population": len(x_ft)},
    }


def run_toy(
    cfg: ToyConfig | None = None,
    methods: Sequence[str] = METHODS,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the problem, compute the theory, train ``methods``; a JSON-ready dict (deterministic per seed)."""
    with torch_threads(1):
        return _run_toy(cfg, methods, progress)


def _run_toy(cfg: ToyConfig | None, methods: Sequence[str], progress: bool) -> dict[str, Any]:
    cfg = (cfg or ToyConfig()).validate()
    for m in methods:
        if m not in METHODS:
            raise UserError(f"method={m!r} is unknown: use one of {', '.join(METHODS)}.")
    problem = make_problem(cfg)
    data = _data(problem, cfg)
    result: dict[str, Any] = {"methods": {}, "theory": theory(problem, data["eval_ft"], data["eval_pt"])}
    x_gate = torch.cat([data["eval_ft"][:20_000], data["eval_pt"][:20_000]])
    train_loss: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        for method in methods:
            torch.manual_seed(cfg.seed * 1000 + 3 + METHODS.index(method))
            model = build_method(problem, method, cfg)
            losses = train_model(model, data["x"], data["y"], cfg, desc=f"toy {method}", progress=progress)
            train_loss[method] = losses[-1]
            result["methods"][method] = evaluate(model, problem, data["eval_ft"], data["eval_pt"])
            if method == "disel":
                result["gates"] = gate_report(model, problem, x_gate)
                result["gate_correlation"] = result["gates"]["pearson_mean"]
        # The exact Bayes parameters written into a fresh DISeL layer: it realises the Bayes loss.
        exact = build_method(problem, "disel", cfg)
        set_disel_to_bayes(exact, problem)
        result["theory"]["bayes_by_disel_layer"] = evaluate(exact, problem, data["eval_ft"], data["eval_pt"])
    result["train_loss"] = train_loss
    result["config"] = asdict(cfg)
    return result


def run_sweep(
    cfg: ToyConfig | None = None,
    separations: Sequence[float] = DEFAULT_SWEEP,
    methods: Sequence[str] = ("lora", "disel"),
    progress: bool = False,
) -> dict[str, Any]:
    """Mixture MSE of best-fixed, Bayes and the learned methods against the separation of the means."""
    cfg = (cfg or ToyConfig()).validate()
    if not separations:
        raise UserError("The sweep needs at least one separation: pass e.g. --sweep 1,2,3.")
    rows = []
    it: Any = separations
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(separations, desc="toy sweep", disable=None)
    for s in it:
        r = run_toy(replace(cfg, separation=float(s)), methods=methods, progress=False)
        row = {
            "separation": float(s),
            "best_fixed": r["theory"]["best_fixed"]["mse_mix"],
            "bayes": r["theory"]["bayes"]["mse_mix"],
            "base_model": r["theory"]["base_model"]["mse_mix"],
        }
        for m in methods:
            row[m] = r["methods"][m]["mse_mix"]
        if "disel" in methods:
            row["gate_correlation"] = r["gate_correlation"]
        rows.append(row)
    return {"sweep": rows, "methods": list(methods), "config": asdict(cfg)}


# ---------------------------------------------------------------------------------------------- outputs
def format_table(result: dict[str, Any]) -> str:
    """Markdown table: MSE per population for every method beside the theory, and the ratio to Bayes."""
    bayes = result["theory"]["bayes"]["mse_mix"]
    lines = [
        "| row | MSE FT | MSE PT | MSE mixture | mixture / Bayes |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [(m, result["methods"][m]) for m in result["methods"]]
    rows += [
        ("theory: best fixed (analytic)", result["theory"]["best_fixed"]),
        ("theory: Bayes p(FT|x)Δx (Monte Carlo)", result["theory"]["bayes"]),
        ("DISeL layer at exact Bayes gate", result["theory"]["bayes_by_disel_layer"]),
        ("base model (no correction)", result["theory"]["base_model"]),
    ]
    for name, v in rows:
        lines.append(
            f"| {name} | {v['mse_ft']:.5f} | {v['mse_pt']:.5f} | {v['mse_mix']:.5f} | {v['mse_mix'] / bayes:.2f} |"
        )
    return "\n".join(lines)


def plot_bars(result: dict[str, Any], path: str | Path) -> Path:
    """Figure-1-like bars: MSE on FT, PT and mixture per method, with best-fixed and Bayes lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.io import save_figure

    methods = list(result["methods"])
    labels = {"full": "full FT", "lora": "LoRA", "disel": "DISeL"}
    pops = [("mse_ft", "fine-tuning inputs"), ("mse_pt", "pre-training inputs"), ("mse_mix", "mixture")]
    colors = ["#1f77b4", "#ff7f0e", "#7f7f7f"]
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    width = 0.26
    for j, (key, label) in enumerate(pops):
        xs = [i + (j - 1) * width for i in range(len(methods))]
        ax.bar(xs, [result["methods"][m][key] for m in methods], width, label=label, color=colors[j])
    bf = result["theory"]["best_fixed"]["mse_mix"]
    by = result["theory"]["bayes"]["mse_mix"]
    ax.axhline(bf, color="black", ls="--", lw=1.2, label=f"best fixed correction ({bf:.4f})")
    ax.axhline(by, color="green", ls=":", lw=1.6, label=f"Bayes p(FT|x)Δx ({by:.4f})")
    ax.set_xticks(range(len(methods)), [labels.get(m, m) for m in methods])
    ax.set_ylabel("MSE (mean over outputs)")
    c = result["config"]
    ax.set_title(
        f"Two-population regression: d={c['dim']}, rank(Δ)={c['rank']}, separation={c['separation']:g}"
    )
    top = max(max(result["methods"][m][k] for m in methods for k, _ in pops), bf)
    ax.set_ylim(0, top * 1.45)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sweep(sweep: dict[str, Any], path: str | Path) -> Path:
    """Mixture MSE (as a fraction of the base model's) against separation: the gap closes as they separate."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.io import save_figure

    rows = sweep["sweep"]
    s = [r["separation"] for r in rows]

    def rel(key: str) -> list[float]:
        return [r[key] / r["base_model"] for r in rows]

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.plot(s, rel("best_fixed"), "k--", label="best fixed correction (theory)")
    ax.plot(s, rel("bayes"), "g:", lw=2, label="Bayes p(FT|x)Δx (theory)")
    styles = {"lora": ("s-", "#ff7f0e", "LoRA (learned)"), "disel": ("o-", "#1f77b4", "DISeL (learned)")}
    styles["full"] = ("^-", "#7f7f7f", "full FT (learned)")
    for m in sweep["methods"]:
        mk, col, lab = styles[m]
        ax.plot(s, rel(m), mk, color=col, label=lab, ms=4)
    ax.set_yscale("log")
    ax.set_xlabel("separation of the means (Mahalanobis distance)")
    ax.set_ylabel("mixture MSE / base-model mixture MSE")
    ax.set_title("A fixed update cannot separate; an input gate can")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
