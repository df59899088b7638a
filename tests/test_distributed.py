"""Data-parallel `disel train` on CPU: 2 processes under torchrun (gloo) stay in sync; only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import yaml

from disel.results import ResultsStore

_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from transformers import TrainerCallback
    from disel.training.config import load_config
    from disel.training.distributed import trainable_hash
    from disel.training.runner import train

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    seen = {}

    class Hashes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["init"] = trainable_hash(model)

    res = train(load_config(sys.argv[1]), callbacks=[Hashes()], progress=False)
    seen["final"] = trainable_hash(res.model)
    seen["world"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    """
)


def test_two_process_cpu_training_stays_in_sync(tmp_path):
    from disel.testing import tiny_model
    from disel.testing_tokenizers import tiny_tokenizer

    tok = tiny_tokenizer(128)
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    with open(tmp_path / "inst.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"instruction": f"Add {i} and {i}.", "output": f"It is {2 * i}."}) + "\n")
    cfg = {
        "model": {"name": str(tmp_path / "llama")},
        "method": {"name": "disel", "rank": 2},
        "data": {"format": "instruction", "train": str(tmp_path / "inst.jsonl"), "max_length": 256},
        "training": {
            "max_steps": 3,
            "per_device_batch_size": 2,
            "save_steps": 3,
            "lr": 1e-2,
            "gate_lr": 5e-2,
        },
        "output": {"dir": str(tmp_path / "runs")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "worker.py").write_text(_WORKER)
    out = tmp_path / "hashes"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "worker.py"), str(tmp_path / "c.yaml"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2  # really two processes
    assert r0["init"] == r1["init"]  # same seed, same adapter init
    assert r0["final"] == r1["final"]  # gradients were all-reduced: the ranks stayed in sync
    assert r0["final"] != r0["init"]  # and training changed the parameters
    info = json.loads((tmp_path / "runs" / "disel-r2-s0" / "run.json").read_text())
    assert (
        info["status"] == "finished" and info["world_size"] == 2 and info["trainable_sha256"] == r0["final"]
    )
    assert len(ResultsStore(tmp_path / "runs").records(kind="run")) == 1  # rank 0 alone wrote the store
