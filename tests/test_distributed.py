"""Data-parallel `disel train` on CPU: two processes under torchrun (gloo) are one DDP job, not two copies.

Asserted: the Trainer's world size is 2 on both ranks; the ranks see different batches; their parameters are
equal after training and equal (float tolerance) to a one-process run with the same global batch; only
rank 0 writes the run dir and the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from disel.results import ResultsStore

pytestmark = pytest.mark.slow

_WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from transformers import TrainerCallback
    import disel.training.runner as runner
    from disel.training.config import load_config
    from disel.training.distributed import trainable_hash
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    seen = {"batches": []}

    class Collate(runner.PadCollator):  # records what this rank trains on
        def __call__(self, batch):
            out = super().__call__(batch)
            seen["batches"].append(hashlib.sha256(out["input_ids"].numpy().tobytes()).hexdigest()[:12])
            return out

    runner.PadCollator = Collate

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["init"] = trainable_hash(model)
            seen["trainer_world"] = args.world_size

    res = runner.train(load_config(sys.argv[1]), callbacks=[Spy()], progress=False)
    seen["final"] = trainable_hash(res.model)
    seen["world"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    params = {n: p.detach().contiguous() for n, p in res.model.named_parameters() if p.requires_grad}
    save_file(params, os.path.join(sys.argv[2], f"params{rank}.safetensors"))
    with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    """
)


def _config(tmp_path, out_dir, per_device):
    return {
        "model": {"name": str(tmp_path / "llama")},
        "method": {"name": "disel", "rank": 2},
        "data": {"format": "instruction", "train": str(tmp_path / "inst.jsonl"), "max_length": 256},
        "training": {
            "max_steps": 3,
            "per_device_batch_size": per_device,
            "save_steps": 3,
            "lr": 1e-2,
            "gate_lr": 5e-2,
            "warmup_ratio": 0.0,
        },
        "output": {"dir": str(out_dir)},
    }


def _run(cmd, tmp_path, cfg, out):
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*cmd, str(tmp_path / "worker.py"), str(path), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_two_cpu_processes_are_one_ddp_job(tmp_path):
    from safetensors.torch import load_file

    from disel.testing import tiny_model
    from disel.testing_tokenizers import tiny_tokenizer

    tok = tiny_tokenizer(128)
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    with open(tmp_path / "inst.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"instruction": f"Add {i} and {i}.", "output": f"It is {2 * i}."}) + "\n")
    (tmp_path / "worker.py").write_text(_WORKER)

    ddp_out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run(torchrun, tmp_path, _config(tmp_path, tmp_path / "runs", per_device=2), ddp_out)
    r0 = json.loads((ddp_out / "rank0.json").read_text())
    r1 = json.loads((ddp_out / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2 and r0["trainer_world"] == r1["trainer_world"] == 2
    assert r0["init"] == r1["init"]  # same seed, same adapter init
    assert len(r0["batches"]) >= 3 and len(r1["batches"]) >= 3  # (the loader may prefetch one more)
    # each rank its own shard of every global batch
    assert not set(r0["batches"][:3]) & set(r1["batches"][:3])
    assert r0["final"] == r1["final"] != r0["init"]  # gradients all-reduced: the ranks stayed in sync
    info = json.loads((tmp_path / "runs" / "disel-r2-s0" / "run.json").read_text())
    assert (
        info["status"] == "finished" and info["world_size"] == 2 and info["trainable_sha256"] == r0["final"]
    )
    assert len(ResultsStore(tmp_path / "runs").records(kind="run")) == 1  # rank 0 alone wrote the store
    assert sorted(p.name for p in (tmp_path / "runs" / "disel-r2-s0").glob("checkpoint-*")) == [
        "checkpoint-3"
    ]

    # One process with the same global batch (2 x 2) ends at the same parameters, up to float rounding.
    single_out = tmp_path / "single"
    _run([sys.executable], tmp_path, _config(tmp_path, tmp_path / "runs1", per_device=4), single_out)
    ddp_params = load_file(str(ddp_out / "params0.safetensors"))
    one_params = load_file(str(single_out / "params0.safetensors"))
    assert ddp_params.keys() == one_params.keys()
    worst = max(float((ddp_params[k] - one_params[k]).abs().max()) for k in ddp_params)
    moved = max(float(one_params[k].abs().max()) for k in one_params if "lora_B" in k)
    assert moved > 1e-3 and worst < 1e-4, (worst, moved)
    print(f"DDP vs one process: max |diff| {worst:.2e} (B entries up to {moved:.2e})")
