"""Smoke test of the reproduction runner, and unit tests of its statistics."""

import importlib.util
import json
import math
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "reproduce_paper.py")
spec = importlib.util.spec_from_file_location("reproduce_paper", SCRIPT)
reproduce_paper = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce_paper)


def test_spearman_hand_values():
    assert reproduce_paper.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert reproduce_paper.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ranks (1, 2, 3, 4) against (2, 1, 4, 3): 1 - 6 * 4 / (4 * 15) = 0.6.
    assert reproduce_paper.spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)


def test_spearman_ties_and_missing_values():
    # Average ranks for ties: (1.5, 1.5, 3) against (1, 2, 3) has Pearson correlation sqrt(3)/2.
    assert reproduce_paper.spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert reproduce_paper.spearman([1, None, 2, float("nan"), 3], [1, 5, 2, 6, 3]) == pytest.approx(1.0)
    assert math.isnan(reproduce_paper.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(reproduce_paper.spearman([1, 2], [1, 2]))


def test_quarter_means():
    first, last = reproduce_paper.quarter_means([0.4, 0.2, 0.3, 0.1, 0.5, 0.6, 0.7, 0.0])
    assert first == pytest.approx(0.3)
    assert last == pytest.approx(0.35)


def test_prediction_table_signs():
    runs = [
        {"tasks": [{"accuracy": a, "rho": 1 - a, "sharpness": 5.0} for a in (0.5, 0.4, 0.3, 0.2)]},
        {"tasks": [{"accuracy": a, "rho": 1 - a, "sharpness": 5.0} for a in (0.6, 0.1, 0.2, 0.3)]},
    ]
    rows = {row["signal"]: row for row in reproduce_paper.prediction_table(runs)}
    assert rows["rho"]["accuracy_pooled"] == pytest.approx(-1.0)
    assert rows["rho"]["accuracy_within"] == pytest.approx(-1.0)
    assert rows["rho"]["pairs"] == 8
    assert math.isnan(rows["sharpness"]["accuracy_pooled"])
    assert rows["gram_rank"]["pairs"] == 0


@pytest.mark.slow
def test_smoke_grid_writes_report(tmp_path, single_thread):
    report = tmp_path / "report.md"
    code = reproduce_paper.main(
        [
            "--smoke",
            "--arms", "vanilla", "reset", "global",
            "--methods", "crelu", "wasserstein",
            "--results-dir", str(tmp_path / "runs"),
            "--report", str(report),
            "epochs=1",
        ]
    )
    assert code == 0
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert len(runs) == 6
    with open(tmp_path / "runs" / "wasserstein_global_seed0.json") as handle:
        run = json.load(handle)
    assert run["lot_config"]["granularity"] == "global"
    assert len(run["tasks"]) == 2
    for task in run["tasks"]:
        assert 0.0 <= task["accuracy"] <= 1.0
        assert task["measurements"] >= 1
        assert 0.0 <= task["rho"] <= 1.0
        assert math.isfinite(task["gram_rank"])
    text = report.read_text()
    assert "| crelu | reset every task | paper | 1 |" in text
    assert "| rho |" in text
    assert (tmp_path / "report_accuracy.png").stat().st_size > 0
    assert (tmp_path / "report_learning_rates.png").stat().st_size > 0

    # A second call finds every run saved and only rebuilds the report.
    os.remove(report)
    assert reproduce_paper.main(["--smoke", "--arms", "vanilla", "--methods", "crelu",
                                 "--results-dir", str(tmp_path / "runs"), "--report", str(report), "--report-only"]) == 0
    assert report.exists()
