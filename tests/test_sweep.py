"""`disel sweep`: grid expansion, skipping finished runs, the evaluation hook, and surviving SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from disel.errors import UserError
from disel.experiments.sweep import expand_grid, run_sweep
from disel.results import ResultsStore
from disel.training.config import config_from_dict


def _base(tmp_path: Path, model: str = "m", data: str = "x.jsonl") -> dict:
    return {
        "model": {"name": model},
        "method": {"name": "disel", "rank": 2},
        "data": {"format": "instruction", "train": data, "max_length": 256},
        "training": {
            "max_steps": 6,
            "per_device_batch_size": 4,
            "save_steps": 2,
            "logging_steps": 1,
            "lr": 1e-3,
        },
        "output": {"dir": str(tmp_path / "runs")},
    }


def test_expand_grid_ids_and_values(tmp_path):
    cfg = config_from_dict(
        {
            **_base(tmp_path),
            "grid": {"method": ["lora", "disel"], "method_options.rank": [2, 4], "training.lr": [1e-3]},
        }
    )
    runs = expand_grid(cfg)
    assert [r.run_id for r in runs] == [
        "lora-r2-s0-lr0.001",
        "lora-r4-s0-lr0.001",
        "disel-r2-s0-lr0.001",
        "disel-r4-s0-lr0.001",
    ]
    assert runs[1].method.rank == 4 and runs[2].method.name == "disel" and runs[3].grid is None
    assert runs[0].run_dir == tmp_path / "runs" / "lora-r2-s0-lr0.001"
    with pytest.raises(UserError, match=r"grid point .*method\.rank=0"):
        expand_grid(config_from_dict({**_base(tmp_path), "grid": {"rank": [0]}}))
    with pytest.raises(UserError, match="Unknown key 'training.lrr'"):
        expand_grid(config_from_dict({**_base(tmp_path), "grid": {"training.lrr": [1]}}))


def test_sweep_skips_finished_runs_and_evaluates_each_run(tmp_path):
    from disel.training.config import run_key
    from disel.training.runner import run_record
    from disel.utils.io import atomic_write_json

    cfg = config_from_dict({**_base(tmp_path), "grid": {"seed": [0, 1, 2]}, "eval": {"suite": "toy"}})
    trained, evaluated = [], []

    def fake_train(rc, store, progress, sweep):
        trained.append(rc.run_id)
        atomic_write_json(rc.run_dir / "run.json", run_record(rc, rc.run_dir, "finished"))
        store.put("run", run_key(rc), {"status": "finished", "method": rc.method.name, "sweep": sweep})

    def fake_eval(run_dir, spec, store):
        evaluated.append((Path(run_dir).name, spec["suite"]))

    s = run_sweep(cfg, progress=False, evaluate=fake_eval, train_fn=fake_train)
    assert trained == ["disel-r2-s0", "disel-r2-s1", "disel-r2-s2"] and len(s.evaluated) == 3
    assert evaluated == [(r, "toy") for r in trained]
    recs = ResultsStore(cfg.results_path).records(kind="run")
    assert len({r["sweep"] for r in recs}) == 1 and str(tmp_path / "runs") in recs[0]["sweep"]
    # A rerun trains nothing and hands every run to the evaluation, which finishes only missing units.
    s2 = run_sweep(cfg, progress=False, evaluate=fake_eval, train_fn=fake_train)
    assert len(trained) == 3 and s2.skipped == trained and len(evaluated) == 6
    # Other hyper-parameters on the same dir and store are other runs: all three train again, beside.
    cfg_b = config_from_dict({**cfg.to_dict(), "training": {**cfg.to_dict()["training"], "lr": 5e-4}})
    s3 = run_sweep(cfg_b, progress=False, evaluate=fake_eval, train_fn=fake_train)
    assert len(s3.trained) == 3 and all(r.startswith("disel-r2-s") and len(r) > 12 for r in s3.trained)
    assert len(ResultsStore(cfg.results_path).records(kind="run")) == 6


def test_sweep_validates_the_whole_grid_before_training(tmp_path):
    cfg = config_from_dict({**_base(tmp_path), "grid": {"method": ["lora", "disel", "lroa"]}})
    trained = []
    with pytest.raises(UserError, match="lroa"):
        run_sweep(cfg, progress=False, train_fn=lambda rc, **kw: trained.append(rc.run_id))
    assert trained == []


# A sweep launched in a subprocess that SIGKILLs itself right after the 2nd run's checkpoint-4 is saved (a
# deterministic point in the middle of a run). Steps are forced onto one thread to keep the test quick.
_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from transformers import TrainerCallback
    from disel.experiments.sweep import run_sweep
    from disel.training.config import load_config
    from disel.training.runner import train

    torch.set_num_threads(1)

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)

    def train_fn(rc, **kw):
        cbs = [Kill()] if rc.run_id == sys.argv[2] else []
        return train(rc, callbacks=cbs, **kw)

    run_sweep(load_config(sys.argv[1]), progress=False, train_fn=train_fn)
    """
)


