"""DISeL as a PEFT method: one matrix of checks that every supported architecture must pass."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import disel
from disel.methods.gated_lora.layer import DiselGate
from disel.testing import DECODERS, TinyMLP, tiny_model

ARCHS = ["llama", "mistral", "qwen2", "gpt2", "roberta", "bert", "mlp"]


def make_base(arch: str, seed: int = 0) -> torch.nn.Module:
    if arch == "mlp":
        torch.manual_seed(seed)
        return TinyMLP().eval()
    return tiny_model(arch, seed=seed)


def targets(arch: str):
    return ["lin0", "lin1"] if arch == "mlp" else "all-linear"


def make_inputs(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if arch == "mlp":
        return {"x": torch.randn(5, 16, generator=g)}
    ids = torch.randint(3, 120, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def disel_model(arch: str, r: int = 4, **kw) -> peft.PeftModel:
    cfg = disel.DiselConfig(r=r, lora_alpha=2 * r, target_modules=targets(arch), **kw)
    return get_peft_model(make_base(arch), cfg)


def randomize_adapter(model: torch.nn.Module, seed: int = 0) -> None:
    """Give U (lora_B) non-zero values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if "lora_gate" in name and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g))


def train_steps(model: torch.nn.Module, arch: str, steps: int = 3, lr: float = 1e-2) -> None:
    opt = disel.build_optimizer(model, lr=lr)
    model.train()
    for i in range(steps):
        out = run(model, make_inputs(arch, seed=10 + i))
        loss = out.float().pow(2).mean() if arch == "mlp" else out.float().logsumexp(-1).mean() - out.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_init_equals_base_exactly(arch):
    base = make_base(arch)
    inputs = make_inputs(arch)
    with torch.no_grad():
        expected = run(base, inputs).clone()
    model = get_peft_model(base, disel.DiselConfig(r=4, target_modules=targets(arch)))
    assert sum(1 for _ in disel.iter_gates(model)) > 0
    with torch.no_grad():
        assert torch.equal(run(model, inputs), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_gates_open_equals_lora_and_shut_equals_base(arch):
    dmodel = disel_model(arch)
    randomize_adapter(dmodel)
    lmodel = get_peft_model(make_base(arch), LoraConfig(r=4, lora_alpha=8, target_modules=targets(arch)))
    # copy D and U into the LoRA model
    lstate = lmodel.state_dict()
    with torch.no_grad():
        for name, p in dmodel.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                lstate[name].copy_(p)
    inputs = make_inputs(arch)
    with torch.no_grad():
        base = run(make_base(arch), inputs)
        lora_out = run(lmodel, inputs)
        gated = run(dmodel, inputs)
        with disel.force_gates(dmodel, 1.0):
            opened = run(dmodel, inputs)
        with disel.force_gates(dmodel, 0.0):
            shut = run(dmodel, inputs)
    assert not torch.allclose(lora_out, base, atol=1e-4), "the adapter must change the output"
    assert not torch.allclose(gated, lora_out, atol=1e-4), "real gates are not all open"
    torch.testing.assert_close(opened, lora_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shut, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_all_disel_parameters_and_nothing_else_trains(arch):
    model = disel_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "no trainable parameters"
    assert all("lora_A" in n or "lora_B" in n or "lora_gate" in n for n in trainable), trainable
    kinds = {"lora_A", "lora_B", "lora_gate.default.weight", "lora_gate.default.bias"}
    assert {k for k in kinds if any(k in n for n in trainable)} == kinds

    # Step 0: U = 0, so the gate and D gradients are exactly zero; one step moves U.
    train_steps(model, arch, steps=1)
    model.train()
    out = run(model, make_inputs(arch, seed=99))
    loss = out.float().pow(2).mean() if arch == "mlp" else out.float().logsumexp(-1).mean() - out.mean()
    loss.backward()
    for k in kinds:
        grads = [p.grad for n, p in model.named_parameters() if k in n]
        assert all(g is not None for g in grads), k
        assert any(g.abs().sum() > 0 for g in grads), f"no gradient reached {k}"
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None
            assert torch.equal(p, before[n]), f"frozen parameter {n} changed"


def test_gate_gradient_is_exactly_zero_at_init():
    model = disel_model("llama")
    model.train()
    out = run(model, make_inputs("llama"))
    out.float().logsumexp(-1).mean().backward()
    for _, gate in disel.iter_gates(model):
        assert torch.count_nonzero(gate.weight.grad) == 0
        assert torch.count_nonzero(gate.bias.grad) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_train_save_reload_in_one_call(arch, tmp_path):
    model = disel_model(arch)
    train_steps(model, arch, steps=3)
    inputs = make_inputs(arch, seed=5)
    with torch.no_grad():
        expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("lora_gate" in k for k in saved)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(make_base(arch), tmp_path)
    relevant = [str(w.message) for w in caught if "is_gradient_checkpointing" not in str(w.message)]
    assert relevant == [], relevant
    assert isinstance(loaded.peft_config["default"], disel.DiselConfig)
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, inputs), expected, rtol=0, atol=1e-6)
    gates_a = dict(disel.iter_gates(model))
    gates_b = dict(disel.iter_gates(loaded))
    assert gates_a.keys() == gates_b.keys()
    for name, g in gates_a.items():
        assert torch.equal(g.weight, gates_b[name].weight)
        assert torch.equal(g.bias, gates_b[name].bias)
    cfg = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, disel.DiselConfig)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "DISEL"


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapter_gives_base_exactly(arch):
    model = disel_model(arch)
    randomize_adapter(model)
    inputs = make_inputs(arch)
    with torch.no_grad():
        base = run(make_base(arch), inputs)
        with model.disable_adapter():
            disabled = run(model, inputs)
        assert not torch.equal(run(model, inputs), base)
    assert torch.equal(disabled, base)


