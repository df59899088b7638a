"""The in-process training core (``disel.training.fit``): exact step count, the Trainer's warmup + cosine
schedule, clipping, regularisers, method callbacks and the gates' learning rate; and that the demo and
``disel train`` build their trainer from the same glue (``make_trainer_class``)."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from transformers import Trainer, TrainerCallback

from disel.methods import build_model
from disel.methods.gated_lora.layer import DiselGate
from disel.testing import tiny_model
from disel.training.fit import FitResult, fit

pytestmark = pytest.mark.usefixtures("one_thread_module")


def examples(n: int = 10, length: int = 12, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, 100, (length - i % 3,), generator=g).tolist()  # uneven lengths: padding
        out.append({"input_ids": ids, "labels": [-100, *ids[1:]]})
    return out


class Recorder(TrainerCallback):
    """Each optimizer step's learning rate per parameter group (as the step used it) and gradient norm."""

    def __init__(self) -> None:
        self.lrs: list[dict[str, float]] = []
        self.grad_norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # the gates' group is named "gates"; the Trainer's own groups (decay / no decay) are "other"
        lrs: dict[str, set[float]] = {}
        for g in optimizer.param_groups:
            lrs.setdefault("gates" if g.get("name") == "gates" else "other", set()).add(g["lr"])
        assert all(len(v) == 1 for v in lrs.values()), lrs  # one learning rate per kind
        self.lrs.append({k: v.pop() for k, v in lrs.items()})


