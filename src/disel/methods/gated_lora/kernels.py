"""Fused forward and backward of DISeL's gated update, at the FLOP cost of LoRA plus one r x d_in product.

The gated update of one adapter is

    out = result + scaling * U (sigmoid(W_g x * s + b_g) * (D x))

where ``s`` is the optional ``1/sqrt(d_in)`` logit scale and ``result`` the frozen base layer's output. The
reference path runs it as separate modules (two matmuls that each read x, a sigmoid, a product, an
up-projection, a scale and an add). Here:

* D and W_g read the same x, so one ``mm`` gives z = [D x, s W_g x] (the bias b_g is then added in place to
  the r logit columns), and one ``grad_z @ cat([D, s W_g])`` gives the gradient of x;
* ``glu(z) = (D x) * sigmoid(logits)`` is one kernel, and ``glu_backward`` gives the gradient of both halves
  of z in one kernel;
* ``scaling`` is the ``alpha`` of the final ``addmm`` into ``result``: no d_out-wide temporary for the
  product, the scale or the sum (plain LoRA makes two);
* with the base layer inside the kernel (``base_weight=``, what ``DiselLinear.forward`` passes when the
  layer is a plain ``nn.Linear`` with one active DISeL adapter) the update is accumulated in place into the
  base output, and the backward accumulates the adapter's part of the gradient of x in place into the base
  part (``g W + grad_z [D; s W_g]`` as one ``mm`` and one ``addmm_``): the d_in-wide add that autograd makes
  for every LoRA layer (two branches reading x) is gone too;
* the autograd Function saves only x, the (T, 2r) pre-activations and the weights; the sigmoid and the
  concatenated weight are recomputed in the backward, so training memory is that of LoRA plus one T x r
  tensor and the gate;
* without autograd (``torch.no_grad``, ``inference_mode``, generation) the concatenated weight
  ``[D; s W_g]`` and bias ``[0, b_g]`` are kept in a per-adapter :class:`WeightCache` and reused while the
  parameters are unchanged (see there for what "unchanged" means).

Compacted adapters (``disel compact``) have ``num_static`` leading components whose gate is 1: W_g holds only
the other ``r - num_static`` rows, so z = [D_s x, D_g x, s W_g x + b_g] and h = [D_s x, glu([D_g x, logits])]
(static part a plain LoRA pair, gated part the same glu) in the same kernels plus one (T, r) cat.

The fast path applies only where it computes exactly what the modules would: see :func:`fast_path_applies`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

_ENABLED = True


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Run every DISeL layer through the reference module path inside this block (tests, benchmarks)."""
    global _ENABLED
    previous = _ENABLED
    _ENABLED = False
    try:
        yield
    finally:
        _ENABLED = previous


def hooked(m: nn.Module) -> bool:
    """Whether calling ``m`` would run more than its class's ``forward``: forward, forward-pre, backward or
    backward-pre hooks on ``m``, or ``forward`` replaced on the instance (as accelerate's hooks do). Reads the
    instance dict directly: it runs for five modules on every layer call."""
    d = m.__dict__
    return bool(
        d["_forward_hooks"]
        or d["_forward_pre_hooks"]
        or d["_backward_hooks"]
        or d["_backward_pre_hooks"]
        or "forward" in d
    )


def unhooked(m: nn.Module) -> bool:
    """``not hooked(m)``."""
    return not hooked(m)


def no_global_hooks() -> bool:
    """No module hooks registered for every module (``torch.nn.modules.module.register_module_*_hook``)."""
    return not (
        _nn_module._global_forward_hooks
        or _nn_module._global_forward_pre_hooks
        or _nn_module._global_backward_hooks
        or _nn_module._global_backward_pre_hooks
    )


def _plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and unhooked(m)


