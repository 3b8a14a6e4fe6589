"""Tests of the accuracy matrix, forgetting, atomic results file, plots and the local accuracy metric."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_lot import results as results_module
from hf_lot.results import (
    ACCURACY_METRIC_PATH,
    ContinualResults,
    LearningRateRecorder,
    average_accuracy,
    forgetting,
    format_summary_table,
    load_accuracy_metric,
    task_accuracy,
    to_json_safe,
    write_json_atomic,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Three tasks, all trained. Row i is after training task i.
FULL = [
    [0.9, None, None],
    [0.7, 0.8, None],
    [0.6, 0.75, 0.85],
]


def test_average_accuracy_full_matrix():
    averages = average_accuracy(FULL)
    assert averages[0] == pytest.approx(0.9)
    assert averages[1] == pytest.approx((0.7 + 0.8) / 2)
    assert averages[2] == pytest.approx((0.6 + 0.75 + 0.85) / 3)


def test_forgetting_full_matrix():
    # Task 0: best earlier 0.9, final 0.6. Task 1: best earlier 0.8, final 0.75. The last task has none.
    values = forgetting(FULL)
    assert values[0] == pytest.approx(0.3)
    assert values[1] == pytest.approx(0.05)
    assert values[2] is None


def test_forgetting_uses_best_earlier_accuracy():
    # Task 0 recovers after task 1, so its reference is the maximum 0.95, not the first value 0.5.
    matrix = [[0.5, None, None], [0.95, 0.6, None], [0.7, 0.4, 0.8]]
    values = forgetting(matrix)
    assert values[0] == pytest.approx(0.25)
    assert values[1] == pytest.approx(0.2)


def test_forgetting_can_be_negative():
    matrix = [[0.5, None], [0.7, 0.9]]
    assert forgetting(matrix)[0] == pytest.approx(-0.2)


def test_partial_matrix_uses_last_trained_task():
    matrix = [[0.9, None, None], [0.7, 0.8, None], [None, None, None]]
    assert average_accuracy(matrix) == [pytest.approx(0.9), pytest.approx(0.75), None]
    assert forgetting(matrix) == [pytest.approx(0.2), None, None]


def test_unseen_task_entries_do_not_change_averages():
    # Row 0 also contains the accuracy of tasks 1 and 2 before they were trained (evaluate_all_tasks).
    matrix = [[0.9, 0.3, 0.2], [0.7, 0.8, 0.25], [0.6, 0.75, 0.85]]
    assert average_accuracy(matrix) == pytest.approx(average_accuracy(FULL))
    assert forgetting(matrix)[:2] == pytest.approx(forgetting(FULL)[:2])


def test_task_accuracy_restricts_to_task_classes():
    metric = load_accuracy_metric()
    # Class 2 has the largest logit everywhere, but a 2-class task only compares classes 0 and 1.
    logits = np.array([[0.1, 0.0, 5.0], [0.0, 0.2, 5.0], [0.3, 0.1, 5.0], [0.0, 0.4, 5.0]])
    labels = np.array([0, 1, 1, 1])
    assert task_accuracy(metric, logits, labels, num_classes=2) == pytest.approx(0.75)
    assert task_accuracy(metric, logits, labels, num_classes=3) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="num_classes=4"):
        task_accuracy(metric, logits, labels, num_classes=4)


def test_metric_module_options():
    metric = load_accuracy_metric()
    assert metric.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 0]) == {"accuracy": 0.75}
    assert metric.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 0], normalize=False) == {"accuracy": 3.0}
    weighted = metric.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3.0, 1.0])
    assert weighted["accuracy"] == pytest.approx(0.75)


def test_metric_module_loads_offline(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    code = (
        "import evaluate, sys; "
        f"metric = evaluate.load({ACCURACY_METRIC_PATH!r}); "
        "print(metric.compute(predictions=[1, 0], references=[1, 1])['accuracy'])"
    )
    completed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "0.5"


def test_json_safe_converts_nan_and_numpy():
    converted = to_json_safe({"a": float("nan"), "b": np.float32(0.5), "c": [np.int64(3), math.inf], 4: None})
    assert converted == {"a": None, "b": 0.5, "c": [3, None], "4": None}


def test_write_json_atomic_replaces_file(tmp_path, monkeypatch):
    path = tmp_path / "out" / "results.json"
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(results_module.os, "replace", lambda src, dst: (replaced.append((src, dst)), real_replace(src, dst)))
    write_json_atomic(path, {"x": float("nan"), "y": [1, 2]})
    assert json.loads(path.read_text()) == {"x": None, "y": [1, 2]}
    assert len(replaced) == 1
    assert os.path.dirname(replaced[0][0]) == str(path.parent)
    assert os.listdir(path.parent) == ["results.json"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"version": 1})

    def broken_dump(data, handle, **kwargs):
        handle.write('{"version": ')
        raise RuntimeError("disk full")

    monkeypatch.setattr(results_module.json, "dump", broken_dump)
    with pytest.raises(RuntimeError, match="disk full"):
        write_json_atomic(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def make_results(threshold=True):
    tasks = [
        {"name": "first", "num_classes": 2, "chance_accuracy": 0.5},
        {"name": "second", "num_classes": 3, "chance_accuracy": 1 / 3},
        {"name": "third", "num_classes": 4, "chance_accuracy": 0.25},
    ]
    results = ContinualResults({"run": {"seed": 0}}, tasks, ["embeddings", "block.0", "head"], threshold, 4)
    step = 0
    for task_index in range(3):
        for _ in range(5):
            step += 1
            results.record_learning_rates(step, task_index, {"embeddings": 1e-4, "block.0": 1e-4 * 0.99**step, "head": 2e-4})
        results.record_training(task_index, {"steps": 5, "train_loss": 1.0 - 0.1 * task_index, "rho": 0.5})
        for seen in range(task_index + 1):
            results.record_accuracy(task_index, seen, FULL[task_index][seen])
    return results


def test_results_dict_schema():
    data = make_results().to_dict()
    assert data["schema_version"] == 1
    assert data["tasks_completed"] == 3
    assert data["task_boundaries"] == [5, 10, 15]
    assert data["accuracy"] == FULL
    assert data["final_average_accuracy"] == pytest.approx(0.7333333)
    assert data["average_forgetting"] == pytest.approx(0.175)
    assert data["learning_rates"]["step"] == list(range(1, 16))
    assert data["learning_rates"]["task"] == [0] * 5 + [1] * 5 + [2] * 5
    assert set(data["learning_rates"]["layers"]) == {"embeddings", "block.0", "head"}
    assert data["threshold"] is True


def test_save_writes_json_and_plots(tmp_path):
    results = make_results(threshold=False)
    paths = results.save(tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["plots"] == {"accuracy": "accuracy.png", "learning_rates": "learning_rates.png"}
    for name in ("accuracy.png", "learning_rates.png"):
        content = (tmp_path / name).read_bytes()
        assert content.startswith(PNG_SIGNATURE)
        assert len(content) > 5000
    assert paths["results"] == str(tmp_path / "results.json")
    assert sorted(os.listdir(tmp_path)) == ["accuracy.png", "learning_rates.png", "results.json"]


def test_save_before_any_task(tmp_path):
    results = ContinualResults({}, [{"name": "only", "num_classes": 2}], ["head"], True, 2)
    results.save(tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "running"
    assert data["accuracy"] == [[None]]
    assert data["final_average_accuracy"] is None
    assert (tmp_path / "learning_rates.png").exists()


def test_learning_rate_recorder_reads_param_groups():
    first, second = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [first], "lr": 0.1}, {"params": [second], "lr": 0.2}])
    layers = [SimpleNamespace(name="a", parameters=[first]), SimpleNamespace(name="b", parameters=[second])]
    results = ContinualResults({}, [{"name": "t0", "num_classes": 2}, {"name": "t1", "num_classes": 2}], ["a", "b"], True, 2)
    recorder = LearningRateRecorder(results, layers, task_index=1, step_offset=10)
    recorder.on_step_end(None, SimpleNamespace(global_step=3), None, optimizer=optimizer)
    assert results.lr_steps == [13]
    assert results.lr_tasks == [1]
    assert results.lr_values == {"a": [0.1], "b": [0.2]}


def test_summary_table_lists_tasks_and_values():
    table = format_summary_table(make_results().to_dict())
    assert "threshold on" in table
    for name in ("first", "second", "third"):
        assert name in table
    assert "0.850" in table
    assert "average forgetting 0.175" in table
