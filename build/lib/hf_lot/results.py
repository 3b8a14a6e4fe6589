"""Results of a continual fine-tuning run: accuracy matrix, forgetting, learning rates and plots.

`ContinualResults` collects what `scripts/continual_finetune.py` measures and
`save` writes it as ``results.json`` (schema in ``docs/results_schema.md``)
plus two PNG plots. The JSON file is replaced atomically, so a reader never
sees a half-written file, even while the run is still going.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import Any

import numpy as np
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "ACCURACY_METRIC_PATH",
    "RESULTS_FILE",
    "RESULTS_SCHEMA_VERSION",
    "ContinualResults",
    "LearningRateRecorder",
    "average_accuracy",
    "forgetting",
    "format_summary_table",
    "load_accuracy_metric",
    "plot_accuracy",
    "plot_learning_rates",
    "remove_temporary_files",
    "task_accuracy",
    "to_json_safe",
    "write_json_atomic",
]

RESULTS_SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
ACCURACY_PLOT_FILE = "accuracy.png"
LEARNING_RATE_PLOT_FILE = "learning_rates.png"
ACCURACY_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "accuracy.py")

Matrix = list[list[float | None]]


# -- metrics -------------------------------------------------------------


def load_accuracy_metric():
    """Load the local accuracy metric module with `evaluate`, without network access.

    ``keep_in_memory=True`` keeps `evaluate` from writing cache files, so
    several processes can compute the metric at once.
    """
    import evaluate

    return evaluate.load(ACCURACY_METRIC_PATH, keep_in_memory=True)


def task_accuracy(metric: Any, logits: Any, labels: Any, num_classes: int) -> float:
    """Compute the accuracy of a task from the shared head's logits.

    The prediction is the argmax over the task's own classes, logits
    ``[:, :num_classes]``, because the task identity is known at evaluation
    (task-incremental setting).
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Expected logits of shape (examples, classes) and one label per example, got logits {logits.shape} "
            f"and labels {labels.shape}."
        )
    if not 1 <= num_classes <= logits.shape[1]:
        raise ValueError(
            f"num_classes={num_classes} does not fit a head with {logits.shape[1]} outputs. Pass the task's number "
            "of classes."
        )
    predictions = logits[:, :num_classes].argmax(axis=-1)
    return float(metric.compute(predictions=predictions.tolist(), references=labels.tolist())["accuracy"])


def _completed_rows(matrix: Matrix) -> int:
    """Return the number of leading rows whose diagonal entry is set (tasks trained so far)."""
    count = 0
    for index, row in enumerate(matrix):
        if index >= len(row) or row[index] is None:
            break
        count += 1
    return count


def average_accuracy(matrix: Matrix) -> list[float | None]:
    """Return, after each task ``i``, the mean of ``acc[i][j]`` over the tasks ``j <= i``.

    Entries for tasks not trained yet are None.
    """
    averages: list[float | None] = []
    for index, row in enumerate(matrix):
        seen = [value for value in row[: index + 1] if value is not None]
        averages.append(sum(seen) / len(seen) if index < _completed_rows(matrix) and seen else None)
    return averages


def forgetting(matrix: Matrix) -> list[float | None]:
    """Return the forgetting of each task after the last trained task ``L``.

    For a task ``j < L``, forgetting is ``max(acc[i][j] for j <= i < L) - acc[L][j]``:
    the best accuracy it had before the last task minus its accuracy now.
    Tasks ``j >= L`` have no earlier accuracy, so their entry is None.
    """
    last = _completed_rows(matrix) - 1
    result: list[float | None] = []
    for task in range(len(matrix)):
        if task >= last:
            result.append(None)
            continue
        earlier = [matrix[i][task] for i in range(task, last) if matrix[i][task] is not None]
        final = matrix[last][task]
        result.append(max(earlier) - final if earlier and final is not None else None)
    return result


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


# -- JSON ----------------------------------------------------------------


