"""Kill -9 at seeded random moments of a tiny sweep (training, checkpoint writes, evaluation), rerun after
each kill, and end with exactly what an uninterrupted sweep gives: the same records in the results store and
the same final adapters, byte for byte (CPU, one thread)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from disel.results import ResultsStore

pytestmark = pytest.mark.slow

# payload fields that name where or when, not what was computed
VOLATILE = {
    "id",
    "created",
    "run_key",
    "run_dir",
    "sweep",
    "wall_seconds",
    "resumed_from",
    "started",
    "checkpoint",
}


@pytest.fixture(scope="module")
def sweep_config(tmp_path_factory, run_assets) -> dict:
    assets = run_assets(32)
    root = tmp_path_factory.mktemp("kill-assets")
    with open(root / "test.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"Add {i} and 1.", "answer": str(i + 1)}) + "\n")
    return {
        "model": {"name": str(assets / "llama")},
        "method": {"name": "lora", "rank": 2},
        "data": {"format": "instruction", "train": str(assets / "inst.jsonl"), "max_length": 256},
        "training": {
            "max_steps": 8,
            "per_device_batch_size": 4,
            "save_steps": 2,
            "logging_steps": 1,
            "lr": 1e-3,
        },
        "eval": {
            "retention": ["stdlib-ppl"],
            "target": {"type": "exact_match", "path": str(root / "test.jsonl"), "max_new_tokens": 4},
            "limit": 4,
            "n_docs": 8,
            "max_length": 64,
            "batch_size": 4,
        },
        "grid": {"method": ["lora", "disel"]},
    }


def _write(cfg: dict, out: Path) -> Path:
    cfg = {**cfg, "output": {"dir": str(out)}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(
        [sys.executable, "-m", "disel.cli", "sweep", str(config), "--no-progress"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes every child with it
    )


def _state(out: Path) -> tuple[list[tuple], dict[str, str]]:
    """(the store's records without volatile fields, sha256 of every final adapter file by run)."""
    recs = []
    for r in ResultsStore(out).records():
        payload = {k: v for k, v in r.items() if k not in VOLATILE}
        if isinstance(payload.get("config"), dict):
            payload["config"] = {**payload["config"], "output": None}
        recs.append(
            (
                r["kind"],
                r["run_id"],
                -1 if r["step"] is None else r["step"],
                json.dumps(payload, sort_keys=True, default=str).replace(str(out), "<OUT>"),
            )
        )
    finals = {}
    for f in sorted(out.glob("*/final/*.safetensors")):
        finals[f"{f.parent.parent.name}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    return sorted(recs), finals


def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_result(tmp_path, sweep_config):
    ref_out = tmp_path / "reference"
    ref_log = tmp_path / "reference.log"
    ref = _start(_write(sweep_config, ref_out), ref_log)
    assert ref.wait(timeout=600) == 0, ref_log.read_text()[-3000:]
    ref_records, ref_finals = _state(ref_out)
    assert len(ref_finals) == 2 and any(r[0] == "eval" for r in ref_records)

    out = tmp_path / "killed"
    config = _write(sweep_config, out)
    log = tmp_path / "killed.log"
    rng = random.Random(1234)
    kills, attempts = [], []
    # Each attempt is killed a seeded random moment after it enters a phase (a training step's log line:
    # the kill lands in a step or in the checkpoint write that follows every second step; or an evaluation
    # line); attempts resume where the previous one was killed, so the kills walk through the whole sweep.
    phases = {"train": ("'loss'",), "eval": ("eval units", "loglikelihood")}
    for phase in ("train", "eval", "train", "eval", "train", "eval"):
        proc = _start(config, log)
        seen = len(log.read_text(errors="replace"))
        fire = None
        while proc.poll() is None:
            fresh = log.read_text(errors="replace")[seen:]
            if fire is None and any(m in fresh for m in phases[phase]):
                fire = time.time() + rng.uniform(0.0, 0.4)
            if fire is not None and time.time() >= fire:
                os.killpg(proc.pid, signal.SIGKILL)
                lines = [ln for ln in fresh.splitlines() if ln.strip() and "fatal:" not in ln]
                kills.append((phase, lines[-1][:100] if lines else ""))  # what it was doing
                break
            time.sleep(0.02)
        if proc.wait(timeout=60) == 0:
            attempts.append(f"{phase}: finished before its kill")
        else:
            attempts.append(f"{phase}: killed")
    final = _start(config, log)
    assert final.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert {p for p, _ in kills} == {"train", "eval"}, (
        f"the kills did not cover training and evaluation: {kills}"
    )
    records, finals = _state(out)
    assert finals == ref_finals, f"kills at {kills} s changed the final adapters"
    assert records == ref_records, f"kills at {kills} s changed the store's records"
    print("kill points (phase, last log line):", *kills, *attempts, sep="\n  ")
    # no temp file or lock owner is left behind
    assert not list(out.glob("**/.*.tmp")) and not list(out.glob("**/.final.tmp"))
