"""Tests of `LoTTrainer` on a tiny MLP and a tiny BERT, on the CPU.

Reference values come from a plain `transformers.Trainer` run on the same data
and initial weights, or from gradients computed here by hand.
"""

import copy
import glob
import math

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_lot import LoTTrainer, LoTTrainingArguments, unwrap_optimizer
from hf_lot.trainer import loss_depends_on_item_count

LEARNING_RATE = 1e-2
NUM_FEATURES = 6
NUM_CLASSES = 3
BATCH_SIZE = 8
PARAMETER_ATOL = 1e-6


class TinyClassifier(nn.Module):
    """Two linear layers, no dropout, so two runs over the same batches are deterministic."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(NUM_FEATURES, 16)
        self.output = nn.Linear(16, NUM_CLASSES)

    def forward(self, x, labels=None):
        logits = self.output(torch.tanh(self.hidden(x)))
        loss = nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def build_classifier(seed: int = 0) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier()


def build_dataset(num_examples: int = 64, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_examples, NUM_FEATURES, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (num_examples,), generator=generator)
    return Dataset.from_dict({"x": features.tolist(), "labels": labels.tolist()})


BERT_VOCAB = 40
BERT_LENGTH = 8
BERT_BATCH = 4


def build_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=BERT_VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=BERT_LENGTH,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def build_token_dataset(num_examples: int = 32, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, BERT_VOCAB, (num_examples, BERT_LENGTH), generator=generator)
    labels = torch.randint(0, 2, (num_examples,), generator=generator)
    return Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "attention_mask": torch.ones_like(input_ids).tolist(),
            "labels": labels.tolist(),
        }
    )


LM_VOCAB = 30
LM_LENGTH = 8


def build_causal_lm(seed: int = 0) -> LlamaForCausalLM:
    """Build a tiny Llama, whose loss is a sum over shifted tokens divided by num_items_in_batch."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=LM_VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LM_LENGTH,
    )
    return LlamaForCausalLM(config)


def build_lm_dataset(num_examples: int = 16, seed: int = 0) -> Dataset:
    """Build token sequences whose last 0-5 label positions are -100, so examples differ in token count."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, LM_VOCAB, (num_examples, LM_LENGTH), generator=generator)
    labels = input_ids.clone()
    ignored = torch.randint(0, 6, (num_examples,), generator=generator)
    for row, count in enumerate(ignored.tolist()):
        labels[row, LM_LENGTH - count :] = -100
    return Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "attention_mask": torch.ones_like(input_ids).tolist(),
            "labels": labels.tolist(),
        }
    )


def count_items(batch: dict) -> int:
    """Count the examples, or for a causal LM (2-D labels) the predicted tokens.

    Predicted tokens are the labels after the first position that are not -100.
    """
    labels = batch["labels"]
    if labels.ndim == 2:
        return int(labels[:, 1:].ne(-100).sum())
    return len(labels)


def common_args(output_dir, **overrides) -> dict:
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        train_sampling_strategy="sequential",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return values


def lot_args(output_dir, **overrides) -> LoTTrainingArguments:
    values = dict(lot_window=3, lot_hvp_cold_iterations=10, lot_hvp_iterations=5)
    values.update(overrides)
    return LoTTrainingArguments(**common_args(output_dir, **values))


# Settings under which a layer cools whenever its bound is finite, because gamma = 1e-6 puts
# gamma times the bound far below alpha.
COOLING = dict(lot_interval=2, lot_gamma=1e-6, lot_alpha_min=0.0, lot_warm_phase="never")


def layer_learning_rates(trainer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in unwrap_optimizer(trainer.optimizer).param_groups}


def action_product(history, layer: str, cool: float, warm: float) -> float:
    """Return the product of the cool and warm factors that the history records for one layer."""
    factor = 1.0
    for record in history:
        action = record["layers"][layer]["action"]
        factor *= {"cool": cool, "warm": warm, "keep": 1.0}[action]
    return factor


class GradientRecorder(TrainerCallback):
    """Copy every parameter's gradient right before each optimizer step."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})


# -- optimizer groups and logging ------------------------------------------------