@pytest.fixture(scope="module")
def assets(run_assets):
    return run_assets(24)


def test_sweep_survives_sigkill_mid_run(tmp_path, assets, one_thread):
    cfg = {**_base(tmp_path, str(assets / "llama"), str(assets / "inst.jsonl"))}
    cfg["grid"] = {"method": ["lora", "disel"], "seed": [0]}
    cfg["method"]["name"] = "lora"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    runs = tmp_path / "runs"

    first = subprocess.run(
        [sys.executable, str(script), str(path), "disel-r2-s0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    store = ResultsStore(runs)
    before = store.records(kind="run")
    assert [r["run_id"] for r in before] == ["lora-r2-s0"]  # the finished run is recorded, the killed one not
    killed = runs / "disel-r2-s0"
    assert json.loads((killed / "run.json").read_text())["status"] == "running"
    assert (killed / "checkpoint-4" / "trainer_state.json").is_file() and not (killed / "final").exists()
    # killed after the Trainer wrote checkpoint-4 but before it was marked complete: not resumable
    assert not (killed / "checkpoint-4" / "disel_state.json").exists()
    assert (killed / "checkpoint-2" / "disel_state.json").is_file()
    lora_final = (runs / "lora-r2-s0" / "final" / "adapter_model.safetensors").stat().st_mtime_ns

    second = subprocess.run(
        [sys.executable, "-m", "disel.cli", "sweep", str(path), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert "skipping checkpoint-4: disel_state.json is missing" in second.stderr
    assert "resuming run disel-r2-s0 from checkpoint-2" in second.stderr
    assert "2 runs, 1 trained now, 1 already finished" in second.stdout
    after = ResultsStore(runs).records(kind="run")
    assert sorted(r["run_id"] for r in after) == ["disel-r2-s0", "lora-r2-s0"]  # each exactly once
    assert after[0]["id"] == before[0]["id"]  # the finished run was not redone ...
    assert (runs / "lora-r2-s0" / "final" / "adapter_model.safetensors").stat().st_mtime_ns == lora_final
    resumed = next(r for r in after if r["run_id"] == "disel-r2-s0")
    assert (
        resumed["resumed_from"] == "checkpoint-2" and resumed["global_step"] == 6
    )  # ... the killed one resumed
    state = json.loads((killed / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # The resumed run ends where an uninterrupted run of the same config ends.
    from disel.training.runner import train

    info = json.loads((killed / "run.json").read_text())
    clean_cfg = config_from_dict({**info["config"], "output": {"dir": str(tmp_path / "clean")}})
    clean = train(clean_cfg, progress=False, store=ResultsStore(tmp_path / "clean"))
    clean_info = json.loads((clean.run_dir / "run.json").read_text())
    assert clean_info["trainable_sha256"] == info["trainable_sha256"]
    # ... and with the same train loss: the loss of the steps before the kill is carried in the checkpoint
    assert clean_info["train_loss"] == pytest.approx(info["train_loss"], rel=1e-9)
    assert clean_info["global_step"] == info["global_step"] == 6
