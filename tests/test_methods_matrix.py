"""One matrix over every registered method x {Llama, GPT-2, RoBERTa} tiny models.

For each (method, arch): the adapted model starts as the base exactly when ``spec.starts_as_base`` says so;
an optimizer step changes trainable parameters only (and at least one of them); the adapter saved the way
the pipeline saves it (``save_pretrained``, or ``spec.export`` for methods that rewrite the base) loads back
through ``disel.loading.load_model`` to the same outputs; disabling the adapter gives the base. Once per
method, a 2-step ``disel train --dry-run``. A guard fails when a registered method has no row here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import yaml

import disel
from disel.methods import MethodOptions, available_methods, build_model, get_method
from disel.methods.registry import METHODS, register_method
from disel.rundir import EXPORT_DIR

pytestmark = [
    pytest.mark.usefixtures("one_thread_module"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),  # GPT-2's Conv1D
]

# arch -> the task its tiny model is built for (RoBERTa as in the pipeline: a classification head)
ARCHS = {"llama": "causal_lm", "gpt2": "causal_lm", "roberta": "seq_cls"}
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}
RANK = 2
SEQ = 10
LR = 1e-2


@dataclasses.dataclass(frozen=True)
class Row:
    """What the matrix must give one method: the data it needs at build time, its own options, tolerances."""

    calibration: bool = False  # method.calibration (source-domain batches)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_atol: float = 0.0  # 0: the adapted model at init is bit-identical to the base
    load_atol: float = 1e-5  # saved-and-loaded vs in-memory outputs
    xfail: dict[str, str] = dataclasses.field(default_factory=dict)  # arch -> reason (a known, reported bug)


CORDA_SEQ_CLS = (
    "bug in src (reported): with task_type SEQ_CLS, corda.core.resolve_targets targets the classification "
    "head (classifier.dense/out_proj), which PEFT wraps in modules_to_save, so build_corda fails (no lora_A)"
)

# One row per registered method (test_every_registered_method_has_a_row keeps this in step with the registry).
ROWS: dict[str, Row] = {
    "disel": Row(),
    "lora": Row(),
    "dora": Row(),
    "adalora": Row(),
    "full": Row(),
    "queryable": Row(),
    "lalora": Row(calibration=True),
    "disel+lalora": Row(calibration=True),
    # CorDA rewrites the base weights to a residual W - s B0 A0: the base's function up to float error
    "corda": Row(
        calibration=True,
        options={"corda": {"progress": False}},
        init_atol=1e-4,
        load_atol=1e-4,
    ),
    "corda++": Row(
        calibration=True,
        options={"corda": {"progress": False}},
        init_atol=1e-4,
        load_atol=1e-4,
    ),
    "disel+corda": Row(calibration=True, options={"disel+corda": {"progress": False}}),
}


def uncovered(methods: dict[str, Any]) -> set[str]:
    """Registered methods that have no row in the matrix."""
    return set(methods) - set(ROWS)


def _cases() -> list[Any]:
    cases = []
    for name, row in ROWS.items():
        for arch in ARCHS:
            reason = row.xfail.get(arch)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(name, arch, marks=marks, id=f"{name}-{arch}"))
    return cases


# -- data, built once per module ----------------------------------------------------------------------


def _batch(task: str, seed: int, rows: int = 2, seq: int = SEQ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (rows, seq), generator=g)  # no special tokens (RoBERTa's pad id is 1)
    labels = ids.clone() if task == "causal_lm" else torch.arange(rows) % 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.fixture(scope="module")
def data() -> dict[str, dict[str, Any]]:
    """Per arch: an evaluation batch, a training batch and the calibration batches."""
    out = {}
    for i, (arch, task) in enumerate(ARCHS.items()):
        # 384 tokens: CorDA++'s 3 covariance subsets get at least the widest layer input (128) each
        calib = [_batch(task, 100 + 10 * i + j, rows=4, seq=16) for j in range(6)]
        out[arch] = {"eval": _batch(task, 10 * i), "train": _batch(task, 10 * i + 1), "calibration": calib}
    return out


@pytest.fixture(scope="module")
def base_logits(tiny_models, data) -> dict[str, torch.Tensor]:
    """The untouched base model's logits on each arch's evaluation batch."""
    return {arch: _logits(tiny_models.model(arch, task), data[arch]["eval"]) for arch, task in ARCHS.items()}


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach().clone()
    model.train(was)
    return out


def _build(name: str, arch: str, tiny_models, data) -> torch.nn.Module:
    row, task = ROWS[name], ARCHS[arch]
    calib = data[arch]["calibration"]
    opts = MethodOptions(
        rank=RANK,
        target_modules="all-linear",
        task_type=TASK_TYPES[task],
        total_steps=10,
        calibration=(lambda: list(calib)) if row.calibration else None,
        task_calibration=lambda: list(calib),
        options=dict(row.options),
    )
    return build_model(tiny_models.model(arch, task), name, opts)


def _steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], n: int = 2) -> None:
    """``n`` optimizer steps as the trainer takes them: task loss plus the method's regularisers."""
    opt = disel.build_optimizer(model, lr=LR)
    model.train()
    for _ in range(n):
        loss = model(**batch).loss
        for reg in getattr(model, "_disel_regularizers", []):
            loss = loss + reg()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> None:
    diff = (got - want).abs().max().item()
    if atol == 0.0:
        assert torch.equal(got, want), f"{what}: not bit-identical (max |diff| {diff:.3g})"
    else:
        assert diff <= atol, f"{what}: max |diff| {diff:.3g} > {atol}"