def test_trainer_groups_per_layer(tmp_path):
    trainer = LoTTrainer(
        model=build_classifier(), args=lot_args(tmp_path, max_steps=2, **COOLING), train_dataset=build_dataset()
    )
    trainer.train()
    names = [group["name"] for group in unwrap_optimizer(trainer.optimizer).param_groups]
    assert names == ["hidden", "hidden.no_decay", "output", "output.no_decay"]
    decays = {group["name"]: group["weight_decay"] for group in unwrap_optimizer(trainer.optimizer).param_groups}
    assert decays["hidden"] == 0.01
    assert decays["hidden.no_decay"] == 0.0


def test_trainer_logs_lot_metrics(tmp_path):
    trainer = LoTTrainer(
        model=build_classifier(), args=lot_args(tmp_path, max_steps=4, **COOLING), train_dataset=build_dataset()
    )
    trainer.train()
    keys = {key for entry in trainer.state.log_history for key in entry}
    assert "lot/lr/hidden" in keys
    assert "lot/lr/output" in keys
    assert "lot/alpha/hidden" in keys
    assert "lot/variance/output" in keys
    assert "lot/rho" in keys
    lot_entries = [entry for entry in trainer.state.log_history if "lot/lr/hidden" in entry]
    assert len(lot_entries) == 2


def test_trainer_cools_layers(tmp_path):
    trainer = LoTTrainer(
        model=build_classifier(), args=lot_args(tmp_path, max_steps=6, **COOLING), train_dataset=build_dataset()
    )
    trainer.train()
    controller = trainer.lot_controller
    config = trainer.lot_config
    assert len(controller.history) == 3

    # Each recorded action follows from the recorded alpha and bound (warming is off).
    for record in controller.history:
        for layer, values in record["layers"].items():
            cools = values["alpha"] > config.gamma * values["alpha_combined"] and values["alpha"] > config.alpha_min
            assert values["action"] == ("cool" if cools else "keep"), (record["step"], layer)

    rates = layer_learning_rates(trainer)
    for index, layer in enumerate(controller.layer_names):
        expected_factor = action_product(controller.history, layer, config.cool_factor, config.warm_factor)
        assert controller.factors[index] == pytest.approx(expected_factor, rel=1e-12), layer
        # The constant base schedule times the factor, for both groups of the layer.
        assert rates[layer] == pytest.approx(LEARNING_RATE * expected_factor, rel=1e-12), layer
        assert rates[f"{layer}.no_decay"] == pytest.approx(LEARNING_RATE * expected_factor, rel=1e-12), layer
    assert any(factor < 1.0 for factor in controller.factors)


@pytest.mark.parametrize("measure_only", [{"lot_preset": "monitor"}, {"lot_control": False}], ids=["preset", "option"])
def test_monitor_keeps_lr(tmp_path, measure_only):
    args = lot_args(tmp_path, max_steps=6, lot_interval=2, lot_gamma=1e-6, lot_alpha_min=0.0, **measure_only)
    trainer = LoTTrainer(model=build_classifier(), args=args, train_dataset=build_dataset())
    trainer.train()
    controller = trainer.lot_controller
    assert len(controller.history) == 3
    # The history still records what the controller would have done.
    actions = {layer["action"] for record in controller.history for layer in record["layers"].values()}
    assert "cool" in actions
    assert controller.factors == [1.0, 1.0]
    for name, rate in layer_learning_rates(trainer).items():
        assert rate == LEARNING_RATE, name


def test_sgd_rejected_before_training(tmp_path):
    model = build_classifier()
    initial = copy.deepcopy(model.state_dict())
    trainer = LoTTrainer(model=model, args=lot_args(tmp_path, max_steps=2, optim="sgd"), train_dataset=build_dataset())
    with pytest.raises(ValueError, match="Adam"):
        trainer.train()
    assert trainer.state.global_step == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, initial[name]), name


# -- two tasks -------------------------------------------------------------------


