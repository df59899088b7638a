"""Masked-LM retention of encoders: the fine-tuned encoder read by the ORIGINAL pretrained MLM head."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from disel.evaluation import evaluate_model
from disel.evaluation.mlm import corpus_texts, mlm_head, mlm_perplexity
from disel.testing import tiny_model
from disel.testing_tokenizers import tiny_tokenizer


@pytest.mark.slow
def test_mlm_perplexity_untouched_equals_base_and_rises_after_full_fine_tuning(tmp_path):
    tok = tiny_tokenizer(128)
    base = tiny_model("roberta", vocab_size=128, pad_token_id=0)
    # give the random base some MLM skill first, so that forgetting it is measurable
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_texts("stdlib", n=16, seed=1, max_chars=200)))
    texts = corpus_texts(str(corpus), n=16)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(base.parameters(), lr=5e-3)
    base.train()
    for i in range(12):
        enc = tok(
            texts[(i * 8) % 16 : (i * 8) % 16 + 8],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=32,
        )
        labels = enc["input_ids"].clone()
        m = (torch.rand(labels.shape) < 0.15) & (enc["attention_mask"] == 1)
        labels[~m] = -100
        ids = enc["input_ids"].masked_fill(m, tok.mask_token_id)
        base(input_ids=ids, attention_mask=enc["attention_mask"], labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    base.eval()
    base.save_pretrained(tmp_path / "base")
    head = mlm_head(AutoModelForMaskedLM.from_pretrained(tmp_path / "base"))

    base_ppl = mlm_perplexity(base, mlm_head(base), tok, texts, max_length=32)["ppl"]
    # the same numbers twice: masking is deterministic
    assert mlm_perplexity(base, mlm_head(base), tok, texts, max_length=32)["ppl"] == base_ppl
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    untouched = mlm_perplexity(clf, head, tok, texts, max_length=32)["ppl"]
    assert untouched == pytest.approx(base_ppl, rel=1e-5)

    # full fine-tuning on a classification task (label = does the text mention "return")
    labels = torch.tensor([int("return" in t) for t in texts])
    opt = torch.optim.AdamW(clf.parameters(), lr=5e-2)
    clf.train()
    for i in range(10):
        sl = slice((i * 8) % 16, (i * 8) % 16 + 8)
        enc = tok(texts[sl], return_tensors="pt", padding=True, truncation=True, max_length=32)
        clf(**enc, labels=labels[sl]).loss.backward()
        opt.step()
        opt.zero_grad()
    clf.eval()
    tuned = mlm_perplexity(clf, head, tok, texts, max_length=32)["ppl"]
    print(f"MLM ppl: base {base_ppl:.3f}, untouched {untouched:.3f}, full FT {tuned:.3f}")
    assert tuned > base_ppl

    # through the spec API: mlm:FILE with the pretrained model as the head's source
    p = evaluate_model(
        clf,
        tok,
        {"retention": [f"mlm:{corpus}"], "mlm": {"base": str(tmp_path / "base"), "max_length": 32, "n": 16}},
    )
    assert p["retention"][f"mlm:{corpus}"] == pytest.approx(tuned, rel=1e-5)
    assert p["retention_score"] == pytest.approx(1 / tuned, rel=1e-5)
