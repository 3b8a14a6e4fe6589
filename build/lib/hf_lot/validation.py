"""Checks of a continual run's inputs that need more than the config file itself.

`hf_lot.tasks.validate_experiment_config` checks the structure and types of a
config. The checks here look at what the config points to: the output
folder, the resolved LoT config (which may come from a file or the Hub), the
optimizer, the model's config and the tokenizer. `check_run_inputs` runs them
all before any task data is loaded or any file is written, and
`check_classification_head` runs once the number of labels is known, before
the model's weights are loaded. Every check raises `ConfigError` with a
message that names the value and the fix.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from .tasks import BUILTIN_MLP, ConfigError, ExperimentConfig

__all__ = [
    "check_classification_head",
    "check_lot_config",
    "check_model_source",
    "check_optimizer",
    "check_output_dir",
    "check_run_inputs",
    "check_tokenizer",
]

TINY_BERT = "tiny-bert"
# The tiny-bert model of the continual script takes the MiniLM tokenizer unless model.tokenizer is set.
TINY_BERT_TOKENIZER = "minilm"


def check_output_dir(output_dir: str) -> None:
    """Check that `output_dir` is a folder, or can be created, and that this process can write to it."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"run.output_dir={output_dir!r}: exists and is not a folder. Set run.output_dir to a folder path.")

    # The nearest existing ancestor decides whether makedirs can create the missing part.
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(
            f"run.output_dir={output_dir!r}: cannot be created because {existing} is a file. "
            "Set run.output_dir to a path under a folder."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"run.output_dir={output_dir!r}: {existing} is not writable by this user. "
            "Set run.output_dir to a writable folder."
        )


def check_lot_config(arguments: Any) -> Any:
    """Resolve the LoT config of `arguments` (preset, saved config, ``lot_*`` options). Return the `LoTConfig`.

    A saved config named by ``lot.config`` is read here, from a folder, a
    file or the Hub, so a missing or invalid one fails before training.
    """
    source = getattr(arguments, "lot_config", None)
    try:
        return arguments.to_lot_config()
    except OSError as error:
        raise ConfigError(
            f"lot.config={source!r}: the saved LoT config could not be loaded ({error}). Set lot.config to a folder "
            "that contains lot_config.json, the JSON file itself or a Hub repository id, or remove it."
        ) from error
    except ValueError as error:
        origin = "" if source is None else f" (options read from lot.config={source!r})"
        raise ConfigError(f"{error} Fix the option in the lot section{origin}.") from error


def _check_noise_source(lot_config: Any, arguments: Any) -> None:
    """Reject a run whose threshold can never see gradient noise, because every bound but 'volatility' needs it."""
    if lot_config.bound == "volatility":
        return
    accumulation = int(arguments.gradient_accumulation_steps)
    if accumulation >= 2 or int(arguments.world_size) >= 2:
        return
    if lot_config.noise_fallback == "none":
        raise ConfigError(
            f"lot.noise_fallback='none' with training.gradient_accumulation_steps={accumulation} on one process: "
            f"no gradient noise is ever measured, so bound={lot_config.bound!r} is never computed. Set "
            "training.gradient_accumulation_steps to 2 or more, or lot.noise_fallback: split."
        )
    if int(arguments.per_device_train_batch_size) < 2:
        raise ConfigError(
            f"training.per_device_train_batch_size={arguments.per_device_train_batch_size} with "
            f"gradient_accumulation_steps={accumulation} on one process: a micro-batch of one example cannot be split "
            "into two halves, so no gradient noise is ever measured. Set per_device_train_batch_size to 2 or more, "
            "or gradient_accumulation_steps to 2 or more."
        )


def _check_interval(config: ExperimentConfig, lot_config: Any) -> None:
    """Reject an interval longer than the whole run, when every task's length is known in steps."""
    # A task without its own length takes max_steps from the training section, if that sets one.
    configured = config.training.get("max_steps")
    default_steps = configured if isinstance(configured, int) and configured > 0 else None
    lengths = []
    for spec in config.tasks:
        if spec.max_steps is not None:
            lengths.append(spec.max_steps)
        elif spec.num_train_epochs is None and default_steps is not None:
            lengths.append(default_steps)
        else:
            # Epoch-based tasks have a length that depends on the data, which is not loaded yet.
            return
    # A controller that carries over counts steps across tasks, but a fresh one per task starts at 0.
    steps = max(lengths) if config.run["reset_lot_state"] else sum(lengths)
    if lot_config.interval > steps:
        scope = "the longest task" if config.run["reset_lot_state"] else "the whole run"
        raise ConfigError(
            f"lot.interval={lot_config.interval}: {scope} has only {steps} optimizer steps, so the controller never "
            f"measures or acts. Set lot.interval to at most {steps}, or train longer."
        )


