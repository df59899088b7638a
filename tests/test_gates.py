"""Gate recording, statistics, domain score and the ``disel gates`` CLI, on gates set by hand."""

from __future__ import annotations

import itertools
import json
import math

import peft
import pytest
import torch

import disel
from disel.analysis import GateRecorder, auroc, band_of, parse_gate_name
from disel.analysis.domains import Item, encode_items, load_items
from disel.analysis.stats import short_labels
from disel.cli import main as cli
from disel.testing import TinyMLP, tiny_model


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _llama_with_constant_gates(layers: int = 3, r: int = 4):
    """Gates with W_g = 0 and b_g = logit(v): every token's gate is exactly sigmoid(logit(v)) per rank."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        tiny_model("llama", layers=layers),
        disel.DiselConfig(r=r, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    expected = {}
    for name, g in disel.iter_gates(pm):
        site = parse_gate_name(name)
        base = {"self_attn.q_proj": 0.1, "self_attn.v_proj": 0.3, "mlp.up_proj": 0.6}[site.mtype]
        vals = torch.tensor([base + 0.05 * i + 0.02 * site.layer for i in range(r)])
        with torch.no_grad():
            g.weight.zero_()
            g.bias.copy_(torch.logit(vals))
        expected[site.module] = torch.sigmoid(torch.logit(vals))  # what the gate computes, in float32
    return pm.eval(), expected


def test_parse_gate_name_bands_and_labels():
    s = parse_gate_name("base_model.model.model.layers.11.self_attn.q_proj.lora_gate.default")
    assert (s.module, s.layer, s.mtype, s.adapter) == (
        "model.layers.11.self_attn.q_proj",
        11,
        "self_attn.q_proj",
        "default",
    )
    assert parse_gate_name("base_model.model.lin0.lora_gate.x").layer is None
    assert [band_of(i, 6) for i in range(6)] == ["early", "early", "middle", "middle", "late", "late"]
    assert [band_of(i, 3) for i in range(3)] == ["early", "middle", "late"]
    labels = short_labels(
        ["attention.output.dense", "output.dense", "intermediate.dense", "attention.self.query"]
    )
    assert labels == {
        "attention.output.dense": "attention.output.dense",
        "output.dense": "output.dense",
        "intermediate.dense": "intermediate.dense",
        "attention.self.query": "query",
    }


def test_recorder_reproduces_hand_set_gates_exactly():
    pm, expected = _llama_with_constant_gates()
    ids = torch.randint(0, 128, (3, 7))
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:] = True
    mask[1, :3] = True  # row 2 has no masked token: it gets no sequence score
    bins = 20
    with GateRecorder(pm, bins=bins, thresholds=(0.25, 0.5)) as rec:
        rec.set_mask(mask)
        pm(input_ids=ids)
    assert all(not h for _, g in disel.iter_gates(pm) for h in (g._forward_hooks,))  # hooks removed
    st = rec.stats()
    n = int(mask.sum())
    assert len(st.modules) == 9
    for name, m in st.modules.items():
        exp = expected[m.site.module].double()
        assert m.count == n
        assert torch.equal(m.sum, exp * n)
        assert torch.equal(m.min, exp) and torch.equal(m.max, exp)
        hist = torch.zeros(4, bins, dtype=torch.int64)
        for i, v in enumerate(exp):
            hist[i, min(int(v * bins), bins - 1)] = n
        assert torch.equal(m.hist, hist)
        assert torch.equal(st.frac_below(name, 0.25), (exp < 0.25).double())
        assert torch.equal(st.frac_above(name, 0.5), (exp > 0.5).double())
    # grouping: band x type means are exact averages of the hand-set values
    for band, layer in (("early", 0), ("middle", 1), ("late", 2)):
        for label, full in (("q_proj", "self_attn.q_proj"), ("up_proj", "mlp.up_proj")):
            g = st.group(band=band, mtype=label)
            exp = expected[f"model.layers.{layer}.{full}"].double()
            assert g["count"] == n * 4
            assert g["mean"] == pytest.approx(float(exp.mean()), abs=1e-12)
            assert sum(g["hist"]) == pytest.approx(1.0)
    assert st.group(rank=2)["mean"] == pytest.approx(
        float(torch.stack([e[2] for e in expected.values()]).double().mean()), abs=1e-12
    )
    # per-sequence scores: constant gates -> every scored sequence gets the same known value
    all_mean = float(torch.stack(list(expected.values())).double().mean())
    mid_late = float(torch.stack([v for k, v in expected.items() if ".0." not in k]).double().mean())
    assert st.sequence_scores("mean").tolist() == pytest.approx([all_mean] * 2, abs=1e-6)
    assert st.sequence_scores("mid_late").tolist() == pytest.approx([mid_late] * 2, abs=1e-6)
    summary = json.loads(json.dumps(st.summary()))
    assert summary["tokens"] == n and summary["sequences"] == 2
    assert summary["modules"]["model.layers.2.mlp.up_proj"]["rank_mean"] == pytest.approx(
        expected["model.layers.2.mlp.up_proj"].tolist(), abs=1e-6
    )


def test_recorder_input_dependent_gate_and_streaming():
    """W_g = e_0, b_g = 0 on a custom model: gate = sigmoid(x_0); two batches add up like one."""
    torch.manual_seed(1)
    pm = peft.get_peft_model(TinyMLP(d_in=16), disel.DiselConfig(r=2, target_modules=["lin0"]))
    ((name, gate),) = list(disel.iter_gates(pm))
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[0, 0] = 1.0
        gate.weight[1, 1] = -1.0
        gate.bias.zero_()
    x = torch.randn(10, 16)
    with GateRecorder(pm, bins=10) as rec:
        rec.set_mask(None)
        pm(x[:6])
        rec.set_mask(None)
        pm(x[6:])
    m = rec.stats().modules[name]
    exp = torch.sigmoid(torch.stack([x[:, 0], -x[:, 1]], 1)).double()
    assert m.count == 10
    assert torch.allclose(m.sum, exp.sum(0), rtol=0, atol=1e-12)
    assert torch.allclose(m.sumsq, (exp**2).sum(0), rtol=0, atol=1e-12)
    for i in range(2):
        assert torch.equal(m.hist[i], torch.bincount((exp[:, i] * 10).long().clamp(max=9), minlength=10))
    # each row of a 2-D input is its own sequence
    assert rec.stats().seq_means.shape == (10, 1)
    assert torch.allclose(rec.stats().seq_means[:, 0].double(), exp.mean(1), atol=1e-6)


def test_recorder_rejects_mismatched_mask_and_models_without_gates():
    pm, _ = _llama_with_constant_gates(layers=2)
    with GateRecorder(pm) as rec:
        rec.set_mask(torch.ones(2, 3, dtype=torch.bool))
        with pytest.raises(ValueError, match="mask has shape"):
            pm(input_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="no DISeL gate"):
        GateRecorder(tiny_model("llama"))


def test_auroc_matches_pairwise_count():
    assert auroc([0.9, 0.8], [0.1, 0.85]) == 0.75
    assert auroc([0.5], [0.5]) == 0.5
    assert auroc([1, 2, 3], [0]) == 1.0 and auroc([0], [1, 2]) == 0.0
    g = torch.Generator().manual_seed(0)
    pos = (torch.randint(0, 6, (23,), generator=g) / 5).tolist()
    neg = (torch.randint(0, 6, (17,), generator=g) / 5).tolist()
    pairs = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    assert auroc(pos, neg) == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)
    with pytest.raises(ValueError):
        auroc([], [1.0])


def test_domain_items_and_masks(tmp_path):
    from disel.testing_tokenizers import tiny_tokenizer

    tok = tiny_tokenizer(128)
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"instruction": "Add 2 and 3.", "output": "5"})
        + "\n"
        + json.dumps({"prompt": "def f():", "completion": "\n    return 1"})
        + "\n"
        + json.dumps({"text": "plain text here"})
        + "\n",
        encoding="utf-8",
    )
    items = load_items(str(f))
    assert "### Instruction:\nAdd 2 and 3." in items[0].prompt and items[0].text == "5"
    assert items[2].prompt is None
    enc = encode_items(tok, items, max_length=256, max_sequences=10)
    resp = tok("5", add_special_tokens=False)["input_ids"]
    assert [i for i, m in zip(enc[0].ids, enc[0].mask) if m] == resp
    assert enc[2].mask[0] is False and all(enc[2].mask[1:])  # raw text: every token but BOS
    long = encode_items(tok, [Item("word " * 200)], max_length=32, max_sequences=3)
    assert len(long) == 3 and all(len(e.ids) == 32 for e in long)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n', encoding="utf-8")
    with pytest.raises(disel.errors.UserError, match="give it 'text'"):
        load_items(str(bad))


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    from disel.testing_tokenizers import tiny_tokenizer

    d = tmp_path_factory.mktemp("adapter")
    tok = tiny_tokenizer(128)
    base = tiny_model("llama", layers=3)
    base.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    pm = peft.get_peft_model(base, disel.DiselConfig(r=4, target_modules="all-linear"))
    torch.manual_seed(3)
    with torch.no_grad():
        for _, g in disel.iter_gates(pm):
            g.bias.uniform_(-4, 4)
    pm.peft_config["default"].base_model_name_or_path = str(d / "base")
    pm.save_pretrained(d / "adapter")
    return d


@pytest.mark.slow
def test_gates_cli_writes_json_figures_and_auroc(saved_adapter, tmp_path, capsys):
    a = tmp_path / "a.txt"
    a.write_text("12+34=46\n7*8=56\n" * 30, encoding="utf-8")
    b = tmp_path / "b.jsonl"
    b.write_text(
        "".join(json.dumps({"question": f"What is {i}?", "answer": f"It is {i}."}) + "\n" for i in range(6))
    )
    out = tmp_path / "rep"
    rc = cli(
        [
            "gates",
            str(saved_adapter / "adapter"),
            "--domain",
            f"arith={a}",
            "--domain",
            f"qa={b}",
            "--target",
            "arith",
            "--out",
            str(out),
            "--max-sequences",
            "6",
            "--max-length",
            "32",
            "--bins",
            "10",
        ]
    )
    assert rc == 0
    rep = json.loads((out / "gates.json").read_text())
    assert set(rep["domains"]) == {"arith", "qa"}
    assert set(rep["domains"]["arith"]["by_band"]) == {"early", "middle", "late"}
    assert 0.0 <= rep["auroc"]["mid_late"]["qa"] <= 1.0
    assert rep["domains"]["qa"]["sequences"] == 6
    assert (
        len(rep["modules_detail"]) == 21
        and len(rep["modules_detail"]["model.layers.0.mlp.up_proj"]["rank_mean"]) == 4
    )
    for png in ("fig_domains.png", "fig_modules.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "AUROC" in capsys.readouterr().out
    # bad input: one clear line, exit code 2
    assert cli(["gates", str(saved_adapter / "adapter"), "--domain", "oops"]) == 2
    assert cli(["gates", str(saved_adapter / "adapter"), "--domain", f"a={a}", "--target", "zzz"]) == 2
    assert cli(["gates", str(tmp_path / "missing"), "--domain", f"a={a}"]) == 2
    assert "NAME=SOURCE" in capsys.readouterr().err
