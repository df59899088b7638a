"""Build CorDA / CorDA++ models on top of PEFT, recover the original base, and export to plain LoRA.

CorDA rewrites each targeted base weight to the residual ``W − s·B₀A₀`` so that residual + adapter equals
the original weight at initialisation. Consequences handled here:
- ``model.disable_adapter()`` gives the residual model, not the base: :func:`original_base` /
  :func:`original_base_state` restore the true base from the residual and the initial adapter.
- A trained CorDA adapter only works on the residual; :func:`export_to_lora` converts it (PEFT's
  ``path_initial_model_for_weight_conversion``) to a rank-2r plain LoRA adapter for the original base.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ..registry import MethodOptions
from .covariance import get_covariances, materialize
from .plusplus import Allocation, Selection, allocate_ranks, energy_spectrum, layer_weight, select_covariances

MODES = ("kpm", "ipm")


@dataclass
class CordaInfo:
    """What a CorDA build leaves on the model (``model._corda_info``)."""

    method: str  # "corda" or "corda++"
    mode: str
    targets: list[str]  # module names in the original model
    ranks: dict[str, int]
    cache_key: str
    cache_hit: bool
    tokens: list[int]
    data: str = "calibration"  # the MethodOptions field the covariance came from
    balanced: bool = False  # factors rescaled to equal norms per component (``balance`` setting)
    # original-model module name -> (A0, B0, scaling, fan_in_fan_out), on CPU
    initial_layers: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = field(default_factory=dict)
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT-format adapter state dict
    selection: Selection | None = None
    allocation: Allocation | None = None
    adapter_name: str = "default"

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "mode": self.mode,
            "ranks": dict(self.ranks),
            "cache_key": self.cache_key,
            "cache_hit": self.cache_hit,
            "calibration_data": self.data,
            "calibration_tokens": list(self.tokens),
            "balanced": self.balanced,
        }
        if self.selection is not None:
            out["chosen_candidate"] = dict(self.selection.chosen)
        if self.allocation is not None:
            out["budget"] = self.allocation.budget
            out["spent"] = self.allocation.spent
        return out


@dataclass
class CordaOptions:
    """CorDA's options (``method.options``); LoRA's own fields (e.g. ``lora_bias``) are accepted too."""

    mode: str = "kpm"  # "kpm": keep the calibration data's knowledge; "ipm": preview the task
    progress: bool = True
    cache_dir: str | None = None  # covariance cache (safetensors) shared by runs on the same data
    balance: bool = False  # rescale A and B to equal norms per component after the decomposition


@dataclass
class CordaPlusPlusOptions:
    """CorDA++'s own options, beside :class:`CordaOptions`."""

    num_candidates: int = 3  # covariance subsets to choose from per layer
    include_pooled: bool = True  # the pooled covariance is a candidate too
    budget: int | None = None  # adapter parameters in all; default rank x the layers' costs
    allocate_ranks: bool = True
    min_rank: int = 1
    max_rank: int | None = None  # default 4 x rank


def _settings(o: MethodOptions, method: str) -> dict[str, Any]:
    s = asdict(CordaOptions(**o.pick(CordaOptions)))
    if method == "corda++":
        s.update(asdict(CordaPlusPlusOptions(**o.pick(CordaPlusPlusOptions))))
    mode = str(s["mode"]).lower()
    if mode not in MODES:
        raise UserError(f"CorDA mode={s['mode']!r} is invalid: use 'kpm' (keep knowledge) or 'ipm' (task).")
    s["mode"] = mode
    return s