def check_learning_rate(arguments: Any) -> None:
    """Check that ``training.learning_rate`` is a finite positive number (an empty value reads as None)."""
    value = arguments.learning_rate
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(
            f"training.learning_rate={value!r}: expected a finite positive number. Set it, for example "
            "training.learning_rate=1e-4, or remove it to use the default."
        )


def check_sharded_engine(config: ExperimentConfig) -> None:
    """Reject FSDP and DeepSpeed settings that would only fail once training starts.

    The threshold supports neither engine (`LoTTrainer` raises for both).
    Without it, DeepSpeed needs its package, whose absence `TrainingArguments`
    reports with a bare traceback. Runs on the config alone, before the
    training arguments are built.
    """
    import importlib.util

    fsdp = config.training.get("fsdp")
    deepspeed = config.training.get("deepspeed")
    alternative = "Train with DDP (accelerate launch --multi_gpu) or one process"
    if config.run["threshold"]:
        if fsdp:
            raise ConfigError(
                f"training.fsdp={fsdp!r}: the LoT threshold does not support FSDP, because its noise statistics "
                f"read every micro-batch's full per-layer gradient. {alternative}, or set run.threshold: false."
            )
        if deepspeed:
            raise ConfigError(
                f"training.deepspeed={deepspeed!r}: the LoT threshold does not support DeepSpeed, because ZeRO "
                f"partitions Adam's second moment across ranks. {alternative}, or set run.threshold: false."
            )
    elif deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"training.deepspeed={deepspeed!r}: the deepspeed package is not installed. Install it "
            "(pip install deepspeed), or remove training.deepspeed."
        )


def check_fsdp_processes(config: ExperimentConfig, arguments: Any) -> None:
    """Reject FSDP on a single process, which `Trainer` only reports after the results folder is written."""
    fsdp = config.training.get("fsdp")
    if fsdp and getattr(arguments, "fsdp", None) and arguments.world_size < 2:
        raise ConfigError(
            f"training.fsdp={fsdp!r}: FSDP needs several processes, and this run has one. Launch with "
            "accelerate launch --num_processes N (N of at least 2), or remove training.fsdp."
        )


def check_optimizer(arguments: Any) -> None:
    """Check that ``training.optim`` builds an optimizer with Adam moments, as the LoT threshold needs.

    The optimizer is built once on a one-element probe parameter, so the
    check reads the same parameter group options as the real optimizer.
    """
    from transformers import Trainer

    from .controller import _require_adam_state

    name = getattr(arguments.optim, "value", arguments.optim)
    fix = "Set training.optim to an Adam-family optimizer such as adamw_torch, or run.threshold: false."
    try:
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(arguments)
    except (ValueError, ImportError, TypeError) as error:
        raise ConfigError(f"training.optim={name!r}: {error} {fix}") from error
    builds_own_groups = sorted({"params", "model", "optimizer_dict"} & set(optimizer_kwargs))
    if builds_own_groups:
        raise ConfigError(
            f"training.optim={name!r}: builds its own parameter groups ({', '.join(builds_own_groups)}), which "
            f"per-layer learning rates cannot use. {fix}"
        )

    probe = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = optimizer_class([{"params": [probe], "lr": arguments.learning_rate}], **optimizer_kwargs)
    except (ValueError, TypeError, RuntimeError, ImportError) as error:
        raise ConfigError(f"training.optim={name!r}: the optimizer could not be built ({error}). {fix}") from error
    try:
        _require_adam_state(optimizer)
    except ValueError as error:
        raise ConfigError(
            f"training.optim={name!r}: {type(optimizer).__name__} keeps no Adam moments, and the LoT threshold "
            f"reads Adam's second moment. {fix}"
        ) from error


def _is_local_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith(("./", "../", "~")) or os.path.exists(name)


def _load_model_config(name: str, path: str) -> Any:
    from transformers import AutoConfig

    if _is_local_path(path) and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(
            f"model.name_or_path={name!r}: folder {path} not found. Set model.name_or_path to a folder that contains "
            "config.json, a Hub model id, 'minilm' or 'tiny-bert'."
        )
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model.name_or_path={name!r}: the model config could not be loaded ({error}). Set model.name_or_path to "
            "a folder that contains config.json, a Hub model id available offline or in the cache, 'minilm' or "
            "'tiny-bert'."
        ) from error


