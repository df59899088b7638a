"""Benchmark statistics and the ``disel bench`` / ``gpu_check`` plumbing (no wall-clock assertions)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from disel.cli import main as cli_main
from disel.commands.bench import (
    INTERVAL_KEYS,
    MODEL_INFER_VARIANTS,
    MODEL_TRAIN_VARIANTS,
    AllocationPeak,
    benchmark_model,
)
from disel.utils.timing import interleaved, median_ci, quantile, ratio_interval, round_orders, summarize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads():
    """``disel bench --threads`` sets torch's thread count for the process: put it back for other tests."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _paired(ratio: float, noise: float, n: int, seed: int) -> tuple[list[float], list[float]]:
    """Baseline times under a drifting load, and contender times = ratio x baseline x multiplicative noise."""
    rng = random.Random(seed)
    b, a = [], []
    for i in range(n):
        load = 1.0 + 0.5 * (i / n) + rng.random()  # the machine's state in round i, shared by both
        b.append(0.1 * load * (1 + noise * rng.uniform(-1, 1)))
        a.append(0.1 * ratio * load * (1 + noise * rng.uniform(-1, 1)))
    return a, b


def test_ratio_interval_recovers_a_known_ratio():
    a, b = _paired(1.25, noise=0.02, n=25, seed=0)
    iv = ratio_interval(a, b)
    assert set(iv) == set(INTERVAL_KEYS) and iv["n"] == 25
    assert iv["ci_low"] <= 1.25 <= iv["ci_high"]
    assert iv["q25"] <= iv["median"] <= iv["q75"]
    assert iv["ci_low"] <= iv["median"] <= iv["ci_high"]
    assert abs(iv["median"] - 1.25) < 0.02
    assert iv["ci_level"] >= 0.95
    # the unpaired view is fooled by the drift: the times themselves spread far more than the ratios
    assert max(b) / min(b) > 1.5 and iv["ci_high"] / iv["ci_low"] < 1.05


def test_noisier_rounds_widen_the_interval():
    quiet = ratio_interval(*_paired(1.1, noise=0.01, n=21, seed=1))
    noisy = ratio_interval(*_paired(1.1, noise=0.3, n=21, seed=1))
    assert noisy["ci_high"] - noisy["ci_low"] > 3 * (quiet["ci_high"] - quiet["ci_low"])
    assert noisy["q75"] - noisy["q25"] > 3 * (quiet["q75"] - quiet["q25"])
    assert noisy["ci_low"] <= 1.1 <= noisy["ci_high"]


def test_median_ci_coverage_levels():
    # [x_(k), x_(n+1-k)] covers the median with 1 - 2 P(Bin(n, 1/2) < k)
    assert median_ci([1, 2, 3, 4, 5]) == (1, 5, 1 - 2 / 32)  # n = 5: no 95% interval, [min, max] at 93.75%
    lo, hi, cov = median_ci(list(range(1, 10)))
    assert (lo, hi) == (2, 8) and cov == pytest.approx(1 - 2 * 10 / 512)
    assert median_ci([3.0]) == (3.0, 3.0, 0.0)
    # empirical coverage on a skewed distribution
    rng = random.Random(0)
    hits = 0
    for _ in range(400):
        xs = [rng.expovariate(1.0) for _ in range(11)]
        lo, hi, _ = median_ci(xs)
        hits += lo <= 0.6931 <= hi  # the median of Exp(1) is ln 2
    assert hits / 400 > 0.93


def test_quantile_and_summarize():
    assert quantile([4, 1, 3, 2], 0.5) == 2.5 and quantile([1, 2, 3], 0.25) == 1.5
    s = summarize({"base": [1.0, 2.0, 4.0], "x": [2.0, 4.0, 8.0]}, "base")
    assert s["base"]["ratio"]["median"] == 1.0 and s["x"]["ratio"]["median"] == 2.0
    assert s["x"]["ratio"]["ci_low"] == s["x"]["ratio"]["ci_high"] == 2.0
    assert s["x"]["median_s"] == 4.0 and s["x"]["min_s"] == 2.0
    with pytest.raises(ValueError):
        ratio_interval([1.0], [1.0, 2.0])