# -- the matrix --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "arch"), _cases())
def test_starts_as_the_base_exactly_when_the_registry_says_so(name, arch, tiny_models, data, base_logits):
    spec = get_method(name)
    model = _build(name, arch, tiny_models, data)
    out = _logits(model, data[arch]["eval"])
    base = base_logits[arch]
    atol = ROWS[name].init_atol
    if spec.starts_as_base:
        _assert_close(out, base, atol, f"{name} on {arch} at init vs the base")
    else:
        diff = (out - base).abs().max().item()
        assert diff > max(atol, 1e-6), f"{name} is flagged starts_as_base=False but computes the base at init"


@pytest.mark.parametrize(("name", "arch"), _cases())
def test_a_step_changes_trainable_parameters_only(name, arch, tiny_models, data):
    model = _build(name, arch, tiny_models, data)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, f"{name} on {arch} trains nothing"
    _steps(model, data[arch]["train"])
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    moved_frozen = [n for n in before if n not in trainable and not torch.equal(after[n], before[n])]
    assert not moved_frozen, f"frozen parameters changed: {moved_frozen[:5]}"
    moved = {n for n in trainable if not torch.equal(after[n], before[n])}
    assert moved, f"{name} on {arch}: no trainable parameter changed in 2 steps"
    lora_b = {n for n in trainable if "lora_B" in n}
    if lora_b:  # the up-projections start at 0 (or at CorDA's B0) and must move: the adapter learns
        assert moved & lora_b, f"{name} on {arch}: no lora_B changed"


