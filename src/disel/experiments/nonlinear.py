"""Noisy non-linear regression (the Queryable LoRA paper's toy setting, reconstructed).

A frozen "pretrained" MLP f0 (3 linear layers, tanh) maps x in R^d to y. The fine-tuning target differs from
f0 by a correction that depends on the input region: the input space is cut into K regions by the argmax
of K random directions, and region k's target is f0 with a rank-2 change Δ_k of its middle layer. Labels
carry Gaussian noise. LoRA, DISeL and Queryable LoRA adapt every layer of f0 at (nearly) equal numbers of
trainable parameters; we report clean test MSE over seeds and the training-loss stability (std of the
loss over the last quarter of training).

Sizes (defaults): d = 8, hidden 48, K = 4 regions, 2,000 training and 4,000 test points, noise std 0.1,
parameter budget = LoRA at rank 4; full-batch Adam, 600 steps, 3 seeds.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..utils.validate import check_int

METHODS = ("lora", "disel", "queryable")


@dataclass
class NonlinearConfig:
    dim: int = 8
    hidden: int = 48
    regions: int = 4
    train_samples: int = 2000
    test_samples: int = 4000
    noise: float = 0.1
    correction: float = 15.0  # size of each region's rank-2 change of the middle layer (times 1/hidden)
    budget_rank: int = 4  # the parameter budget is LoRA's at this rank
    steps: int = 600
    lr: float = 1e-2
    seeds: int = 3
    seed: int = 0
    num_atoms: int = 4
    top_k: int = 2

    def __post_init__(self) -> None:
        for name in (
            "dim",
            "hidden",
            "regions",
            "train_samples",
            "test_samples",
            "budget_rank",
            "steps",
            "seeds",
        ):
            check_int(name, getattr(self, name))
        if self.noise < 0:
            raise UserError(f"noise={self.noise!r} is invalid: use a standard deviation >= 0.")
        if not 1 <= self.top_k <= self.num_atoms:
            raise UserError(f"top_k={self.top_k!r} is invalid: use 1 <= top_k <= num_atoms={self.num_atoms}.")


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.layers[0](x))
        x = torch.tanh(self.layers[1](x))
        return self.layers[2](x).squeeze(-1)


def _task(cfg: NonlinearConfig, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    f0 = MLP(cfg.dim, cfg.hidden)
    dirs = torch.randn(cfg.regions, cfg.dim, generator=g)
    deltas = [
        torch.randn(cfg.hidden, 2, generator=g)
        @ torch.randn(2, cfg.hidden, generator=g)
        * (cfg.correction / cfg.hidden)
        for _ in range(cfg.regions)
    ]

    @torch.no_grad()
    def target(x: torch.Tensor) -> torch.Tensor:
        region = (x @ dirs.T).argmax(-1)
        h = torch.tanh(f0.layers[0](x))
        base_mid = f0.layers[1](h)
        out = torch.empty(x.shape[0])
        for k in range(cfg.regions):
            m = region == k
            mid = base_mid[m] + h[m] @ deltas[k].T
            out[m] = f0.layers[2](torch.tanh(mid)).squeeze(-1)
        return out

    x_tr = torch.randn(cfg.train_samples, cfg.dim, generator=g)
    x_te = torch.randn(cfg.test_samples, cfg.dim, generator=g)
    y_tr = target(x_tr) + cfg.noise * torch.randn(cfg.train_samples, generator=g)
    return {"f0": f0, "x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": target(x_te)}


def _targets() -> list[str]:
    return ["layers.0", "layers.1", "layers.2"]


def trainable_params(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _build(method: str, f0: nn.Module, rank: int, cfg: NonlinearConfig) -> nn.Module:
    import copy

    from peft import LoraConfig, get_peft_model

    import disel
    from disel.methods.queryable import QueryableConfig

    base = copy.deepcopy(f0)
    common = dict(r=rank, lora_alpha=rank, target_modules=_targets())
    if method == "lora":
        return get_peft_model(base, LoraConfig(**common))
    if method == "disel":
        return get_peft_model(base, disel.DiselConfig(**common, gate_bias_init=-1.0))
    return get_peft_model(
        base,
        QueryableConfig(**common, num_atoms=cfg.num_atoms, top_k=cfg.top_k, key_dim=8, block_size=1),
    )


def match_ranks(cfg: NonlinearConfig, f0: nn.Module) -> dict[str, tuple[int, int]]:
    """Per method, the largest rank whose trainable-parameter count fits LoRA's at ``budget_rank``."""
    budget = trainable_params(_build("lora", f0, cfg.budget_rank, cfg))
    out = {}
    for method in METHODS:
        best = (1, trainable_params(_build(method, f0, 1, cfg)))
        for r in range(2, 4 * cfg.budget_rank + 1):
            n = trainable_params(_build(method, f0, r, cfg))
            if n > budget:
                break
            best = (r, n)
        out[method] = best
    return out