def fast_tensors(
    lora_A: nn.Module, lora_B: nn.Module, gate: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(D, W_g, b_g, U)`` when the fused kernel computes exactly what calling the modules would, else None.

    That needs: the kernel switched on, a gate that nothing observes or forces (``gate.fast_path_ok()``),
    no gate bottleneck, plain unhooked ``nn.Linear`` projections without bias, one dtype for all adapter
    weights, and no global module hooks. Everything is read from the modules on every call (a few attribute
    and dict lookups), so nothing can go stale.
    """
    if not _ENABLED or not gate.fast_path_ok() or gate.proj is not None:
        return None
    if not (_plain_linear(lora_A) and _plain_linear(lora_B) and no_global_hooks()):
        return None
    pa, pb, pg = lora_A._parameters, lora_B._parameters, gate._parameters
    if pa["bias"] is not None or pb["bias"] is not None:
        return None
    down_w, up_w, gate_w, gate_b = pa["weight"], pb["weight"], pg["weight"], pg["bias"]
    if gate_w.shape[0] + gate.num_static != down_w.shape[0]:
        return None
    dtype = down_w.dtype
    if up_w.dtype != dtype or gate_w.dtype != dtype or gate_b.dtype != dtype:
        return None
    return down_w, gate_w, gate_b, up_w


def fast_path_applies(lora_A: nn.Module, lora_B: nn.Module, gate: nn.Module) -> bool:
    """True when the fused kernel computes exactly what calling the modules would (see :func:`fast_tensors`)."""
    return fast_tensors(lora_A, lora_B, gate) is not None


class WeightCache:
    """``[D; s W_g]``, ``[0, b_g]`` and ``U.T`` of one adapter, reused by calls without autograd while D, W_g, b_g
    and U are unchanged.

    "Unchanged" is checked on every call: each of D, W_g and b_g is still set to exactly the memory it was
    when the entry was made (``Tensor.is_set_to`` on an alias the cache holds, so that memory cannot be
    freed and handed to another tensor meanwhile) and its version counter has not moved; U is still set to
    its memory (the cached ``U.T`` is a view of it: in-place writes to U show through). So an
    optimizer step, ``load_state_dict``, any in-place write through the parameter (``p.copy_``, ``p.add_``
    under ``no_grad``), ``.to(dtype/device)``, ``p.data = ...`` or a new ``nn.Parameter`` all make the next
    call recompute it. The one write that is not seen is an in-place write through ``p.data`` (``p.data.
    copy_(...)``, which PyTorch does not count on ``p``'s version counter): after such a write call
    :func:`clear_caches` (or write through ``p`` under ``torch.no_grad()`` instead).

    Calls with autograd never use it (the weights change at every optimizer step, and the kernel must see
    the parameters themselves) and empty it, so training holds no copy. Not saved, copied or pickled: a
    deep copy or an unpickled model starts with an empty cache.
    """

    __slots__ = ("entry",)

    def __init__(self) -> None:
        # (key, sources, [D; s W_g], [0, b_g], U.T): one tuple, replaced as a whole, so a reader in another
        # thread sees either the old entry or the new one
        self.entry: tuple | None = None

    def clear(self) -> None:
        self.entry = None

    def get(
        self,
        down_w: torch.Tensor,
        gate_w: torch.Tensor,
        gate_b: torch.Tensor,
        up_w: torch.Tensor,
        logit_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``([D; s W_g], [0, b_g], U.T)``, from the cache when D, W_g, b_g, U and ``s`` are what they were."""
        key = (down_w._version, gate_w._version, gate_b._version, logit_scale)
        entry = self.entry
        if entry is not None and entry[0] == key:
            d, g, b, u = entry[1]
            if down_w.is_set_to(d) and gate_w.is_set_to(g) and gate_b.is_set_to(b) and up_w.is_set_to(u):
                return entry[2], entry[3], entry[4]
        u = up_w.detach()
        entry = (
            key,
            (down_w.detach(), gate_w.detach(), gate_b.detach(), u),
            _down_and_gate_weight(down_w, gate_w, logit_scale),
            _zero_padded_bias(gate_b, down_w.shape[0]),
            u.t(),
        )
        self.entry = entry
        return entry[2], entry[3], entry[4]

    def __bool__(self) -> bool:
        return self.entry is not None

    def __deepcopy__(self, memo: dict) -> WeightCache:
        return WeightCache()

    def __reduce__(self) -> tuple:
        return (WeightCache, ())


def clear_caches(model: nn.Module) -> int:
    """Empty the :class:`WeightCache` of every DISeL gate in ``model``; returns how many held an entry."""
    n = 0
    for m in model.modules():
        cache = getattr(m, "weight_cache", None)
        if isinstance(cache, WeightCache):
            n += bool(cache)
            cache.clear()
    return n


def _down_and_gate_weight(down_w: torch.Tensor, gate_w: torch.Tensor, logit_scale: float) -> torch.Tensor:
    gate_w = gate_w if logit_scale == 1.0 else gate_w * logit_scale
    return torch.cat([down_w, gate_w], dim=0)


def _zero_padded_bias(gate_b: torch.Tensor, r: int) -> torch.Tensor:
    out = gate_b.new_zeros(r + gate_b.shape[0])
    out[r:] = gate_b
    return out


def _pre_activations(
    x2d: torch.Tensor, down_w: torch.Tensor, gate_w: torch.Tensor, gate_b: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """z = [D x, s W_g x + b_g] of shape (T, r + r_g): one mm, then the bias added in place to the logits."""
    z = torch.mm(x2d, _down_and_gate_weight(down_w, gate_w, logit_scale).t())
    if gate_b.shape[0]:
        z[:, down_w.shape[0] :].add_(gate_b)
    return z


def _hidden(z: torch.Tensor, r: int, num_static: int) -> torch.Tensor:
    """h = [D_s x, (D_g x) * sigmoid(logits)]: static components pass through, gated ones go through glu."""
    if num_static == 0:
        return F.glu(z, dim=-1)
    if num_static == r:  # no gated component left: plain LoRA
        return z
    return torch.cat([z[:, :num_static], F.glu(z[:, num_static:], dim=-1)], dim=-1)


def _hidden_backward(grad_h: torch.Tensor, z: torch.Tensor, r: int, num_static: int) -> torch.Tensor:
    """Gradient of z from that of h (the inverse of :func:`_hidden`'s split)."""
    if num_static == 0:
        return torch.ops.aten.glu_backward(grad_h, z, -1)
    if num_static == r:
        return grad_h
    gated = torch.ops.aten.glu_backward(grad_h[:, num_static:], z[:, num_static:], -1)
    return torch.cat([grad_h[:, :num_static], gated], dim=-1)


def _add_up(result2d: torch.Tensor, h: torch.Tensor, up_w: torch.Tensor, scaling: float) -> torch.Tensor:
    """result + scaling * h @ U.T in one addmm when dtypes agree, else type-promoted as ``a + b`` would be."""
    if result2d.dtype == h.dtype:
        return torch.addmm(result2d, h, up_w.t(), alpha=scaling)
    return result2d + torch.mm(h, up_w.t()).mul_(scaling)


def _adapter_backward(
    ctx: torch.autograd.function.FunctionCtx,
    g: torch.Tensor,
    x2d: torch.Tensor,
    z: torch.Tensor,
    down_w: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    need_x: bool,
    need_d: bool,
    need_g: bool,
    need_b: bool,
    need_u: bool,
    grad_x: torch.Tensor | None = None,
) -> tuple:
    """Gradients of x (added in place to ``grad_x`` when given), D, W_g, b_g and U of the gated update."""
    scaling, logit_scale, num_static = ctx.scaling, ctx.logit_scale, ctx.num_static
    r = down_w.shape[0]
    grad_up = grad_down = grad_gate_w = grad_gate_b = None
    if need_u:
        h = _hidden(z, r, num_static)
        # scaling * g.T @ h (beta=0: the first argument only gives the shape and is not read)
        grad_up = torch.addmm(up_w, g.t(), h, beta=0, alpha=scaling)
    if need_x or need_d or need_g or need_b:
        grad_h = torch.addmm(z[:, :r], g, up_w, beta=0, alpha=scaling)  # scaling * g @ U, (T, r)
        grad_z = _hidden_backward(grad_h, z, r, num_static)  # (T, r + r_g): [d/d(D x), d/d(logits)]
        if need_b:
            grad_gate_b = grad_z[:, r:].sum(0)
        if need_d or need_g:
            grad_w = grad_z.t() @ x2d  # (r + r_g, d_in): [dD, d(s W_g)]
            grad_down = grad_w[:r] if need_d else None
            if need_g:
                grad_gate_w = grad_w[r:] if logit_scale == 1.0 else grad_w[r:] * logit_scale
        if need_x:
            weight = _down_and_gate_weight(down_w, gate_w, logit_scale)
            grad_x = torch.mm(grad_z, weight) if grad_x is None else grad_x.addmm_(grad_z, weight)
    return grad_x, grad_down, grad_gate_w, grad_gate_b, grad_up


class _GatedLoRAFunction(torch.autograd.Function):
    """Autograd for ``result + scaling * glu([D x, s W_g x + b_g]) @ U.T``, ``glu([a, b]) = a * sigmoid(b)``.

    Few, large kernels matter on CPU (every parallel op pays a thread-pool round trip): the forward is
    mm, a (T, r) add, glu, addmm; the backward recomputes glu from the saved pre-activations and gets the
    gradient of both halves of z from one ``glu_backward``. ``num_static`` leading components are ungated
    (see the module docstring); with 0 (the default) this is the uncompacted layer.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x2d: torch.Tensor,
        result2d: torch.Tensor,
        down_w: torch.Tensor,
        gate_w: torch.Tensor,
        gate_b: torch.Tensor,
        up_w: torch.Tensor,
        scaling: float,
        logit_scale: float,
        num_static: int = 0,
    ) -> torch.Tensor:
        z = _pre_activations(x2d, down_w, gate_w, gate_b, logit_scale)
        h = _hidden(z, down_w.shape[0], num_static)
        ctx.save_for_backward(x2d, z, down_w, gate_w, up_w)
        ctx.scaling = scaling
        ctx.logit_scale = logit_scale
        ctx.num_static = num_static
        ctx.result_dtype = result2d.dtype
        return _add_up(result2d, h, up_w, scaling)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        x2d, z, down_w, gate_w, up_w = ctx.saved_tensors
        need_x, need_result, need_d, need_g, need_b, need_u = ctx.needs_input_grad[:6]
        g = grad_out if grad_out.dtype == up_w.dtype else grad_out.to(up_w.dtype)
        grad_x, grad_down, grad_gate_w, grad_gate_b, grad_up = _adapter_backward(
            ctx, g, x2d, z, down_w, gate_w, up_w, need_x, need_d, need_g, need_b, need_u
        )
        grad_result = None
        if need_result:
            grad_result = grad_out if grad_out.dtype == ctx.result_dtype else grad_out.to(ctx.result_dtype)
        return grad_x, grad_result, grad_down, grad_gate_w, grad_gate_b, grad_up, None, None, None


class _GatedLinearFunction(torch.autograd.Function):
    """Autograd for the whole layer ``x W.T + b + scaling * glu([D x, s W_g x + b_g]) @ U.T``.

    Forward: mm (base), mm + (T, r) add (z), glu, ``addmm_`` of the update into the base output (no
    d_out-wide copy). Backward: ``g W`` then ``addmm_`` of ``grad_z [D; s W_g]`` into it (no d_in-wide add), and
    the adapter's weight gradients as in :class:`_GatedLoRAFunction`. All tensors have one dtype.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x2d: torch.Tensor,
        base_w: torch.Tensor,
        base_b: torch.Tensor | None,
        down_w: torch.Tensor,
        gate_w: torch.Tensor,
        gate_b: torch.Tensor,
        up_w: torch.Tensor,
        scaling: float,
        logit_scale: float,
        num_static: int = 0,
    ) -> torch.Tensor:
        out = F.linear(x2d, base_w, base_b)  # a fresh (T, d_out) tensor, the update is added in place
        z = _pre_activations(x2d, down_w, gate_w, gate_b, logit_scale)
        out.addmm_(_hidden(z, down_w.shape[0], num_static), up_w.t(), alpha=scaling)
        ctx.save_for_backward(x2d, z, base_w, down_w, gate_w, up_w)
        ctx.scaling = scaling
        ctx.logit_scale = logit_scale
        ctx.num_static = num_static
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor):  # type: ignore[override]
        x2d, z, base_w, down_w, gate_w, up_w = ctx.saved_tensors
        need_x, need_w, need_bias, need_d, need_g, need_b, need_u = ctx.needs_input_grad[:7]
        grad_x = torch.mm(g, base_w) if need_x else None
        grad_x, grad_down, grad_gate_w, grad_gate_b, grad_up = _adapter_backward(
            ctx, g, x2d, z, down_w, gate_w, up_w, need_x, need_d, need_g, need_b, need_u, grad_x
        )
        grad_w = g.t() @ x2d if need_w else None  # a trainable base (not frozen): its own gradients
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, grad_w, grad_bias, grad_down, grad_gate_w, grad_gate_b, grad_up, None, None, None


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def fused_gated_update(
    x: torch.Tensor,
    result: torch.Tensor | None,
    down_w: torch.Tensor,
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    up_w: torch.Tensor,
    scaling: float,
    logit_scale: float = 1.0,
    num_static: int = 0,
    *,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    cache: WeightCache | None = None,
) -> torch.Tensor:
    """``result + scaling * U (sigmoid(s W_g x + b_g) * (D x))`` for x of shape (..., d_in).

    With ``num_static`` > 0 the first ``num_static`` components (rows of D, columns of U) are ungated and
    ``gate_w``/``gate_b`` hold the rows of the others only (a compacted adapter).

    ``x`` must already be dropout-applied and in the adapter weights' dtype; ``result`` (shape (..., d_out))
    may have another dtype, in which case the sum is type-promoted as ``result + delta`` would be.

    ``result=None`` with ``base_weight`` (and optionally ``base_bias``) of a linear layer computes the whole
    layer, ``x W.T + b`` plus the update, in one kernel (the base's x is the adapter's: no dropout); every
    tensor must then have one dtype. ``cache``: a :class:`WeightCache` for calls without autograd.
    """
    r = down_w.shape[0]
    if num_static < 0 or gate_w.shape[0] != r - num_static:
        raise ValueError(
            f"gate weight has {gate_w.shape[0]} rows for rank {r} with num_static={num_static}; "
            f"it must have rank - num_static = {r - num_static}."
        )
    if (result is None) is (base_weight is None):
        raise ValueError("fused_gated_update takes either result or base_weight (with result=None).")
    if (_any_autocast is None or _any_autocast()) and torch.is_autocast_enabled(x.device.type):
        # Do what autocast does to F.linear (differentiable casts of input and weights to the autocast dtype),
        # then run the kernel with autocast off so its forward and backward see one dtype.
        device_type = x.device.type
        dt = torch.get_autocast_dtype(device_type)
        x, down_w, gate_w, gate_b, up_w = (t.to(dt) for t in (x, down_w, gate_w, gate_b, up_w))
        if base_weight is not None:
            base_weight = base_weight.to(dt)
            base_bias = base_bias.to(dt) if base_bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _fused_gated_update(  # itself, not a wrapper that tests or tools put in its place
                x,
                result,
                down_w,
                gate_w,
                gate_b,
                up_w,
                scaling,
                logit_scale,
                num_static,
                base_weight=base_weight,
                base_bias=base_bias,
            )
    x2d = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (
        x.requires_grad
        or down_w.requires_grad
        or gate_w.requires_grad
        or gate_b.requires_grad
        or up_w.requires_grad
        or (result.requires_grad if result is not None else base_weight.requires_grad)  # type: ignore[union-attr]
        or (base_bias is not None and base_bias.requires_grad)
    ):
        if cache is not None and cache.entry is not None and not torch.compiler.is_compiling():
            cache.clear()  # training: hold no copy of weights that the next optimizer step changes
        args = (down_w, gate_w, gate_b, up_w, float(scaling), float(logit_scale), int(num_static))
        if result is None:
            out = _GatedLinearFunction.apply(x2d, base_weight, base_bias, *args)
        else:
            out = _GatedLoRAFunction.apply(x2d, result.reshape(-1, result.shape[-1]), *args)
    else:
        # Inference: the same arithmetic without an autograd node, the concatenated weights cached.
        if cache is not None and not torch.compiler.is_compiling():
            weight, bias, up_t = cache.get(down_w, gate_w, gate_b, up_w, logit_scale)
            z = F.linear(x2d, weight, bias)
        else:
            z = _pre_activations(x2d, down_w, gate_w, gate_b, logit_scale)
            up_t = up_w.t()
        h = F.glu(z, -1) if num_static == 0 else _hidden(z, r, num_static)
        if result is None:
            out = F.linear(x2d, base_weight, base_bias).addmm_(h, up_t, alpha=scaling)  # type: ignore[arg-type]
        else:
            out = _add_up(result.reshape(-1, result.shape[-1]), h, up_t.t(), scaling)
    return out.view(*x.shape[:-1], out.shape[-1])


_fused_gated_update = fused_gated_update