@pytest.mark.parametrize(("name", "arch"), _cases())
def test_saved_adapter_loads_to_the_same_outputs(name, arch, tiny_models, data, tmp_path):
    from disel.loading import load_model

    spec = get_method(name)
    task = ARCHS[arch]
    model = _build(name, arch, tiny_models, data)
    _steps(model, data[arch]["train"])
    want = _logits(model, data[arch]["eval"])
    if spec.uses_peft:
        # the adapter names its base; the loader reads it from adapter_config.json
        model.peft_config["default"].base_model_name_or_path = str(tiny_models.saved(arch, task))
        model.save_pretrained(tmp_path / "adapter")
        saved = tmp_path / "adapter"
        if spec.export is not None:
            # the native adapter needs the rewritten base: load what loads on the ORIGINAL base instead
            spec.export(model, tmp_path / "adapter" / EXPORT_DIR)
            saved = tmp_path / "adapter" / EXPORT_DIR
    else:
        model.save_pretrained(tmp_path / "model")
        saved = tmp_path / "model"
    tiny_models.tokenizer.save_pretrained(saved)  # as the pipeline does beside every saved model
    loaded, _, info = load_model(saved)
    assert info["kind"] == ("adapter" if spec.uses_peft else "model") and info["task"] == task
    got = _logits(loaded, data[arch]["eval"])
    _assert_close(got, want, ROWS[name].load_atol, f"{name} on {arch} reloaded")
    assert not torch.allclose(got, _logits(tiny_models.model(arch, task), data[arch]["eval"]))  # trained


@pytest.mark.parametrize(("name", "arch"), _cases())
def test_disabling_the_adapter_gives_the_base(name, arch, tiny_models, data, base_logits):
    spec = get_method(name)
    if not spec.uses_peft:
        pytest.skip("full fine-tuning has no adapter to disable: the trained weights are the model")
    model = _build(name, arch, tiny_models, data)
    _steps(model, data[arch]["train"])
    batch = data[arch]["eval"]
    assert (_logits(model, batch) - base_logits[arch]).abs().max() > 0  # the steps moved the model
    if spec.export is not None:
        # CorDA's base layers hold the residual: disable_adapter() alone is not the base, original_base() is
        from disel.methods.corda import original_base

        with original_base(model):
            out = _logits(model, batch)
        _assert_close(out, base_logits[arch], ROWS[name].init_atol, f"{name} on {arch} original_base()")
    else:
        with model.disable_adapter():
            out = _logits(model, batch)
        _assert_close(out, base_logits[arch], 0.0, f"{name} on {arch} with the adapter disabled")
    assert not torch.equal(_logits(model, batch), base_logits[arch])  # and enabled again afterwards


# -- a dry run per method ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ROWS), ids=list(ROWS))
def test_dry_run_trains_two_steps(name, tmp_path, capsys):
    from disel.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny-llama"},
                "method": {"name": "lora", "rank": RANK},
                "data": {"format": "instruction", "train": "unused.jsonl", "max_length": 128},
                "training": {"lr": 1e-3},
            }
        )
    )
    args = ["train", str(config), "--dry-run", "--no-progress", "--set", f"method.name={name}"]
    row = ROWS[name]
    if row.calibration:
        # a small text file of blank-line separated blocks (stdlib:docstrings would parse the stdlib: slow)
        calib = tmp_path / "calibration.txt"
        calib.write_text("\n\n".join(f"def g{i}(y):\n    return y * {i}  # scale y" for i in range(8)))
        args += ["--set", f"method.calibration={calib}", "--set", "method.calibration_samples=8"]
        args += ["--set", "method.calibration_max_length=32"]
    for section, values in row.options.items():
        for key, value in values.items():
            args += ["--set", f"method.options.{section}.{key}={yaml.safe_dump(value).splitlines()[0]}"]
    assert main(args) == 0
    assert "dry run finished: 2 steps" in capsys.readouterr().out


# -- the guard ---------------------------------------------------------------------------------------


def test_every_registered_method_has_a_row():
    missing = sorted(uncovered(available_methods()))
    assert not missing, f"registered methods without a row in ROWS of tests/test_methods_matrix.py: {missing}"
    assert set(ROWS) <= set(available_methods()), "ROWS names a method that is not registered"
    # the guard is live: a method registered without a row is reported
    name = "test-matrix-unlisted"
    try:
        register_method(name, "a method the matrix does not list")(lambda model, o: model)
        assert uncovered(available_methods()) == {name}
    finally:
        METHODS.pop(name, None)
    assert name not in available_methods()
