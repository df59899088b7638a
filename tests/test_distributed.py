"""Data-parallel `disel train` on CPU: two processes under torchrun or accelerate launch are one DDP job.

Asserted for each launcher: the Trainer's world size is 2 on both ranks; the ranks see different batches;
their parameters are equal after training, moved from the init, and equal (float tolerance) to a one-process
run with the same global batch; only rank 0 writes the run dir, final/ and the store. A spelling of
accelerate launch that starts one process where two were asked for is refused in one sentence."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import disel
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
    seen = {"batches": [], "replaced": []}

    class Collate(runner.PadCollator):  # records what this rank trains on
        def __call__(self, batch):
            out = super().__call__(batch)
            seen["batches"].append(hashlib.sha256(out["input_ids"].numpy().tobytes()).hexdigest()[:12])
            return out

    runner.PadCollator = Collate
    _replace = os.replace

    def replace(src, dst, *a, **kw):  # every atomic write (run.json, final/, the store) ends in os.replace
        seen["replaced"].append(os.path.basename(os.fspath(dst)))
        return _replace(src, dst, *a, **kw)

    os.replace = replace
    if rank == 0 and os.environ.get("SLOW_DELETES"):  # rank 0 clears an overwritten run dir slowly
        import shutil, time

        _rmtree = shutil.rmtree

        def rmtree(*a, **kw):
            time.sleep(3)
            return _rmtree(*a, **kw)

        shutil.rmtree = rmtree

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["init"] = trainable_hash(model)
            seen["trainer_world"] = args.world_size

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            seen["optimizer"] = type(getattr(optimizer, "optimizer", optimizer)).__name__

    res = runner.train(load_config(sys.argv[1]), callbacks=[Spy()], progress=False)
    seen["final"] = trainable_hash(res.model)
    seen["world"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    params = {n: p.detach().contiguous() for n, p in res.model.named_parameters() if p.requires_grad}
    save_file(params, os.path.join(sys.argv[2], f"params{rank}.safetensors"))
    with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    """
)

_ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
_ACCELERATE += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
_SHIPPED = Path(disel.__file__).parent / "configs" / "accelerate"
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # accelerate's multi-GPU launcher is torchrun underneath: on a machine without GPUs, gloo DDP on CPU
    "accelerate": [*_ACCELERATE, "--multi_gpu", "--num_processes", "2"],
    # the shipped ZeRO-2 config (bf16 and 8 processes overridden): DeepSpeed's CPU accelerator, gloo
    "deepspeed": [
        *_ACCELERATE,
        "--config_file",
        str(_SHIPPED / "deepspeed_zero2.yaml"),
        "--num_processes",
        "2",
    ],
}


def _config(ws: Path, out_dir: Path, per_device: int) -> dict:
    return {
        "model": {"name": str(ws / "llama")},
        "method": {"name": "disel", "rank": 2},
        "data": {"format": "instruction", "train": str(ws / "inst.jsonl"), "max_length": 256},
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


def _env(ws: Path) -> dict:
    # HF_HOME in the workspace: no accelerate default_config.yaml of this machine's user changes the launch
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(ws / "hf")}


