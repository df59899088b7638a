"""Queryable LoRA: routing over shared atoms, as a PEFT adapter."""

from __future__ import annotations

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from disel.methods import build_model
from disel.methods.queryable import (
    QueryableConfig,
    QueryableLinear,
    instruction_prior,
    layer_index,
    record_routing,
)
from disel.testing import TinyMLP, tiny_model


def qmodel(**kw) -> peft.PeftModel:
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", num_atoms=4, top_k=2, block_size=2)
    cfg.update(kw)
    return get_peft_model(tiny_model("llama", layers=4), QueryableConfig(**cfg))


def randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


IDS = torch.randint(3, 120, (3, 7), generator=torch.Generator().manual_seed(1))


def test_starts_as_base_and_memory_is_shared():
    base = tiny_model("llama", layers=4)
    with torch.no_grad():
        expected = base(IDS).logits
    model = get_peft_model(base, QueryableConfig(r=4, target_modules="all-linear", num_atoms=3, top_k=1))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)
    layers = [m for m in model.modules() if isinstance(m, QueryableLinear)]
    assert len({id(m.lora_memory["default"]) for m in layers}) == 1
    memory = model.base_model.memory()
    assert memory.atoms.shape == (3, 4, 4)
    # the shared memory is counted once among the trainable parameters
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_layer = sum(m.lora_A["default"].weight.numel() + m.lora_B["default"].weight.numel() for m in layers)
    assert n_trainable == per_layer + sum(p.numel() for p in memory.parameters())


def test_blocks_group_consecutive_layers():
    model = qmodel(block_size=2)
    blocks = {n: m.block_index for n, m in model.named_modules() if isinstance(m, QueryableLinear)}
    for name, b in blocks.items():
        assert b == layer_index(name) // 2
    assert set(blocks.values()) == {0, 1}
    assert layer_index("model.layers.13.mlp.up_proj") == 13
    assert layer_index("transformer.h.2.attn.c_attn") == 2
    assert layer_index("lin0") == 0


def test_topk_sparsity_and_convex_weights():
    model = qmodel(num_atoms=5, top_k=2)
    randomize(model)
    with torch.no_grad(), record_routing(model) as rec:
        model(IDS)
    assert len(rec) == 2  # two blocks, one routing each
    for _, _, alpha in rec:
        assert alpha.shape == (3, 5)
        assert torch.all((alpha > 0).sum(-1) == 2)
        torch.testing.assert_close(alpha.sum(-1), torch.ones(3))
        assert torch.all(alpha >= 0)


def test_update_norm_is_bounded_by_the_convex_combination():
    model = qmodel(num_atoms=4, top_k=3, atom_init_noise=0.5)
    randomize(model)
    captured = {}
    layer = next(m for m in model.modules() if isinstance(m, QueryableLinear))
    layer.register_forward_hook(lambda m, i, o: captured.update(x=i[0].detach(), y=o.detach()))
    with torch.no_grad():
        model(IDS)
        x = captured["x"]
        delta = captured["y"] - layer.get_base_layer()(x)
        mem = layer.lora_memory["default"]
        atom_norm = torch.linalg.matrix_norm(mem.atoms, ord=2).max()
        bound = (
            layer.scaling["default"]
            * torch.linalg.matrix_norm(layer.lora_B["default"].weight, ord=2)
            * atom_norm
            * layer.lora_A["default"](x).norm(dim=-1)
        )
    assert torch.all(delta.norm(dim=-1) <= bound * (1 + 1e-5))
    assert delta.abs().max() > 0


def test_one_atom_without_routing_reduces_to_lora():
    torch.manual_seed(0)
    q = get_peft_model(
        TinyMLP(),
        QueryableConfig(
            r=4, lora_alpha=8, target_modules=["lin0", "lin1"], num_atoms=1, top_k=1, atom_init_noise=0.0
        ),
    )
    torch.manual_seed(0)
    lora = get_peft_model(TinyMLP(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
    randomize(q)
    state = lora.state_dict()
    with torch.no_grad():
        for n, p in q.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                state[n].copy_(p)
    x = torch.randn(6, 16)
    with torch.no_grad():
        torch.testing.assert_close(q(x), lora(x))


def test_save_load_round_trip(tmp_path):
    model = qmodel()
    randomize(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama", layers=4), tmp_path)
    assert isinstance(loaded.peft_config["default"], QueryableConfig)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, rtol=0, atol=1e-6)
    assert torch.equal(loaded.base_model.memory().atoms, model.base_model.memory().atoms)


def test_gradients_reach_memory_and_factors():
    model = qmodel()
    randomize(model)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    mem = model.base_model.memory()
    for name in ("atoms", "keys"):
        assert getattr(mem, name).grad is not None and getattr(mem, name).grad.abs().sum() > 0
    assert mem.query.weight.grad.abs().sum() > 0


def test_instruction_prior_shifts_routing():
    model = qmodel(prior_dim=6, num_atoms=4, top_k=4)
    randomize(model)
    with torch.no_grad():
        model.base_model.memory().prior.weight.normal_(0, 3.0)
        with record_routing(model) as plain:
            model(IDS)
        with instruction_prior(model, torch.randn(3, 6)), record_routing(model) as prior:
            model(IDS)
    assert not torch.allclose(plain[0][2], prior[0][2])


def test_registry_and_bad_config():
    model = build_model(tiny_model("llama"), "queryable", rank=4, options={"queryable": {"num_atoms": 3}})
    assert model.peft_config["default"].num_atoms == 3
    with pytest.raises(ValueError, match="top_k=5.*num_atoms=4"):
        QueryableConfig(target_modules="all-linear", num_atoms=4, top_k=5)
    with pytest.raises(ValueError, match="num_atoms=0"):
        QueryableConfig(target_modules="all-linear", num_atoms=0)
    with pytest.raises(TypeError, match="cannot be merged"):
        qmodel().merge_and_unload()
    model = qmodel()
    model.eval()
    with pytest.raises(ValueError, match="mixed batches"):
        model(IDS, adapter_names=["default"] * 3)


def test_routing_usage_per_domain_and_plot(tmp_path):
    from disel.analysis.routing import plot_routing, routing_usage
    from disel.testing_tokenizers import tiny_tokenizer

    tok = tiny_tokenizer(128)
    model = qmodel(num_atoms=4, top_k=2)
    randomize(model)
    with torch.no_grad():  # make routing depend strongly on the input
        model.base_model.memory().query.weight.normal_(0, 5.0)
    usage = routing_usage(
        model, tok, {"code": ["def f(x):\n    return x + 1"], "prose": ["The cat sat on it."]}
    )
    assert set(usage) == {"code", "prose"}
    for blocks in usage.values():
        assert set(blocks) == {0, 1}
        for weights in blocks.values():
            assert len(weights) == 4 and abs(sum(weights) - 1.0) < 1e-6
            assert sum(w > 0 for w in weights) <= 2  # one text: at most top_k atoms used
    png = plot_routing(usage, tmp_path / "routing.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
