"""DISeL's gate recipe (own group, lr x gate_lr_multiplier, no decay) wherever a DISeL model trains: a stock
Trainer, TRL's SFTTrainer and DPOTrainer, on the optimizer the Trainer builds from ``args.optim``."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import disel
from disel.testing import tiny_model
from disel.testing_tokenizers import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _model(mult: float = 4.0):
    tok = tiny_tokenizer(128)
    base = tiny_model("llama", vocab_size=len(tok))
    cfg = disel.DiselConfig(r=2, target_modules="all-linear", gate_lr_multiplier=mult, task_type="CAUSAL_LM")
    return get_peft_model(base, cfg), tok


def _groups(opt: torch.optim.Optimizer, model) -> dict[str, dict]:
    gate_ids = {id(p) for p in disel.gate_parameters(model)}
    out = {}
    for g in opt.param_groups:
        kind = "gates" if any(id(p) in gate_ids for p in g["params"]) else "other"
        assert kind == "other" or all(id(p) in gate_ids for p in g["params"])  # gates alone in their group
        out.setdefault(kind, {"lr": g["lr"], "weight_decay": g.get("weight_decay")})
    return out


def _args(tmp_path, cls, **kw):
    return cls(
        output_dir=str(tmp_path),
        learning_rate=1e-3,
        weight_decay=0.1,
        report_to="none",
        max_steps=1,
        per_device_train_batch_size=2,
        use_cpu=True,
        **kw,
    )


@pytest.mark.parametrize(
    "optim, opt_cls", [("sgd", torch.optim.SGD), ("adafactor", None), ("adamw_torch", torch.optim.AdamW)]
)
def test_stock_trainer_gets_the_gate_group_with_its_own_optimizer(tmp_path, optim, opt_cls):
    from transformers import Trainer, TrainingArguments

    model, _ = _model()
    trainer = Trainer(model=model, args=_args(tmp_path, TrainingArguments, optim=optim))
    opt = trainer.create_optimizer()
    if opt_cls is not None:
        assert type(opt) is opt_cls
    else:
        assert "Adafactor" in type(opt).__name__
    groups = _groups(opt, model)
    assert groups["gates"]["lr"] == pytest.approx(4e-3)  # 1e-3 x the adapter's gate_lr_multiplier
    assert groups["gates"]["weight_decay"] in (0.0, None) or "Adafactor" in type(opt).__name__
    if "Adafactor" not in type(opt).__name__:
        assert groups["gates"]["weight_decay"] == 0.0 and groups["other"]["weight_decay"] == 0.1
    # the model the Trainer is given is the one grouped (not only self.model)
    other, _ = _model(2.0)
    opt2 = Trainer(model=model, args=_args(tmp_path, TrainingArguments, optim=optim))
    opt2.optimizer = None
    built = opt2.create_optimizer(other)
    assert _groups(built, other)["gates"]["lr"] == pytest.approx(2e-3)


def test_with_disel_optimizer_gate_lr_override_and_training_moves_gates(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model, tok = _model()
    ids = tok("def f(x): return x", add_special_tokens=False)["input_ids"][:12]
    data = Dataset.from_list([{"input_ids": ids, "labels": ids}] * 4)
    cls = disel.training.with_disel_optimizer(Trainer)
    args = _args(tmp_path, TrainingArguments, optim="sgd")
    args.max_steps, args.learning_rate = 3, 0.1  # B = 0 at init: the gates get a gradient once B has moved
    trainer = cls(model=model, args=args, train_dataset=data, gate_lr=0.5)
    before = [p.detach().clone() for p in disel.gate_parameters(model)]
    trainer.train()
    groups = _groups(trainer.optimizer, model)
    gate_group = next(g for g in trainer.optimizer.param_groups if g.get("name") == "gates")
    assert gate_group["initial_lr"] == pytest.approx(0.5) and groups["gates"]["weight_decay"] == 0.0
    assert any(not torch.equal(b, p) for b, p in zip(before, disel.gate_parameters(model)))


def test_sft_and_dpo_trainers_group_the_gates(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model, tok = _model()
    sft_data = Dataset.from_list([{"text": "def f(x): return x"}] * 4)
    sft = trl.SFTTrainer(
        model=model,
        args=_args(tmp_path / "sft", trl.SFTConfig, optim="sgd", max_length=32),
        train_dataset=sft_data,
        processing_class=tok,
    )
    opt = sft.create_optimizer()
    assert type(opt) is torch.optim.SGD
    g = _groups(opt, sft.model)
    assert (
        g["gates"] == {"lr": pytest.approx(4e-3), "weight_decay": 0.0} and g["other"]["weight_decay"] == 0.1
    )

    model2, tok2 = _model()
    dpo_data = Dataset.from_list([{"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 3"}] * 4)
    dpo = trl.DPOTrainer(
        model=model2,
        args=_args(tmp_path / "dpo", trl.DPOConfig, optim="sgd", max_length=32),
        train_dataset=dpo_data,
        processing_class=tok2,
    )
    opt = dpo.create_optimizer()
    assert type(opt) is torch.optim.SGD
    g = _groups(opt, dpo.model)
    assert (
        g["gates"] == {"lr": pytest.approx(4e-3), "weight_decay": 0.0} and g["other"]["weight_decay"] == 0.1
    )
    print("SFT groups", _groups(sft.optimizer, sft.model), "DPO groups", g)
