"""DISeL's gated update in few, large kernels, at the FLOP cost of LoRA plus one r x d_in product.

The gated update of one adapter is

    out = result + scaling * U (sigmoid(W_g x * s + b_g) * (D x))

where ``s`` is the optional ``1/sqrt(d_in)`` logit scale and ``result`` the frozen base layer's output. The
reference path runs it as separate modules (two matmuls that each read x, a sigmoid, a product, an
up-projection, a scale and an add). Here:

* D and W_g read the same x, so one ``linear`` with the weight ``[D; s W_g]`` and the bias ``[0, b_g]`` gives
  z = [D x, s W_g x + b_g], and its backward one ``grad_z @ [D; s W_g]`` for the gradient of x and one
  ``grad_z.T @ x`` for both weight gradients;
* ``glu(z) = (D x) * sigmoid(logits)`` is one kernel, and its backward (``glu_backward``) gives the
  gradient of both halves of z in one kernel;
* ``scaling`` is the ``alpha`` of the final ``addmm`` into ``result``: no d_out-wide temporary for the
  product, the scale or the sum (plain LoRA makes two, and two more in its backward);
* with the base layer inside the kernel (``base_weight=``, what ``DiselLinear.forward`` passes when the
  layer is a plain ``nn.Linear`` with one active DISeL adapter) the update is accumulated in place into the
  base output (``addmm_``): no d_out-wide copy either.

It is written with differentiable PyTorch ops only (no ``autograd.Function``): autograd's C++ nodes run the
backward with less per-call overhead than a Python backward would (measured on a whole tiny Llama: a training
step about 1% faster than with the fused Python backward this replaced, 0.7% slower on one wide layer, where
autograd's separate add of the two gradients of x costs more than the per-call overhead saves; see
``docs/performance.md``), and everything that works with PyTorch ops works here: double backward, forward-mode
AD, ``torch.func``, ``torch.compile``, checkpointing. Saved for the backward: x (also saved by LoRA), z and h
(T x 2r and T x r) and the concatenated weight (2r x d_in).

Without autograd (``torch.no_grad``, ``inference_mode``, generation) the concatenated weight ``[D; s W_g]``
and bias ``[0, b_g]`` are kept in a per-adapter :class:`WeightCache` and reused while the parameters are
unchanged (see there for what "unchanged" means).

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
            _padded_bias(gate_b, down_w.shape[0]),
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
    """``[D; s W_g]``: one weight for the down-projection and the gate logits."""
    gate_w = gate_w if logit_scale == 1.0 else gate_w * logit_scale
    return torch.cat([down_w, gate_w], dim=0)


def _padded_bias(gate_b: torch.Tensor, r: int) -> torch.Tensor:
    """``[0, b_g]``: the bias of z, zero on the r down-projection columns."""
    return F.pad(gate_b, (r, 0))


def _hidden(z: torch.Tensor, r: int, num_static: int) -> torch.Tensor:
    """h = [D_s x, (D_g x) * sigmoid(logits)]: static components pass through, gated ones go through glu."""
    if num_static == 0:
        return F.glu(z, dim=-1)
    if num_static == r:  # no gated component left: plain LoRA
        return z
    return torch.cat([z[:, :num_static], F.glu(z[:, num_static:], dim=-1)], dim=-1)


def _add_up(result2d: torch.Tensor, h: torch.Tensor, up_t: torch.Tensor, scaling: float) -> torch.Tensor:
    """result + scaling * h @ U.T in one addmm when dtypes agree, else type-promoted as ``a + b`` would be."""
    if result2d.dtype == h.dtype:
        return torch.addmm(result2d, h, up_t, alpha=scaling)
    return result2d + torch.mm(h, up_t).mul_(scaling)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
_NO_CONTEXT = contextlib.nullcontext()  # reusable: entered on every call without autocast


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
    base_input: torch.Tensor | None = None,
    cache: WeightCache | None = None,
) -> torch.Tensor:
    """``result + scaling * U (sigmoid(s W_g x + b_g) * (D x))`` for x of shape (..., d_in).

    With ``num_static`` > 0 the first ``num_static`` components (rows of D, columns of U) are ungated and
    ``gate_w``/``gate_b`` hold the rows of the others only (a compacted adapter).

    ``x`` must already be dropout-applied and in the adapter weights' dtype; ``result`` (shape (..., d_out))
    may have another dtype, in which case the sum is type-promoted as ``result + delta`` would be.

    ``result=None`` with ``base_weight`` (and optionally ``base_bias``) of a linear layer computes the whole
    layer, ``x W.T + b`` plus the update, in one kernel; every tensor must then have one dtype. The base reads
    ``base_input`` when given (the layer's input, where ``x`` is its dropped-out copy), else ``x``. ``cache``:
    a :class:`WeightCache` for calls without autograd.
    """
    r = down_w.shape[0]
    if num_static < 0 or gate_w.shape[0] != r - num_static:
        raise ValueError(
            f"gate weight has {gate_w.shape[0]} rows for rank {r} with num_static={num_static}; "
            f"it must have rank - num_static = {r - num_static}."
        )
    if (result is None) is (base_weight is None):
        raise ValueError("fused_gated_update takes either result or base_weight (with result=None).")
    autocast_off: contextlib.AbstractContextManager = _NO_CONTEXT
    if (_any_autocast is None or _any_autocast()) and torch.is_autocast_enabled(x.device.type):
        # Do what autocast does to F.linear (differentiable casts of input and weights to the autocast dtype),
        # then run the kernel with autocast off so its forward and backward see one dtype.
        device_type = x.device.type
        dt = torch.get_autocast_dtype(device_type)
        x, down_w, gate_w, gate_b, up_w = (t.to(dt) for t in (x, down_w, gate_w, gate_b, up_w))
        if base_weight is not None:
            base_weight = base_weight.to(dt)
            base_bias = base_bias.to(dt) if base_bias is not None else None
            base_input = base_input.to(dt) if base_input is not None else None
        cache = None  # the casts are new tensors at every call: nothing to reuse
        autocast_off = torch.autocast(device_type, enabled=False)
    with autocast_off:
        x2d = x.reshape(-1, x.shape[-1])
        use_cache = cache is not None and not torch.compiler.is_compiling()
        if (
            use_cache
            and torch.is_grad_enabled()
            and (
                x.requires_grad
                or down_w.requires_grad
                or gate_w.requires_grad
                or gate_b.requires_grad
                or up_w.requires_grad
                or (result.requires_grad if result is not None else base_weight.requires_grad)  # type: ignore[union-attr]
                or (base_bias is not None and base_bias.requires_grad)
                or (base_input is not None and base_input.requires_grad)
            )
        ):
            cache.clear()  # type: ignore[union-attr]  # training: hold no copy of weights the next step changes
            use_cache = False
        if use_cache:
            weight, bias, up_t = cache.get(down_w, gate_w, gate_b, up_w, logit_scale)  # type: ignore[union-attr]
        else:
            weight = _down_and_gate_weight(down_w, gate_w, logit_scale)
            bias = _padded_bias(gate_b, r)
            up_t = up_w.t()
        z = F.linear(x2d, weight, bias)  # (T, r + r_g): [D x, s W_g x + b_g]
        h = F.glu(z, -1) if num_static == 0 else _hidden(z, r, num_static)
        if result is None:
            base_x2d = x2d if base_input is None else base_input.reshape(-1, base_input.shape[-1])
            out = F.linear(base_x2d, base_weight, base_bias).addmm_(h, up_t, alpha=scaling)  # type: ignore[arg-type]
        else:
            out = _add_up(result.reshape(-1, result.shape[-1]), h, up_t, scaling)
        return out.view(*x.shape[:-1], out.shape[-1])