def _fit(model: nn.Module, data: dict[str, Any], cfg: NonlinearConfig) -> dict[str, float]:
    import disel

    opt = disel.build_optimizer(model, lr=cfg.lr, gate_lr=cfg.lr * 5)
    losses = []
    model.train()
    for _ in range(cfg.steps):
        loss = (model(data["x_tr"]) - data["y_tr"]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        mse = (model(data["x_te"]) - data["y_te"]).pow(2).mean().item()
    tail = torch.tensor(losses[-max(1, cfg.steps // 4) :])
    return {"test_mse": mse, "final_train_loss": losses[-1], "train_loss_std_tail": tail.std().item()}


def run_nonlinear(cfg: NonlinearConfig | None = None, progress: bool = False) -> dict[str, Any]:
    """Train every method on every seed; returns per-method mean/std of test MSE and parameter counts."""
    from tqdm.auto import tqdm

    cfg = cfg or NonlinearConfig()
    t0 = time.perf_counter()
    per_method: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    ranks: dict[str, tuple[int, int]] = {}
    base_mse = []
    bar = tqdm(total=cfg.seeds * len(METHODS), desc="nonlinear", disable=not progress)
    for s in range(cfg.seeds):
        data = _task(cfg, cfg.seed + s)
        if not ranks:
            ranks = match_ranks(cfg, data["f0"])
        with torch.no_grad():
            base_mse.append((data["f0"](data["x_te"]) - data["y_te"]).pow(2).mean().item())
        for method in METHODS:
            torch.manual_seed(cfg.seed + 1000 * s + 1)
            model = _build(method, data["f0"], ranks[method][0], cfg)
            per_method[method].append(_fit(model, data, cfg))
            bar.update(1)
    bar.close()

    def stats(vals: list[float]) -> tuple[float, float]:
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / max(1, len(vals) - 1)) if len(vals) > 1 else 0.0
        return m, sd

    methods = {}
    for method, runs in per_method.items():
        mse_m, mse_sd = stats([r["test_mse"] for r in runs])
        stab_m, _ = stats([r["train_loss_std_tail"] for r in runs])
        methods[method] = {
            "rank": ranks[method][0],
            "trainable_params": ranks[method][1],
            "test_mse_mean": mse_m,
            "test_mse_std": mse_sd,
            "train_loss_std_tail": stab_m,
            "runs": runs,
        }
    return {
        "task": "nonlinear",
        "methods": methods,
        "base_test_mse": stats(base_mse)[0],
        "noise_floor": 0.0,
        "config": asdict(cfg),
        "wall_seconds": time.perf_counter() - t0,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        "| method | rank | trainable params | test MSE (mean ± std) | train-loss std, last quarter |",
        "|---|---|---|---|---|",
        f"| base (no fine-tuning) | – | 0 | {result['base_test_mse']:.4f} | – |",
    ]
    for name, m in result["methods"].items():
        lines.append(
            f"| {name} | {m['rank']} | {m['trainable_params']} | {m['test_mse_mean']:.4f} ± "
            f"{m['test_mse_std']:.4f} | {m['train_loss_std_tail']:.2e} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Any) -> Any:
    """Bar chart of test MSE (mean ± std over seeds) per method, with the base model's MSE as a line."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.io import save_figure

    names = list(result["methods"])
    means = [result["methods"][n]["test_mse_mean"] for n in names]
    stds = [result["methods"][n]["test_mse_std"] for n in names]
    labels = [
        f"{n}\nr={result['methods'][n]['rank']}, {result['methods'][n]['trainable_params']} params"
        for n in names
    ]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(labels, means, yerr=stds, capsize=4, color=["tab:blue", "tab:orange", "tab:green"][: len(names)])
    ax.axhline(result["base_test_mse"], color="gray", ls="--", label="base model (no fine-tuning)")
    ax.set_ylabel("clean test MSE")
    ax.set_title("Noisy non-linear regression at equal trainable parameters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
