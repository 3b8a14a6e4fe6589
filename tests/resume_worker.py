"""Run scripts/continual_finetune.py and stop the process at a named point, for the resume tests.

Usage: python tests/resume_worker.py STOP_POINT [script arguments ...]

Stop points (task and step count from 0 and 1, as in the task's Trainer):

- ``none``: run to the end.
- ``after-checkpoint:TASK:STEP``: once Trainer has saved checkpoint STEP of
  task TASK, create the file named by $RESUME_WORKER_MARKER and wait, so the
  test can kill the process with a real SIGKILL.
- ``training-step:TASK:STEP``: exit after optimizer step STEP of task TASK,
  before any checkpoint of a later step.
- ``evaluating:TASK``: exit during the evaluation after task TASK, after the
  first evaluated task.
- ``writing-results:TASK``: exit while writing the results.json that counts
  task TASK, after its temporary file is written and before it replaces
  results.json.

Exits use os._exit(137), the status of a process killed by SIGKILL, so no
cleanup code runs.
"""

import importlib.util
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "continual_finetune.py")
KILLED = 137


def load_script():
    spec = importlib.util.spec_from_file_location("continual_finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_of(output_dir: str) -> int:
    """Return the task index of a task's Trainer output folder ``.../tasks/<i>-<name>``."""
    return int(os.path.basename(os.path.normpath(output_dir)).split("-", 1)[0])


def install(module, point: str) -> None:
    kind, _, where = point.partition(":")
    numbers = [int(part) for part in where.split(":")] if where else []

    if kind == "after-checkpoint":
        task, step = numbers

        def on_save(self, args, state, control, **kwargs):
            if self.task_index == task and state.global_step == step:
                with open(os.environ["RESUME_WORKER_MARKER"], "w") as handle:
                    handle.write(str(os.getpid()))
                while True:
                    time.sleep(1)

        module.LearningRateRecorder.on_save = on_save

    elif kind == "training-step":
        task, step = numbers

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            recorded = original_on_step_end(self, args, state, control, optimizer=optimizer, **kwargs)
            if self.task_index == task and state.global_step == step:
                os._exit(KILLED)
            return recorded

        original_on_step_end = module.LearningRateRecorder.on_step_end
        module.LearningRateRecorder.on_step_end = on_step_end

    elif kind == "evaluating":
        (task,) = numbers
        original = module.evaluate_tasks

        def evaluate_tasks(trainer, tasks, eval_sets, indices, metric):
            if task_of(trainer.args.output_dir) == task:
                original(trainer, tasks, eval_sets, indices[:1], metric)
                os._exit(KILLED)
            return original(trainer, tasks, eval_sets, indices, metric)

        module.evaluate_tasks = evaluate_tasks

    elif kind == "writing-results":
        (task,) = numbers
        import hf_lot.results as results_module

        original = results_module.write_json_atomic

        def write_json_atomic(path, data):
            if os.path.basename(path) == "results.json" and data.get("tasks_completed") == task + 1:
                folder = os.path.dirname(os.path.abspath(path))
                with open(os.path.join(folder, f".results.json.{os.getpid()}.deadbeef.tmp"), "w") as handle:
                    handle.write('{"schema_version": 1, "status": "runn')
                os._exit(KILLED)
            original(path, data)

        results_module.write_json_atomic = write_json_atomic

    elif kind != "none":
        raise SystemExit(f"Unknown stop point {point!r}.")


def main() -> int:
    point, script_arguments = sys.argv[1], sys.argv[2:]
    module = load_script()
    install(module, point)
    return module.main(script_arguments)


if __name__ == "__main__":
    sys.exit(main())