def to_json_safe(value: Any) -> Any:
    """Convert numpy values to Python ones and NaN or infinity to None, so the output is strict JSON."""
    if isinstance(value, dict):
        return {str(key): to_json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON to `path` through a temporary file in the same folder and `os.replace`.

    Readers see either the old file or the complete new one. The temporary
    file is removed when serialization fails.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A plain open() gives the file the usual permissions under the umask, unlike tempfile's 0600.
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            json.dump(to_json_safe(data), handle, indent=2, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def remove_temporary_files(output_dir: str | os.PathLike) -> list[str]:
    """Delete the temporary files that `write_json_atomic` and the plots leave behind when a process is killed.

    Returns the names of the deleted files. Only names of the form
    ``.<file>.<pid>.<hex>.tmp`` and ``.<plot>.tmp.png`` are touched.
    """
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        if name.startswith(".") and (name.endswith(".tmp") or name.endswith(".tmp.png")):
            os.unlink(os.path.join(output_dir, name))
            removed.append(name)
    return removed


# -- learning-rate recording ---------------------------------------------


class LearningRateRecorder(TrainerCallback, ExportableState):
    """Trainer callback that records every layer's learning rate after each optimizer step, and the task's loss.

    Each record is ``(step, task, {layer_name: lr})``, where ``step`` counts
    optimizer steps across all tasks. A layer's learning rate is that of the
    parameter group that contains its first parameter, so the recorder works for
    the plain `Trainer` (one rate for every layer) and for per-layer groups.

    The records of the current task and the loss sums are also kept here, and
    `state` exports them: `Trainer` writes them into every checkpoint's
    ``trainer_state.json`` (under ``stateful_callbacks``) in the same file as
    the step count, so a task resumed from a checkpoint continues them with
    `load_state`. ``run_id`` marks which run wrote a checkpoint.
    """

    def __init__(
        self, results: ContinualResults, layers: list[Any], task_index: int, step_offset: int, run_id: str | None = None
    ):
        self.results = results
        self.layers = layers
        self.task_index = task_index
        self.step_offset = step_offset
        self.run_id = run_id
        self.task_records: list[list[Any]] = []
        self.loss_sum = 0.0
        self.loss_steps = 0
        self.nonfinite_loss_steps = 0
        self._step_loss = 0.0

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        group_of = {id(param): group for group in optimizer.param_groups for param in group["params"]}
        rates = {}
        for layer in self.layers:
            group = group_of.get(id(layer.parameters[0]))
            if group is not None:
                rates[layer.name] = float(group["lr"])
        step = self.step_offset + state.global_step
        self.task_records.append([step, rates])
        self.results.record_learning_rates(step, self.task_index, rates)

    def record_loss(self, loss: float, last_micro_batch: bool) -> None:
        """Add one micro-batch loss, as `Trainer.training_step` returns it, and close the step on the last micro-batch.

        A step whose loss is NaN or infinite is left out of the mean and counted in `nonfinite_loss_steps`.
        """
        self._step_loss += float(loss)
        if not last_micro_batch:
            return
        if math.isfinite(self._step_loss):
            self.loss_sum += self._step_loss
            self.loss_steps += 1
        else:
            self.nonfinite_loss_steps += 1
        self._step_loss = 0.0

    @property
    def train_loss(self) -> float | None:
        """Mean loss over the task's optimizer steps with a finite loss, or None before any such step."""
        return self.loss_sum / self.loss_steps if self.loss_steps else None

    def state(self) -> dict[str, Any]:
        return {
            "args": {},
            "attributes": {
                "run_id": self.run_id,
                "task_index": self.task_index,
                "task_records": self.task_records,
                "loss_sum": self.loss_sum,
                "loss_steps": self.loss_steps,
                "nonfinite_loss_steps": self.nonfinite_loss_steps,
            },
        }

    def load_state(self, attributes: dict[str, Any]) -> None:
        """Continue from the `state()` attributes of a checkpoint and add its learning-rate records to the results again.

        Raises:
            ValueError: If the checkpoint belongs to another run or task.
        """
        if attributes.get("run_id") != self.run_id or attributes.get("task_index") != self.task_index:
            raise ValueError(
                f"Checkpoint records are for run {attributes.get('run_id')!r}, task {attributes.get('task_index')}, "
                f"not run {self.run_id!r}, task {self.task_index}."
            )
        self.task_records = [[int(step), dict(rates)] for step, rates in attributes["task_records"]]
        for step, rates in self.task_records:
            self.results.record_learning_rates(step, self.task_index, rates)
        self.loss_sum = float(attributes["loss_sum"])
        self.loss_steps = int(attributes["loss_steps"])
        self.nonfinite_loss_steps = int(attributes["nonfinite_loss_steps"])
        self._step_loss = 0.0


# -- results -------------------------------------------------------------


class ContinualResults:
    """Measurements of a continual run, filled in task by task.

    Args:
        config: The resolved experiment config, stored as given.
        tasks: One dict per task with at least ``name`` and ``num_classes``.
        layer_names: Names of the layers whose learning rates are recorded.
        threshold: Whether the LoT threshold controller was on.
        num_labels: Outputs of the shared classification head.
    """

    def __init__(
        self,
        config: dict[str, Any],
        tasks: list[dict[str, Any]],
        layer_names: list[str],
        threshold: bool,
        num_labels: int,
    ):
        num_tasks = len(tasks)
        self.config = config
        self.tasks = [dict(task) for task in tasks]
        self.layer_names = list(layer_names)
        self.threshold = threshold
        self.num_labels = num_labels
        self.status = "running"
        self.accuracy: Matrix = [[None] * num_tasks for _ in range(num_tasks)]
        self.train: list[dict[str, Any] | None] = [None] * num_tasks
        self.task_boundaries: list[int] = []
        self.lr_steps: list[int] = []
        self.lr_tasks: list[int] = []
        self.lr_values: dict[str, list[float | None]] = {name: [] for name in self.layer_names}
        self.lot_history: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}

    # Keys of `to_dict` that are computed from the stored fields instead of being stored.
    _DERIVED_KEYS = (
        "schema_version",
        "tasks_completed",
        "average_accuracy",
        "final_average_accuracy",
        "forgetting",
        "average_forgetting",
        "plots",
    )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContinualResults:
        """Rebuild the results from a ``results.json`` dict, for a run that continues after an interruption.

        NaN values come back as None, because ``results.json`` stores them as null.
        """
        if data.get("schema_version") != RESULTS_SCHEMA_VERSION:
            raise ValueError(
                f"results.json has schema_version {data.get('schema_version')!r}, but this version of hf_lot reads "
                f"only version {RESULTS_SCHEMA_VERSION}. Continue the run with the hf_lot version that started it."
            )
        results = cls(data["config"], data["tasks"], data["layer_names"], data["threshold"], data["num_labels"])
        results.status = data["status"]
        results.accuracy = [list(row) for row in data["accuracy"]]
        results.train = [None if summary is None else dict(summary) for summary in data["train"]]
        results.task_boundaries = [int(step) for step in data["task_boundaries"]]
        rates = data["learning_rates"]
        results.lr_steps = [int(step) for step in rates["step"]]
        results.lr_tasks = [int(task) for task in rates["task"]]
        results.lr_values = {name: list(rates["layers"][name]) for name in results.layer_names}
        results.lot_history = list(data["lot_history"])
        stored = {"status", "threshold", "num_labels", "tasks", "layer_names", "train", "accuracy", "task_boundaries",
                  "learning_rates", "lot_history", "config"}  # fmt: skip
        results.extra = {key: value for key, value in data.items() if key not in stored and key not in cls._DERIVED_KEYS}
        return results

    @property
    def tasks_completed(self) -> int:
        """Number of tasks trained and evaluated so far."""
        return _completed_rows(self.accuracy)

    @property
    def task_names(self) -> list[str]:
        return [task["name"] for task in self.tasks]

    def record_training(self, task_index: int, summary: dict[str, Any]) -> None:
        """Store the train summary of a task and extend the task boundaries by ``summary["steps"]``."""
        self.train[task_index] = dict(summary)
        previous = self.task_boundaries[-1] if self.task_boundaries else 0
        self.task_boundaries.append(previous + int(summary["steps"]))

    def record_accuracy(self, after_task: int, task_index: int, accuracy: float) -> None:
        """Store ``acc[after_task][task_index]``: accuracy on `task_index` after training `after_task`."""
        self.accuracy[after_task][task_index] = float(accuracy)

    def record_learning_rates(self, step: int, task_index: int, rates: dict[str, float]) -> None:
        self.lr_steps.append(int(step))
        self.lr_tasks.append(int(task_index))
        for name in self.layer_names:
            self.lr_values[name].append(rates.get(name))

    def to_dict(self) -> dict[str, Any]:
        """Return the results in the ``results.json`` schema (see ``docs/results_schema.md``)."""
        per_task_forgetting = forgetting(self.accuracy)
        averages = average_accuracy(self.accuracy)
        completed = _completed_rows(self.accuracy)
        return {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "status": self.status,
            "threshold": self.threshold,
            "num_labels": self.num_labels,
            "tasks_completed": completed,
            "tasks": self.tasks,
            "layer_names": self.layer_names,
            "train": self.train,
            "accuracy": self.accuracy,
            "average_accuracy": averages,
            "final_average_accuracy": averages[completed - 1] if completed else None,
            "forgetting": per_task_forgetting,
            "average_forgetting": _mean(per_task_forgetting),
            "task_boundaries": self.task_boundaries,
            "learning_rates": {
                "step": self.lr_steps,
                "task": self.lr_tasks,
                "layers": self.lr_values,
            },
            "lot_history": self.lot_history,
            **self.extra,
            "config": self.config,
        }

    def save(self, output_dir: str | os.PathLike, plots: bool = True) -> dict[str, str]:
        """Write ``results.json`` atomically and, with `plots`, the two PNG plots. Return their paths."""
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        data = self.to_dict()
        paths = {"results": os.path.join(output_dir, RESULTS_FILE)}
        if plots:
            paths["accuracy_plot"] = os.path.join(output_dir, ACCURACY_PLOT_FILE)
            paths["learning_rate_plot"] = os.path.join(output_dir, LEARNING_RATE_PLOT_FILE)
            data["plots"] = {"accuracy": ACCURACY_PLOT_FILE, "learning_rates": LEARNING_RATE_PLOT_FILE}
            plot_accuracy(data, paths["accuracy_plot"])
            plot_learning_rates(data, paths["learning_rate_plot"])
        write_json_atomic(paths["results"], data)
        return paths


# -- plots ---------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure: Any, path: str) -> None:
    # Save through a temporary name as well, so a viewer never opens half a PNG.
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.tmp.png")
    figure.savefig(temporary, dpi=120, bbox_inches="tight")
    os.replace(temporary, path)


def plot_accuracy(results: dict[str, Any], path: str) -> None:
    """Plot the accuracy matrix as a heatmap next to each task's accuracy after every task."""
    plt = _pyplot()
    names = [task["name"] for task in results["tasks"]]
    matrix = np.array(
        [[np.nan if value is None else value for value in row] for row in results["accuracy"]], dtype=float
    )
    num_tasks = len(names)

    figure, (heatmap, curves) = plt.subplots(1, 2, figsize=(6 + 1.2 * num_tasks, 4 + 0.3 * num_tasks))
    image = heatmap.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(num_tasks):
        for j in range(num_tasks):
            if not np.isnan(matrix[i, j]):
                color = "black" if matrix[i, j] > 0.6 else "white"
                heatmap.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color=color, fontsize=8)
    heatmap.set_xticks(range(num_tasks), names, rotation=45, ha="right")
    heatmap.set_yticks(range(num_tasks), names)
    heatmap.set_xlabel("evaluated task j")
    heatmap.set_ylabel("after training task i")
    heatmap.set_title("accuracy acc[i][j]")
    figure.colorbar(image, ax=heatmap, fraction=0.046, pad=0.04)

    positions = np.arange(num_tasks)
    for j, task in enumerate(results["tasks"]):
        values = matrix[:, j]
        mask = ~np.isnan(values)
        if not mask.any():
            continue
        (line,) = curves.plot(positions[mask], values[mask], marker="o", label=task["name"])
        chance = task.get("chance_accuracy")
        if chance is not None:
            # A dotted line in the task's color marks its chance accuracy, 1 / number of classes.
            curves.hlines(chance, positions[mask][0], max(positions[mask][-1], positions[mask][0] + 0.2),
                          colors=line.get_color(), linestyles=":", linewidth=1)
    averages = [np.nan if value is None else value for value in results.get("average_accuracy", [])]
    if averages and not np.all(np.isnan(averages)):
        curves.plot(positions, averages, color="black", linestyle="--", label="average")
    curves.set_xticks(positions, names, rotation=45, ha="right")
    curves.set_xlabel("after training task")
    curves.set_ylabel("accuracy")
    curves.set_ylim(0.0, 1.02)
    curves.set_title("accuracy of each task (dotted: chance)")
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.suptitle(f"threshold {'on' if results.get('threshold') else 'off'}")
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)