def test_two_tasks_continue_state(tmp_path):
    model = build_classifier()
    first = LoTTrainer(
        model=model, args=lot_args(tmp_path / "task0", max_steps=4, **COOLING), train_dataset=build_dataset(seed=0)
    )
    first.train()
    controller = first.lot_controller
    optimizer = unwrap_optimizer(first.optimizer)
    assert controller.task_index == 0
    steps_after_first = [int(state["step"]) for state in optimizer.state.values()]
    history_after_first = len(controller.history)
    factors_after_first = list(controller.factors)

    second = LoTTrainer(
        model=model,
        args=lot_args(tmp_path / "task1", max_steps=4, **COOLING),
        train_dataset=build_dataset(seed=1),
        optimizers=(optimizer, None),
        lot_controller=controller,
    )
    second.train()

    assert second.lot_controller is controller
    assert unwrap_optimizer(second.optimizer) is optimizer
    assert controller.task_index == 1
    assert controller.total_steps == 8
    assert steps_after_first == [4] * len(steps_after_first)
    assert [int(state["step"]) for state in optimizer.state.values()] == [8] * len(steps_after_first)

    steps = [record["step"] for record in controller.history]
    assert len(steps) == history_after_first + 2
    assert steps == sorted(steps)
    assert len(set(steps)) == len(steps)
    assert [record["task"] for record in controller.history] == [0, 0, 1, 1]
    assert controller.task_summary(0)["measurements"] == 2
    assert controller.task_summary(1)["measurements"] == 2

    # Factors continue from task 0 instead of restarting at 1.
    config = second.lot_config
    for index, layer in enumerate(controller.layer_names):
        later = action_product(controller.history[history_after_first:], layer, config.cool_factor, config.warm_factor)
        assert controller.factors[index] == pytest.approx(factors_after_first[index] * later, rel=1e-12), layer
        expected_rate = LEARNING_RATE * controller.factors[index]
        assert layer_learning_rates(second)[layer] == pytest.approx(expected_rate, rel=1e-12), layer


# -- equivalence with a plain Trainer -------------------------------------------


def train_and_record(trainer_class, args, model, dataset):
    """Train `model` and return (gradients before each step, final parameters, trainer)."""
    recorder = GradientRecorder()
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, callbacks=[recorder])
    trainer.train()
    parameters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return recorder.steps, parameters, trainer


def assert_same_training(
    tmp_path, build_model, dataset, batch_size, accumulation, num_steps=3, step_examples=None, **lot_overrides
):
    """Train with a plain Trainer and with LoTTrainer, and compare gradients and parameters step by step.

    `step_examples` lists the items (examples or tokens) behind each optimizer step, when
    they are not ``batch_size * accumulation`` examples.
    """
    # No clipping, so a wrongly scaled gradient cannot be hidden by the rescaling of clip_grad_norm_.
    shared = dict(
        max_steps=num_steps, gradient_accumulation_steps=accumulation, per_device_train_batch_size=batch_size,
        max_grad_norm=0.0,
    )  # fmt: skip
    plain_args = TrainingArguments(**common_args(tmp_path / "plain", **shared))
    plain_gradients, plain_parameters, _ = train_and_record(Trainer, plain_args, build_model(), dataset)

    # Monitor preset: statistics (and, unless switched off, sharpness) every step, learning rates untouched.
    args = lot_args(tmp_path / "lot", lot_preset="monitor", lot_interval=1, **shared, **lot_overrides)
    gradients, parameters, trainer = train_and_record(LoTTrainer, args, build_model(), dataset)

    assert len(gradients) == len(plain_gradients) == num_steps
    for step, (expected, measured) in enumerate(zip(plain_gradients, gradients)):
        for name in expected:
            assert torch.allclose(measured[name], expected[name], rtol=0, atol=PARAMETER_ATOL), (step, name)
    for name in plain_parameters:
        assert torch.allclose(parameters[name], plain_parameters[name], rtol=0, atol=PARAMETER_ATOL), name

    # Noise was measured on every step: by splitting (one micro-batch) or by accumulation.
    history = trainer.lot_controller.history
    assert len(history) == num_steps
    step_examples = step_examples or [batch_size * accumulation] * num_steps
    for record, examples in zip(history, step_examples):
        assert record["batch_size"] == examples, record["step"]
        for name, layer in record["layers"].items():
            assert math.isfinite(layer["variance"]), (record["step"], name)


@pytest.mark.parametrize(
    ("batch_size", "accumulation"), [(BATCH_SIZE, 1), (7, 1), (BATCH_SIZE, 2)], ids=["split", "split-odd", "accumulate"]
)
def test_matches_plain_trainer(tmp_path, batch_size, accumulation):
    assert_same_training(tmp_path, build_classifier, build_dataset(), batch_size, accumulation)


@pytest.mark.parametrize("accumulation", [1, 2], ids=["split", "accumulate"])
def test_bert_matches_plain_trainer(tmp_path, accumulation):
    assert_same_training(
        tmp_path, build_bert, build_token_dataset(), BERT_BATCH, accumulation, num_steps=2, lot_curvature=False,
        lot_beta=0.0,
    )  # fmt: skip