def check_model_source(model_config: dict[str, Any], resolve_path: Callable[[str], str]) -> Any:
    """Check that the model exists, has a sequence classification head and fits ``max_length``.

    `resolve_path` maps special names such as ``minilm`` to a folder. Return
    the model's `transformers` config, or None for ``tiny-bert``, which the
    script builds from scratch.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    attention = model_config.get("attn_implementation")
    if attention is not None:
        valid = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        if attention not in valid:
            raise ConfigError(
                f"model.attn_implementation={attention!r}: unknown attention implementation. Set it to one of "
                f"{', '.join(valid)}, or remove it."
            )

    name = model_config["name_or_path"]
    if name == TINY_BERT:
        return None
    path = resolve_path(name)
    config = _load_model_config(name, path)

    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ConfigError(
            f"model.name_or_path={name!r}: model type {config.model_type!r} has no sequence classification head in "
            "transformers (AutoModelForSequenceClassification does not support it). Use a text model such as BERT, "
            "RoBERTa or MiniLM."
        )

    max_positions = getattr(config, "max_position_embeddings", None)
    max_length = model_config["max_length"]
    if isinstance(max_positions, int) and max_positions > 0 and max_length > max_positions:
        raise ConfigError(
            f"model.max_length={max_length}: the model has only {max_positions} position embeddings. Set "
            f"model.max_length to at most {max_positions}."
        )
    return config


def check_classification_head(model_config: dict[str, Any], num_labels: int, resolve_path: Callable[[str], str]) -> None:
    """Check that a checkpoint's trained classification head, if it has one, has `num_labels` outputs.

    A checkpoint saved from a sequence classifier keeps its head, and loading
    it with another number of outputs fails in `from_pretrained`. A base
    checkpoint without a head gets a new one of any size.
    """
    name = model_config["name_or_path"]
    # Both models are built from scratch with num_labels outputs, so there is no saved head to match.
    if name in (TINY_BERT, BUILTIN_MLP):
        return
    config = _load_model_config(name, resolve_path(name))
    architectures = getattr(config, "architectures", None) or []
    if not any(architecture.endswith("ForSequenceClassification") for architecture in architectures):
        return
    head = int(config.num_labels)
    if head == num_labels:
        return
    if head > num_labels:
        fix = f"Set model.num_labels: {head} to keep the checkpoint's head."
    else:
        fix = (
            f"The tasks need {num_labels} outputs, so start from a checkpoint without this head (the base model), "
            f"or use tasks with at most {head} classes."
        )
    raise ConfigError(
        f"model.name_or_path={name!r}: the checkpoint's classification head ({', '.join(architectures)}) has {head} "
        f"outputs, but the run needs num_labels={num_labels}. {fix}"
    )


def check_tokenizer(model_config: dict[str, Any], resolve_path: Callable[[str], str]) -> None:
    """Check that the tokenizer loads and has a pad token, which batch padding needs."""
    from transformers import AutoTokenizer

    name = model_config["name_or_path"]
    # As in the script, an explicit model.tokenizer is used as written, and only the defaults are resolved.
    if model_config.get("tokenizer"):
        source = path = model_config["tokenizer"]
        where = "model.tokenizer"
    else:
        source = TINY_BERT_TOKENIZER if name == TINY_BERT else name
        path = resolve_path(source)
        where = "model.name_or_path"
    if _is_local_path(path) and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"{where}={source!r}: folder {path} not found. Set {where} to a folder with tokenizer files.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{where}={source!r}: the tokenizer could not be loaded ({error}). Set model.tokenizer to a folder with "
            "tokenizer files or a Hub id available offline."
        ) from error
    if tokenizer.pad_token is None:
        eos = tokenizer.eos_token
        suggestion = (
            f"Save a copy with a pad token (for example tokenizer.pad_token = tokenizer.eos_token, which is {eos!r}, "
            "then tokenizer.save_pretrained(folder)) and set model.tokenizer to that folder."
            if eos is not None
            else "Save a copy with a pad token (tokenizer.pad_token = ..., then tokenizer.save_pretrained(folder)) "
            "and set model.tokenizer to that folder."
        )
        raise ConfigError(
            f"{where}={source!r}: the tokenizer ({type(tokenizer).__name__}) has no pad token, which batches of "
            f"texts of different lengths need. {suggestion}"
        )


def check_run_inputs(config: ExperimentConfig, task_arguments: list[Any], resolve_path: Callable[[str], str]) -> None:
    """Run every input check that needs neither the task data nor the model weights.

    `task_arguments` are the training arguments of every task, already built,
    and `resolve_path` maps special model names to folders. Raise
    `ConfigError` at the first problem.
    """
    check_output_dir(config.run["output_dir"])
    first = task_arguments[0]
    check_learning_rate(first)
    check_fsdp_processes(config, first)
    if config.run["threshold"]:
        lot_config = check_lot_config(first)
        _check_noise_source(lot_config, first)
        _check_interval(config, lot_config)
        check_optimizer(first)
    if config.model["name_or_path"] == BUILTIN_MLP:
        # The image model is built from scratch in hf_lot and takes no tokenizer.
        return
    check_model_source(config.model, resolve_path)
    check_tokenizer(config.model, resolve_path)
