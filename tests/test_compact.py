"""Compaction: static (ungated) components, the plan from exact gate counts, and the saved adapter."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import disel
from disel.analysis import GateRecorder, add_compacted_adapter, cost_report, plan_compaction
from disel.analysis.compact import fidelity, save_adapter
from disel.cli import main as cli
from disel.methods.gated_lora.layer import DiselGate
from disel.testing import tiny_model

R = 6
# per component: b_g = -12 (always closed -> drop), +12 (always open -> fold), 0 with input-dependent W_g (keep)
PATTERN = [-12.0, 12.0, 0.0, -12.0, 12.0, 0.0]


def test_static_components_are_ones_and_keep_the_fast_path():
    g = DiselGate(8, 4, num_static=3)
    g.reset_parameters(-3.0, "kaiming")
    assert g.weight.shape == (1, 8) and g.bias.shape == (1,)
    out = g(torch.randn(2, 5, 8))
    assert out.shape == (2, 5, 4)
    assert torch.equal(out[..., :3], torch.ones(2, 5, 3))
    assert g.fast_path_ok() and DiselGate(8, 4).fast_path_ok()  # the fused kernel takes num_static
    g.override = 0.5
    assert not g.fast_path_ok()
    with pytest.raises(ValueError, match="num_static"):
        DiselGate(8, 4, num_static=5)
    with pytest.raises(ValueError, match="static_rank_pattern"):
        disel.DiselConfig(r=4, target_modules="all-linear", static_rank_pattern={"q_proj": 9})


def _hand_set_model(seed: int = 0):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(
        tiny_model("llama", layers=3), disel.DiselConfig(r=R, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if isinstance(mod, disel.DiselLinear):
                mod.lora_B["default"].weight.normal_(0, 0.2)
                g = mod.lora_gate["default"]
                g.bias.copy_(torch.tensor(PATTERN))
                for i, b in enumerate(PATTERN):
                    if b != 0.0:
                        g.weight[i].zero_()
                # the last layer's up_proj never opens anything: every component is dropped there
                if name.endswith("layers.2.mlp.up_proj"):
                    g.weight.zero_()
                    g.bias.fill_(-12.0)
    return pm.eval()


def test_plan_add_save_and_load_compacted_adapter(tmp_path):
    pm = _hand_set_model()
    ids = torch.randint(0, 128, (4, 12))
    with GateRecorder(pm, thresholds=(0.02, 0.98)) as rec:
        rec.set_mask(None)
        pm(input_ids=ids)
    plan = plan_compaction(rec.stats(), tau_closed=0.02, tau_open=0.98, coverage=0.99)
    n_layers = 21
    c = plan.counts()
    assert c["components"] == n_layers * R and c["layers_removed"] == 1
    assert c["folded"] == 2 * (n_layers - 1) and c["gated"] == 2 * (n_layers - 1)
    assert c["dropped"] == 2 * (n_layers - 1) + R
    lp = plan.layers["model.layers.0.self_attn.q_proj"]
    assert (lp.static, lp.gated, lp.dropped) == ([1, 4], [2, 5], [0, 3])

    cfg = add_compacted_adapter(pm, plan, "default", "compact")
    assert cfg.static_rank_pattern["model.layers.0.self_attn.q_proj"] == 2
    assert "model.layers.2.mlp.up_proj" not in cfg.target_modules
    gate = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_gate["compact"]
    assert gate.num_static == 2 and gate.weight.shape[0] == 2
    # fidelity: dropped gates were < 1e-5, folded ones > 1 - 1e-5
    fid = fidelity(pm, [(ids, torch.ones_like(ids), None)], "default", "compact")
    assert fid["max_abs_logit_diff"] < 1e-3 and abs(fid["nll_diff"]) < 1e-4
    costs = cost_report(pm, plan)
    assert costs["params_after"] < costs["params_before"]
    assert costs["macs_per_token_merged_static"] < costs["macs_per_token_after"]

    with GateRecorder(pm, thresholds=(0.02, 0.98)) as rec2:
        pm(input_ids=ids)  # only the active 'default' gates run; the 'compact' ones see no token
    assert plan_compaction(rec2.stats()).counts() == c
    pm.set_adapter("compact")
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    pm.set_adapter("default")
    out = save_adapter(pm, "compact", tmp_path / "compacted")
    loaded_cfg = json.loads((out / "adapter_config.json").read_text())
    assert loaded_cfg["static_rank_pattern"]["model.layers.0.self_attn.q_proj"] == 2
    # one call loads it, and it computes what the in-memory compacted adapter computed
    torch.manual_seed(0)
    fresh = peft.PeftModel.from_pretrained(tiny_model("llama", layers=3), str(out)).eval()
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(disel.errors.UserError, match="not empty"):
        save_adapter(pm, "compact", tmp_path / "compacted")


def test_plan_rejects_bad_thresholds_and_all_closed():
    pm = _hand_set_model()
    with GateRecorder(pm, thresholds=(0.02, 0.98)) as rec:
        pm(input_ids=torch.randint(0, 128, (2, 5)))
    with pytest.raises(disel.errors.UserError, match="tau_closed"):
        plan_compaction(rec.stats(), tau_closed=0.5, tau_open=0.4)
    with pytest.raises(ValueError, match="threshold 0.1 was not recorded"):
        plan_compaction(rec.stats(), tau_closed=0.1, tau_open=0.98)
    with torch.no_grad():
        for _, g in disel.iter_gates(pm):
            g.weight.zero_()
            g.bias.fill_(-12.0)
    with GateRecorder(pm, thresholds=(0.02, 0.98)) as rec:
        pm(input_ids=torch.randint(0, 128, (2, 5)))
    with pytest.raises(disel.errors.UserError, match="no gate of adapter 'other'"):
        plan_compaction(rec.stats(), adapter="other")
    with pytest.raises(disel.errors.UserError, match="every gate stayed closed"):
        add_compacted_adapter(pm, plan_compaction(rec.stats()), "default", "compact")


@pytest.mark.slow
def test_compact_cli(tmp_path, capsys):
    from disel.testing_tokenizers import tiny_tokenizer

    tok = tiny_tokenizer(128)
    base = tiny_model("llama", layers=3)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    pm = _hand_set_model()
    pm.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    pm.save_pretrained(tmp_path / "adapter")
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    calib2 = tmp_path / "calib2.jsonl"
    calib2.write_text(json.dumps({"prompt": "Q: 2+2?", "response": " A: 4"}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["compact", str(tmp_path / "adapter"), "--calibration", str(calib), "--out", str(out)]
    args += ["--calibration", str(calib2)]
    assert cli([*args, "--max-sequences", "4", "--max-length", "32", "--timing-repeats", "2"]) == 0
    rep = json.loads((out / "compaction.json").read_text())
    n_pair = len(
        tok("Q: 2+2?", add_special_tokens=False)["input_ids"]
        + tok(" A: 4", add_special_tokens=False)["input_ids"]
    )
    # 4 windows of BOS + 31 text tokens, and the prompt/response pair: prompt tokens count for compaction
    # (the adapter acts on them and the answer attends to them), only BOS does not
    assert rep["calibration_tokens"] == 4 * 31 + n_pair
    assert rep["counts"]["folded"] == 40 and rep["counts"]["layers_removed"] == 1
    assert rep["fidelity"]["max_abs_logit_diff"] < 1e-3
    assert set(rep["timing_s"]) == {"default", "compact", "base"} and rep["speedup_forward"] > 0
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    assert cli(args) == 2  # --out not empty
    assert "not an empty directory" in capsys.readouterr().err

    # --merge-static: a full model directory (merged base) + the gated remainder in adapter/
    merged = tmp_path / "merged"
    args[args.index(str(out))] = str(merged)
    assert (
        cli([*args, "--max-sequences", "4", "--max-length", "32", "--timing-repeats", "1", "--merge-static"])
        == 0
    )
    rep = json.loads((merged / "compaction.json").read_text())
    assert rep["merge_static"]["components_merged"] == 40 and rep["merge_static"]["gated_components"] == 40
    assert rep["merge_static"]["max_abs_logit_diff"] < 1e-4
    assert set(rep["merge_static"]["timing_merged_s"]) == {"default", "compact", "base"}
    assert rep["speedup_forward_merged"] > 0
    assert (merged / "model.safetensors").exists() and (merged / "tokenizer_config.json").exists()
    import transformers

    ids = torch.tensor([tok("The quick brown fox")["input_ids"]])
    with torch.no_grad():
        unmerged = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(out)
        )
        deployed = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(merged), str(merged / "adapter")
        )
        want, got = unmerged.eval()(input_ids=ids).logits, deployed.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _compacted(pattern=None, seed: int = 0):
    """The hand-set model with its compacted adapter 'compact' beside 'default' (active: 'default')."""
    pm = _hand_set_model(seed)
    if pattern is not None:
        with torch.no_grad():
            for _, g in disel.iter_gates(pm):
                g.weight.zero_()
                g.bias.copy_(torch.tensor(pattern))
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(seed))
    with GateRecorder(pm, thresholds=(0.02, 0.98)) as rec:
        pm(input_ids=ids)
    add_compacted_adapter(pm, plan_compaction(rec.stats()), "default", "compact")
    pm.set_adapter("compact")
    return pm, ids


def test_compacted_forward_uses_fused_kernel(count_fused):
    from disel.methods.gated_lora import kernels

    pm, ids = _compacted()
    calls = count_fused
    with torch.no_grad():
        fast = pm(input_ids=ids).logits
        assert calls["n"] == 20  # every adapted layer (21 minus the removed one), static parts included
        with kernels.reference_path():
            ref = pm(input_ids=ids).logits
    assert calls["n"] == 20
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)


def test_merge_static_keeps_logits_and_leaves_only_gated_components(tmp_path):
    pm, ids = _compacted()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        q = pm.base_model.model.model.layers[0].self_attn.q_proj
        w_before = q.base_layer.weight.clone()
        a, b, s = q.lora_A["compact"].weight[:2].clone(), q.lora_B["compact"].weight[:, :2].clone(), q.scaling
        s = s["compact"]
    counts = disel.merge_static(pm, "compact")
    assert counts == {"layers": 20, "components_merged": 40, "layers_removed": 0, "gated_components": 40}
    assert q.r["compact"] == 2 and q.lora_gate["compact"].num_static == 0 and q.scaling["compact"] == 8 / 2
    torch.testing.assert_close(q.base_layer.weight, w_before + s * b @ a)
    cfg = pm.peft_config["compact"]
    assert cfg.static_rank_pattern == {} and set(cfg.rank_pattern.values()) == {2}
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert disel.merge_static(pm, "compact")["layers"] == 0  # nothing static is left: a no-op
    with pytest.raises(disel.errors.UserError, match="no adapter 'nope'"):
        disel.merge_static(pm, "nope")

    # deployment: full merged model directory + gated adapter, reloaded in two calls
    from disel.analysis.compact import save_merged

    out = save_merged(pm, "compact", tmp_path / "deploy")
    assert (out / "config.json").exists() and (out / "adapter" / "adapter_config.json").exists()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(out.resolve()) and cfg["static_rank_pattern"] == {}
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(out)
    fresh = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_merge_static_without_gated_components_is_exactly_the_merged_base():
    # every component always open or always closed: the compacted adapter is purely static
    pm, ids = _compacted(pattern=[12.0, -12.0, 12.0, 12.0, -12.0, 12.0])
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    counts = disel.merge_static(pm, "compact")
    assert counts["gated_components"] == 0 and counts["layers_removed"] == counts["layers"] == 21
    assert not any("compact" in m.lora_A for m in pm.modules() if isinstance(m, disel.DiselLinear))
    with torch.no_grad():
        got = pm(input_ids=ids).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
    assert torch.equal(got, base)  # nothing of the adapter runs any more
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plain = pm.unload()
    assert not any(isinstance(m, disel.DiselLinear) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, got)


def test_encode_items_masks_responses_for_analysis_and_every_token_for_compaction():
    from disel.analysis.domains import Item, encode_items
    from disel.testing_tokenizers import tiny_tokenizer

    tok = tiny_tokenizer(128)
    item = Item(" A: 4", prompt="Q: 2+2?")
    n_p = len(tok("Q: 2+2?", add_special_tokens=False)["input_ids"])
    n_r = len(tok(" A: 4", add_special_tokens=False)["input_ids"])
    (resp,) = encode_items(tok, [item], 64, 4)
    (every,) = encode_items(tok, [item], 64, 4, all_tokens=True)
    assert resp.ids == every.ids and len(resp.ids) == 1 + n_p + n_r
    assert resp.mask == [False] * (1 + n_p) + [True] * n_r
    assert every.mask == [False] + [True] * (n_p + n_r)


def test_interleaved_times_pairs_rounds_and_restores_the_model(monkeypatch):
    from disel.analysis.compact import interleaved_times, speedup_interval
    from disel.utils import timing

    pm, ids = _compacted()
    pm.set_adapter("default")
    att = torch.ones_like(ids)
    with torch.no_grad():
        before = pm(input_ids=ids).logits
    seen = {}
    real = timing.interleaved

    def spy(fns, repeats, warmup=1, **kw):
        seen.update(names=list(fns), repeats=repeats, setup=sorted(kw["setup"]))
        return real(fns, repeats, warmup, **kw)

    monkeypatch.setattr(timing, "interleaved", spy)
    times = interleaved_times(pm, ids, att, ["default", "compact"], repeats=3)
    assert seen == {
        "names": ["default", "compact", "base"],
        "repeats": 3,
        "setup": ["base", "compact", "default"],
    }
    assert {n: len(t) for n, t in times.items()} == {"default": 3, "compact": 3, "base": 3}
    iv = speedup_interval(times)
    assert iv["n"] == 3 and iv["ci_low"] <= iv["median"] <= iv["ci_high"]
    assert pm.active_adapter == "default"  # adapters switched back on, the active one restored
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, before)


def test_speedup_line_only_for_an_interval_that_excludes_one():
    from disel.commands.compact import speedup_line

    iv = {"median": 1.2, "q25": 1.1, "q75": 1.3, "ci_low": 1.05, "ci_high": 1.31, "ci_level": 0.961, "n": 9}
    assert speedup_line("forward speed-up", iv) == (
        "forward speed-up 1.200 [1.050, 1.310]x (median [96% interval], 9 rounds)"
    )
    assert speedup_line("forward speed-up", {**iv, "ci_low": 0.98}) is None  # includes 1: no claim
    assert speedup_line("forward speed-up", {**iv, "ci_level": 0.75, "n": 3}) is None  # too few rounds