def lora(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_model("llama"), "lora", rank=2)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_exact_steps_full_batches_and_the_warmup_cosine_schedule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = lora()
    batches: list[int] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["input_ids"].shape[0]) if m.training else None, with_kwargs=True
    )
    rec = Recorder()
    before = trainable(model)
    # 10 examples, batch 4: two full batches an epoch, so 7 steps cycle four epochs
    res = fit(
        model, examples(10), steps=7, batch_size=4, lr=1e-2, warmup_steps=2, callbacks=[rec], progress=False
    )
    assert isinstance(res, FitResult) and res.global_step == 7 and len(res.losses) == 7
    assert batches == [4] * 7 and len(rec.lrs) == 7
    assert all(math.isfinite(x) for x in res.losses) and math.isfinite(res.train_loss)
    expected = [1e-2 * s / 2 for s in range(2)] + [
        1e-2 * 0.5 * (1 + math.cos(math.pi * (s - 2) / (7 - 2))) for s in range(2, 7)
    ]
    for got, want in zip(rec.lrs, expected, strict=True):
        assert set(got) == {"other"} and got["other"] == pytest.approx(want)
    assert rec.lrs[2]["other"] == pytest.approx(1e-2)  # the full rate right after warmup, decaying after
    assert not model.training
    after = trainable(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert list(tmp_path.iterdir()) == []  # nothing written outside the temporary output directory


def test_gradients_are_clipped_to_max_grad_norm():
    rec_clip, rec_free = Recorder(), Recorder()
    for max_grad_norm, rec in ((1e-4, rec_clip), (0.0, rec_free)):
        fit(
            lora(),
            examples(8),
            steps=3,
            batch_size=4,
            lr=1e-3,
            max_grad_norm=max_grad_norm,
            callbacks=[rec],
            progress=False,
        )
    assert all(n <= 1e-4 * 1.001 for n in rec_clip.grad_norms), rec_clip.grad_norms
    assert all(n > 1e-3 for n in rec_free.grad_norms), rec_free.grad_norms


def test_the_models_regularisers_are_added_to_the_loss_and_change_the_weights():
    plain = lora()
    res_plain = fit(plain, examples(8), steps=4, batch_size=4, lr=1e-2, progress=False)

    reg_model = lora()
    a_params = [p for n, p in reg_model.named_parameters() if "lora_A" in n]
    calls: list[int] = []

    def reg() -> torch.Tensor:
        calls.append(1)
        # a constant 10 plus a strong pull of lora_A towards zero
        return 10.0 + 1e3 * sum((p**2).sum() for p in a_params)

    reg_model._disel_regularizers = [reg]
    a0 = sum(float((p.detach() ** 2).sum()) for p in a_params)
    res_reg = fit(reg_model, examples(8), steps=4, batch_size=4, lr=1e-2, progress=False)
    assert len(calls) == 4  # once per step
    # the losses of FitResult are the task losses; train_loss (the Trainer's) includes the penalty
    assert res_reg.train_loss - sum(res_reg.losses) / 4 > 10.0
    assert res_plain.train_loss == pytest.approx(sum(res_plain.losses) / 4, rel=1e-5)
    a_reg = sum(float((p.detach() ** 2).sum()) for p in a_params)
    a_plain = sum(float((p.detach() ** 2).sum()) for n, p in plain.named_parameters() if "lora_A" in n)
    # Adam moves each weight about lr a step: four steps take a clear bite out of lora_A's norm
    assert a_reg < 0.75 * a0 and a_reg < 0.75 * a_plain


def test_the_methods_callbacks_run_adalora_allocates_after_every_step(monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_model("llama"), "adalora", rank=2, total_steps=5)
    steps_seen: list[int] = []
    real = model.base_model.update_and_allocate

    def spy(global_step: int) -> None:
        steps_seen.append(global_step)
        real(global_step)

    monkeypatch.setattr(model.base_model, "update_and_allocate", spy)
    fit(model, examples(8), steps=5, batch_size=4, lr=1e-2, method="adalora", progress=False)
    assert steps_seen == [0, 1, 2, 3, 4]
    # without the method name, no callback: the allocation is the method's, not the loop's
    steps_seen.clear()
    fit(model, examples(8), steps=2, batch_size=4, lr=1e-2, progress=False)
    assert steps_seen == []


def test_the_gates_train_at_their_own_learning_rate():
    torch.manual_seed(0)
    model = build_model(tiny_model("llama"), "disel", rank=2, options={"disel": {"gate_lr_multiplier": 3.0}})
    gates = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_gate" in n}
    assert gates and any(isinstance(m, DiselGate) for m in model.modules())
    rec = Recorder()
    res = fit(
        model, examples(8), steps=3, batch_size=4, lr=1e-3, warmup_steps=0, callbacks=[rec], progress=False
    )
    assert res.gate_lr == pytest.approx(3e-3)
    assert rec.lrs[0]["gates"] == pytest.approx(3e-3) and rec.lrs[0]["other"] == pytest.approx(1e-3)
    assert all(step["gates"] == pytest.approx(3 * step["other"]) for step in rec.lrs)
    moved = dict(model.named_parameters())
    assert any(not torch.equal(v, moved[n]) for n, v in gates.items())  # the gates did train
    rec2 = Recorder()
    res2 = fit(
        model, examples(8), steps=1, batch_size=4, lr=1e-3, gate_lr=5e-2, callbacks=[rec2], progress=False
    )
    assert res2.gate_lr == 5e-2 and rec2.lrs[0]["gates"] == pytest.approx(5e-2)


def test_fit_rejects_empty_data_and_bad_steps():
    from disel.errors import UserError

    with pytest.raises(UserError, match="no training examples"):
        fit(lora(), [], steps=1, batch_size=2, lr=1e-3, progress=False)
    with pytest.raises(UserError, match="steps >= 1"):
        fit(lora(), examples(4), steps=0, batch_size=2, lr=1e-3, progress=False)


def test_the_demo_and_disel_train_build_their_trainer_from_the_same_glue(tmp_path, monkeypatch):
    import disel.training.fit as fit_mod
    import disel.training.runner as runner_mod
    import disel.training.trainer as glue
    from disel.experiments.demo import DemoConfig, run_demo
    from disel.testing_tokenizers import tiny_tokenizer
    from disel.training.config import config_from_dict

    made: list[str] = []
    classes: list[type] = []

    def spy(base=None):
        made.append("call")
        cls = glue.make_trainer_class(base)
        classes.append(cls)
        return cls

    monkeypatch.setattr(fit_mod, "make_trainer_class", spy)
    monkeypatch.setattr(runner_mod, "make_trainer_class", spy)

    cfg = DemoConfig.quick(methods=["lora", "disel"], steps=2, n_test=2, n_retention=2, n_gate_texts=2)
    res = run_demo(cfg, tmp_path / "demo", log=lambda _: None)
    assert len(made) == 2 and set(res["methods"]) == {"lora", "disel"}

    tok = tiny_tokenizer(128)
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    rows = [{"instruction": f"Add {i} and {i}.", "output": f"It is {2 * i}."} for i in range(8)]
    (tmp_path / "inst.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_cfg = config_from_dict(
        {
            "model": {"name": str(tmp_path / "llama")},
            "method": {"name": "disel", "rank": 2},
            "data": {"format": "instruction", "train": str(tmp_path / "inst.jsonl")},
            "training": {"max_steps": 2, "per_device_batch_size": 4, "save_steps": 2},
            "output": {"dir": str(tmp_path / "runs")},
        }
    )
    out = runner_mod.train(run_cfg, progress=False)
    assert out.status == "finished" and out.global_step == 2
    assert len(made) == 3
    # one glue: the same regulariser handling and gate-lr override under every trainer
    assert {c.compute_loss.__qualname__ for c in classes} == {
        "make_trainer_class.<locals>.RunTrainer.compute_loss"
    }
    assert all(
        issubclass(c, Trainer) and "gate_lr" in inspect.signature(c.__init__).parameters for c in classes
    )
