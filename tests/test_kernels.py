"""The fused DISeL kernel computes what the reference module path computes (outputs and gradients)."""

from __future__ import annotations

import contextlib
import io
import json

import peft
import pytest
import torch
from torch import nn

import disel
from disel.cli import main as cli_main
from disel.methods.gated_lora import kernels
from disel.methods.gated_lora.kernels import fused_gated_update, reference_path
from disel.testing import TinyMLP


def _disel_mlp(seed: int = 0, dtype=torch.float32, autocast=True, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyMLP(d_in=12, hidden=20, d_out=6).to(dtype)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1", "lin2"], "gate_bias_init": 0.5}
    options.update(cfg)
    pm = peft.get_peft_model(model, disel.DiselConfig(**options), autocast_adapter_dtype=autocast)
    with torch.no_grad():  # U starts at zero; make the adapters (and every gradient) non-trivial
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    return pm


def _grads(pm: nn.Module, x: torch.Tensor, reference: bool, seed: int = 0):
    pm.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    ctx = reference_path() if reference else contextlib.nullcontext()
    torch.manual_seed(seed)
    with ctx:
        out = pm(x)
    out.float().pow(2).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


def _assert_same(pm, x, atol=1e-5, rtol=1e-4, seed=0):
    out_f, gx_f, g_f = _grads(pm, x, reference=False, seed=seed)
    out_r, gx_r, g_r = _grads(pm, x, reference=True, seed=seed)
    torch.testing.assert_close(out_f, out_r, atol=atol, rtol=rtol)
    torch.testing.assert_close(gx_f, gx_r, atol=atol, rtol=rtol)
    assert g_f.keys() == g_r.keys()
    kinds = {k.split(".")[-3] for k in g_f}
    assert {"lora_A", "lora_B", "lora_gate"} <= kinds
    for k in g_f:
        torch.testing.assert_close(g_f[k], g_r[k], atol=atol, rtol=rtol, msg=k)


@pytest.mark.parametrize("logit_scale", [1.0, 0.37])
def test_gradcheck_float64(logit_scale):
    torch.manual_seed(0)
    t, d, o, r = 5, 6, 7, 3

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    inputs = (leaf(t, d), leaf(t, o), leaf(r, d), leaf(r, d), leaf(r), leaf(o, r))
    fn = lambda *a: fused_gated_update(*a, 1.7, logit_scale)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    x, res, dw, gw, gb, uw = inputs
    ref = res + 1.7 * ((torch.sigmoid(x @ gw.t() * logit_scale + gb) * (x @ dw.t())) @ uw.t())
    torch.testing.assert_close(fused_gated_update(x, res, dw, gw, gb, uw, 1.7, logit_scale), ref)
    with torch.no_grad():  # the inference branch (no autograd node) agrees too
        torch.testing.assert_close(fused_gated_update(x, res, dw, gw, gb, uw, 1.7, logit_scale), ref)


def test_fast_path_applies_decides_from_the_modules():
    pm = _disel_mlp()
    layer = pm.base_model.model.lin1
    a, b, g = layer.lora_A["default"], layer.lora_B["default"], layer.lora_gate["default"]
    assert kernels.fast_path_applies(a, b, g)
    for module in (a, b, g):
        for register in ("register_forward_hook", "register_full_backward_hook"):
            args = (lambda *h: None,)
            handle = getattr(module, register)(*args)
            assert not kernels.fast_path_applies(a, b, g), (type(module).__name__, register)
            handle.remove()
        module.forward = module.forward  # replaced on the instance (as accelerate's hooks do)
        assert not kernels.fast_path_applies(a, b, g)
        del module.forward
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *h: None)
    assert not kernels.fast_path_applies(a, b, g)
    handle.remove()
    with reference_path():
        assert not kernels.fast_path_applies(a, b, g)
    a.to(torch.float64)
    assert not kernels.fast_path_applies(a, b, g)  # mixed adapter dtypes
    assert kernels.fast_path_applies(a.float(), b, g)


def test_peft_layer_matches_reference_and_uses_fast_path(count_fused):
    pm = _disel_mlp(gate_logit_scale=True)
    x = torch.randn(3, 5, 12)
    _assert_same(pm, x)
    assert count_fused["n"] == 3  # three layers, once each in the fused run, never under reference_path()
    pm.eval()
    with torch.no_grad():
        fast = pm(x)
        with reference_path():
            ref = pm(x)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)


def test_dropout_shared_by_gate_and_down_projection():
    pm = _disel_mlp(lora_dropout=0.3)
    pm.train()
    _assert_same(pm, torch.randn(4, 12), seed=123)


