"""Curvature of the source-domain loss with respect to the LoRA matrices only (and, optionally, DISeL gates).

Why our own hooks instead of curvlinops/laplace-torch: we need the Fisher of a handful of small matrices
inside PEFT layers (whose forward also multiplies by a DISeL gate), on a Hugging Face model called with
dict batches, and we need the down-projection's curvature at a point where the up-projection is non-zero
without moving the model. Per-layer hooks give all of that in one forward and one backward per batch:

* the input ``x`` of ``lora_A`` (the down-projection D), its output ``D x``, the gate value ``s = g(x)``
  (1 for plain LoRA), the input ``a = s * D x`` of ``lora_B`` (the up-projection U);
* the gradient ``gB`` of the loss with respect to ``lora_B``'s output (a zero "probe" tensor is added to
  that output, so one ``torch.autograd.grad`` call on the probes returns exactly these and accumulates no
  parameter gradients).

From these every per-example gradient is a sum over tokens of outer products:
``dU = sum_t gB a^T``, ``dD = sum_t ((U^T gB) * s) x^T``, and for a gate ``dz = (U^T gB) * Dx * s (1 - s)``.

The zero-curvature problem: PEFT starts LoRA with U = 0, which makes every gradient of D (and of the
gates) exactly zero, so the Fisher of D is zero. With ``up_init="virtual"`` (default) we use, only inside
the formula above, a fixed random stand-in ``U_v`` wherever the real U is all zero: the D-block is then the
Fisher D would have if U were ``U_v``, with the model itself still exactly at theta0 (the function and the
U-block are untouched). ``up_scale`` scales ``U_v`` (entries uniform in +-up_scale/sqrt(r), the same law
PEFT uses for D with fan-in r); the D-block grows with ``up_scale**2``. ``up_init="none"`` keeps the
zero block (then only ``prior_prec`` constrains D). If U is already non-zero (curvature estimated after
warm-up steps, or on a trained adapter) the real U is always used.

Normalisation: the precision is the Fisher *per predicted token* (sums over the data divided by the
number of predicted tokens T), so (1/2) d^T P d approximates the rise of the source mean token NLL and
lambda = 1 weighs that rise like the task loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...errors import UserError
from ..gated_lora.layer import DiselGate

Curvature = Literal["diag", "kfac"]
Fisher = Literal["true", "empirical"]
UpInit = Literal["virtual", "none"]
_NOT_INPUTS = ("labels",)


@dataclass
class LoraSite:
    """One LoRA layer's trainable matrices for the active adapter."""

    name: str
    A: nn.Linear  # down-projection D (r x in)
    B: nn.Linear  # up-projection U (out x r)
    gate: DiselGate | None


@dataclass
class CurvatureState:
    """Precision blocks keyed by parameter name: ``diag[name]`` or ``kfac[name] = (A_in, G_out)``."""

    curvature: str
    fisher: str
    diag: dict[str, torch.Tensor] = field(default_factory=dict)
    kfac: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    tokens: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def _active_adapter(model: nn.Module) -> str:
    active = getattr(model, "active_adapter", "default")
    if isinstance(active, list | tuple):
        active = active[0] if active else "default"
    return str(active)


def lora_sites(model: nn.Module, adapter: str | None = None) -> list[LoraSite]:
    """The LoRA layers of ``model`` whose ``lora_A``/``lora_B`` for ``adapter`` are ``nn.Linear``."""
    adapter = adapter or _active_adapter(model)
    sites = []
    for name, m in model.named_modules():
        la, lb = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
        if not isinstance(la, nn.ModuleDict) or not isinstance(lb, nn.ModuleDict) or adapter not in la:
            continue
        if not (isinstance(la[adapter], nn.Linear) and isinstance(lb[adapter], nn.Linear)):
            continue
        gates = getattr(m, "lora_gate", None)
        gate = gates[adapter] if isinstance(gates, nn.ModuleDict) and adapter in gates else None
        sites.append(LoraSite(name, la[adapter], lb[adapter], gate))
    return sites


