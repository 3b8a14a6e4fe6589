"""Files that let an interrupted continual run continue where it stopped.

`scripts/continual_finetune.py` keeps three kinds of state in its output folder:

- ``config.yaml``: the resolved experiment config, written before training,
  which ``--resume`` reads back.
- ``tasks/<i>-<name>/checkpoint-<step>``: ordinary `Trainer` checkpoints
  inside a task. `find_checkpoint` picks the newest complete one of this run.
- ``tasks/<i>-<name>/task_end``: the state after task ``i`` finished training
  (model, Adam state, LoT controller and the task's records). It is written
  before evaluation, so a run killed while evaluating or writing results
  continues without training the task again.

Every folder and file here is written under a temporary name and renamed into
place, so a killed process leaves either the previous state or the new one.

NOTE: with several processes, each process has its own power-iteration
vectors for the sharpness, but checkpoints and task-end states contain only
the main process's. After a resume the other processes warm-start from those,
so the sharpness measured after the resume differs from an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from typing import Any

import torch
import yaml
from transformers.utils import logging

from .results import write_json_atomic

__all__ = [
    "CONFIG_FILE",
    "TASK_END_DIR",
    "RunFolderInUseError",
    "find_checkpoint",
    "hold_run_lock",
    "load_task_end",
    "new_run_id",
    "read_config",
    "remove_checkpoints",
    "remove_task_end",
    "restore_task_end",
    "save_task_end",
    "write_config",
]

logger = logging.get_logger(__name__)

CONFIG_FILE = "config.yaml"
TASK_END_DIR = "task_end"
# Held with flock by the process that writes a run folder; the kernel releases it when the process dies.
RUN_LOCK_FILE = ".run.lock"
TASK_RECORD_FILE = "task_record.json"
MODEL_STATE_FILE = "model.pt"
OPTIMIZER_STATE_FILE = "optimizer.pt"
CONTROLLER_STATE_FILE = "lot_controller.pt"
TRAINER_STATE_FILE = "trainer_state.json"
# The optimizer file of a Trainer checkpoint (transformers 5.25 `OPTIMIZER_NAME`).
CHECKPOINT_OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_PREFIX = "checkpoint-"
# Class name under which Trainer stores the recorder's exported state in trainer_state.json.
RECORDER_STATE_NAME = "LearningRateRecorder"


class RunFolderInUseError(RuntimeError):
    """Another live process holds the lock of the run folder."""


@contextlib.contextmanager
def hold_run_lock(output_dir: str):
    """Hold an exclusive lock on the run folder while the run writes to it.

    A second run or ``--resume`` on the same folder would interleave its
    checkpoints and results with the first one's, so it raises
    `RunFolderInUseError` instead. The lock is an advisory ``flock`` on
    ``.run.lock``, released by the kernel when the process dies, so a killed
    run never leaves a stale lock. The file is deleted on exit.

    NOTE: ``flock`` is only reliable on local file systems; on NFS two hosts
    may both acquire it.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_LOCK_FILE)
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise RunFolderInUseError(
                f"{output_dir} is in use by a running process ({owner}). Wait for it to finish or stop it, "
                "then run again or resume with --resume."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield path
        finally:
            os.unlink(path)
    finally:
        handle.close()


def new_run_id() -> str:
    """Return a random id that marks the checkpoints and task states of one run."""
    return uuid.uuid4().hex


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_config(output_dir: str, config: dict[str, Any]) -> str:
    """Write the resolved experiment config to ``config.yaml`` in `output_dir` atomically. Return its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, CONFIG_FILE)
    temporary = os.path.join(output_dir, f".{CONFIG_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            handle.write("# Resolved config of this run; `continual_finetune.py --resume <folder>` reads it.\n")
            yaml.safe_dump(config, handle, sort_keys=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def read_config(output_dir: str) -> str:
    """Return the path of the saved config of the run in `output_dir`.

    Raises:
        FileNotFoundError: If `output_dir` contains no saved config.
    """
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found, so {output_dir} contains no run that can be resumed. Pass the run.output_dir of a run "
            "started by this version of continual_finetune.py, or start a new run with --config."
        )
    return path


# -- the state at the end of a task -------------------------------------------------


def save_task_end(
    directory: str,
    record: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    controller: Any | None = None,
) -> None:
    """Write the state after a task to `directory` (``.../task_end``), replacing any earlier one.

    The files go to a temporary sibling folder that is renamed to `directory`
    at the end. `record` is JSON data that must contain ``run_id`` and
    ``task_index``.
    """
    parent, name = os.path.split(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    for entry in os.listdir(parent):
        # Folders of an earlier process that was killed while writing.
        if entry.startswith(f".{name}.tmp-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)

    temporary = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(temporary)
    try:
        files = {MODEL_STATE_FILE: model.state_dict()}
        if optimizer is not None:
            files[OPTIMIZER_STATE_FILE] = optimizer.state_dict()
        if controller is not None:
            files[CONTROLLER_STATE_FILE] = controller.state_dict()
        for file_name, state in files.items():
            path = os.path.join(temporary, file_name)
            torch.save(state, path)
            _fsync_file(path)
        # The record is written last, so a folder with a record contains every other file.
        write_json_atomic(os.path.join(temporary, TASK_RECORD_FILE), record)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.rename(temporary, directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def load_task_end(directory: str, run_id: str, task_index: int) -> dict[str, Any] | None:
    """Return the record of the task-end state in `directory`, or None when there is none for this run and task."""
    path = os.path.join(directory, TASK_RECORD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        record = json.load(handle)
    if record.get("run_id") != run_id or record.get("task_index") != task_index:
        logger.warning(
            "Ignoring %s: it was written by run %s for task %s, not by run %s for task %d.",
            directory,
            record.get("run_id"),
            record.get("task_index"),
            run_id,
            task_index,
        )
        return None
    return record


def restore_task_end(
    directory: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    controller: Any | None = None,
) -> None:
    """Load the model weights, and the optimizer and controller states when given, from a task-end folder.

    Tensors are read to the CPU, and `load_state_dict` of the model, the
    optimizer and the controller moves them to their parameters' devices.
    """

    def load(name: str) -> Any:
        return torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True)

    model.load_state_dict(load(MODEL_STATE_FILE))
    if optimizer is not None:
        optimizer.load_state_dict(load(OPTIMIZER_STATE_FILE))
    if controller is not None:
        controller.load_state_dict(load(CONTROLLER_STATE_FILE))


def remove_task_end(directory: str) -> None:
    """Delete a task-end folder that a later task's state has replaced.

    The record goes first, so a deletion cut short leaves a folder that
    `load_task_end` ignores.
    """
    record = os.path.join(directory, TASK_RECORD_FILE)
    if os.path.isfile(record):
        os.unlink(record)
    if os.path.isdir(directory):
        shutil.rmtree(directory)


# -- Trainer checkpoints inside a task -----------------------------------------------


def remove_checkpoints(task_output_dir: str) -> list[str]:
    """Delete the Trainer checkpoints of a task whose task-end state has been written. Return their paths.

    The task-end state supersedes them, and each contains the model and twice its
    size of Adam state, so keeping them would multiply the output folder's size
    by the number of tasks.
    """
    removed = []
    if not os.path.isdir(task_output_dir):
        return removed
    for name in sorted(os.listdir(task_output_dir)):
        path = os.path.join(task_output_dir, name)
        if _checkpoint_step(name) is not None and os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(path)
    return removed


def _checkpoint_step(name: str) -> int | None:
    suffix = name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def find_checkpoint(task_output_dir: str, run_id: str, task_index: int) -> tuple[str, dict[str, Any]] | None:
    """Find the newest checkpoint of this run and task from which training can continue.

    A checkpoint qualifies when its ``trainer_state.json`` (which `Trainer`
    writes after every other file) parses, carries the learning-rate
    recorder's state with this `run_id` and `task_index`, stops before the
    task's last step, and the optimizer state exists. A checkpoint at the last
    step is skipped: resuming from it would run one step more than
    ``max_steps`` when the task ends inside an epoch (transformers 5.25).

    Returns:
        ``(path, recorder attributes)``, or None when no checkpoint qualifies.
    """
    if not os.path.isdir(task_output_dir):
        return None
    candidates = []
    for name in os.listdir(task_output_dir):
        step = _checkpoint_step(name)
        if step is not None and os.path.isdir(os.path.join(task_output_dir, name)):
            candidates.append((step, name))

    for step, name in sorted(candidates, reverse=True):
        path = os.path.join(task_output_dir, name)
        reason = _unusable_checkpoint_reason(path, step, run_id, task_index)
        if reason is None:
            state = _read_trainer_state(path)
            return path, _recorder_attributes(state)
        logger.warning("Skipping checkpoint %s: %s.", path, reason)
    return None


def _read_trainer_state(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, TRAINER_STATE_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _recorder_attributes(state: dict[str, Any]) -> dict[str, Any] | None:
    saved = (state.get("stateful_callbacks") or {}).get(RECORDER_STATE_NAME)
    if isinstance(saved, list):
        saved = saved[0] if len(saved) == 1 else None
    if not isinstance(saved, dict):
        return None
    return saved.get("attributes")


def _unusable_checkpoint_reason(path: str, step: int, run_id: str, task_index: int) -> str | None:
    state = _read_trainer_state(path)
    if state is None:
        return f"{TRAINER_STATE_FILE} is missing or incomplete (the process was probably killed while saving)"
    if state.get("global_step") != step:
        return f"its {TRAINER_STATE_FILE} is for step {state.get('global_step')}"
    attributes = _recorder_attributes(state)
    if attributes is None or attributes.get("run_id") != run_id or attributes.get("task_index") != task_index:
        return "it was written by another run"
    if step >= int(state.get("max_steps") or 0):
        return "it is at the task's last step, so the task restarts from an earlier state"
    if not os.path.isfile(os.path.join(path, CHECKPOINT_OPTIMIZER_FILE)):
        return "it has no optimizer state (save_only_model)"
    return None