def _run(cmd: list[str], ws: Path, cfg: dict, out: Path, **env: str) -> dict[int, dict]:
    """Run the worker under ``cmd``; what each rank saw, by rank."""
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    out.mkdir()
    proc = subprocess.run(
        [*cmd, str(ws / "worker.py"), str(path), str(out)],
        env={**_env(ws), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A tiny Llama, its data, the worker, and the one-process reference run (global batch 4, as 2 x 2)."""
    from disel.testing import tiny_model
    from disel.testing_tokenizers import tiny_tokenizer

    ws = tmp_path_factory.mktemp("ddp")
    tok = tiny_tokenizer(128)
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(ws / "llama")
    tok.save_pretrained(ws / "llama")
    with open(ws / "inst.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"instruction": f"Add {i} and {i}.", "output": f"It is {2 * i}."}) + "\n")
    (ws / "worker.py").write_text(_WORKER)
    (one,) = _run([sys.executable], ws, _config(ws, ws / "runs1", per_device=4), ws / "single").values()
    assert one["world"] == one["trainer_world"] == 1
    return ws


_NO_DEEPSPEED = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install deepspeed)"
)


@pytest.mark.parametrize(
    "launcher",
    [pytest.param(n, marks=[_NO_DEEPSPEED] if n == "deepspeed" else []) for n in sorted(LAUNCHERS)],
)
def test_two_cpu_processes_are_one_ddp_job(launcher, ws, tmp_path):
    from safetensors.torch import load_file

    out, runs = tmp_path / "ddp", tmp_path / "runs"
    ranks = _run(LAUNCHERS[launcher], ws, _config(ws, runs, per_device=2), out)
    assert sorted(ranks) == [0, 1]
    r0, r1 = ranks[0], ranks[1]
    assert r0["world"] == r1["world"] == 2 and r0["trainer_world"] == r1["trainer_world"] == 2
    assert r0["init"] == r1["init"]  # same seed, same adapter init
    assert len(r0["batches"]) >= 3 and len(r1["batches"]) >= 3  # (the loader may prefetch one more)
    # each rank its own shard of every global batch
    assert not set(r0["batches"][:3]) & set(r1["batches"][:3])
    assert r0["final"] == r1["final"] != r0["init"]  # gradients all-reduced: the ranks stayed in sync
    if launcher == "deepspeed":  # ZeRO-2 really ran (accelerate did not fall back to plain DDP)
        assert r0["optimizer"] == r1["optimizer"] == "DeepSpeedZeroOptimizer", r0["optimizer"]

    # one writer: rank 0 moved final/ into place once and wrote run.json and the store; rank 1 wrote nothing
    assert r0["replaced"].count("final") == 1 and "run.json" in r0["replaced"]
    assert r1["replaced"] == [], r1["replaced"]
    run_dir = runs / "disel-r2-s0"
    info = json.loads((run_dir / "run.json").read_text())
    assert (
        info["status"] == "finished" and info["world_size"] == 2 and info["trainable_sha256"] == r0["final"]
    )
    assert len(ResultsStore(runs).records(kind="run")) == 1
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert not list(run_dir.glob(".final*"))

    # One process with the same global batch (2 x 2) ends at the same parameters, up to float rounding.
    ddp = load_file(str(out / "params0.safetensors"))
    one = load_file(str(ws / "single" / "params0.safetensors"))
    assert ddp.keys() == one.keys()
    saved = load_file(str(run_dir / "final" / "adapter_model.safetensors"))  # final/ holds those parameters
    assert saved.keys() == {k.replace(".default", "") for k in ddp}
    assert all(bool((saved[k.replace(".default", "")] == v).all()) for k, v in ddp.items())
    worst = max(float((ddp[k] - one[k]).abs().max()) for k in ddp)
    moved = max(float(one[k].abs().max()) for k in one if "lora_B" in k)
    assert moved > 1e-3 and worst < 1e-4, (worst, moved)
    print(
        f"\n{launcher}: world {r0['world']}/{r1['world']} (Trainer {r0['trainer_world']}/{r1['trainer_world']}),"
        f" first batches {r0['batches'][0]} / {r1['batches'][0]}, params {r0['final'][:12]} /"
        f" {r1['final'][:12]} (init {r0['init'][:12]}), max |diff| vs one process {worst:.2e}"
        f" (B entries up to {moved:.2e})"
    )


def test_overwrite_waits_for_rank_0_to_clear_the_run_dir(ws, tmp_path):
    """With output.overwrite, no rank reads the old run's checkpoints while rank 0 is still deleting them."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(ws / "runs1", runs)  # a finished one-process run (other settings) in the same run dir
    cfg = _config(ws, runs, per_device=2)
    cfg["output"]["overwrite"] = True
    ranks = _run(LAUNCHERS["torchrun"], ws, cfg, tmp_path / "ddp", SLOW_DELETES="1")
    assert (
        ranks[0]["final"] == ranks[1]["final"] != ranks[0]["init"]
    )  # both trained, none resumed the old run
    info = json.loads((runs / "disel-r2-s0" / "run.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == 3 and info["resumed_from"] is None


@pytest.mark.parametrize("flags", [["--cpu"], []], ids=["cpu", "no-gpus"])
def test_accelerate_launch_of_one_process_for_two_is_refused(flags, ws, tmp_path):
    """``accelerate launch [--cpu] --num_processes 2`` without GPUs starts one process: disel says so."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(ws, tmp_path / "runs", per_device=2)))
    cmd = [*_ACCELERATE, *flags, "--num_processes", "2", "-m", "disel.cli", "train", str(cfg)]
    proc = subprocess.run(cmd, env=_env(ws), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("disel train: error:")]
    assert len(errors) == 1 and "started this process alone" in errors[0], proc.stderr[-3000:]
    assert "--multi_gpu" in errors[0]
    assert not (tmp_path / "runs").exists()  # refused before anything was written