def param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def virtual_up(B: nn.Linear, seed: int, scale: float) -> torch.Tensor:
    """The stand-in U used for the D-block when the real U is zero (deterministic per layer and seed)."""
    out_f, r = B.weight.shape
    g = torch.Generator().manual_seed(seed)
    bound = scale / math.sqrt(r)
    return ((torch.rand(out_f, r, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(
        device=B.weight.device, dtype=B.weight.dtype
    )


def is_causal_lm(model: nn.Module) -> bool:
    base = model
    for attr in ("get_base_model",):
        if hasattr(base, attr):
            base = base.get_base_model()
    return "CausalLM" in type(base).__name__ or "LMHead" in type(base).__name__


def token_targets(
    logits: torch.Tensor,
    batch: dict[str, Any],
    causal: bool,
    fisher: str,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, valid) aligned per predicted position, flattened to [B, T, C] / [B, T].

    ``fisher="true"`` replaces the targets by labels sampled from the model (the true Fisher, whose
    expectation is the GGN for softmax cross-entropy); ``"empirical"`` keeps the data's labels.
    """
    labels = batch.get("labels")
    if logits.dim() == 2:  # sequence classification: [B, C], labels [B]
        if labels is None and fisher == "empirical":
            raise UserError("The empirical Fisher needs 'labels' in every calibration batch; add them.")
        logits = logits.unsqueeze(1)
        tgt = labels.view(-1, 1) if labels is not None else torch.zeros(logits.shape[:2], dtype=torch.long)
    else:
        if labels is None:
            if "input_ids" not in batch or not causal:
                raise UserError(
                    "Calibration batches need 'labels' (or 'input_ids' for a causal LM); add them."
                )
            labels = batch["input_ids"].clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = -100
        tgt = labels
        if causal:
            logits, tgt = logits[:, :-1], tgt[:, 1:]
    tgt = tgt.to(logits.device)
    valid = tgt != -100
    if fisher == "true":
        probs = torch.softmax(logits.detach().double(), dim=-1).reshape(-1, logits.shape[-1])
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        sampled = torch.multinomial(probs.to(gen_dev), 1, generator=generator).view(tgt.shape)
        tgt = torch.where(valid, sampled.to(tgt.device), tgt)
    return logits, tgt, valid


def per_example_loss(logits: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum of token NLLs for each example: shape [B]."""
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), tgt.clamp_min(0).reshape(-1), reduction="none"
    ).view(tgt.shape)
    return (nll * valid).sum(dim=1)


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items() if k not in _NOT_INPUTS and torch.is_tensor(v)}