def plot_learning_rates(results: dict[str, Any], path: str) -> None:
    """Plot each layer's learning rate against the optimizer step, with task boundaries as vertical lines."""
    plt = _pyplot()
    trajectories = results["learning_rates"]
    steps = np.asarray(trajectories["step"], dtype=float)

    figure, axis = plt.subplots(figsize=(9, 4.5))
    low, high = math.inf, -math.inf
    plotted = False
    for name, values in trajectories["layers"].items():
        values = np.array([np.nan if value is None else value for value in values], dtype=float)
        if values.size and not np.all(np.isnan(values)):
            # The learning rate is constant between optimizer steps, so draw steps, not slopes.
            axis.plot(steps, values, label=name, linewidth=1.2, drawstyle="steps-post")
            plotted = True
            low, high = min(low, float(np.nanmin(values))), max(high, float(np.nanmax(values)))
    if plotted and low > 0 and high / low > 10:
        axis.set_yscale("log")

    start = 0
    names = [task["name"] for task in results["tasks"]]
    for index, boundary in enumerate(results.get("task_boundaries", [])):
        axis.axvline(boundary, color="gray", linestyle="--", linewidth=0.8)
        label = names[index] if len(names[index]) <= 16 else names[index][:15] + "…"
        axis.text((start + boundary) / 2, 1.01, label, transform=axis.get_xaxis_transform(), ha="center", fontsize=8)
        start = boundary
    if not plotted:
        axis.text(0.5, 0.5, "no learning rates recorded yet", transform=axis.transAxes, ha="center")
    axis.set_xlabel("optimizer step (all tasks)")
    axis.set_ylabel("learning rate")
    axis.set_title(f"per-layer learning rates, threshold {'on' if results.get('threshold') else 'off'}", pad=16)
    if plotted:
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)