@pytest.mark.parametrize("accumulation", [1, 2], ids=["split", "accumulate"])
def test_causal_lm_matches_plain_trainer(tmp_path, accumulation):
    dataset = build_lm_dataset()
    columns = {name: torch.tensor(dataset[name]) for name in dataset.column_names}
    step_size = 4 * accumulation
    step_tokens = [count_items({"labels": columns["labels"][start : start + step_size]}) for start in (0, step_size)]
    assert_same_training(
        tmp_path, build_causal_lm, dataset, 4, accumulation, num_steps=2, step_examples=step_tokens,
        lot_curvature=False, lot_beta=0.0,
    )  # fmt: skip


def test_uneven_epoch_matches_plain_trainer(tmp_path):
    # 20 examples in micro-batches of 4 with 2 accumulation steps: each epoch ends with a lone
    # micro-batch, which LoTTrainer splits in two.
    dataset = build_dataset(num_examples=20)
    assert_same_training(tmp_path, build_classifier, dataset, 4, 2, num_steps=6, step_examples=[8, 8, 4, 8, 8, 4])


# -- exact noise statistics --------------------------------------------------------


class ParameterSnapshots(TrainerCallback):
    """Copy the model before every optimizer step: at train begin and after each step."""

    def __init__(self):
        self.models = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.models.append(copy.deepcopy(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.models.append(copy.deepcopy(model))


def expected_noise(model, micro_batches, weights, layers) -> dict[str, tuple[float, float]]:
    """Return per layer ``(sigma2_hat, |G|^2)`` from the mean gradients of the given micro-batches.

    ``sigma2_hat = (sum_j a_j |g_j|^2 - |G|^2) / sum_j a_j (1 - a_j) / b_j`` with
    ``G = sum_j a_j g_j``, the unbiased estimator for micro-batches of ``b_j`` items.
    Each micro-batch is a dict of model inputs whose loss is the mean over its items.
    A weight of None stands for the micro-batch's share ``b_j / B`` of the step's items.
    """
    means = []
    for batch in micro_batches:
        model.zero_grad()
        model(**batch)["loss"].backward()
        means.append({name: p.grad.detach().double().clone() for name, p in model.named_parameters()})
    sizes = [count_items(batch) for batch in micro_batches]
    weights = [size / sum(sizes) if weight is None else weight for weight, size in zip(weights, sizes)]
    denominator = sum(a * (1 - a) / b for a, b in zip(weights, sizes))

    result = {}
    for layer in layers:
        micro_norms = [sum(float(g[n].pow(2).sum()) for n in layer.parameter_names) for g in means]
        combined = {n: sum(a * g[n] for a, g in zip(weights, means)) for n in layer.parameter_names}
        combined_norm = sum(float(value.pow(2).sum()) for value in combined.values())
        weighted = sum(a * norm for a, norm in zip(weights, micro_norms))
        result[layer.name] = ((weighted - combined_norm) / denominator, combined_norm)
    return result


def equal_windows(num_windows: int, micro_batch_size: int, accumulation: int, weight="mean") -> list:
    """Plan of `num_windows` optimizer steps over consecutive micro-batches.

    Each micro-batch gets weight ``1 / accumulation`` (``weight="mean"``) or None, its share of the items.
    """
    plan = []
    for window in range(num_windows):
        start = window * micro_batch_size * accumulation
        micro_plan = []
        for index in range(accumulation):
            first = start + index * micro_batch_size
            micro_plan.append(((first, first + micro_batch_size), 1 / accumulation if weight == "mean" else None))
        plan.append(micro_plan)
    return plan


# Per case: model, micro-batch size, accumulation steps, dataset size, and per optimizer step
# the example ranges of its micro-batches with their weights in the step gradient.
NOISE_CASES = {
    # A lone micro-batch of 7 runs as halves of 3 and 4 examples, each weighted by its share.
    "split-odd": ("mlp", 7, 1, 21, [[((0, 3), 3 / 7), ((3, 7), 4 / 7)], [((7, 10), 3 / 7), ((10, 14), 4 / 7)]]),
    # Five micro-batches per epoch: a window of three, then a window of two.
    "accumulate-uneven": (
        "mlp", 4, 3, 20,
        [[((0, 4), 1 / 3), ((4, 8), 1 / 3), ((8, 12), 1 / 3)], [((12, 16), 1 / 2), ((16, 20), 1 / 2)],
         [((0, 4), 1 / 3), ((4, 8), 1 / 3), ((8, 12), 1 / 3)]],
    ),
    # BERT accepts **kwargs but ignores num_items_in_batch, so Trainer leaves its mean loss undivided.
    "bert-accumulate": ("bert", BERT_BATCH, 2, 32, equal_windows(2, BERT_BATCH, 2)),
    "bert-split": ("bert", BERT_BATCH, 1, 32, [[((0, 2), 1 / 2), ((2, 4), 1 / 2)], [((4, 6), 1 / 2), ((6, 8), 1 / 2)]]),
    # A token-level loss divided by num_items_in_batch: each micro-batch weighs its share of the tokens.
    "lm-accumulate": ("lm", 4, 2, 16, equal_windows(2, 4, 2, weight="share")),
    "lm-split": ("lm", 4, 1, 16, equal_windows(2, 2, 2, weight="share")),
}  # fmt: skip

NOISE_MODELS = {
    "mlp": (build_classifier, build_dataset),
    "bert": (build_bert, build_token_dataset),
    "lm": (build_causal_lm, build_lm_dataset),
}


@pytest.mark.parametrize("case", sorted(NOISE_CASES))
def test_noise_matches_micro_batches(tmp_path, case):
    model_kind, batch_size, accumulation, num_examples, plan = NOISE_CASES[case]
    build_model, build_data = NOISE_MODELS[model_kind]
    dataset = build_data(num_examples=num_examples)
    columns = {name: torch.tensor(dataset[name]) for name in dataset.column_names}
    snapshots = ParameterSnapshots()
    args = lot_args(
        tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=len(plan), lot_preset="monitor", lot_interval=1, lot_curvature=False, lot_beta=0.0,
    )  # fmt: skip
    trainer = LoTTrainer(model=build_model(), args=args, train_dataset=dataset, callbacks=[snapshots])
    trainer.train()
    history = trainer.lot_controller.history
    assert len(history) == len(plan)

    for step, micro_plan in enumerate(plan):
        micro_batches = []
        for (start, stop), _ in micro_plan:
            micro_batches.append({name: value[start:stop] for name, value in columns.items()})
        weights = [weight for _, weight in micro_plan]
        expected = expected_noise(snapshots.models[step], micro_batches, weights, trainer.lot_controller.layers)
        assert history[step]["batch_size"] == sum(count_items(batch) for batch in micro_batches)
        for layer, (variance, squared_norm) in expected.items():
            measured = history[step]["layers"][layer]
            assert measured["grad_sq"] == pytest.approx(squared_norm, rel=1e-4), (step, layer)
            assert measured["variance"] == pytest.approx(variance, rel=1e-3, abs=1e-7), (step, layer)


# -- checkpoints -----------------------------------------------------------------


class ControllerSnapshot(TrainerCallback):
    """Record the controller state at train begin and at each checkpoint save."""

    def __init__(self):
        self.trainer = None
        self.at_begin = None
        self.at_save = {}

    def snapshot(self) -> dict:
        controller = self.trainer.lot_controller
        return {
            "factors": list(controller.factors),
            "history": len(controller.history),
            "total_steps": controller.total_steps,
            "task_index": controller.task_index,
        }

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_begin = self.snapshot()

    def on_save(self, args, state, control, **kwargs):
        self.at_save[state.global_step] = self.snapshot()


def run_checkpointed(output_dir, save_steps: int, resume_from=None):
    snapshot = ControllerSnapshot()
    args = lot_args(output_dir, max_steps=8, save_strategy="steps", save_steps=save_steps, **COOLING)
    trainer = LoTTrainer(model=build_classifier(), args=args, train_dataset=build_dataset(), callbacks=[snapshot])
    snapshot.trainer = trainer
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, snapshot


def assert_same_history(measured: list[dict], expected: list[dict]) -> None:
    """Compare two controller histories field by field: numbers to 1e-5, everything else exactly."""
    assert len(measured) == len(expected)
    for record, reference in zip(measured, expected):
        for key in ("step", "task", "warm_phase", "rho_event", "noise_event", "volatility_event"):
            assert record[key] == reference[key], (reference["step"], key)
        for layer, values in reference["layers"].items():
            for key, value in values.items():
                got = record["layers"][layer][key]
                if isinstance(value, float) and math.isnan(value):
                    assert math.isnan(got), (reference["step"], layer, key)
                elif isinstance(value, float):
                    assert got == pytest.approx(value, rel=1e-5, abs=1e-9), (reference["step"], layer, key)
                else:
                    assert got == value, (reference["step"], layer, key)


# Interval 2 measures after steps 2, 4, 6 and 8, so a save after step 3 falls inside an interval,
# with one step of noise statistics recorded but not yet used.
@pytest.mark.parametrize("save_steps", [4, 3], ids=["at-measurement", "mid-interval"])
def test_resume_restores_controller(tmp_path, save_steps):
    full, full_snapshot = run_checkpointed(tmp_path / "full", save_steps)
    checkpoint = tmp_path / "full" / f"checkpoint-{save_steps}"
    assert (checkpoint / "scheduler.pt").is_file()
    saved = torch.load(checkpoint / "scheduler.pt", weights_only=True)["controller"]

    resumed, resumed_snapshot = run_checkpointed(tmp_path / "resumed", save_steps, resume_from=str(checkpoint))

    at_checkpoint = full_snapshot.at_save[save_steps]
    restored = resumed_snapshot.at_begin
    assert saved["factors"] == at_checkpoint["factors"]
    assert restored["factors"] == at_checkpoint["factors"]
    assert restored["history"] == at_checkpoint["history"] == len(saved["history"]) == save_steps // 2
    assert restored["total_steps"] == at_checkpoint["total_steps"] == saved["total_steps"] == save_steps
    assert restored["task_index"] == 0
    assert any(factor < 1.0 for factor in restored["factors"])

    assert resumed.state.global_step == full.state.global_step == 8
    assert resumed.lot_controller.total_steps == 8
    assert resumed.lot_controller.task_index == 0
    assert_same_history(resumed.lot_controller.history, full.lot_controller.history)
    assert resumed.lot_controller.factors == pytest.approx(full.lot_controller.factors, rel=1e-12)
    assert layer_learning_rates(resumed) == pytest.approx(layer_learning_rates(full), rel=1e-12)
    full_parameters = dict(full.model.named_parameters())
    for name, parameter in resumed.model.named_parameters():
        assert torch.allclose(parameter, full_parameters[name], rtol=0, atol=PARAMETER_ATOL), name


# -- BERT with curvature ---------------------------------------------------------


def test_bert_trains_with_accumulation(tmp_path):
    model = build_bert()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = lot_args(
        tmp_path, per_device_train_batch_size=BERT_BATCH, gradient_accumulation_steps=2, max_steps=4,
        lot_hvp_cold_iterations=4, lot_hvp_iterations=2, **COOLING,
    )  # fmt: skip
    trainer = LoTTrainer(model=model, args=args, train_dataset=build_token_dataset())
    trainer.train()

    controller = trainer.lot_controller
    assert controller.layer_names == ["embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "head"]
    assert len(controller.history) == 2
    for record in controller.history:
        assert record["batch_size"] == 2 * BERT_BATCH
        for name, layer in record["layers"].items():
            assert math.isfinite(layer["variance"]), (record["step"], name)
            assert math.isfinite(layer["grad_sq"]), (record["step"], name)
            assert math.isfinite(layer["sharpness"]), (record["step"], name)
            assert not math.isnan(layer["alpha_combined"]), (record["step"], name)
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), initial[name])]
    assert changed