class _Recorder:
    """Forward hooks on lora_A / gate / lora_B that keep what the per-example gradients are made of."""

    def __init__(self, sites: list[LoraSite]):
        self.sites = sites
        self.calls: dict[int, list[dict[str, torch.Tensor]]] = {i: [] for i in range(len(sites))}
        self.handles: list[Any] = []
        self.leaves: list[torch.Tensor] = []

    def __enter__(self) -> _Recorder:
        for i, s in enumerate(self.sites):
            self.handles.append(s.A.register_forward_hook(self._hook_a(i)))
            if s.gate is not None:
                if s.gate.override is not None:
                    raise UserError(
                        "A DISeL gate is forced (force_gates) during curvature estimation; leave the block first."
                    )
                self.handles.append(s.gate.register_forward_hook(self._hook_gate(i)))
            self.handles.append(s.B.register_forward_hook(self._hook_b(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def reset(self) -> None:
        for v in self.calls.values():
            v.clear()
        self.leaves.clear()

    def _hook_a(self, i: int):
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            self.calls[i].append({"x": inp[0].detach(), "down": out.detach()})

        return hook

    def _hook_gate(self, i: int):
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            self.calls[i][-1]["s"] = out.detach()

        return hook

    def _hook_b(self, i: int):
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            rec = self.calls[i][-1]
            rec["a"] = inp[0].detach()
            # A zero "probe" added to the output: d loss / d probe = d loss / d output, while the graph
            # through the LoRA branch stays intact for the layers below (exact when U != 0).
            probe = torch.zeros_like(out, requires_grad=True)
            rec["out"] = probe
            self.leaves.append(probe)
            return out + probe

        return hook


def _as_btd(t: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[B, ..., d] -> [B, T, d] in float32 (or float64 when the model is in float64)."""
    dt = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.reshape(batch_size, -1, t.shape[-1]).to(dt)


def estimate_curvature(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    curvature: Curvature = "diag",
    fisher: Fisher = "true",
    n_batches: int | None = 8,
    up_init: UpInit = "virtual",
    up_scale: float = 1.0,
    include_gates: bool = False,
    gates: str = "open",
    seed: int = 0,
    progress: bool = False,
) -> CurvatureState:
    """Fisher precision of the LoRA matrices (and optionally the gates' W_g, b_g) on ``batches``.

    ``curvature="diag"``: diagonal of the Fisher from exact per-example (per-sequence) gradients.
    ``curvature="kfac"``: one Kronecker block ``A_in (x) G_out`` per LoRA matrix (KFAC-expand: input and
    output-gradient second moments over tokens); gates, if included, always get the diagonal.
    ``fisher="true"`` samples labels from the model (default), ``"empirical"`` uses the batch labels.
    ``gates`` (DISeL): ``"open"`` (default) estimates the LoRA blocks as if every gate were 1, i.e. the
    Fisher of the same LoRA without gates (at theta0 U = 0, so the model is the same either way);
    ``"actual"`` uses the gate values, which at init (closed gates) shrinks the blocks by about s**2.
    """
    if curvature not in ("diag", "kfac"):
        raise UserError(f"curvature={curvature!r} is invalid: use 'diag' or 'kfac'.")
    if fisher not in ("true", "empirical"):
        raise UserError(f"fisher={fisher!r} is invalid: use 'true' or 'empirical'.")
    if gates not in ("open", "actual"):
        raise UserError(f"gates={gates!r} is invalid: use 'open' or 'actual'.")
    if up_init not in ("virtual", "none"):
        raise UserError(f"up_init={up_init!r} is invalid: use 'virtual' or 'none'.")
    sites = lora_sites(model)
    if not sites:
        raise UserError(
            "The model has no LoRA layers to estimate curvature for; build it with LoRA or DISeL."
        )
    names = param_names(model)
    dev = sites[0].A.weight.device
    causal = is_causal_lm(model)
    ups: list[torch.Tensor] = []
    for i, s in enumerate(sites):
        U = s.B.weight.detach()
        if up_init == "virtual" and not bool(U.any()):
            U = virtual_up(s.B, seed * 100003 + i, up_scale)
        ups.append(U)
    gen = torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(seed)

    st = CurvatureState(curvature=curvature, fisher=fisher)
    acc: dict[str, torch.Tensor] = {}
    fac: dict[str, list[torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    it = iter(batches)
    total = n_batches if n_batches else None
    try:
        with _Recorder(sites) as rec, torch.enable_grad():
            for _ in tqdm(range(total) if total else iter(int, 1), desc="curvature", disable=not progress):
                try:
                    batch = next(it)
                except StopIteration:
                    break
                rec.reset()
                inputs = model_inputs(batch, dev)
                out = model(**inputs)
                logits = out if torch.is_tensor(out) else out.logits
                lg, tgt, valid = token_targets(logits, batch, causal, fisher, gen)
                loss = per_example_loss(lg, tgt, valid).sum()
                st.tokens += int(valid.sum())
                bsz = logits.shape[0]
                if not rec.leaves:
                    raise UserError(
                        "No LoRA layer ran in the forward pass; check the adapter's target_modules."
                    )
                if not loss.requires_grad:
                    raise UserError(
                        "The loss does not depend on the LoRA layers; check the calibration batches."
                    )
                grads = torch.autograd.grad(loss, rec.leaves, allow_unused=True)
                gmap = {id(leaf): g for leaf, g in zip(rec.leaves, grads)}
                am = inputs.get("attention_mask")
                for i, s in enumerate(sites):
                    for call in rec.calls[i]:
                        g_out = gmap.get(id(call["out"]))
                        if g_out is None:
                            g_out = torch.zeros_like(call["out"])
                        _accumulate(
                            st,
                            acc,
                            fac,
                            names,
                            s,
                            ups[i],
                            call,
                            g_out,
                            bsz,
                            am,
                            include_gates,
                            gates == "open",
                        )
    finally:
        model.train(was_training)
    if st.tokens == 0:
        raise UserError("The calibration data gave no predicted tokens; pass non-empty batches with labels.")
    T = float(st.tokens)
    for k, v in acc.items():
        st.diag[k] = (v / T).float()
    for k, (a_in, g_out, n_in) in fac.items():
        st.kfac[k] = ((a_in / max(float(n_in), 1.0)).float(), (g_out / T).float())
    st.info = {
        "tokens": st.tokens,
        "up_init": up_init,
        "up_scale": up_scale,
        "include_gates": include_gates,
        "gates": gates,
    }
    return st


def _accumulate(
    st: CurvatureState,
    acc: dict[str, torch.Tensor],
    fac: dict[str, list[torch.Tensor]],
    names: dict[int, str],
    s: LoraSite,
    U: torch.Tensor,
    call: dict[str, torch.Tensor],
    g_out: torch.Tensor,
    bsz: int,
    attention_mask: torch.Tensor | None,
    include_gates: bool,
    open_gates: bool,
) -> None:
    x = _as_btd(call["x"], bsz)
    down = _as_btd(call["down"], bsz)
    sgate = _as_btd(call["s"], bsz) if "s" in call else None
    a = down if (open_gates and sgate is not None) else _as_btd(call["a"], bsz)
    gB = _as_btd(g_out, bsz)
    dt = gB.dtype
    gA_pre = gB @ U.to(dt)  # dL/d(input of lora_B): [B, T, r]
    gA = gA_pre * sgate if (sgate is not None and not open_gates) else gA_pre
    m = None
    if attention_mask is not None and attention_mask.shape[:2] == x.shape[:2]:
        m = attention_mask.to(dt).unsqueeze(-1)
    n_tok = int(m.sum()) if m is not None else x.shape[0] * x.shape[1]
    nA, nB = names[id(s.A.weight)], names[id(s.B.weight)]

    def add(store: dict, key: str, val: torch.Tensor) -> None:
        store[key] = store[key] + val if key in store else val

    if st.curvature == "diag":
        add(acc, nB, torch.einsum("bto,btr->bor", gB, a).pow(2).sum(0))
        add(acc, nA, torch.einsum("btr,bti->bri", gA, x).pow(2).sum(0))
    else:
        xm = x * m if m is not None else x
        am_ = a * m if m is not None else a
        for key, ain, gout in ((nA, xm, gA), (nB, am_, gB)):
            ai = ain.reshape(-1, ain.shape[-1])
            go = gout.reshape(-1, gout.shape[-1])
            new = [ai.T @ ai, go.T @ go, torch.tensor(float(n_tok))]
            fac[key] = [o + n for o, n in zip(fac[key], new)] if key in fac else new
    if include_gates and s.gate is not None and sgate is not None:
        gate = s.gate
        h = x
        if gate.proj is not None:
            with torch.no_grad():
                h = gate.proj(call["x"]).reshape(bsz, -1, gate.proj.out_features).to(dt)
        dz = (gA_pre * down * sgate * (1 - sgate))[
            ..., getattr(gate, "num_static", 0) :
        ]  # static: no W_g row
        if gate.logit_scale:
            h = h * gate.input_scale
        add(acc, names[id(gate.weight)], torch.einsum("btr,bti->bri", dz, h).pow(2).sum(0))
        add(acc, names[id(gate.bias)], dz.sum(1).pow(2).sum(0))
