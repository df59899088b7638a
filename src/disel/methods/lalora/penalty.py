"""The Laplace penalty (lambda/2)(theta - theta0)^T P (theta - theta0), attached to a model, saved and loaded.

The penalty object lives on the model as ``model._lalora`` and in ``model._disel_regularizers`` (the
project-wide contract: the training loop adds the sum of those zero-argument callables to the task loss).
It is a plain object, not an ``nn.Module``, so it never enters the adapter's state dict; its tensors are
saved separately by :func:`save_curvature` as ``lalora_curvature.safetensors`` beside the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ...utils.io import atomic_write_bytes
from .curvature import CurvatureState

CURVATURE_FILE = "lalora_curvature.safetensors"
FORMAT = "disel-lalora-v1"


class LaplacePenalty:
    """``(lam/2) * sum_blocks d^T (P + prior_prec I) d`` with ``d = theta - theta0``.

    Diagonal blocks: ``sum(P * d**2)``. Kronecker blocks ``P = A (x) G`` for a weight of shape out x in:
    ``vec(d)^T (A (x) G) vec(d) = sum(d * (G @ d @ A))`` (column-major vec), never forming the Kronecker
    product. ``lam = 0`` returns a constant zero without touching the parameters, so training is exactly
    plain LoRA/DISeL training.
    """

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        theta0: dict[str, torch.Tensor],
        state: CurvatureState,
        lam: float = 1.0,
        prior_prec: float = 0.0,
    ) -> None:
        missing = [n for n in list(state.diag) + list(state.kfac) if n not in params]
        if missing:
            raise UserError(f"Curvature names parameters the model lacks ({missing[0]!r}); rebuild it.")
        self.params = params
        self.theta0 = {n: t.detach().clone() for n, t in theta0.items()}
        self.state = state
        self.lam = _check_lam(lam)
        self.prior_prec = float(prior_prec)
        if self.prior_prec < 0:
            raise UserError(f"prior_prec={prior_prec!r} is invalid: use a value >= 0.")
        self._cache: dict[tuple[str, str, torch.device, torch.dtype], torch.Tensor] = {}

    def _on(self, key: str, part: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ck = (key, part, like.device, like.dtype)
        if ck not in self._cache:
            self._cache[ck] = t.to(device=like.device, dtype=like.dtype)
        return self._cache[ck]

    def quadratic(self) -> torch.Tensor:
        """d^T (P + prior I) d summed over all blocks (no lambda, no 1/2)."""
        total: torch.Tensor | None = None
        for name, p in self.params.items():
            d = p - self._on(name, "theta0", self.theta0[name], p)
            if name in self.state.diag:
                q = (self._on(name, "diag", self.state.diag[name], p) * d * d).sum()
            elif name in self.state.kfac:
                A, G = self.state.kfac[name]
                q = (d * (self._on(name, "G", G, p) @ d @ self._on(name, "A", A, p))).sum()
            else:
                q = d.new_zeros(())
            if self.prior_prec:
                q = q + self.prior_prec * (d * d).sum()
            total = q if total is None else total + q
        if total is None:
            raise UserError("The LaLoRA penalty has no parameters; estimate the curvature first.")
        return total

    def __call__(self) -> torch.Tensor:
        if self.lam == 0.0:
            p = next(iter(self.params.values()))
            return torch.zeros((), device=p.device, dtype=p.dtype)
        return 0.5 * self.lam * self.quadratic()

    def distance(self) -> float:
        """Euclidean ||theta - theta0|| over the penalised parameters (for plots and tests)."""
        with torch.no_grad():
            sq = sum(float(((p - self.theta0[n].to(p)) ** 2).sum()) for n, p in self.params.items())
        return sq**0.5


def _check_lam(lam: Any) -> float:
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise UserError(f"lam={lam!r} is invalid: use a number >= 0 such as 1.0.") from None
    if not value >= 0.0 or value == float("inf"):
        raise UserError(f"lam={lam!r} is invalid: use a finite number >= 0 such as 1.0.")
    return value


def attach(model: nn.Module, reg: LaplacePenalty) -> LaplacePenalty:
    """Put ``reg`` on ``model`` (replacing an earlier LaLoRA penalty) and in ``_disel_regularizers``."""
    old = getattr(model, "_lalora", None)
    regs = [r for r in getattr(model, "_disel_regularizers", []) if r is not old]
    regs.append(reg)
    object.__setattr__(model, "_lalora", reg)
    object.__setattr__(model, "_disel_regularizers", regs)
    return reg


def get_penalty(model: nn.Module) -> LaplacePenalty:
    reg = getattr(model, "_lalora", None)
    if not isinstance(reg, LaplacePenalty):
        raise UserError("This model has no LaLoRA penalty; build it with method 'lalora' or 'disel+lalora'.")
    return reg


def penalty(model: nn.Module) -> torch.Tensor:
    """The model's LaLoRA penalty as a scalar tensor, for plain training loops: ``loss + penalty(model)``."""
    return get_penalty(model)()


