"""Run integrity: one process per run dir, stale locks, unreadable checkpoints, temp files, the umask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from disel.cli import main
from disel.errors import UserError
from disel.rundir import RunBusy, checkpoint_problem, checkpoints, lock_owner, run_lock
from disel.training.config import config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def assets(run_assets):
    return run_assets(16)


def _cfg(assets: Path, out: Path, **training) -> dict:
    return {
        "model": {"name": str(assets / "llama")},
        "method": {"name": "lora", "rank": 2},
        "data": {"format": "instruction", "train": str(assets / "inst.jsonl"), "max_length": 256},
        "training": {
            "max_steps": 4,
            "per_device_batch_size": 4,
            "save_steps": 2,
            "logging_steps": 1,
            **training,
        },
        "output": {"dir": str(out)},
    }


def test_lock_excludes_a_second_process_and_a_dead_owner_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        assert lock_owner(run_dir) is not None and str(os.getpid()) in lock_owner(run_dir)
        # another process cannot take it while this one lives
        probe = (
            "import sys; from disel.rundir import run_lock, RunBusy\n"
            "try:\n    with run_lock(sys.argv[1]): print('got it')\nexcept RunBusy as e: print('busy', e.owner)\n"
        )
        out = subprocess.run([sys.executable, "-c", probe, str(run_dir)], capture_output=True, text=True)
        assert out.stdout.startswith("busy pid"), out.stderr
    assert lock_owner(run_dir) is None
    # a process killed while holding it: the kernel drops the flock, the file keeps its pid -> taken over
    script = "import os, sys, time; from disel.rundir import run_lock\nwith run_lock(sys.argv[1]):\n    os._exit(9)\n"
    subprocess.run([sys.executable, "-c", script, str(run_dir)], check=False)
    messages: list[str] = []
    with run_lock(run_dir, log=messages.append):
        pass
    assert len(messages) == 1 and "taking over the lock" in messages[0] and "no longer running" in messages[0]
    with run_lock(run_dir), pytest.raises(RunBusy), run_lock(run_dir):
        pass


def test_disel_train_refuses_a_run_dir_in_use(tmp_path, assets, capsys):
    cfg = config_from_dict(_cfg(assets, tmp_path / "runs"))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_cfg(assets, tmp_path / "runs")))
    with run_lock(cfg.run_dir):
        assert main(["train", str(p), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is in use by pid" in err and "wait for it to finish" in err and len(err.strip().splitlines()) == 1


def test_two_sweeps_at_once_train_each_run_once(tmp_path, assets):
    cfg = {**_cfg(assets, tmp_path / "runs"), "grid": {"method": ["lora", "disel"], "seed": [0, 1]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "disel.cli", "sweep", str(path), "--no-progress"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in "ab"
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    finished = [
        line for _, err in outs for line in err.splitlines() if "finished:" in line and "[disel] run" in line
    ]
    assert len(finished) == 4, finished  # 4 runs, each trained by exactly one of the two sweeps
    from disel.results import ResultsStore

    recs = ResultsStore(tmp_path / "runs").records(kind="run")
    assert sorted(r["run_id"] for r in recs) == ["disel-r2-s0", "disel-r2-s1", "lora-r2-s0", "lora-r2-s1"]


def test_unreadable_checkpoint_is_skipped_for_the_previous_one(tmp_path, assets, capsys):
    from disel.training.runner import train

    cfg = config_from_dict(_cfg(assets, tmp_path / "runs"))
    res = train(cfg, progress=False)
    assert res.global_step == 4
    run_dir = res.run_dir
    info = json.loads((run_dir / "run.json").read_text())
    # a truncated trainer_state.json (the Trainer writes it without fsync) and a run that did not finish
    state = run_dir / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    (run_dir / "run.json").write_text(json.dumps({**info, "status": "running"}))
    stray = run_dir / ".run.json.abc123.tmp"
    stray.write_text("half")
    assert checkpoint_problem(run_dir / "checkpoint-4") == "a state file is unreadable (JSONDecodeError)"
    assert [s for s, _ in checkpoints(run_dir)] == [2]
    again = train(cfg, progress=False)
    err = capsys.readouterr().err
    assert (
        "skipping checkpoint-4: a state file is unreadable" in err
        and "resuming run lora-r2-s0 from checkpoint-2" in err
    )
    assert "removed .run.json.abc123.tmp, left by a killed write" in err and not stray.exists()
    again_info = json.loads((run_dir / "run.json").read_text())
    assert again.global_step == 4 and again_info["trainable_sha256"] == info["trainable_sha256"]
    assert again_info["train_loss"] == pytest.approx(info["train_loss"], rel=1e-9)


def test_kill_after_the_last_checkpoint_never_trains_past_max_steps(tmp_path, assets):
    from disel.training.runner import train

    cfg = config_from_dict(_cfg(assets, tmp_path / "runs"))
    res = train(cfg, progress=False)
    info = json.loads((res.run_dir / "run.json").read_text())
    # as if killed during the final save: checkpoint-4 complete, final/ gone, run.json still "running"
    import shutil

    shutil.rmtree(res.run_dir / "final")
    (res.run_dir / "run.json").write_text(json.dumps({**info, "status": "running"}))
    again = train(cfg, progress=False)
    again_info = json.loads((res.run_dir / "run.json").read_text())
    assert again.global_step == 4 and sorted(p.name for p in res.run_dir.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert again_info["trainable_sha256"] == info["trainable_sha256"]
    assert again_info["train_loss"] == pytest.approx(info["train_loss"], rel=1e-9)


def test_files_follow_the_umask(tmp_path):
    from disel.utils.io import atomic_dir, atomic_write_text

    old = os.umask(0o027)
    try:
        f = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize("steps", [0, -2])
def test_max_steps_zero_or_below_minus_one_is_refused(steps, tmp_path):
    with pytest.raises(UserError, match=rf"training.max_steps={steps} is invalid.*-1"):
        config_from_dict(_cfg(tmp_path, tmp_path, max_steps=steps))
