"""`disel train`: config parsing and validation, data formats and their errors, and tiny training runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from disel.cli import main
from disel.data.sources import read_rows
from disel.data.templates import ALPACA as ALPACA_TEMPLATE
from disel.data.templates import MAGICODER as MAGICODER_TEMPLATE
from disel.errors import UserError
from disel.results import ResultsStore
from disel.training.config import (
    config_from_dict,
    effective_lr,
    load_config,
    parse_override_args,
)
from disel.training.data import prepare_data

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from disel.testing import tiny_model
    from disel.testing_tokenizers import tiny_tokenizer

    root = tmp_path_factory.mktemp("train-assets")
    tok = tiny_tokenizer(128)
    for arch, task in [("llama", "causal_lm"), ("roberta", "seq_cls")]:
        m = tiny_model(arch, task, vocab_size=len(tok))
        m.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
    with open(root / "inst.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"instruction": f"Add {i} and {i}.", "output": f"It is {2 * i}."}) + "\n")
    with open(root / "cls.jsonl", "w") as f:
        for i in range(16):
            f.write(
                json.dumps(
                    {
                        "s1": "a good day" if i % 2 else "a bad day",
                        "s2": "yes",
                        "label": "pos" if i % 2 else "neg",
                    }
                )
                + "\n"
            )
    return root


def _cfg(assets: Path, tmp_path: Path, **sections) -> dict:
    base = {
        "model": {"name": str(assets / "llama")},
        "method": {"name": "disel", "rank": 2},
        "data": {"format": "instruction", "train": str(assets / "inst.jsonl"), "max_length": 256},
        "training": {
            "max_steps": 2,
            "per_device_batch_size": 4,
            "save_steps": 1,
            "logging_steps": 1,
            "lr": 1e-3,
        },
        "output": {"dir": str(tmp_path / "runs")},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return base


# -- config ------------------------------------------------------------------------------------------


def test_config_unknown_key_and_bad_type_name_the_field(tmp_path):
    good = {"model": {"name": "m"}, "data": {"train": "x.jsonl"}}
    with pytest.raises(UserError, match=r"'training\.lrr'"):
        config_from_dict({**good, "training": {"lrr": 1.0}})
    with pytest.raises(UserError, match=r"training\.lr='fast'"):
        config_from_dict({**good, "training": {"lr": "fast"}})
    with pytest.raises(UserError, match=r"method\.rank=0"):
        config_from_dict({**good, "method": {"rank": 0}})
    with pytest.raises(UserError, match=r"data\.format='tabular'"):
        config_from_dict({**good, "data": {"train": "x", "format": "tabular"}})
    with pytest.raises(UserError, match=r"model\.name is empty"):
        config_from_dict({"data": {"train": "x"}})


def test_demo_model_alias_resolves_to_the_shipped_model():
    from disel.experiments.demo import demo_model_dir

    cfg = config_from_dict({"model": {"name": "disel:demo-model"}, "data": {"train": "x.jsonl"}})
    assert cfg.model.name == str(demo_model_dir()) and (Path(cfg.model.name) / "config.json").is_file()
    cfg = config_from_dict(
        {"model": {"name": "m", "tokenizer": "disel:demo-model"}, "data": {"train": "x.jsonl"}}
    )
    assert cfg.model.name == "m" and cfg.model.tokenizer == str(demo_model_dir())


def test_overrides_from_yaml_and_cli(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"name": "m"}, "method": "lora", "data": {"train": "x.jsonl"}}))
    ov, rest = parse_override_args(
        [
            "--set",
            "training.lr=1e-4",
            "--method.rank",
            "16",
            "--data.text_fields=[a, b]",
            "--seed=3",
            "--dry-run",
        ]
    )
    assert rest == ["--dry-run"]
    cfg = load_config(p, ov)
    assert cfg.method.name == "lora" and cfg.method.rank == 16 and cfg.training.seed == 3
    assert cfg.training.lr == pytest.approx(1e-4) and cfg.data.text_fields == ["a", "b"]
    assert cfg.run_id == "lora-r16-s3" and cfg.run_dir == Path("runs") / "lora-r16-s3"
    with pytest.raises(UserError, match="training.bogus"):
        load_config(p, [("training.bogus", 1)])


def test_rank_scaled_and_gate_learning_rates():
    cfg = config_from_dict(
        {
            "model": {"name": "m"},
            "data": {"train": "x"},
            "method": {"name": "disel", "rank": 32, "options": {"disel": {"gate_lr_multiplier": 5.0}}},
            "training": {"lr": 4e-4, "rank_scaled_lr": True, "rank_scaled_lr_reference": 8},
        }
    )
    assert effective_lr(cfg) == pytest.approx(4e-4 * (8 / 32) ** 0.5)
    from disel.methods import MethodOptions, build_model
    from disel.testing import tiny_model
    from disel.training.trainer import gate_learning_rate

    model = build_model(tiny_model("llama"), "disel", MethodOptions(rank=2, options=cfg.method.options))
    assert gate_learning_rate(model, cfg.training.lr) == pytest.approx(2e-3)  # from the unscaled lr
    assert gate_learning_rate(model, cfg.training.lr, 1e-2) == 1e-2  # training.gate_lr wins
    assert gate_learning_rate(tiny_model("llama"), cfg.training.lr) is None  # no gates, no gate lr
    full = config_from_dict({**cfg.to_dict(), "method": {**cfg.to_dict()["method"], "name": "full"}})
    assert effective_lr(full) == pytest.approx(4e-4)


# -- data --------------------------------------------------------------------------------------------


def test_malformed_rows_name_file_line_and_field(tmp_path, assets):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    cfg = config_from_dict(_cfg(assets, tmp_path, data={"train": str(bad)}))
    tok = _tok()
    with pytest.raises(UserError, match=r"bad\.jsonl:2 has no field 'output'"):
        prepare_data(cfg, tok)
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2 is not valid JSON"):
        read_rows(str(bad))
    js = tmp_path / "bad.json"
    js.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "x"}]))
    cfg = config_from_dict(_cfg(assets, tmp_path, data={"train": str(js)}))
    with pytest.raises(UserError, match=r"bad\.json\[1\] field 'instruction' must be text"):
        prepare_data(cfg, tok)
    csv = tmp_path / "bad.csv"
    csv.write_text("s1,s2,label\nfine,ok,1\nfine,ok,7\n")
    cfg = config_from_dict(
        _cfg(
            assets,
            tmp_path,
            data={"train": str(csv), "format": "classification", "text_fields": ["s1", "s2"]},
            model={"num_labels": 2},
        )
    )
    with pytest.raises(UserError, match=r"bad\.csv:3 field 'label'=7 is outside \[0, 2\)"):
        prepare_data(cfg, tok)


def _tok():
    from disel.testing_tokenizers import tiny_tokenizer

    return tiny_tokenizer(128)


def test_instruction_loss_on_response_only_and_templates(tmp_path, assets):
    tok = _tok()
    for name, template in [("alpaca", ALPACA_TEMPLATE), ("magicoder", MAGICODER_TEMPLATE)]:
        cfg = config_from_dict(_cfg(assets, tmp_path, data={"template": name, "max_length": 256}))
        ex = prepare_data(cfg, tok).train[3]
        prompt = template.format(instruction="Add 3 and 3.")
        # BOS, as generation and scoring put it (this tokenizer does not add it itself), then the prompt
        assert tok("x")["input_ids"][0] != tok.bos_token_id and ex["input_ids"][0] == tok.bos_token_id
        n_prompt = 1 + len(tok(prompt)["input_ids"])
        assert ex["labels"][:n_prompt] == [-100] * n_prompt
        resp = ex["labels"][n_prompt:]
        assert resp[-1] == tok.eos_token_id and -100 not in resp
        assert tok.decode(resp[:-1]) == "It is 6."
        assert tok.decode(ex["input_ids"][1:n_prompt]) == prompt
    assert "@@ Instruction\n" in MAGICODER_TEMPLATE and MAGICODER_TEMPLATE.endswith("\n\n@@ Response\n")


def test_string_labels_are_numbered(tmp_path, assets):
    cfg = config_from_dict(
        _cfg(
            assets,
            tmp_path,
            data={
                "train": str(assets / "cls.jsonl"),
                "format": "classification",
                "text_fields": ["s1", "s2"],
            },
        )
    )
    data = prepare_data(cfg, _tok())
    assert data.label_names == ["neg", "pos"] and data.num_labels == 2
    assert [data.train[i]["labels"] for i in range(4)] == [0, 1, 0, 1]


# -- training ----------------------------------------------------------------------------------------


def test_train_cli_disel_writes_run_dir_and_store(tmp_path, assets):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_cfg(assets, tmp_path)))
    rc = main(["train", str(p), "--no-progress", "--set", "training.gate_lr=5e-3"])
    assert rc == 0
    run_dir = tmp_path / "runs" / "disel-r2-s0"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["method"] == "disel" and info["rank"] == 2
    assert info["task"] == "causal_lm" and info["model"] == str(assets / "llama")
    assert info["gate_lr"] == pytest.approx(5e-3) and info["global_step"] == 2
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert (run_dir / "final" / "tokenizer.json").is_file()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    recs = ResultsStore(tmp_path / "runs").records(kind="run")
    assert len(recs) == 1 and recs[0]["run_id"] == "disel-r2-s0" and recs[0]["status"] == "finished"
    assert recs[0]["train_loss"] > 0
    # Training the same run again finds it finished and does not redo it.
    assert main(["train", str(p), "--no-progress", "--set", "training.gate_lr=5e-3"]) == 0
    assert len(ResultsStore(tmp_path / "runs").records(kind="run")) == 1
    # Other settings under the same name are another run: trained beside it, never "already finished".
    assert main(["train", str(p), "--no-progress"]) == 0
    recs = ResultsStore(tmp_path / "runs").records(kind="run")
    assert (
        len(recs) == 2
        and len({r["run_key"] for r in recs}) == 2
        and len({r["fingerprint"] for r in recs}) == 2
    )
    other = [d for d in (tmp_path / "runs").iterdir() if d.name.startswith("disel-r2-s0-")]
    other_cfg = json.loads((other[0] / "run.json").read_text())["config"]
    assert (
        len(other) == 1 and other_cfg["training"]["gate_lr"] is None and info["config"]["training"]["gate_lr"]
    )
    # A bad override is one line and exit code 2.
    assert main(["train", str(p), "--set", "training.lr=-1"]) == 2


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_train_baselines(tmp_path, assets, method):
    from disel.training.runner import train

    cfg = config_from_dict(_cfg(assets, tmp_path, method={"name": method}, training={"save_steps": 2}))
    res = train(cfg, progress=False)
    assert res.status == "finished" and res.global_step == 2
    final = res.run_dir / "final"
    assert (final / ("model.safetensors" if method == "full" else "adapter_model.safetensors")).is_file()
    if method == "dora":
        assert json.loads((final / "adapter_config.json").read_text())["use_dora"] is True


def test_adalora_update_and_allocate_is_called(tmp_path, assets):
    from disel.training.runner import train

    cfg = config_from_dict(
        _cfg(
            assets,
            tmp_path,
            method={"name": "adalora", "rank": 2},
            training={"max_steps": 5, "save_steps": 5},
        )
    )
    res = train(cfg, progress=False)
    # total 5, tinit 1, tfinal 1: at step 4 the budget is fixed and the rank pattern is written to the config.
    adapter_cfg = json.loads((res.run_dir / "final" / "adapter_config.json").read_text())
    assert adapter_cfg["rank_pattern"], "update_and_allocate never reached the final allocation"


def test_seq_cls_trains_and_saves_the_new_head(tmp_path, assets):
    from safetensors.torch import load_file

    from disel.training.runner import train

    cfg = config_from_dict(
        _cfg(
            assets,
            tmp_path,
            model={"name": str(assets / "roberta")},
            method={"options": {"gate_bias_init": -7.0}},
            data={
                "train": str(assets / "cls.jsonl"),
                "format": "classification",
                "text_fields": ["s1", "s2"],
            },
            training={"gradient_checkpointing": True},
        )
    )
    res = train(cfg, progress=False)
    info = json.loads((res.run_dir / "run.json").read_text())
    assert info["task"] == "seq_cls" and info["label_names"] == ["neg", "pos"]
    keys = load_file(res.run_dir / "final" / "adapter_model.safetensors").keys()
    assert any("classifier" in k for k in keys) and any("lora_gate" in k for k in keys)


def test_regularizers_are_added_to_the_loss(tmp_path, assets):
    from disel.methods.registry import METHODS, build_model, register_method
    from disel.training.runner import train

    calls = []

    @register_method("test-lora-reg", "LoRA plus a constant extra loss (test only).")
    def _build(model, o):
        m = build_model(model, "lora", o)
        p = next(q for q in m.parameters() if q.requires_grad)

        def reg():
            calls.append(1)
            return torch.tensor(10.0) + 0.0 * p.sum()

        m._disel_regularizers = [reg]
        return m

    try:
        plain = train(config_from_dict(_cfg(assets, tmp_path, method={"name": "lora"})), progress=False)
        cfg = config_from_dict(_cfg(assets, tmp_path, method={"name": "test-lora-reg"}))
        reg = train(cfg, progress=False)
    finally:
        METHODS.pop("test-lora-reg", None)
    assert len(calls) == 2  # once per training step (batch 4, no accumulation)
    assert reg.train_loss - plain.train_loss == pytest.approx(10.0, abs=1e-3)


def test_data_methods_get_calibration_and_resume_with_saved_curvature(tmp_path, assets):
    """LaLoRA reads method.calibration at build time; its curvature travels with each checkpoint."""
    from disel.training.runner import train

    method = {
        "name": "disel+lalora",
        "rank": 2,
        "calibration": "stdlib:docstrings",
        "calibration_samples": 8,
        "calibration_max_length": 32,
        "options": {"lalora": {"lam": 1.0, "curvature": "diag"}},
    }
    cfg = config_from_dict(_cfg(assets, tmp_path, method=method, training={"max_steps": 2, "save_steps": 1}))
    res = train(cfg, progress=False)
    assert res.status == "finished"
    assert (res.run_dir / "checkpoint-1" / "lalora_curvature.safetensors").is_file()

    bad = config_from_dict(_cfg(assets, tmp_path / "bad", method={**method, "calibration": "stdlib:nothing"}))
    with pytest.raises(UserError, match="stdlib:nothing"):
        train(bad, progress=False)


def test_queryable_trains_through_the_pipeline(tmp_path, assets):
    from disel.training.runner import train

    cfg = config_from_dict(_cfg(assets, tmp_path, method={"name": "queryable", "rank": 2}))
    res = train(cfg, progress=False)
    assert res.status == "finished"
    saved = json.loads((res.run_dir / "final" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "QUERYABLE"


def test_corda_run_exports_plain_lora_for_the_original_base(tmp_path, assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from disel.rundir import evaluation_points as run_checkpoints
    from disel.training.runner import train

    method = {
        "name": "corda",
        "rank": 2,
        "calibration": "stdlib:docstrings",
        "calibration_samples": 16,
        "calibration_max_length": 48,
        "options": {"corda": {"mode": "ipm", "cache_dir": str(tmp_path / "cov")}},
    }
    cfg = config_from_dict(_cfg(assets, tmp_path, method=method, training={"max_steps": 2, "save_steps": 1}))
    res = train(cfg, progress=False)
    assert res.status == "finished"
    paths = dict(run_checkpoints(res.run_dir))
    assert paths[None].name == "original_base_lora" and paths[1].name == "original_base_lora"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "llama"), paths[None])
    assert loaded.peft_config["default"].peft_type == "LORA"