def set_lambda(model: nn.Module, lam: float) -> None:
    get_penalty(model).lam = _check_lam(lam)


def regularizers(model: nn.Module) -> list:
    return list(getattr(model, "_disel_regularizers", []))


def save_curvature(model: nn.Module, directory: str | Path) -> Path:
    """Write theta0 and the precision blocks to ``directory/lalora_curvature.safetensors`` (atomically)."""
    from safetensors.torch import save

    reg = get_penalty(model)
    st = reg.state
    tensors: dict[str, torch.Tensor] = {}
    for n, t in reg.theta0.items():
        tensors[f"{n}::theta0"] = t.detach().cpu().contiguous()
    for n, t in st.diag.items():
        tensors[f"{n}::diag"] = t.detach().cpu().contiguous()
    for n, (A, G) in st.kfac.items():
        tensors[f"{n}::kfac_A"] = A.detach().cpu().contiguous()
        tensors[f"{n}::kfac_G"] = G.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "curvature": st.curvature,
        "fisher": st.fisher,
        "lam": repr(reg.lam),
        "prior_prec": repr(reg.prior_prec),
        "tokens": str(st.tokens),
        "info": json.dumps(st.info),
    }
    path = Path(directory) / CURVATURE_FILE
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def load_curvature(model: nn.Module, directory: str | Path, lam: float | None = None) -> LaplacePenalty:
    """Read ``directory/lalora_curvature.safetensors`` and attach its penalty to ``model`` (resume).

    The parameter names must match ``model.named_parameters()`` (same base model and adapter layout).
    ``lam`` overrides the saved lambda.
    """
    from safetensors import safe_open

    path = Path(directory) / CURVATURE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: save it with save_curvature(model, dir) first.")
    named = dict(model.named_parameters())
    theta0: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} is not a LaLoRA curvature file ({FORMAT}); re-estimate the curvature.")
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            name, _, part = key.rpartition("::")
            if name not in named:
                raise UserError(
                    f"{path} names parameter {name!r} that the model lacks; load it into the same adapter layout."
                )
            if part == "theta0":
                theta0[name] = f.get_tensor(key)
            else:
                parts.setdefault(name, {})[part] = f.get_tensor(key)
    st = CurvatureState(curvature=meta["curvature"], fisher=meta["fisher"], tokens=int(meta.get("tokens", 0)))
    st.info = json.loads(meta.get("info", "{}"))
    for name, d in parts.items():
        if "diag" in d:
            st.diag[name] = d["diag"]
        if "kfac_A" in d:
            st.kfac[name] = (d["kfac_A"], d["kfac_G"])
    params = {n: named[n] for n in theta0}
    for n, t in theta0.items():
        if tuple(t.shape) != tuple(named[n].shape):
            raise UserError(
                f"{path}: parameter {n!r} has shape {tuple(t.shape)}, the model's differs; rebuild."
            )
    reg = LaplacePenalty(
        params,
        theta0,
        st,
        lam=float(meta["lam"]) if lam is None else lam,
        prior_prec=float(meta.get("prior_prec", "0.0")),
    )
    return attach(model, reg)


def checkpoint_callback() -> Any:
    """A ``transformers.TrainerCallback`` that writes the curvature into every ``checkpoint-<step>/``.

    So a run resumed from any checkpoint can ``load_curvature`` from that same directory.
    """
    from transformers import TrainerCallback

    class LaLoRACheckpointCallback(TrainerCallback):
        def on_save(
            self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any
        ) -> None:
            lalora = isinstance(getattr(model, "_lalora", None), LaplacePenalty)
            if model is not None and lalora and state.is_world_process_zero:
                save_curvature(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return LaLoRACheckpointCallback()
