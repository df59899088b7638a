"""CorDA / CorDA++ in the method registry: exact init, true-base recovery, export, cache, rank budget."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel

from disel.errors import UserError
from disel.methods import build_model
from disel.methods.corda import (
    allocate_ranks,
    compactness,
    corda_info,
    covariance,
    export_to_lora,
    original_base,
    original_base_state,
    save_initial_adapter,
    select_covariances,
)
from disel.testing import tiny_model

VOCAB = 128


def make_batches(lo: int, hi: int, n: int = 16, t: int = 24, bs: int = 4, seed: int = 0, pad: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, hi, (n, t), generator=g)
    mask = torch.ones_like(ids)
    if pad:  # right-pad every other sequence to a random length
        for i in range(0, n, 2):
            k = int(torch.randint(4, t, (1,), generator=g))
            ids[i, k:] = 0
            mask[i, k:] = 0
    return [
        {"input_ids": ids[i : i + bs], "attention_mask": mask[i : i + bs], "labels": ids[i : i + bs].clone()}
        for i in range(0, n, bs)
    ]


CALIB = make_batches(0, VOCAB, seed=1)  # 384 tokens for hidden 32 / intermediate 64: non-singular


def build(method: str, mode: str, arch: str = "llama", calib=CALIB, rank: int = 4, **extra):
    return build_model(
        tiny_model(arch),
        method,
        rank=rank,
        calibration=lambda: calib,
        task_calibration=lambda: calib,  # IPM reads the task data; here the same batches
        options={method: {"mode": mode, "progress": False, **extra}},
    )


X = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model, x=X):
    return model(input_ids=x).logits


@pytest.mark.parametrize(
    "method,mode,arch",
    [
        ("corda", "kpm", "llama"),
        ("corda", "ipm", "llama"),
        ("corda++", "kpm", "llama"),
        ("corda", "ipm", "gpt2"),
    ],
)
def test_init_equals_base_and_original_base_is_recoverable(method, mode, arch):
    base_out = logits(tiny_model(arch))
    m = build(method, mode, arch=arch)
    out = logits(m)
    assert torch.allclose(out, base_out, atol=1e-4), (out - base_out).abs().max()
    # the adapter is not zero: the base weight really became a residual, so disable_adapter() is NOT the base
    with m.disable_adapter():
        resid = logits(m)
    assert (resid - base_out).abs().max() > 1e-3
    with original_base(m):
        assert torch.allclose(logits(m), base_out, atol=1e-4)
    assert torch.allclose(logits(m), out)  # weights restored after the block
    orig = original_base_state(m)
    ref = tiny_model(arch).state_dict()
    assert len(orig) == len(corda_info(m).targets) > 0
    for k, w in orig.items():
        assert torch.allclose(w, ref[k], atol=1e-5), k


def test_padded_batches_give_the_same_covariance_as_one_sequence_at_a_time():
    model = tiny_model("llama")
    from disel.methods.corda import resolve_targets
    from disel.methods.registry import MethodOptions

    targets = resolve_targets(model, MethodOptions(rank=4))
    padded = make_batches(0, VOCAB, n=8, bs=4, seed=3, pad=True)
    single = []
    for b in padded:
        for i in range(b["input_ids"].shape[0]):
            k = int(b["attention_mask"][i].sum())
            single.append({"input_ids": b["input_ids"][i : i + 1, :k]})
    a = covariance.collect_covariances(model, targets, padded, progress=False)
    s = covariance.collect_covariances(model, targets, single, progress=False)
    assert a.tokens == s.tokens and a.tokens[0] < 8 * 24
    for n in targets:
        assert torch.allclose(a.covs[n][0], s.covs[n][0], atol=1e-5, rtol=1e-4), n


def test_covariance_cache_is_reused_and_keyed_by_data(tmp_path, monkeypatch):
    m1 = build("corda", "kpm", cache_dir=str(tmp_path))
    files = list(tmp_path.glob("corda-cov-*.safetensors"))
    assert len(files) == 1 and not corda_info(m1).cache_hit
    real = covariance.collect_covariances

    def boom(*a, **k):
        raise AssertionError("covariance recomputed although cached")

    monkeypatch.setattr(covariance, "collect_covariances", boom)
    m2 = build("corda", "kpm", cache_dir=str(tmp_path))
    assert corda_info(m2).cache_hit
    for (k1, v1), (k2, v2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2), k1
    # different calibration data -> different key -> recomputed
    monkeypatch.setattr(covariance, "collect_covariances", real)
    m3 = build("corda", "kpm", cache_dir=str(tmp_path), calib=make_batches(0, VOCAB, seed=2))
    assert not corda_info(m3).cache_hit and len(list(tmp_path.glob("corda-cov-*.safetensors"))) == 2


def test_rank_allocation_spends_exactly_the_budget():
    g = torch.Generator().manual_seed(0)
    spectra, costs = {}, {}
    for i, (din, dout) in enumerate([(32, 32), (32, 16), (64, 32), (32, 64), (48, 32)]):
        m = min(din, dout)
        s = torch.rand(m, generator=g).sort(descending=True).values ** (1 + i)
        spectra[f"l{i}"] = (s / s.sum()).double()
        costs[f"l{i}"] = din + dout
    for mode in ("ipm", "kpm"):
        for budget in (4 * sum(costs.values()), 16 * 95):
            alloc = allocate_ranks(spectra, costs, budget, mode, max_rank=16)
            assert alloc.spent == budget == sum(alloc.ranks[n] * costs[n] for n in costs)
            assert all(1 <= r <= 16 for r in alloc.ranks.values())
    # an unreachable budget spends the largest reachable amount below it
    alloc = allocate_ranks(spectra, costs, 4 * sum(costs.values()) + 7, "ipm")
    assert alloc.spent == 4 * sum(costs.values())
    with pytest.raises(UserError):
        allocate_ranks(spectra, costs, 10, "ipm")


def test_allocation_and_selection_follow_compactness():
    flat = torch.full((16,), 1 / 16, dtype=torch.float64)
    peaked = torch.tensor([0.9] + [0.1 / 15] * 15, dtype=torch.float64)
    costs = {"flat": 32, "peaked": 32}
    ipm = allocate_ranks({"flat": flat, "peaked": peaked}, costs, 8 * 32, "ipm")
    assert ipm.ranks["flat"] > ipm.ranks["peaked"]  # IPM: spread task energy needs more rank
    assert compactness(peaked, 1, "ipm") == pytest.approx(0.9)
    assert compactness(peaked, 4, "kpm") == pytest.approx(1 - 4 * 0.1 / 15)
    # selection: the low-rank covariance makes W·C compact, so IPM picks it at rank 2
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    u = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    sel = select_covariances({"w": w}, {"w": [torch.eye(8), u @ u.T + 1e-3 * torch.eye(8)]}, 2, "ipm")
    assert sel.chosen["w"] == 1 and sel.scores["w"][1] > sel.scores["w"][0]


def test_corda_pp_model_spends_the_parameter_budget():
    m = build("corda++", "ipm", num_candidates=2)
    info = corda_info(m)
    lora_params = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
    assert lora_params == info.allocation.spent == info.allocation.budget
    assert set(info.selection.chosen.values()) <= {0, 1, 2}
    assert len(set(info.ranks.values())) > 1  # ranks really differ across layers


def _train(model, data, steps: int, lr: float) -> None:
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for s in range(steps):
        loss = model(**data[s % len(data)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_kpm_changes_outputs_on_its_data_less_than_lora_at_matched_target_loss():
    """KPM calibrated on data A, then both methods train on B (same data, steps, optimizer, seeds).

    At equal learning rate KPM learns B much faster (its adapter starts non-zero and acts on the directions
    A leaves unused), so the fair comparison is at matched target progress: LoRA needs 3x the learning rate
    to reach KPM's loss on B, and then it has moved the outputs on A more than KPM has.
    """
    a = make_batches(0, 8, n=16, t=32, bs=8, seed=1)  # data whose behaviour must be kept: 8 tokens
    b = make_batches(64, 72, n=16, t=32, bs=8, seed=2)  # the new task: 8 other tokens
    a_eval = make_batches(0, 8, n=8, t=32, bs=8, seed=3)
    ref = torch.cat([logits(tiny_model("llama", hidden=64), x["input_ids"]) for x in a_eval])
    runs = {}
    for name, method, lr in (("kpm", "corda", 1e-3), ("lora", "lora", 3e-3)):
        extra = {"corda": {"mode": "kpm", "progress": False}} if method == "corda" else {}
        m = build_model(tiny_model("llama", hidden=64), method, rank=4, calibration=lambda: a, options=extra)
        _train(m, b, steps=10, lr=lr)
        with torch.no_grad():
            loss_b = sum(float(m(**x).loss) for x in b) / len(b)
        change_a = (torch.cat([logits(m, x["input_ids"]) for x in a_eval]) - ref).abs().mean().item()
        runs[name] = (loss_b, change_a)
    assert runs["kpm"][0] <= runs["lora"][0] + 0.01, runs  # KPM learned B at least as well
    assert runs["kpm"][1] < 0.75 * runs["lora"][1], runs  # ... while changing A clearly less


def test_exported_lora_on_original_base_reproduces_trained_corda(tmp_path):
    m = build("corda++", "kpm", num_candidates=2)
    init_dir = save_initial_adapter(m, tmp_path / "init")
    _train(m, make_batches(0, VOCAB, n=8, seed=5), steps=3, lr=1e-2)
    trained = logits(m)
    assert (trained - logits(tiny_model("llama"))).abs().max() > 1e-3  # training changed something
    out = export_to_lora(m, tmp_path / "lora")
    out2 = export_to_lora(m, tmp_path / "lora2", initial_adapter_dir=init_dir)
    for d in (out, out2):
        plain = PeftModel.from_pretrained(tiny_model("llama"), str(d))
        assert plain.peft_config["default"].init_lora_weights is True
        assert torch.allclose(logits(plain), trained, atol=1e-4), (logits(plain) - trained).abs().max()


def test_bad_settings_raise_user_errors():
    with pytest.raises(UserError, match="mode"):
        build("corda", "svd")
    with pytest.raises(UserError, match="calibration"):
        build_model(tiny_model("llama"), "corda", rank=4)
    with pytest.raises(UserError, match="no batches"):
        build("corda", "kpm", calib=[])
    assert math.isfinite(compactness(torch.ones(3) / 3, 1, "kpm"))
