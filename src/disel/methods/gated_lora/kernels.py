"""Fused forward and backward of DISeL's gated update, at the FLOP cost of LoRA plus one r x d_in product.

The gated update of one adapter is

    out = result + scaling * U (sigmoid(W_g x * s + b_g) * (D x))

where ``s`` is the optional ``1/sqrt(d_in)`` logit scale. The reference path runs it as separate modules
(two matmuls that each read x, a sigmoid, a product, an up-projection, a scale and an add). Here:

* D and W_g read the same x, so one ``addmm`` gives z = [D x, s W_g x + b_g] (the bias rides along as the
  addmm input), and one ``grad_z @ cat([D, s W_g])`` gives the gradient of x;
* ``glu(z) = (D x) * sigmoid(logits)`` is one kernel, and ``glu_backward`` gives the gradient of both halves
  of z in one kernel;
* ``scaling`` is the ``alpha`` of the final ``addmm`` into ``result``: no d_out-wide temporary for the
  product, the scale or the sum (plain LoRA makes two);
* the autograd Function saves only x, the (T, 2r) pre-activations and the weights; the sigmoid is
  recomputed in the backward, so training memory is that of LoRA plus one T x r tensor and the gate.

Compacted adapters (``disel compact``) have ``num_static`` leading components whose gate is 1: W_g holds only
the other ``r - num_static`` rows, so z = [D_s x, D_g x, s W_g x + b_g] and h = [D_s x, glu([D_g x, logits])]
(static part a plain LoRA pair, gated part the same glu) in the same three kernels plus one (T, r) cat.

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


def _plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks


def fast_path_applies(lora_A: nn.Module, lora_B: nn.Module, gate: nn.Module) -> bool:
    """True when the fused kernel computes exactly what calling the modules would.

    That needs: the kernel switched on, a gate that nothing observes or forces (``gate.fast_path_ok()``),
    no gate bottleneck, plain unhooked ``nn.Linear`` projections without bias on U, one dtype for all
    adapter weights, and no global module hooks.
    """
    if not _ENABLED or not gate.fast_path_ok() or getattr(gate, "proj", None) is not None:
        return False
    if (
        not (_plain_linear(lora_A) and _plain_linear(lora_B))
        or lora_A.bias is not None
        or lora_B.bias is not None
    ):
        return False
    if _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks:
        return False
    if gate.weight.shape[0] + getattr(gate, "num_static", 0) != lora_A.weight.shape[0]:
        return False
    dtype = lora_A.weight.dtype
    return lora_B.weight.dtype == dtype and gate.weight.dtype == dtype and gate.bias.dtype == dtype


def _down_and_gate_weight(down_w: torch.Tensor, gate_w: torch.Tensor, logit_scale: float) -> torch.Tensor:
    gate_w = gate_w if logit_scale == 1.0 else gate_w * logit_scale
    return torch.cat([down_w, gate_w], dim=0)


def _add_up(result2d: torch.Tensor, h: torch.Tensor, up_w: torch.Tensor, scaling: float) -> torch.Tensor:
    """result + scaling * h @ U.T in one addmm when dtypes agree, else type-promoted as ``a + b`` would be."""
    if result2d.dtype == h.dtype:
        return torch.addmm(result2d, h, up_w.t(), alpha=scaling)
    return result2d + torch.mm(h, up_w.t()).mul_(scaling)


def _pre_activations(
    x2d: torch.Tensor, down_w: torch.Tensor, gate_w: torch.Tensor, gate_b: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """z = [D x, s W_g x + b_g] of shape (T, r + r_g), in one addmm (the bias rides along as the addmm input)."""
    bias = torch.cat([gate_b.new_zeros(down_w.shape[0]), gate_b])
    return torch.addmm(bias, x2d, _down_and_gate_weight(down_w, gate_w, logit_scale).t())


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


class _GatedLoRAFunction(torch.autograd.Function):
    """Autograd for ``result + scaling * glu([D x, s W_g x + b_g]) @ U.T``, ``glu([a, b]) = a * sigmoid(b)``.

    Few, large kernels matter on CPU (every parallel op pays a thread-pool round trip): the forward is
    addmm, glu, addmm; the backward recomputes glu from the saved pre-activations and gets the gradient of
    both halves of z from one ``glu_backward``. ``num_static`` leading components are ungated (see the
    module docstring); with 0 (the default) this is the uncompacted layer.
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
        scaling, logit_scale = ctx.scaling, ctx.logit_scale
        need_x, need_result, need_d, need_g, need_b, need_u = ctx.needs_input_grad[:6]
        r = down_w.shape[0]
        g = grad_out if grad_out.dtype == up_w.dtype else grad_out.to(up_w.dtype)

        grad_up = grad_x = grad_down = grad_gate_w = grad_gate_b = None
        if need_u:
            h = _hidden(z, r, ctx.num_static)
            # scaling * g.T @ h (beta=0: the first argument only gives the shape and is not read)
            grad_up = torch.addmm(up_w, g.t(), h, beta=0, alpha=scaling)
        if need_x or need_d or need_g or need_b:
            grad_h = torch.addmm(z[:, :r], g, up_w, beta=0, alpha=scaling)  # scaling * g @ U, (T, r)
            grad_z = _hidden_backward(grad_h, z, r, ctx.num_static)  # (T, r + r_g): [d/d(D x), d/d(logits)]
            if need_b:
                grad_gate_b = grad_z[:, r:].sum(0)
            if need_d or need_g:
                grad_w = grad_z.t() @ x2d  # (2r, d_in): [dD, d(s W_g)]
                grad_down = grad_w[:r] if need_d else None
                if need_g:
                    grad_gate_w = grad_w[r:] if logit_scale == 1.0 else grad_w[r:] * logit_scale
            if need_x:
                grad_x = grad_z @ _down_and_gate_weight(down_w, gate_w, logit_scale)
        grad_result = None
        if need_result:
            grad_result = grad_out if grad_out.dtype == ctx.result_dtype else grad_out.to(ctx.result_dtype)
        return grad_x, grad_result, grad_down, grad_gate_w, grad_gate_b, grad_up, None, None, None