def test_interleaved_runs_every_contender_each_round_in_varying_order():
    clock = [0.0]
    calls: list[str] = []
    load = {"v": 1.0}

    def make(name: str, cost: float):
        def fn() -> None:
            calls.append(name)
            load["v"] *= 1.05  # the machine gets slower every call: pairing must cancel it
            clock[0] += cost * load["v"]

        return fn

    fns = {"a": make("a", 1.0), "b": make("b", 2.0), "c": make("c", 3.0)}
    times = interleaved(fns, repeats=12, warmup=2, timer=lambda: clock[0])
    assert calls[:6] == ["a", "b", "c", "a", "b", "c"]  # warm-up, not timed
    assert all(len(t) == 12 for t in times.values())
    rounds = [calls[6 + 3 * i : 9 + 3 * i] for i in range(12)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # a fresh random order per round
    iv = ratio_interval(times["b"], times["a"])
    assert iv["ci_low"] <= 2.0 * 1.05 and iv["ci_high"] >= 2.0 / 1.05**2  # within the in-round drift
    with pytest.raises(ValueError):
        interleaved(fns, repeats=0)


def test_interleaved_setup_runs_outside_the_clock():
    clock = [0.0]
    state = {"active": None}
    seen = []

    def activate(name: str):
        def go() -> None:
            clock[0] += 100.0  # an expensive switch (e.g. set_adapter) must not be timed
            state["active"] = name

        return go

    def run(name: str):
        def fn() -> None:
            seen.append((name, state["active"]))
            clock[0] += 1.0

        return fn

    names = ("x", "y")
    times = interleaved(
        {n: run(n) for n in names},
        repeats=4,
        warmup=1,
        timer=lambda: clock[0],
        setup={n: activate(n) for n in names},
    )
    assert all(t == 1.0 for ts in times.values() for t in ts)
    assert all(name == active for name, active in seen) and len(seen) == 10
    with pytest.raises(ValueError):
        interleaved({"x": run("x")}, repeats=1, setup={"z": activate("z")})


def test_round_orders():
    assert round_orders(["a", "b"], 4, "rotate") == [["a", "b"], ["b", "a"], ["b", "a"], ["a", "b"]]
    rot = round_orders(["a", "b", "c"], 6, "rotate")
    assert rot[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for pos in range(3):  # over 2k rounds every contender runs twice in every position
        assert sorted(r[pos] for r in rot) == ["a", "a", "b", "b", "c", "c"]
    assert round_orders(["a", "b", "c"], 5, seed=3) == round_orders(["a", "b", "c"], 5, seed=3)
    with pytest.raises(ValueError):
        round_orders(["a"], 1, "sorted")


def test_allocation_peak_counts_new_storages_until_freed():
    w = torch.randn(64, 64)
    with AllocationPeak() as mem:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # another 4000
        view = b[:10]  # a view: no new storage
        del a
        c = w.t()  # a view of a pre-existing tensor: not counted
    assert mem.peak == 8000
    assert mem.live == 4000  # b is still alive
    del b, view, c
    assert mem.live == 0


def _cli_json(argv: list[str]) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(argv) == 0
    return json.loads(buf.getvalue())


def _check_interval(iv: dict) -> None:
    assert set(iv) == set(INTERVAL_KEYS)
    assert iv["ci_low"] <= iv["median"] <= iv["ci_high"]
    assert iv["q25"] <= iv["median"] <= iv["q75"]
    assert iv["n"] >= 1 and 0 <= iv["ci_level"] < 1


def test_bench_smoke_json_has_intervals():
    res = _cli_json(["bench", "--smoke", "--json", "--threads", "1"])
    for key in ("train", "infer", "naive_train", "naive_infer"):
        assert res[f"{key}_ratio_vs_lora"] == res[f"{key}_ratio_vs_lora_interval"]["median"]
        _check_interval(res[f"{key}_ratio_vs_lora_interval"])
    _check_interval(res["merged_lora_infer_ratio_vs_lora_interval"])
    assert res["threads"] == 1 and res["repeats"] == 3
    assert res["shape"]["d_in"] == 64 and res["memory_ratio_vs_lora"] > 1.0
    assert "load_avg" in res["machine"]


def test_bench_table_states_threads_and_intervals():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(["bench", "--smoke", "--threads", "1", "--repeats", "6"]) == 0
    out = buf.getvalue()
    assert "1 torch thread(s)" in out and "6 interleaved rounds" in out and "97% CI" in out


def test_whole_model_bench_reports_every_variant(tmp_path):
    res = _cli_json(
        [
            "bench",
            "--smoke",
            "--model",
            "tiny-llama",
            "--json",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "m.json"),
        ]
    )
    assert res["model"]["name"] == "micro-llama" and res["settings"]["threads"] == 1
    assert set(res["train"]) == set(MODEL_TRAIN_VARIANTS)
    assert set(res["forward"]) == set(res["generate"]) == set(MODEL_INFER_VARIANTS)
    for mode in ("train", "forward", "generate"):
        for v in res[mode].values():
            _check_interval(v["ratio_vs_lora"])
            assert v["median_s"] > 0
    assert all(v["tokens_per_s"] > 0 for v in res["generate"].values())
    mem = res["memory"]
    assert set(mem) == set(MODEL_TRAIN_VARIANTS)
    assert all(v["step_peak"] > 0 for v in mem.values())
    assert (
        mem["disel"]["trainable_params"]
        > mem["lora"]["trainable_params"]
        > 0
        == mem["base"]["trainable_params"]
    )
    c = res["compaction"]
    assert c["dropped"] > 0 and c["folded"] > 0 and c["gated"] > 0
    fid = res["fidelity_max_abs_logit_diff"]
    assert fid["disel_compact_vs_disel"] < 1e-3 and fid["disel_merged_vs_disel_compact"] < 1e-3
    full = json.loads((tmp_path / "m.json").read_text())
    assert full["train"]["disel"]["interval"] == res["train"]["disel"]["ratio_vs_lora"]


def test_whole_model_bench_from_a_local_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    res = benchmark_model(str(tmp_path / "m"), r=2, tokens=64, prompt_tokens=4, new_tokens=2, repeats=1)
    assert res["settings"]["tokens"] == 32  # clamped to max_position_embeddings
    assert res["model"]["vocab"] == 64 and set(res["generate"]) == set(MODEL_INFER_VARIANTS)
    assert cli_main(["bench", "--model", str(tmp_path / "missing")]) == 2


def _load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_detects_a_wrong_kernel(monkeypatch):
    from disel.methods.gated_lora import kernels

    gpu_check = _load_benchmark("gpu_check")
    real = kernels.fused_gated_update

    def wrong(x, result, down_w, gate_w, gate_b, up_w, scaling, *a, **k):
        return real(x, result, down_w, gate_w, gate_b, up_w, scaling * 1.1, *a, **k)

    monkeypatch.setattr(kernels, "fused_gated_update", wrong)
    ok, rows = gpu_check.check_kernel("cpu", d=16, r=4, tokens=8)
    assert not ok and any(not r["ok"] for r in rows)
    monkeypatch.setattr(kernels, "fused_gated_update", real)
    ok, rows = gpu_check.check_kernel("cpu", d=16, r=4, tokens=8)
    assert ok, [r for r in rows if not r["ok"]]
    assert {r["dtype"] for r in rows} == {"bf16", "fp16"}
    assert {r["case"] for r in rows} == {"plain", "logit_scale", "static", "autocast"}


@pytest.mark.slow
def test_gpu_check_script_cpu_dry_run(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_NO_INSTALL": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        ["bash", str(script), "--cpu-dry-run", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernel check: PASS" in proc.stdout
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["kernel_check"]["ok"]
    assert len(report["layer"]) == 2 and set(report["model"]["generate"]) == set(MODEL_INFER_VARIANTS)


def test_bench_compact_script_reuses_the_model_variants(tmp_path, capsys, monkeypatch):
    """benchmarks/bench_compact.py builds its contenders with disel bench's build_model_variants."""
    from disel.commands import bench

    spec = importlib.util.spec_from_file_location("bench_compact", ROOT / "benchmarks" / "bench_compact.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []
    real = bench.build_model_variants

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "build_model_variants", spy)
    out = tmp_path / "compact.json"
    args = ["--hidden", "64", "--layers", "1", "--vocab", "64", "--r", "4", "--tokens", "8", "--repeats", "2"]
    assert mod.main([*args, "--threads", "1", "--out", str(out)]) == 0
    assert calls == [1]
    res = json.loads(out.read_text())
    assert set(res["vs_disel"]) == {
        "disel",
        "compact",
        "compact_module_path",
        "compact_merged",
        "lora",
        "base",
    }
    assert res["fidelity"]["compact_vs_disel_max_abs_logit_diff"] < 1e-4
    assert "| compact |" in capsys.readouterr().out


def test_ab_kernel_compares_two_kernel_files(tmp_path):
    """The same kernel file as baseline gives identical gradients; a wrong one shows; bad paths are refused."""
    from disel.methods.gated_lora import kernels, layer

    ab = _load_benchmark("ab_kernel")
    src = Path(kernels.__file__).read_text()
    same, wrong = tmp_path / "same.py", tmp_path / "wrong.py"
    same.write_text(src)
    # a baseline that computes another function: the update scaled by 1.1
    wrong.write_text(
        "from disel.methods.gated_lora import kernels as _k\n"
        "globals().update({k: v for k, v in vars(_k).items() if not k.startswith('__')})\n"
        "def fused_gated_update(x, result, down_w, gate_w, gate_b, up_w, scaling, *args, **kwargs):\n"
        "    return _k.fused_gated_update(x, result, down_w, gate_w, gate_b, up_w, scaling * 1.1, *args, **kwargs)\n"
    )
    tiny = ["--hidden", "64", "--layers", "1", "--vocab", "128", "--tokens", "16", "--repeats", "2"]
    results = {}
    for name, path in (("same", same), ("wrong", wrong)):
        out = tmp_path / f"{name}.json"
        assert ab.main(["--baseline", str(path), *tiny, "--memory-tokens", "16", "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
        assert layer.kernels is kernels  # the library's module is put back
    assert results["same"]["max_grad_diff"] == 0.0
    assert results["wrong"]["max_grad_diff"] > 1e-3 * results["wrong"]["max_grad"]
    res = results["same"]
    assert set(res["ratios"]) == {"current_vs_baseline", "current_vs_lora", "baseline_vs_lora"}
    assert all(
        iv["n"] == 2 and iv["ci_low"] <= iv["median"] <= iv["ci_high"] for iv in res["ratios"].values()
    )
    peak = res["peak_mb"]["16"]
    assert peak["baseline"] == peak["current"] > 0 and peak["lora"] > 0
    out = tmp_path / "layer.json"
    layer_args = ["--layer", "32", "--r", "4", "--tokens", "8", "--repeats", "2", "--out", str(out)]
    assert ab.main(["--baseline", str(wrong), *layer_args]) == 0
    res = json.loads(out.read_text())
    assert res["max_grad_diff"] > 1e-3 * res["max_grad"] and res["peak_mb"] == {}
    # a baseline from before ``base_input`` (dropout on the whole-layer path) runs without dropout only
    old = tmp_path / "old.py"
    old.write_text(
        "from disel.methods.gated_lora import kernels as _k\n"
        "globals().update({k: v for k, v in vars(_k).items() if not k.startswith('__')})\n"
        "def fused_gated_update(x, result, down_w, gate_w, gate_b, up_w, scaling, logit_scale=1.0,\n"
        "                       num_static=0, *, base_weight=None, base_bias=None, cache=None):\n"
        "    return _k.fused_gated_update(x, result, down_w, gate_w, gate_b, up_w, scaling, logit_scale,\n"
        "                                 num_static, base_weight=base_weight, base_bias=base_bias, cache=cache)\n"
    )
    assert ab.main(["--baseline", str(old), *tiny, "--memory-tokens", ""]) == 0
    with pytest.raises(SystemExit, match="dropout"):
        ab.main(["--baseline", str(old), *tiny, "--dropout", "0.1"])
    assert layer.kernels is kernels  # put back even when a step raised
    for bad in (tmp_path / "missing.py", ROOT / "README.md"):
        with pytest.raises(SystemExit, match="baseline"):
            ab.main(["--baseline", str(bad), *tiny])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            ab.main(["--baseline", str(same), *tiny, "--device", "cuda"])
