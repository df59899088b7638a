"""Optimizer groups and Trainer / TRL glue."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import disel
from disel.testing import tiny_model
from disel.training import param_groups


def test_param_groups_gate_lr_and_no_decay():
    model = get_peft_model(
        tiny_model("llama"),
        disel.DiselConfig(r=4, target_modules="all-linear", gate_lr_multiplier=7.0, lora_bias=False),
    )
    groups = {g["name"]: g for g in param_groups(model, lr=2e-4, weight_decay=0.01)}
    gate_ids = {id(p) for p in disel.gate_parameters(model)}
    assert {id(p) for p in groups["gates"]["params"]} == gate_ids
    assert groups["gates"]["lr"] == pytest.approx(2e-4 * 7.0)
    assert groups["gates"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.01
    decay_ids = {id(p) for p in groups["decay"]["params"]}
    assert not decay_ids & gate_ids
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set().union(*({id(p) for p in g["params"]} for g in groups.values())) == trainable
    explicit = {g["name"]: g for g in param_groups(model, lr=1e-4, gate_lr=3e-3)}
    assert explicit["gates"]["lr"] == 3e-3


def test_norms_and_biases_get_no_decay_in_full_finetuning():
    model = tiny_model("gpt2")
    for p in model.parameters():
        p.requires_grad_(True)
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, weight_decay=0.1)}
    assert "gates" not in groups
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    for name, p in model.named_parameters():
        if "ln_" in name or name.endswith("bias"):
            assert id(p) in no_decay, name


def test_lora_model_gets_default_multiplier_without_gates():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear"))
    opt = disel.build_optimizer(model, lr=1e-3, weight_decay=0.01)
    assert [g["name"] for g in opt.param_groups] == ["decay"]


@pytest.mark.parametrize(
    "bad", [{"lr": 0.0}, {"lr": 1e-3, "gate_lr": -1.0}, {"lr": 1e-3, "weight_decay": -0.1}]
)
def test_bad_optimizer_arguments(bad):
    model = get_peft_model(tiny_model("llama"), disel.DiselConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match="must be"):
        disel.build_optimizer(model, **bad)


def test_no_trainable_parameters_is_an_error():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        disel.build_optimizer(model, lr=1e-3)


def _lm_dataset(n: int = 16, length: int = 12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (n, length), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def test_disel_trainer_uses_gate_groups_and_trains(tmp_path):
    from transformers import TrainingArguments

    model = get_peft_model(tiny_model("llama"), disel.DiselConfig(r=4, target_modules="all-linear"))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        learning_rate=1e-3,
        weight_decay=0.01,
        per_device_train_batch_size=4,
        max_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    before = [p.detach().clone() for p in disel.gate_parameters(model)]
    trainer = disel.DiselTrainer(model=model, args=args, train_dataset=_lm_dataset())
    trainer.train()
    groups = {g.get("name", "base"): g for g in trainer.optimizer.param_groups}
    assert groups["gates"]["weight_decay"] == 0.0
    assert groups["gates"]["initial_lr"] == pytest.approx(5e-3)
    after = disel.gate_parameters(model)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_trl_sft_trainer_with_disel_optimizer(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from disel.training import with_disel_optimizer

    model = get_peft_model(tiny_model("llama"), disel.DiselConfig(r=4, target_modules="all-linear"))
    rows = _lm_dataset(8)
    ds = Dataset.from_list([{"input_ids": r["input_ids"].tolist()} for r in rows])
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        max_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    trainer_cls = with_disel_optimizer(trl.SFTTrainer)
    assert trainer_cls.__name__ == "DiselSFTTrainer"
    from disel.testing_tokenizers import tiny_tokenizer

    trainer = trainer_cls(
        model=model, args=args, train_dataset=ds, processing_class=tiny_tokenizer(), gate_lr=2e-2
    )
    trainer.train()
    groups = {g.get("name", "base"): g for g in trainer.optimizer.param_groups}
    assert groups["gates"]["initial_lr"] == pytest.approx(2e-2)