def resolve_targets(model: nn.Module, o: MethodOptions) -> dict[str, nn.Module]:
    """The Linear/Conv1D modules PEFT would adapt for ``o.target_modules`` (``all-linear`` expanded)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    if hasattr(model, "peft_config"):
        raise UserError("CorDA must be applied to a plain base model: pass the model before get_peft_model.")
    kw = o.peft_common()
    cfg = LoraConfig(
        **{k: v for k, v in kw.items() if k in ("r", "lora_alpha", "target_modules", "task_type")}
    )
    cfg = _maybe_include_all_linear_layers(cfg, model)
    skip = set(o.modules_to_save or [])
    if (o.task_type or "").upper() == "SEQ_CLS":
        # PEFT trains the new head whole (modules_to_save): not a CorDA target
        skip |= {"classifier", "score"}
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, Conv1D)):
            continue
        if any(name == s or name.endswith("." + s) or f".{s}." in f".{name}." for s in skip):
            continue
        if check_target_module_exists(cfg, name):
            out[name] = mod
    if not out:
        raise UserError(
            f"target_modules={o.target_modules!r} matches no Linear layer of this model: name existing "
            "linear layers or use 'all-linear'."
        )
    return out


def calibration_source(o: MethodOptions, mode: str) -> tuple[Any, str]:
    """The batch factory CorDA reads in ``mode``: KPM the knowledge to keep, IPM the fine-tuning task.

    IPM without ``task_calibration`` is an error rather than a silent fall-back to ``calibration``: that
    field holds the data to *keep*, and IPM on it adapts exactly the directions it should protect (on the
    demo this wiped out retention: exp(-NLL) 0.025 -> 0.0007).
    """
    if mode == "ipm":
        if o.task_calibration is None:
            raise UserError(
                "CorDA mode 'ipm' previews the fine-tuning task and needs task_calibration=<zero-argument "
                "callable returning batches of task examples> in MethodOptions (calibration= holds the "
                "knowledge to keep and is read by mode 'kpm')."
            )
        return o.task_calibration, "task_calibration"
    return o.calibration, "calibration"


@torch.no_grad()
def balance_factors(model: nn.Module, names: list[str], adapter: str = "default") -> None:
    """Rescale each rank-one component ``(b_i, a_i)`` to equal norms, keeping ``B A`` (so the init) unchanged.

    PEFT's CorDA puts ``√σ_i · v_iᵀ Ĉ⁻¹`` in ``A`` and ``√σ_i · u_i`` in ``B``. In KPM the kept directions are
    the ones the calibration data barely excites, where ``Ĉ⁻¹`` is ~1/damping: rows of ``A`` get norms in the
    hundreds while ``B`` is tiny. Adam moves every entry by about ``lr``, so a step on ``B`` is amplified by
    ``‖A x‖``: the adapter learns (and drifts) far faster than LoRA at the same learning rate. Equal norms
    give the same product with LoRA-like step sizes (see docs/corda.md for the numbers).
    """
    inner = model.base_model.model
    for n in names:
        layer = inner.get_submodule(n)
        a = layer.lora_A[adapter].weight
        b = layer.lora_B[adapter].weight
        na, nb = a.float().norm(dim=1), b.float().norm(dim=0)
        d = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-30)).sqrt(), torch.ones_like(na))
        a.mul_(d.to(a.dtype)[:, None])
        b.div_(d.to(b.dtype)[None, :])


def _cost(mod: nn.Module) -> int:
    w = layer_weight(mod)
    return int(w.shape[0] + w.shape[1])


def build_corda(model: nn.Module, o: MethodOptions, method: str = "corda") -> nn.Module:
    """CorDA (``method='corda'``) or CorDA++ (``'corda++'``) as a PEFT LoRA model on ``model``."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.utils import get_peft_model_state_dict

    s = _settings(o, method)
    mode = s["mode"]
    progress = bool(s.get("progress", True))
    targets = resolve_targets(model, o)
    source, field_name = calibration_source(o, mode)
    batches = materialize(source, field_name)
    plus = method == "corda++"
    k = int(s.get("num_candidates", 3)) if plus else 1
    k = max(1, min(k, len(batches)))
    cs = get_covariances(
        model, targets, batches, num_subsets=k, cache_dir=s.get("cache_dir"), progress=progress
    )

    selection: Selection | None = None
    allocation: Allocation | None = None
    ranks = {n: min(o.rank, min(layer_weight(m).shape)) for n, m in targets.items()}
    if plus:
        cands = {n: list(cs.covs[n]) for n in targets}
        if k > 1 and bool(s.get("include_pooled", True)):
            for n in targets:
                cands[n].append(cs.pooled(n))
        weights = {n: layer_weight(m) for n, m in targets.items()}
        selection = select_covariances(weights, cands, o.rank, mode)
        chosen = {n: cands[n][selection.chosen[n]] for n in targets}
        costs = {n: _cost(m) for n, m in targets.items()}
        budget = s.get("budget")
        budget = int(budget) if budget is not None else sum(o.rank * c for c in costs.values())
        if s.get("allocate_ranks", True):
            spectra = {n: energy_spectrum(weights[n], chosen[n]) for n in targets}
            allocation = allocate_ranks(
                spectra,
                costs,
                budget,
                mode,
                min_rank=int(s.get("min_rank", 1)),
                max_rank=int(s["max_rank"] or 4 * o.rank),
            )
            ranks = allocation.ranks
    else:
        chosen = {n: cs.pooled(n) for n in targets}

    names = sorted(targets)
    lora_kw = o.peft_common()
    lora_kw["target_modules"] = names
    rank_pattern = {re.escape(n): r for n, r in ranks.items() if r != o.rank}
    tmp = tempfile.mkdtemp(prefix="disel-corda-")
    try:
        # PEFT reads covariance_file with torch.load: it only ever sees this file, written by us just now in a
        # private temp dir (and torch >= 2.6 loads with weights_only=True). The persistent cache is safetensors.
        cov_file = os.path.join(tmp, "covariance.pt")
        torch.save({n: chosen[n].float().to(next(model.parameters()).device) for n in names}, cov_file)
        cfg = LoraConfig(
            **{
                **o.pick(LoraConfig),
                **lora_kw,
                "init_lora_weights": "corda",
                "rank_pattern": rank_pattern,
                "corda_config": CordaConfig(corda_method=mode, covariance_file=cov_file, verbose=False),
            }
        )
        preprocess_corda(model, cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peft_model = get_peft_model(model, cfg)
    # Drop PEFT's pointer to the deleted covariance file so saved configs carry no stale path.
    peft_model.peft_config["default"].corda_config = None
    balanced = bool(s.get("balance", False))
    if balanced:
        balance_factors(peft_model, names)

    info = CordaInfo(
        method=method,
        mode=mode,
        targets=names,
        ranks=dict(ranks),
        cache_key=cs.key,
        cache_hit=cs.from_cache,
        tokens=list(cs.tokens),
        data=field_name,
        balanced=balanced,
        selection=selection,
        allocation=allocation,
    )
    inner = peft_model.base_model.model
    for n in names:
        layer = inner.get_submodule(n)
        a0 = layer.lora_A["default"].weight.detach().float().cpu().clone()
        b0 = layer.lora_B["default"].weight.detach().float().cpu().clone()
        info.initial_layers[n] = (a0, b0, float(layer.scaling["default"]), bool(layer.fan_in_fan_out))
    info.initial_state = {
        key: v.detach().cpu().clone()
        for key, v in get_peft_model_state_dict(peft_model, adapter_name="default").items()
    }
    peft_model._corda_info = info
    return peft_model


def corda_info(model: nn.Module) -> CordaInfo:
    info = getattr(model, "_corda_info", None)
    if info is None:
        raise UserError(
            "This model was not built with disel's 'corda' or 'corda++' method: build it with "
            "disel.methods.build_model(model, 'corda', ...)."
        )
    return info


@torch.no_grad()
def original_base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ORIGINAL base weights of every CorDA-rewritten layer, keyed like the base model's state dict.

    Rebuilt as residual + s·B₀A₀ from the initial adapter (exact in float32; within one rounding step of
    the residual's dtype for fp16/bf16 models).
    """
    from peft.utils import transpose

    info = corda_info(model)
    inner = model.base_model.model
    out = {}
    for n, (a0, b0, scale, fifo) in info.initial_layers.items():
        base = inner.get_submodule(n).get_base_layer()
        w = base.weight
        delta = transpose((b0 @ a0) * scale, fifo).to(w.device)
        out[f"{n}.weight"] = (w.detach().float() + delta).to(w.dtype)
    return out


@contextlib.contextmanager
def original_base(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model`` computes exactly the ORIGINAL base model (adapter off, weights restored).

    Use this, not ``disable_adapter()``, for retention baselines of CorDA models.
    """
    orig = original_base_state(model)
    inner = model.base_model.model
    saved = {}
    with torch.no_grad():
        for key, w in orig.items():
            base = inner.get_submodule(key.rsplit(".", 1)[0]).get_base_layer()
            saved[key] = base.weight.data
            base.weight.data = w
    try:
        with model.disable_adapter():
            yield model
    finally:
        with torch.no_grad():
            for key, w in saved.items():
                inner.get_submodule(key.rsplit(".", 1)[0]).get_base_layer().weight.data = w


def save_initial_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the CorDA adapter as it was at initialisation (PEFT format, ``init_lora_weights=True``).

    Keep it next to a run's checkpoints so :func:`export_to_lora` can convert them in another process.
    """
    from safetensors.torch import save_file

    info = corda_info(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(model.peft_config[info.adapter_name])
    cfg.init_lora_weights = True
    cfg.corda_config = None
    cfg.save_pretrained(str(directory))
    save_file(
        {k: v.contiguous() for k, v in info.initial_state.items()},
        str(directory / "adapter_model.safetensors"),
    )
    return directory


def export_to_lora(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    initial_adapter_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Save the (trained) CorDA adapter as a plain LoRA adapter for the ORIGINAL base model.

    ``ΔW = s(BA − B₀A₀) = s[B | −B₀][A ; A₀]``: a rank-2r LoRA (PEFT's conversion). Load it with
    ``PeftModel.from_pretrained(original_base_model, out_dir)``. ``initial_adapter_dir`` is the
    :func:`save_initial_adapter` directory; by default the initial adapter kept on the model is used.
    Written to a temporary directory and renamed, so ``out_dir`` is never half-written.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"export path {out_dir} is a file: give a directory path.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if initial_adapter_dir is None:
            init_dir = save_initial_adapter(model, work / "corda_initial")
        else:
            src = Path(initial_adapter_dir)
            if not (src / "adapter_model.safetensors").is_file():
                raise UserError(
                    f"initial_adapter_dir={src} has no adapter_model.safetensors: pass the directory written "
                    "by save_initial_adapter."
                )
            init_dir = Path(shutil.copytree(src, work / "corda_initial"))
        target = work / "lora"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*changes the base weights.*")
            model.save_pretrained(
                str(target),
                path_initial_model_for_weight_conversion=str(init_dir),
                selected_adapters=["default"],
            )
        # PEFT's conversion keeps only lora_A/lora_B; put back modules_to_save etc. (heads) unchanged.
        extras = {
            k: v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(model).items()
            if "lora_A" not in k and "lora_B" not in k
        }
        if extras:
            f = target / "adapter_model.safetensors"
            sd = load_file(str(f))
            sd.update(extras)
            save_file(sd, str(f), metadata={"format": "pt"})
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(target, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir
