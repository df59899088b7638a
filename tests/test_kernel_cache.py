"""The whole-layer fused kernel and the no-grad weight cache: when they run, and that they never go stale."""

from __future__ import annotations

import contextlib
import copy
import pickle

import peft
import pytest
import torch
from torch import nn

import disel
from disel.methods.gated_lora import kernels
from disel.methods.gated_lora.kernels import fused_gated_update, reference_path
from disel.testing import TinyMLP

TARGETS = ["lin0", "lin1", "lin2"]


def _pm(seed: int = 0, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "gate_bias_init": 0.5}
    options.update(cfg)
    pm = peft.get_peft_model(TinyMLP(d_in=12, hidden=20, d_out=6), disel.DiselConfig(**options))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    return pm


@pytest.fixture
def paths(monkeypatch):
    """Counts fused-kernel calls by kind: "layer" (base inside the kernel) and "update" (PEFT's base output)."""
    calls = {"layer": 0, "update": 0}
    real = kernels.fused_gated_update

    def spy(*args, **kwargs):
        calls["layer" if kwargs.get("base_weight") is not None else "update"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "fused_gated_update", spy)
    return calls


def _reference(pm: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad(), reference_path():
        return pm(x, **kwargs)


def _caches(pm: nn.Module) -> list[kernels.WeightCache]:
    return [g.weight_cache for _, g in disel.iter_gates(pm)]


@pytest.mark.parametrize("bias,logit_scale,num_static", [(True, 1.0, 0), (False, 0.37, 0), (True, 0.37, 2)])
def test_gradcheck_whole_layer(bias, logit_scale, num_static):
    torch.manual_seed(0)
    t, d, o, r = 5, 6, 7, 3

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    rg = r - num_static
    x, w, b = leaf(t, d), leaf(o, d), leaf(o) if bias else None
    dw, gw, gb, uw = leaf(r, d), leaf(rg, d), leaf(rg), leaf(o, r)
    inputs = (x, w, b, dw, gw, gb, uw)

    def fn(x, w, b, dw, gw, gb, uw):
        return fused_gated_update(
            x, None, dw, gw, gb, uw, 1.7, logit_scale, num_static, base_weight=w, base_bias=b
        )

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)  # plain differentiable ops: second derivatives too
    gate = torch.cat(
        [torch.ones(t, num_static, dtype=x.dtype), torch.sigmoid(x @ gw.t() * logit_scale + gb)], -1
    )
    ref = x @ w.t() + (b if bias else 0) + 1.7 * ((gate * (x @ dw.t())) @ uw.t())
    kw = {"base_weight": w, "base_bias": b}
    torch.testing.assert_close(
        fused_gated_update(x, None, dw, gw, gb, uw, 1.7, logit_scale, num_static, **kw), ref
    )
    with torch.no_grad():
        cache = kernels.WeightCache()
        for _ in range(2):  # the second call reads the cache
            out = fused_gated_update(x, None, dw, gw, gb, uw, 1.7, logit_scale, num_static, cache=cache, **kw)
            torch.testing.assert_close(out, ref)
        assert cache
    with pytest.raises(ValueError, match="either result or base_weight"):
        fused_gated_update(x, x @ w.t(), dw, gw, gb, uw, 1.7, logit_scale, num_static, **kw)


def test_whole_layer_path_is_the_common_case_and_matches_peft(paths):
    pm = _pm()
    x = torch.randn(3, 5, 12)
    out = pm(x)
    assert paths == {"layer": 3, "update": 0}
    torch.testing.assert_close(out, _reference(pm, x), atol=1e-6, rtol=1e-5)
    with reference_path():  # PEFT's forward and the module path: no fused call at all
        pm(x)
    assert paths == {"layer": 3, "update": 0}


def test_dropout_in_training_stays_on_the_whole_layer_path(paths):
    """The base reads x, the adapter dropout(x), with PEFT's random draw: outputs and gradients match PEFT."""
    pm = _pm(lora_dropout=0.3)
    pm.train()
    x = torch.randn(4, 5, 12)
    outs, grads = [], []
    for reference in (False, True):
        torch.manual_seed(7)
        pm.zero_grad(set_to_none=True)
        with reference_path() if reference else contextlib.nullcontext():
            out = pm(x)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None})
    assert paths == {"layer": 3, "update": 0}
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)
    torch.manual_seed(7)
    with torch.no_grad():
        dropped = pm(x)
    torch.manual_seed(8)
    with torch.no_grad():
        other = pm(x)
    assert not torch.allclose(dropped, other)  # the masks are random: dropout really applies
    pm.eval()  # eval-mode dropout is the identity
    with torch.no_grad():
        torch.testing.assert_close(pm(x), _reference(pm, x), atol=1e-6, rtol=1e-5)


def test_other_cases_take_peft_forward(paths):
    x = torch.randn(4, 12)
    # an in-place dropout (not what PEFT builds) would change the base's input too: PEFT's forward
    pm = _pm(lora_dropout=0.3)
    for m in pm.modules():
        if isinstance(m, nn.Dropout):
            m.inplace = True
    pm.train()
    pm(x)
    assert paths == {"layer": 0, "update": 3}
    paths.update(update=0)

    pm = _pm()
    pm.add_adapter("other", disel.DiselConfig(r=2, lora_alpha=3, target_modules=TARGETS))
    pm.eval()
    paths.update(layer=0, update=0)
    with torch.no_grad():
        mixed = pm(x, adapter_names=["default", "other", "__base__", "default"])
    assert paths == {"layer": 0, "update": 6}
    torch.testing.assert_close(
        mixed, _reference(pm, x, adapter_names=["default", "other", "__base__", "default"])
    )
    pm.base_model.set_adapter(["default", "other"])  # two active adapters
    paths.update(update=0)
    both = pm(x)
    assert paths == {"layer": 0, "update": 6}
    torch.testing.assert_close(both, _reference(pm, x), atol=1e-6, rtol=1e-5)

    pm = _pm()
    lin1 = pm.base_model.model.lin1
    seen = []
    handle = lin1.base_layer.register_forward_hook(lambda m, i, o: seen.append(o))
    paths.update(update=0, layer=0)
    pm(x)
    handle.remove()
    assert len(seen) == 1 and paths == {"layer": 2, "update": 1}  # the hooked base ran as a module
    with pm.disable_adapter():
        paths.update(update=0, layer=0)
        torch.testing.assert_close(pm(x), pm.get_base_model()(x))
        assert paths == {"layer": 0, "update": 0}


def test_trainable_base_and_double_precision():
    pm = _pm()
    pm.base_model.model.lin1.base_layer.weight.requires_grad_(True)
    pm.base_model.model.lin1.base_layer.bias.requires_grad_(True)
    pm.double()
    x = torch.randn(3, 12, dtype=torch.float64)
    grads = {}
    for ref in (False, True):
        pm.zero_grad(set_to_none=True)
        ctx = reference_path() if ref else torch.enable_grad()
        with ctx:
            pm(x).pow(2).sum().backward()
        grads[ref] = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    assert "base_model.model.lin1.base_layer.weight" in grads[False]
    assert grads[False].keys() == grads[True].keys()
    for k in grads[True]:
        torch.testing.assert_close(grads[False][k], grads[True][k], msg=k)


def test_cache_is_used_without_grad_and_refreshed_after_every_change():
    pm = _pm()
    pm.eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        pm(x)
    caches = _caches(pm)
    assert all(caches)
    held = [c.entry[2] for c in caches]
    with torch.no_grad():
        pm(x)
    assert all(c.entry[2] is w for c, w in zip(caches, held))  # reused

    def check(what: str) -> None:
        with torch.no_grad():
            out = pm(x)
        torch.testing.assert_close(out, _reference(pm, x), atol=1e-6, rtol=1e-5, msg=what)

    gate = pm.base_model.model.lin0.lora_gate["default"]
    lora_A = pm.base_model.model.lin1.lora_A["default"]

    # an optimizer step
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm(x).pow(2).sum().backward()
    assert not any(_caches(pm))  # a call with autograd empties the caches
    with torch.no_grad():
        pm(x)
    opt.step()
    check("optimizer step")
    # in-place writes through the parameter, on each of D, W_g and b_g
    for p in (lora_A.weight, gate.weight, gate.bias):
        with torch.no_grad():
            p.mul_(-1.5)
        check("in-place write")
    # load_state_dict (peft's keys), of another adapter's values
    other = _pm(seed=7)
    pm.load_state_dict(other.state_dict())
    check("load_state_dict")
    # a new tensor behind the parameter, and a new parameter
    gate.weight.data = torch.randn_like(gate.weight)
    check("p.data = ...")
    lora_A.weight = nn.Parameter(torch.randn_like(lora_A.weight))
    check("new nn.Parameter")
    # a round trip through another dtype frees and reallocates every tensor (same size, same version)
    pm.half()
    assert not any(_caches(pm))  # .to() / .half() drop the cached copies at once
    pm.float()
    check("half and back")
    # logit scale changes the concatenated weight
    gate.logit_scale = True
    check("logit scale")
    # what is not seen: a write through .data; clear_caches fixes it
    with torch.no_grad():
        pm(x)
    lora_A.weight.data.mul_(2.0)
    assert kernels.clear_caches(pm) == 3
    check("clear_caches after a .data write")


def test_cache_with_inference_mode_and_grad():
    pm = _pm()
    pm.eval()
    x = torch.randn(2, 12)
    with torch.inference_mode():
        a = pm(x)
    with torch.no_grad():
        b = pm(x)
    torch.testing.assert_close(a, b)
    xg = x.clone().requires_grad_(True)
    out = pm(xg)  # with autograd: the kernel reads the parameters, the caches are emptied
    assert out.requires_grad and not any(_caches(pm))
    out.sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(out.detach(), b)


def test_gate_hooks_still_called_with_a_cache(paths):
    pm = _pm()
    pm.eval()
    x = torch.randn(2, 12)
    with torch.no_grad():
        pm(x)
    seen = []
    handles = [g.register_forward_hook(lambda m, i, o: seen.append(o)) for _, g in disel.iter_gates(pm)]
    paths.update(layer=0, update=0)
    with torch.no_grad():
        hooked = pm(x)
    for h in handles:
        h.remove()
    assert len(seen) == 3 and paths == {"layer": 0, "update": 0}
    torch.testing.assert_close(hooked, _reference(pm, x))
    back = []
    gate = pm.base_model.model.lin2.lora_gate["default"]
    h = gate.register_full_backward_hook(lambda m, gi, go: back.append(go))
    paths.update(layer=0, update=0)
    pm(x.requires_grad_(True)).sum().backward()
    h.remove()
    assert len(back) == 1 and paths == {"layer": 2, "update": 0}


def test_state_dict_keys_save_load_copy_and_pickle(tmp_path):
    pm = _pm()
    keys_before = set(pm.state_dict())
    x = torch.randn(2, 12)
    with torch.no_grad():
        expected = pm(x)
    assert all(_caches(pm)) and set(pm.state_dict()) == keys_before
    assert not any("cache" in k for k in keys_before)
    pm.save_pretrained(tmp_path / "adapter")
    saved = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
    lora = peft.get_peft_model(
        TinyMLP(d_in=12, hidden=20, d_out=6), peft.LoraConfig(r=4, target_modules=TARGETS)
    )
    lora_keys = set(peft.get_peft_model_state_dict(lora))
    assert lora_keys < set(saved) and {k for k in saved if k not in lora_keys} == {
        f"base_model.model.{t}.lora_gate.{p}" for t in TARGETS for p in ("weight", "bias")
    }
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(TinyMLP(d_in=12, hidden=20, d_out=6), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)
    for clone in (copy.deepcopy(pm), pickle.loads(pickle.dumps(pm))):
        assert not any(_caches(clone))
        with torch.no_grad():
            torch.testing.assert_close(clone(x), expected)


def test_no_grad_compiled_forward():
    pm = _pm()
    pm.eval()
    layer = pm.base_model.model.lin1
    x = torch.randn(3, 20)
    with torch.no_grad():
        ref = _reference(layer, x)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), ref, atol=1e-6, rtol=1e-5)