def test_hooks_override_and_bottleneck_use_reference_path(count_fused):
    pm = _disel_mlp()
    x = torch.randn(2, 12)
    seen = []
    _, gate = next(iter(disel.iter_gates(pm)))
    handle = gate.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    pm(x)
    handle.remove()
    assert len(seen) == 1 and count_fused["n"] == 2  # the hooked layer ran the module path
    count_fused["n"] = 0
    with torch.no_grad(), disel.force_gates(pm, 0.0):
        out = pm(x)
        with pm.disable_adapter():
            plain = pm(x)
    assert count_fused["n"] == 0
    torch.testing.assert_close(out, plain)  # closed gates: exactly the base model
    bottleneck = _disel_mlp(gate_bottleneck=3)
    count_fused["n"] = 0
    bottleneck(x)
    assert count_fused["n"] == 0


def test_several_adapters_and_mixed_batch():
    pm = _disel_mlp()
    pm.add_adapter("other", disel.DiselConfig(r=2, lora_alpha=3, target_modules=["lin0", "lin1", "lin2"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B.other" in name or ("lora_gate.other" in name and name.endswith("bias")):
                p.normal_(0.0, 0.5)
    pm.base_model.set_adapter(["default", "other"])
    _assert_same(pm, torch.randn(3, 12))
    pm.eval()
    x = torch.randn(4, 12)
    names = ["default", "other", "__base__", "default"]
    with torch.no_grad():
        fast = pm(x, adapter_names=names)
        with reference_path():
            ref = pm(x, adapter_names=names)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "dtype,autocast", [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)]
)
def test_low_precision(dtype, autocast, count_fused):
    pm = _disel_mlp(dtype=dtype, autocast=autocast)
    adapter_dtype = next(p for n, p in pm.named_parameters() if "lora_A" in n).dtype
    assert adapter_dtype == (torch.float32 if autocast else dtype)
    x = torch.randn(3, 12, dtype=dtype)
    out_f, gx_f, g_f = _grads(pm, x, reference=False)
    out_r, gx_r, g_r = _grads(pm, x, reference=True)
    assert out_f.dtype == out_r.dtype == dtype and count_fused["n"] == 3
    tol = {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(out_f.float(), out_r.float(), **tol)
    torch.testing.assert_close(gx_f.float(), gx_r.float(), **tol)
    for k in g_f:
        scale = g_r[k].float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(g_f[k].float() / scale, g_r[k].float() / scale, **tol, msg=k)


def test_autocast_bf16_training_step(count_fused):
    pm = _disel_mlp()
    x = torch.randn(3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_f, gx_f, g_f = _grads(pm, x, reference=False)
        out_r, gx_r, g_r = _grads(pm, x, reference=True)
    assert count_fused["n"] == 3 and out_f.dtype == out_r.dtype
    assert all(g.dtype == torch.float32 for g in g_f.values())  # fp32 master weights get fp32 grads
    tol = {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(out_f.float(), out_r.float(), **tol)
    torch.testing.assert_close(gx_f.float(), gx_r.float(), **tol)
    for k in g_f:
        scale = g_r[k].abs().max().clamp_min(1.0)
        torch.testing.assert_close(g_f[k] / scale, g_r[k] / scale, **tol, msg=k)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(dropout, reentrant):
    """Recomputation in the backward redraws the same dropout masks (checkpoint restores the RNG state)."""
    pm = _disel_mlp(lora_dropout=dropout)
    pm.train()
    x = torch.randn(3, 12, requires_grad=True)
    torch.manual_seed(5)
    pm(x).pow(2).sum().backward()
    expected = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    gx = x.grad.clone()
    pm.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(5)
    out = torch.utils.checkpoint.checkpoint(pm, x, use_reentrant=reentrant)
    out.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, gx)
    for n, g in expected.items():
        torch.testing.assert_close(dict(pm.named_parameters())[n].grad, g, msg=n)


def test_torch_compile_forward_and_backward():
    pm = _disel_mlp()
    layer = pm.base_model.model.lin1  # a DiselLinear
    x = torch.randn(3, 20)
    out_r, gx_r, g_r = _grads(layer, x, reference=True)
    # fullgraph: the fused kernel traces without graph breaks; aot_eager also traces its backward
    # (what inductor needs) without paying for C++ code generation in a unit test.
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out, gx, grads = _grads(compiled, x, reference=False)
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx, gx_r, atol=1e-5, rtol=1e-4)
    grads = {k.removeprefix("_orig_mod."): g for k, g in grads.items()}
    assert grads.keys() == g_r.keys() and len(g_r) == 4
    for k, g in g_r.items():
        torch.testing.assert_close(grads[k], g, atol=1e-5, rtol=1e-4, msg=k)


def test_bench_cli_json_schema():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli_main(
            ["bench", "--quick", "--json", "--d", "32", "--r", "4", "--tokens", "16", "--repeats", "2"]
        )
    assert code == 0
    res = json.loads(buf.getvalue())
    for key in ("train_ratio_vs_lora", "infer_ratio_vs_lora", "memory_ratio_vs_lora"):
        assert res[key] > 0 and res["naive_" + key] > 0
    assert res["shape"] == {"d_in": 32, "d_out": 32, "r": 4, "tokens": 16, "dtype": "fp32", "device": "cpu"}
    # DISeL saves one more r-wide tensor and has the gate's parameters: more memory than LoRA, never less.
    assert res["memory_ratio_vs_lora"] > 1.0
    assert cli_main(["bench", "--quick", "--r", "0", "--d", "32"]) == 2


@pytest.mark.parametrize("num_static", [1, 2, 3])
def test_gradcheck_static_components(num_static):
    """Compacted layers: the first num_static components are ungated (3 = all of them: plain LoRA)."""
    torch.manual_seed(1)
    t, d, o, r = 5, 6, 7, 3

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    inputs = (leaf(t, d), leaf(t, o), leaf(r, d), leaf(r - num_static, d), leaf(r - num_static), leaf(o, r))
    assert torch.autograd.gradcheck(lambda *a: fused_gated_update(*a, 1.7, 0.37, num_static), inputs)
    x, res, dw, gw, gb, uw = inputs
    gate = torch.cat([torch.ones(t, num_static, dtype=x.dtype), torch.sigmoid(x @ gw.t() * 0.37 + gb)], -1)
    ref = res + 1.7 * ((gate * (x @ dw.t())) @ uw.t())
    torch.testing.assert_close(fused_gated_update(x, res, dw, gw, gb, uw, 1.7, 0.37, num_static), ref)
    with torch.no_grad():
        torch.testing.assert_close(fused_gated_update(x, res, dw, gw, gb, uw, 1.7, 0.37, num_static), ref)
    with pytest.raises(ValueError, match="rows"):
        fused_gated_update(x, res, dw, gw, gb, uw, 1.7, 0.37, num_static - 1)


def test_static_components_use_fast_path_and_match_reference(count_fused):
    # lin0: 2 of 4 components static; lin1: all 4 static (no gate rows); lin2: uncompacted
    pm = _disel_mlp(static_rank_pattern={"lin0": 2, "lin1": 4})
    gates = dict(disel.iter_gates(pm))
    assert sorted(g.num_static for g in gates.values()) == [0, 2, 4]
    assert all(g.fast_path_ok() for g in gates.values())
    x = torch.randn(3, 5, 12)
    _assert_same(pm, x, atol=1e-6, rtol=1e-5)
    assert count_fused["n"] == 3
    pm.eval()
    with torch.no_grad():
        fast = pm(x)
        with reference_path():
            ref = pm(x)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
    # a hooked (recorded) static gate runs the module path and sees the ones of its static components
    count_fused["n"] = 0
    seen = []
    gate = pm.base_model.model.lin0.lora_gate["default"]
    handle = gate.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        hooked = pm(x)
    handle.remove()
    assert count_fused["n"] == 2 and len(seen) == 1
    assert torch.equal(seen[0][..., :2], torch.ones(3, 5, 2))
    torch.testing.assert_close(hooked, ref, atol=1e-6, rtol=1e-5)


def test_torch_func_per_sample_gradients_and_forward_mode_on_the_fused_path():
    """Plain differentiable ops: torch.func (vmap of grad, jvp) works on a DISeL model's fused path."""
    from torch.func import functional_call, grad, jvp, vmap

    pm = _disel_mlp()
    pm.eval()
    params = {n: p.detach() for n, p in pm.named_parameters() if p.requires_grad}
    x = torch.randn(5, 12)

    def loss(p, xi):
        return functional_call(pm, p, (xi.unsqueeze(0),)).pow(2).sum()

    calls = {"n": 0}
    real = kernels.fused_gated_update

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    kernels.fused_gated_update = counting
    try:
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    finally:
        kernels.fused_gated_update = real
    assert calls["n"] == 3  # traced once per adapted layer, on the fused path
    for i in range(x.shape[0]):  # against autograd on the reference module path, one sample at a time
        with reference_path():
            ref = torch.autograd.grad(
                loss(dict(pm.named_parameters()), x[i]), [pm.get_parameter(n) for n in params]
            )
        for (name, g), r in zip(per_sample.items(), ref):
            torch.testing.assert_close(g[i], r, atol=1e-5, rtol=1e-4, msg=name)
    # forward mode: the directional derivative along a random direction in x, fused vs reference
    v = torch.randn_like(x)
    _, tangent = jvp(lambda t: pm(t), (x,), (v,))
    with reference_path():
        _, tangent_ref = jvp(lambda t: pm(t), (x,), (v,))
    torch.testing.assert_close(tangent, tangent_ref, atol=1e-5, rtol=1e-4)
    assert tangent.abs().max() > 0