# -- summary table -------------------------------------------------------


def _format(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_summary_table(results: dict[str, Any]) -> str:
    """Format the accuracy matrix, average accuracy, forgetting and risk as a text table."""
    names = [task["name"] for task in results["tasks"]]
    width = max(8, *(len(name) for name in names)) + 2
    header = "after task".ljust(width) + "".join(name.rjust(width) for name in names)
    header += "avg acc".rjust(10) + "loss".rjust(9) + "rho".rjust(7) + "steps".rjust(7)
    lines = [f"threshold {'on' if results['threshold'] else 'off'}: accuracy acc[i][j]", header, "-" * len(header)]
    for index, name in enumerate(names):
        row = results["accuracy"][index]
        train = results["train"][index] or {}
        line = name.ljust(width) + "".join(_format(value).rjust(width) for value in row)
        line += _format(results["average_accuracy"][index]).rjust(10)
        line += _format(train.get("train_loss")).rjust(9)
        line += _format(train.get("rho"), 2).rjust(7)
        line += str(train.get("steps", "-")).rjust(7)
        lines.append(line)
    lines.append("forgetting".ljust(width) + "".join(_format(value).rjust(width) for value in results["forgetting"]))
    lines.append(
        f"final average accuracy {_format(results['final_average_accuracy'])}, "
        f"average forgetting {_format(results['average_forgetting'])}"
    )
    return "\n".join(lines)
