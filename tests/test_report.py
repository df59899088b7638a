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
