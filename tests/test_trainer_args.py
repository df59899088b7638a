"""`disel train` speaks TrainingArguments: transformers' names, a pass-through, trackers, optim, hub push."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from disel.cli import main
from disel.errors import UserError
from disel.training.config import config_from_dict, load_config

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _cfg(**training) -> dict:
    return {"model": {"name": "m"}, "data": {"train": "x.jsonl"}, "method": "lora", "training": training}


def test_transformers_names_are_accepted_in_yaml_and_on_the_command_line(tmp_path):
    cfg = config_from_dict(
        _cfg(
            learning_rate=3e-4,
            per_device_train_batch_size=2,
            num_train_epochs=1.5,
            lr_scheduler_type="linear",
        )
    )
    t = cfg.training
    assert (t.lr, t.per_device_batch_size, t.epochs, t.scheduler) == (3e-4, 2, 1.5, "linear")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_cfg()))
    over = load_config(p, [("training.learning_rate", 1e-5), ("per_device_train_batch_size", 3)])
    assert over.training.lr == 1e-5 and over.training.per_device_batch_size == 3
    with pytest.raises(UserError, match="training.learning_rate and training.lr are the same setting"):
        config_from_dict(_cfg(learning_rate=1e-4, lr=2e-4))


def test_training_args_pass_through_is_checked(tmp_path):
    from disel.training.runner import training_arguments

    with pytest.raises(UserError, match=r"training.args.adam_beta1 is set by disel.*use training.adam_beta1"):
        config_from_dict(_cfg(args={"adam_beta1": 0.8}))
    with pytest.raises(UserError, match=r"training.args.learning_rate .*use training.lr"):
        config_from_dict(_cfg(args={"learning_rate": 0.8}))
    with pytest.raises(
        UserError, match=r"training.args.label_smothing_factor is not .*did you mean 'label_smoothing_factor'"
    ):
        config_from_dict(_cfg(args={"label_smothing_factor": 0.1}))
    cfg = config_from_dict(_cfg(args={"label_smoothing_factor": 0.1}, optim="sgd", optim_args=None))
    args = training_arguments(cfg, tmp_path, 1, progress=False)
    assert args.label_smoothing_factor == 0.1 and getattr(args.optim, "value", args.optim) == "sgd"
    assert cfg.fingerprint() != config_from_dict(_cfg(optim="sgd")).fingerprint()  # it changes the result


def test_report_to_takes_a_list_and_a_missing_tracker_is_one_sentence(capsys, tmp_path):
    cfg = config_from_dict(_cfg(report_to=["none"]))
    assert cfg.training.report_to == ["none"]
    missing = next(
        (
            n
            for n, pkg in [("wandb", "wandb"), ("mlflow", "mlflow"), ("aim", "aim")]
            if importlib.util.find_spec(pkg) is None
        ),
        None,
    )
    if missing is None:
        pytest.skip("every tracker tried is installed here")
    with pytest.raises(UserError, match=rf"report_to='{missing}' needs the '{missing}' package.*pip install"):
        config_from_dict(_cfg(report_to=[missing]))
    with pytest.raises(UserError, match="is not a tracker"):
        config_from_dict(_cfg(report_to="wandbb"))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_cfg(report_to=[missing])))
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install {missing}" in err


def test_optim_and_push_to_hub_reach_the_trainer(tmp_path, monkeypatch):
    import peft
    import torch

    from disel.testing import tiny_model
    from disel.testing_tokenizers import tiny_tokenizer
    from disel.training.runner import train

    tok = tiny_tokenizer(128)
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(8))
    )
    pushed: list[str] = []
    monkeypatch.setattr(peft.PeftModel, "push_to_hub", lambda self, repo, **kw: pushed.append(repo))
    monkeypatch.setattr(type(tok), "push_to_hub", lambda self, repo, **kw: pushed.append(f"tok:{repo}"))
    seen = {}
    from transformers import TrainerCallback

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            # the Trainer's optimizer, inside accelerate's wrapper
            seen["optimizer"] = type(getattr(optimizer, "optimizer", optimizer))

    cfg = config_from_dict(
        {
            "model": {"name": str(tmp_path / "llama")},
            "method": {"name": "disel", "rank": 2},
            "data": {"train": str(data), "max_length": 256},
            "training": {
                "max_steps": 2,
                "per_device_train_batch_size": 4,
                "optim": "sgd",
                "learning_rate": 1e-2,
                "push_to_hub": True,
                "hub_model_id": "me/tiny-disel",
                "save_steps": 1,
            },
            "output": {"dir": str(tmp_path / "runs")},
        }
    )
    res = train(cfg, progress=False, callbacks=[Spy()])
    assert res.global_step == 2 and seen["optimizer"] is torch.optim.SGD
    assert pushed == ["me/tiny-disel", "tok:me/tiny-disel"]
    assert Path(res.run_dir / "final" / "adapter_model.safetensors").is_file()


def test_fsdp_on_cpu_is_refused_in_one_sentence(tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from disel.testing import tiny_model
    from disel.testing_tokenizers import tiny_tokenizer
    from disel.training.config import shipped_configs

    assert {"accelerate/fsdp", "accelerate/deepspeed_zero2"} <= {
        f"{p.parent.name}/{p.stem}"
        for p in (next(iter(shipped_configs().values())).parent / "accelerate").glob("*.yaml")
    }
    tok = tiny_tokenizer(128)
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(4))
    )
    cfg = {
        "model": {"name": str(tmp_path / "llama")},
        "method": {"name": "lora", "rank": 2},
        "data": {"train": str(data), "max_length": 256},
        "training": {"max_steps": 1, "per_device_batch_size": 2},
        "output": {"dir": str(tmp_path / "runs")},
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main(["train", str(p), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("disel train: error: FSDP needs GPUs") and "torchrun" in err[-1]
    assert not (tmp_path / "runs").exists()  # refused before anything was written