def test_auto_peft_model_loads_in_one_call(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(tiny_model("llama"), disel.DiselConfig(r=4, target_modules="all-linear"))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    inputs = make_inputs("llama")
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, inputs), run(model, inputs), rtol=0, atol=1e-6)


def test_several_adapters_set_delete_and_mixed_batches():
    model = disel_model("llama")
    randomize_adapter(model, seed=1)
    model.add_adapter("other", disel.DiselConfig(r=2, target_modules="all-linear", gate_bias_init=-1.0))
    randomize_adapter(model, seed=2)
    model.eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 120, (3, 8), generator=g)
    with torch.no_grad():
        base = run(tiny_model("llama"), {"input_ids": ids})
        model.set_adapter("default")
        out_default = run(model, {"input_ids": ids})
        model.set_adapter("other")
        out_other = run(model, {"input_ids": ids})
        mixed = run(model, {"input_ids": ids, "adapter_names": ["default", "other", "__base__"]})
    assert not torch.allclose(out_default, out_other)
    torch.testing.assert_close(mixed[0], out_default[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], out_other[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], base[2], rtol=0, atol=1e-6)
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert all("other" not in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(run(model, {"input_ids": ids}), out_default)


def test_merge_and_unload_raises_clear_error_but_unload_works():
    model = disel_model("llama")
    with pytest.raises(TypeError, match="cannot be merged.*input-dependent gate.*disel compact"):
        model.merge_and_unload()
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter()
    inputs = make_inputs("llama")
    unloaded = model.unload()
    with torch.no_grad():
        assert torch.equal(run(unloaded, inputs), run(tiny_model("llama"), inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    base = tiny_model("llama").to(dtype)
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = run(base, inputs)
    model = get_peft_model(base, disel.DiselConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        out = run(model, inputs)
    assert out.dtype == dtype
    assert torch.equal(out, expected)
    # adapters are upcast to fp32 by PEFT's default autocast_adapter_dtype, gates included
    assert {p.dtype for p in disel.gate_parameters(model)} == {torch.float32}
    randomize_adapter(model)
    model.train()
    out = run(model, inputs)
    out.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in disel.gate_parameters(model))


def test_gradient_checkpointing_matches_plain_backward():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = disel_model("llama")
        randomize_adapter(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        out = run(model, make_inputs("llama"))
        out.float().logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    a, b = grads(False), grads(True)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)


def test_torch_compile_forward():
    model = disel_model("llama")
    randomize_adapter(model)
    inputs = make_inputs("llama")
    with torch.no_grad():
        eager = run(model, inputs)
        compiled = torch.compile(model, backend="eager")
        torch.testing.assert_close(run(compiled, inputs), eager)


def test_conv1d_and_all_linear_on_gpt2():
    model = disel_model("gpt2")
    layers = [m for m in model.modules() if isinstance(m, disel.DiselLinear)]
    assert layers and all(m.fan_in_fan_out for m in layers)
    assert {type(m.get_base_layer()).__name__ for m in layers} == {"Conv1D"}


@pytest.mark.parametrize("arch", DECODERS)
def test_all_linear_targets_every_decoder_block_linear(arch):
    model = disel_model(arch)
    names = [n for n, m in model.named_modules() if isinstance(m, disel.DiselLinear)]
    assert not any("lm_head" in n for n in names)
    per_block = {"llama": 7, "mistral": 7, "qwen2": 7, "gpt2": 4}[arch]
    assert len(names) == 2 * per_block, names  # two blocks in the tiny models


def test_bottleneck_and_logit_scale_gates():
    model = disel_model("llama", gate_bottleneck=3, gate_logit_scale=True)
    gate = next(g for _, g in disel.iter_gates(model))
    assert gate.proj is not None and gate.proj.weight.shape == (3, gate.in_features)
    assert gate.weight.shape == (4, 3)
    x = torch.randn(6, gate.in_features)
    expected = torch.sigmoid((x @ gate.proj.weight.T @ gate.weight.T) / gate.in_features**0.5 + gate.bias)
    torch.testing.assert_close(gate(x), expected)
    # gates start nearly closed: sigmoid(-3) ~ 0.047 plus a small input term
    g0 = disel_model("llama")
    gate0 = next(g for _, g in disel.iter_gates(g0))
    assert torch.all(gate0.bias == -3.0)
    assert gate0(torch.zeros(2, gate0.in_features)).max() < 0.05


def test_zero_gate_weight_init_ablation():
    model = disel_model("llama", gate_weight_init="zero")
    for _, g in disel.iter_gates(model):
        assert torch.count_nonzero(g.weight) == 0


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("gate_bias_init", "low", "gate_bias_init='low'"),
        ("gate_bias_init", float("nan"), "gate_bias_init=nan"),
        ("gate_weight_init", "xavier", "gate_weight_init='xavier'.*'kaiming'"),
        ("gate_logit_scale", "yes", "gate_logit_scale='yes'"),
        ("gate_bottleneck", 0, "gate_bottleneck=0.*positive integer"),
        ("gate_bottleneck", 2.5, "gate_bottleneck=2.5"),
        ("gate_lr_multiplier", -1.0, "gate_lr_multiplier=-1.0.*positive"),
        ("gate_lr_multiplier", 0, "gate_lr_multiplier=0"),
        ("r", 0, "r=0.*positive integer"),
        ("use_dora", True, "use_dora=True"),
        ("init_lora_weights", "pissa", "init_lora_weights='pissa'"),
    ],
)
def test_bad_config_values_give_clear_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        disel.DiselConfig(target_modules="all-linear", **{field: value})


def test_target_modules_matching_nothing():
    with pytest.raises(ValueError, match="not found in the base model|Target modules"):
        get_peft_model(tiny_model("llama"), disel.DiselConfig(target_modules=["no_such_layer"]))


def test_embedding_target_is_refused_clearly():
    with pytest.raises(ValueError, match="DISeL cannot adapt Embedding"):
        get_peft_model(tiny_model("llama"), disel.DiselConfig(target_modules=["embed_tokens"]))


def test_loading_into_base_of_wrong_shape(tmp_path):
    model = disel_model("llama")
    model.save_pretrained(tmp_path)
    wrong = tiny_model("llama", hidden=48)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(wrong, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors_file(tmp_path, damage):
    model = disel_model("llama")
    model.save_pretrained(tmp_path)
    f: Path = tmp_path / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 64)
    with pytest.raises(Exception, match="(?i)safetensor|header|incomplete|deserializ|invalid"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_gate_module_is_what_the_layer_uses():
    model = disel_model("llama")
    calls = []
    gates = [g for _, g in disel.iter_gates(model)]
    hooks = [g.register_forward_hook(lambda m, i, o: calls.append(o.shape)) for g in gates]
    with torch.no_grad():
        run(model, make_inputs("llama"))
    for h in hooks:
        h.remove()
    assert len(calls) == len(gates)
    assert all(isinstance(g, DiselGate) for g in gates)
