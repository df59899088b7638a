"""The paper's three configs: the recipe's values are there, and each trains for 2 steps on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from disel.training.config import load_config
from disel.training.dryrun import dry_run_config
from disel.training.runner import train

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "disel" / "configs"
PAPER = ["llama2-7b-metamathqa.yaml", "mistral-7b-magicoder.yaml", "roberta-base-glue.yaml"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_recipe_and_dry_run(tmp_path, name):
    cfg = load_config(CONFIGS / name)
    t, m = cfg.training, cfg.method
    # Shared recipe: alpha = 2r (default), dropout 0, AdamW(0.9, 0.999, 1e-8), cosine, 2% warmup, effective
    # batch 32, max length 512, 3 epochs, clip 1.0, bf16, gradient checkpointing.
    assert m.alpha is None and m.dropout == 0.0
    assert (t.adam_beta1, t.adam_beta2, t.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert t.scheduler == "cosine" and t.warmup_ratio == 0.02 and t.effective_batch_size == 32
    assert cfg.data.max_length == 512 and t.epochs == 3 and t.max_grad_norm == 1.0
    assert t.bf16 is True and t.gradient_checkpointing is True
    if name.startswith("roberta"):
        assert (
            cfg.task == "seq_cls"
            and m.options["disel"]["gate_bias_init"] == -7.0
            and t.gate_lr == 1e-4
            and t.rank_scaled_lr
        )
        assert cfg.grid["method_options.rank"] == [4, 8, 16, 32, 64] and cfg.grid["seed"] == [0, 1, 2]
    else:
        assert cfg.task == "causal_lm" and m.options["disel"]["gate_bias_init"] == -3.0
        assert t.gate_lr == pytest.approx(5 * t.lr) and t.lr == 2e-4 and t.weight_decay == 0.01
        assert len(m.target_modules) == 7 and cfg.grid["method_options.rank"] == [16, 32, 64, 128, 256]
        assert cfg.data.template == ("magicoder" if "magicoder" in name else "alpaca")

    dry = dry_run_config(cfg, tmp_path, steps=2)
    assert dry.training.gradient_checkpointing and dry.method.name == cfg.method.name
    res = train(dry, progress=False)
    assert res.status == "finished" and res.global_step == 2 and res.train_loss > 0
    info = json.loads((res.run_dir / "run.json").read_text())
    assert info["task"] == cfg.task and (res.run_dir / "final" / "adapter_model.safetensors").is_file()


def test_dry_run_from_the_cli(capsys):
    from disel.cli import main

    assert (
        main(["train", str(CONFIGS / PAPER[0]), "--dry-run", "--no-progress", "--method.name", "lora"]) == 0
    )
    assert "dry run finished: 2 steps" in capsys.readouterr().out


def test_demo_sweep_config_trains_the_shipped_model_on_the_demo_data(tmp_path):
    """configs/demo-arith-sweep.yaml for real (2 steps): the model alias, the saved data's fields, the prompt."""
    from disel.experiments.demo import DemoConfig, demo_model_dir, save_task_data

    save_task_data(tmp_path / "data", DemoConfig.quick())
    train_file, test_file = tmp_path / "data" / "arith_train.jsonl", tmp_path / "data" / "arith_test.jsonl"
    cfg = load_config(
        CONFIGS / "demo-arith-sweep.yaml",
        [
            ("data.train", str(train_file)),
            ("training.max_steps", 2),
            ("training.save_steps", 1),
            ("output.dir", str(tmp_path / "runs")),
        ],
    )
    assert cfg.model.name == str(demo_model_dir())
    assert cfg.grid == {"method": ["lora", "disel"], "method_options.rank": [4, 8], "seed": [0]}
    assert cfg.eval["target"]["type"] == "exact_match" and cfg.eval["retention"] == ["stdlib-ppl"]
    res = train(cfg, progress=False)
    assert res.status == "finished" and res.global_step == 2 and 0 < res.train_loss < 20
    # the test file has the fields the exact-match target reads
    row = json.loads(test_file.read_text().splitlines()[0])
    assert set(row) == {"prompt", "answer"} and row["prompt"].startswith("Question: ")