def test_effective_step_ignores_loss_scaling(tmp_path):
    """BERT accepts but ignores num_items_in_batch, so Trainer leaves its accumulated gradient 2x the mean.

    Adam's second moment is then 4x larger. The effective step and the normalized sharpness must
    still refer to the mean gradient, as in a run where Trainer divides the loss itself.
    """
    args = dict(
        per_device_train_batch_size=BERT_BATCH, gradient_accumulation_steps=2, max_steps=2, max_grad_norm=0.0,
        lot_preset="monitor", lot_interval=1, lot_hvp_cold_iterations=30, lot_hvp_iterations=30,
        # Adam's eps enters as eps / scale after the correction; a tiny eps keeps it below sqrt(v) in every layer.
        adam_epsilon=1e-14,
    )  # fmt: skip
    histories = {}
    for divides in (False, True):
        trainer = LoTTrainer(
            model=build_bert(), args=lot_args(tmp_path / str(divides), **args), train_dataset=build_token_dataset()
        )
        if divides:
            trainer.model_accepts_loss_kwargs = False
        trainer.train()
        histories[divides] = trainer.lot_controller.history

    assert len(histories[False]) == len(histories[True]) == 2
    # The first measurement comes before any Adam step, so only the second has effective steps.
    scaled, divided = histories[False][1], histories[True][1]
    for name, layer in divided["layers"].items():
        assert math.isfinite(layer["alpha"]), name
        assert scaled["layers"][name]["alpha"] == pytest.approx(layer["alpha"], rel=1e-3), name
        assert scaled["layers"][name]["alpha_noise"] == pytest.approx(layer["alpha_noise"], rel=1e-3), name
        assert scaled["layers"][name]["normalized_sharpness"] == pytest.approx(
            layer["normalized_sharpness"], rel=2e-2
        ), name


