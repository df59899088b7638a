"""`disel report`: trade-off points are per method x rank means over seeds at the best checkpoint."""

from __future__ import annotations

import pytest

from disel.cli import main
from disel.report import best_evals, make_report, summarize
from disel.results import ResultsStore


def _fill(store: ResultsStore) -> None:
    store.add("base_eval", "base:tiny", {"target_score": 0.1, "retention_score": 0.60, "retention": {}})
    for method, rank, seed, scores in [
        ("lora", 8, 0, [(10, 0.40, 0.50), (20, 0.50, 0.45)]),
        ("lora", 8, 1, [(10, 0.45, 0.52), (20, 0.40, 0.50)]),
        ("disel", 8, 0, [(10, 0.48, 0.60), (20, 0.52, 0.59)]),
    ]:
        rid = f"{method}-r{rank}-s{seed}"
        store.put("run", rid, {"method": method, "rank": rank, "seed": seed, "status": "finished"})
        for step, target, ret in scores:
            store.add(
                "eval",
                rid,
                {
                    "method": method,
                    "rank": rank,
                    "checkpoint": f"checkpoint-{step}",
                    "target_score": target,
                    "retention_score": ret,
                    "retention_delta": ret - 0.60,
                },
                step=step,
            )


def test_summary_uses_best_checkpoint_and_seed_statistics(tmp_path):
    store = ResultsStore(tmp_path)
    _fill(store)
    best = {r["run_id"]: r["step"] for r in best_evals(store)}
    assert best == {"lora-r8-s0": 20, "lora-r8-s1": 10, "disel-r8-s0": 20}
    rows = {r.method: r for r in summarize(store)}
    assert rows["lora"].n == 2
    assert rows["lora"].target_mean == pytest.approx(0.475)
    assert rows["lora"].target_std == pytest.approx(0.03535534, rel=1e-5)  # sample std over the seeds
    assert rows["lora"].retention_mean == pytest.approx(0.485)
    assert rows["disel"].retention_delta_mean == pytest.approx(-0.01)


def test_report_writes_pngs_and_table(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    _fill(store)
    files = make_report(tmp_path, tmp_path / "out")
    for key in ("tradeoff", "retention_over_steps"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = files["table"].read_text()
    assert "| lora | 8 | 2 | 0.4750 ± 0.0354 | 0.4850 ± 0.0495 | -0.1150 |" in table
    assert "| base (tiny) |" in table
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes leave no temp files
    assert main(["report", str(tmp_path / "out" / "missing.sqlite")]) == 2
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "summary.md").is_file()


def test_records_without_a_target_show_retention_only(tmp_path, capsys):
    """The base and the runs evaluated without a target: no crash, retention shown, the target named missing."""
    store = ResultsStore(tmp_path / "results.sqlite")
    store.put("base_eval", "base:tiny", {"target_score": None, "retention_score": 0.60, "retention": {}})
    for rid, method, ret in [("lora-r8-s0#aa", "lora", 0.55), ("disel-r8-s0#bb", "disel", 0.59)]:
        for step, r in [(10, ret - 0.05), (None, ret)]:
            payload = {"method": method, "rank": 8, "target_score": None, "target": {}, "retention_score": r}
            store.put(
                "eval", rid, {**payload, "run_id": rid.split("#")[0], "retention_delta": r - 0.6}, step=step
            )
    files = make_report(tmp_path, tmp_path / "out")
    table = files["table"].read_text()
    assert "| base (tiny) | – | – | – | 0.6000 | 0 | – |" in table
    assert (
        "| disel | 8 | 1 | – (no target) | 0.5900 ± 0.0000 | -0.0100 | – |" in table
    )  # the final checkpoint
    assert "| lora | 8 | 1 | – (no target) | 0.5500 ± 0.0000 | -0.0500 | – |" in table
    assert "- lora r8: target missing for lora-r8-s0#aa (evaluated without a target)" in table
    assert files["tradeoff"].read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().err.count("note: ") == 2


def test_an_incomplete_evaluation_is_named_not_silently_used(tmp_path):
    """A run whose eval_plan lists checkpoints/metrics without records is counted and named in a note."""
    store = ResultsStore(tmp_path / "results.sqlite")
    key = "disel-r8-s0#cc"
    units = {"retention:stdlib-ppl": "u1", "target": "u2"}
    plan = {"run_id": "disel-r8-s0", "run_dir": "/runs/disel-r8-s0", "units_key": "K", "unit_keys": units}
    plan["checkpoints"] = [{"step": 10}, {"step": 20}, {"step": None}]
    store.put("eval_plan", key, plan)
    for step, unit in [(10, "retention:stdlib-ppl"), (10, "target"), (20, "retention:stdlib-ppl")]:
        store.add("eval_unit", key, {"unit": unit, "unit_key": units[unit]}, step=step)
    payload = {"method": "disel", "rank": 8, "target_score": 0.5, "retention_score": 0.6, "units_key": "K"}
    store.put("eval", key, payload, step=10)
    store.put("eval", key, {**payload, "target_score": 0.9, "units_key": "OLD"}, step=20)  # an earlier spec's
    notes: list[str] = []
    files = make_report(tmp_path, tmp_path / "out", log=notes.append)
    assert notes == [
        f"run {key}: evaluation incomplete, missing checkpoint-20 (target); final (all metrics); its numbers use "
        "only the finished checkpoints (rerun `disel eval /runs/disel-r8-s0` to finish it)."
    ]
    row = summarize(store)[0]
    assert (row.n, row.incomplete, row.target_mean) == (1, 1, 0.5)  # the stale step-20 record is not used
    assert "| disel | 8 | 1 | 0.5000 ± 0.0000 | 0.6000 ± 0.0000 | – | 1 |" in files["table"].read_text()