def fused_gated_update(
    x: torch.Tensor,
    result: torch.Tensor,
    down_w: torch.Tensor,
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    up_w: torch.Tensor,
    scaling: float,
    logit_scale: float = 1.0,
    num_static: int = 0,
) -> torch.Tensor:
    """``result + scaling * U (sigmoid(s W_g x + b_g) * (D x))`` for x of shape (..., d_in).

    With ``num_static`` > 0 the first ``num_static`` components (rows of D, columns of U) are ungated and
    ``gate_w``/``gate_b`` hold the rows of the others only (a compacted adapter).

    ``x`` must already be dropout-applied and in the adapter weights' dtype; ``result`` (shape (..., d_out))
    may have another dtype, in which case the sum is type-promoted as ``result + delta`` would be.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Do what autocast does to F.linear (differentiable casts of input and weights to the autocast dtype),
        # then run the kernel with autocast off so its forward and backward see one dtype.
        dt = torch.get_autocast_dtype(device_type)
        x, down_w, gate_w, gate_b, up_w = (t.to(dt) for t in (x, down_w, gate_w, gate_b, up_w))
        with torch.autocast(device_type, enabled=False):
            return _fused(x, result, down_w, gate_w, gate_b, up_w, scaling, logit_scale, num_static)
    return _fused(x, result, down_w, gate_w, gate_b, up_w, scaling, logit_scale, num_static)


def _fused(
    x: torch.Tensor,
    result: torch.Tensor,
    down_w: torch.Tensor,
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    up_w: torch.Tensor,
    scaling: float,
    logit_scale: float,
    num_static: int = 0,
) -> torch.Tensor:
    r = down_w.shape[0]
    if not 0 <= num_static <= r or gate_w.shape[0] != r - num_static:
        raise ValueError(
            f"gate weight has {gate_w.shape[0]} rows for rank {r} with num_static={num_static}; "
            f"it must have rank - num_static = {r - num_static}."
        )
    d_in = x.shape[-1]
    x2d = x.reshape(-1, d_in)
    result2d = result.reshape(-1, result.shape[-1])
    scaling, logit_scale, num_static = float(scaling), float(logit_scale), int(num_static)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, result, down_w, gate_w, gate_b, up_w)
    )
    if needs_grad:
        out = _GatedLoRAFunction.apply(
            x2d, result2d, down_w, gate_w, gate_b, up_w, scaling, logit_scale, num_static
        )
    else:
        # Inference: the same arithmetic without an autograd node.
        h = _hidden(_pre_activations(x2d, down_w, gate_w, gate_b, logit_scale), r, num_static)
        out = _add_up(result2d, h, up_w, scaling)
    return out.reshape(*result.shape[:-1], out.shape[-1])
