"""Tests of the built-in MNIST tasks and the builtin:mlp model of scripts/continual_finetune.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from hf_lot.tasks import ConfigError, TaskSpec, load_task_data, prepare_tasks, validate_experiment_config
from hf_lot.vision_tasks import load_images

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "continual_finetune.py")
NUM_IMAGES = 60


def image_spec(builtin, name="task", **fields):
    return TaskSpec.from_dict({"name": name, "source": {"builtin": builtin, "num_images": NUM_IMAGES}, **fields})


def image_config(**model):
    return {
        "model": {"name_or_path": "builtin:mlp", **model},
        "tasks": [{"name": "a", "source": {"builtin": "mnist_random_labels", "num_images": NUM_IMAGES}}],
    }


def rows_by_bytes(images):
    return {np.asarray(row, dtype=np.float32).tobytes(): index for index, row in enumerate(images)}


def test_random_labels_differ_per_task():
    spec = image_spec("mnist_random_labels")
    first = load_task_data(spec, seed=0, task_index=0)
    second = load_task_data(spec, seed=0, task_index=1)

    assert first.num_classes == 10
    assert len(first.train) == NUM_IMAGES
    assert len(first.train[0]["pixel_values"]) == 784
    assert list(first.train["pixel_values"]) == list(second.train["pixel_values"])
    assert list(first.train["label"]) != list(second.train["label"])
    assert set(first.train["label"]) <= set(range(10))
    # Random labels are evaluated on the training images and labels.
    assert list(first.eval["pixel_values"]) == list(first.train["pixel_values"])
    assert list(first.eval["label"]) == list(first.train["label"])


def test_random_labels_follow_seed():
    spec = image_spec("mnist_random_labels")
    first = load_task_data(spec, seed=3, task_index=1)
    again = load_task_data(spec, seed=3, task_index=1)
    other_seed = load_task_data(spec, seed=4, task_index=1)

    assert list(first.train["label"]) == list(again.train["label"])
    assert list(first.train["pixel_values"]) == list(again.train["pixel_values"])
    assert list(first.train["label"]) != list(other_seed.train["label"])


def test_permuted_tasks_permute_pixels():
    images, labels = load_images("mnist", NUM_IMAGES, 0)
    images, labels = images.numpy(), labels.numpy()
    tasks, num_labels = prepare_tasks([image_spec("mnist_permuted", "p0"), image_spec("mnist_permuted", "p1")], seed=0)

    assert num_labels == 10
    permuted_rows = []
    for task in tasks:
        rows = list(task.train["pixel_values"]) + list(task.eval["pixel_values"])
        assert len(task.eval) == pytest.approx(0.2 * NUM_IMAGES, abs=1)
        assert len(rows) == NUM_IMAGES
        # Each image keeps its pixel values and true label, in another pixel order.
        original = rows_by_bytes(np.sort(images, axis=1))
        task_labels = list(task.train["label"]) + list(task.eval["label"])
        for row, label in zip(rows, task_labels):
            index = original[np.sort(np.asarray(row, dtype=np.float32)).tobytes()]
            assert label == labels[index]
        assert not set(rows_by_bytes(rows)) & set(rows_by_bytes(images))
        permuted_rows.append(set(rows_by_bytes(rows)))
    assert not permuted_rows[0] & permuted_rows[1]


@pytest.mark.parametrize(
    "source, fields, field_name",
    [
        ({"builtin": "mnist_random_labels", "categories": ["a", "b"]}, {}, "categories"),
        ({"builtin": "mnist_random_labels", "num_images": 1}, {}, "num_images"),
        ({"builtin": "mnist_permuted", "image_source": "cifar"}, {}, "image_source"),
        ({"builtin": "mnist_digits"}, {}, "builtin"),
        ({"builtin": "mnist_random_labels"}, {"eval_fraction": 0.2}, "eval_fraction"),
        ({"builtin": "mnist_permuted"}, {"max_train_examples": 10}, "max_train_examples"),
    ],
)
def test_image_source_errors(source, fields, field_name):
    with pytest.raises(ConfigError) as error:
        TaskSpec.from_dict({"name": "t", "source": source, **fields}, where="tasks.0")
    assert field_name in str(error.value)


def test_model_activation_errors():
    with pytest.raises(ConfigError) as error:
        validate_experiment_config(image_config(activation="tanh"))
    assert "model.activation='tanh'" in str(error.value)
    assert "relu" in str(error.value)

    config = image_config(activation="relu")
    config["model"]["name_or_path"] = "tiny-bert"
    with pytest.raises(ConfigError) as error:
        validate_experiment_config(config)
    assert "model.activation" in str(error.value)


def test_model_task_kind_mismatch():
    config = image_config()
    config["model"]["name_or_path"] = "builtin:cnn"
    with pytest.raises(ConfigError) as error:
        validate_experiment_config(config)
    assert "builtin:cnn" in str(error.value)

    config = image_config()
    config["model"]["name_or_path"] = "tiny-bert"
    with pytest.raises(ConfigError) as error:
        validate_experiment_config(config)
    assert "builtin:mlp" in str(error.value)

    config = image_config()
    config["tasks"] = [{"name": "text", "source": {"builtin": "fortunes", "categories": ["science", "food"]}}]
    with pytest.raises(ConfigError) as error:
        validate_experiment_config(config)
    assert "text task" in str(error.value)


def test_image_config_accepts_crelu():
    config = validate_experiment_config(image_config(activation="crelu"))
    assert config.model["activation"] == "crelu"
    assert config.tasks[0].is_image_task


def test_script_runs_image_tasks(tmp_path):
    steps = 3
    output_dir = tmp_path / "out"
    config = {
        "model": {"name_or_path": "builtin:mlp", "activation": "crelu"},
        "tasks": [
            {"name": "labels-0", "source": {"builtin": "mnist_random_labels", "num_images": 64}, "max_steps": steps},
            {"name": "labels-1", "source": {"builtin": "mnist_random_labels", "num_images": 64}, "max_steps": steps},
        ],
        "training": {
            "per_device_train_batch_size": 16,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "constant",
            "disable_tqdm": True,
        },
        "lot": {"interval": 2, "window": 3},
        "run": {"output_dir": str(output_dir), "plots": False},
    }
    config_path = tmp_path / "image.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "1",
    }
    completed = subprocess.run(
        [sys.executable, SCRIPT, "--config", str(config_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]

    with open(output_dir / "results.json") as handle:
        results = json.load(handle)
    assert results["status"] == "complete"
    assert results["num_labels"] == 10
    assert results["layer_names"] == ["layers.0", "layers.2", "layers.4"]
    accuracy = results["accuracy"]
    assert len(accuracy) == 2
    assert accuracy[0][1] is None
    for i, j in ((0, 0), (1, 0), (1, 1)):
        assert 0.0 <= accuracy[i][j] <= 1.0
    assert [task["eval_examples"] for task in results["tasks"]] == [64, 64]

    rates = results["learning_rates"]
    assert rates["step"] == list(range(1, 2 * steps + 1))
    assert rates["task"] == [0] * steps + [1] * steps
    for name in results["layer_names"]:
        assert len(rates["layers"][name]) == 2 * steps
        assert all(rate is not None and rate > 0 for rate in rates["layers"][name])

    saved = os.listdir(output_dir / "model")
    assert "config.json" in saved
    assert "tokenizer_config.json" not in saved
    with open(output_dir / "model" / "config.json") as handle:
        assert json.load(handle)["activation"] == "crelu"