@pytest.mark.parametrize(
    ("build_model", "build_data", "expected"),
    [(build_bert, build_token_dataset, False), (build_causal_lm, build_lm_dataset, True)],
    ids=["bert-ignores", "llama-divides"],
)
def test_item_count_probe(build_model, build_data, expected):
    model = build_model()
    model.train()
    batch = {name: torch.tensor(values[:4]) for name, values in build_data()[:4].items()}

    normalizes = loss_depends_on_item_count(model, lambda count: model(**batch, num_items_in_batch=count).loss, 7)

    assert normalizes is expected
    assert model.training


def test_item_count_probe_rejected_kwarg():
    model = build_classifier()
    features = torch.randn(4, NUM_FEATURES)
    labels = torch.tensor([0, 1, 2, 0])

    normalizes = loss_depends_on_item_count(
        model, lambda count: model(features, labels=labels, num_items_in_batch=count)["loss"], 4
    )

    assert normalizes is False


# -- TensorBoard -----------------------------------------------------------------


def test_tensorboard_receives_layer_lr(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tensorboard"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(log_dir))
    args = lot_args(tmp_path / "out", max_steps=4, report_to="tensorboard", **COOLING)
    trainer = LoTTrainer(model=build_classifier(), args=args, train_dataset=build_dataset())
    trainer.train()

    event_files = glob.glob(str(log_dir / "**" / "events.out.tfevents*"), recursive=True)
    assert event_files
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    # transformers' TensorBoardCallback prefixes training logs with "train/".
    assert "train/lot/lr/hidden" in tags
    assert "train/lot/lr/output" in tags

    logged = [event.value for event in accumulator.Scalars("train/lot/lr/hidden")]
    recorded = [record["layers"]["hidden"]["lr"] for record in trainer.lot_controller.history]
    assert len(logged) == len(recorded) == 2
    assert logged == pytest.approx(recorded, rel=1e-6)


def test_recorded_lr_is_rate_after_action(tmp_path):
    # max_steps=4 with interval 2 ends on a measurement, so the last record's
    # rates are the ones the optimizer holds when training stops.
    args = lot_args(tmp_path / "out", max_steps=4, **COOLING)
    trainer = LoTTrainer(model=build_classifier(), args=args, train_dataset=build_dataset())
    trainer.train()

    last = trainer.lot_controller.history[-1]
    rates = layer_learning_rates(trainer)
    for layer in ("hidden", "output"):
        assert last["layers"][layer]["action"] == "cool"
        assert last["layers"][layer]["lr"] == pytest.approx(rates[layer], rel=1e-12)


def test_parser_rejects_invalid_lot_flag(tmp_path):
    parser = HfArgumentParser(LoTTrainingArguments)
    flags = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "true"]

    with pytest.raises(ValueError, match="interval=0"):
        parser.parse_args_into_dataclasses(flags + ["--lot_interval", "0"])
    with pytest.raises(ValueError, match="curvature"):
        parser.parse_args_into_dataclasses(flags + ["--lot_curvature", "false"])


def test_parser_accepts_lot_flags(tmp_path):
    parser = HfArgumentParser(LoTTrainingArguments)
    flags = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "true"]

    (args,) = parser.parse_args_into_dataclasses(flags + ["--lot_interval", "7", "--lot_hvp_solver", "lanczos"])

    config = args.to_lot_config()
    assert config.interval == 7
    assert config.hvp_solver == "lanczos"
