"""Numerical faults in `LoTTrainer`: NaN and infinite losses and gradients, loss scaling, bf16, bounded state.

A NaN is injected into one layer's gradient with a tensor hook on a chosen
optimizer step. With fp16=True on the CPU, Trainer (transformers 5.25,
accelerate 1.16) trains in fp32 without a loss scaler. So the tests attach a
`torch.amp.GradScaler` for the CPU to the trainer's accelerator before
training, and it scales the loss and skips steps as an fp16 scaler on a GPU
does.
"""

import copy
import logging
import math

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback

from hf_lot import LoTTrainer, LoTTrainingArguments, unwrap_optimizer

NUM_FEATURES = 6
NUM_CLASSES = 3
# Interval 2 measures on steps 2, 4 and 6. Gamma 1e-6 makes every measurement cool every layer,
# so a measurement that runs always changes the factors.
COOLING = dict(lot_interval=2, lot_gamma=1e-6, lot_alpha_min=0.0, lot_warm_phase="never")
FAULT_LOGGER = "hf_lot.trainer"

# The test's scaler wraps optimizer.step after the schedulers are built, which torch's LRScheduler
# reports with this warning. The order of the steps is unchanged.
pytestmark = pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden:UserWarning")


class TinyClassifier(nn.Module):
    """Two linear layers without dropout, which add `loss_offset` to the loss when it is set."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(NUM_FEATURES, 16)
        self.output = nn.Linear(16, NUM_CLASSES)
        self.loss_offset = None

    def forward(self, x, labels=None):
        logits = self.output(torch.tanh(self.hidden(x)))
        loss = nn.functional.cross_entropy(logits, labels)
        if self.loss_offset is not None:
            loss = loss + self.loss_offset
        return {"loss": loss, "logits": logits}


def build_model(seed: int = 0) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier()


def build_dataset(num_examples: int = 96, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_examples, NUM_FEATURES, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (num_examples,), generator=generator)
    return Dataset.from_dict({"x": features.tolist(), "labels": labels.tolist()})


def lot_args(output_dir, **overrides) -> LoTTrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        max_steps=6,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        train_sampling_strategy="sequential",
        use_cpu=True,
        disable_tqdm=True,
        lot_window=3,
        lot_hvp_cold_iterations=10,
        lot_hvp_iterations=5,
    )
    values.update(overrides)
    return LoTTrainingArguments(**values)


def controller_snapshot(controller) -> dict:
    return copy.deepcopy(controller.state_dict())


class FaultInjector(TrainerCallback):
    """Make one layer's gradient NaN, or add `loss_offset` to the loss, on the chosen 1-based steps.

    It also snapshots the controller and the parameters around every faulty step.
    """

    def __init__(self, steps, parameter=None, loss_offset=None):
        self.steps = set(steps)
        self.parameter = parameter
        self.loss_offset = loss_offset
        self.trainer = None
        self.active = False
        self.before = {}
        self.after = {}
        self.parameters_before = {}
        self.parameters_after = {}
        if parameter is not None:
            parameter.register_hook(self._poison)

    def _poison(self, grad):
        return grad * math.nan if self.active else None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        self.active = step in self.steps
        if self.active:
            model.loss_offset = self.loss_offset
            self.before[step] = controller_snapshot(self.trainer.lot_controller)
            self.parameters_before[step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step in self.steps:
            self.after[step] = controller_snapshot(self.trainer.lot_controller)
            self.parameters_after[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.active = False
        model.loss_offset = None


def train_with_faults(tmp_path, steps, poison_output=True, loss_offset=None, scaler=True, **overrides):
    model = build_model()
    injector = FaultInjector(steps, model.output.weight if poison_output else None, loss_offset)
    args = lot_args(tmp_path / "out", **{**COOLING, **overrides})
    trainer = LoTTrainer(model=model, args=args, train_dataset=build_dataset(), callbacks=[injector])
    injector.trainer = trainer
    if scaler:
        # Power-of-two scale, so scaling and unscaling are exact.
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.train()
    return trainer, injector


def layer_of(trainer, parameter_name):
    for layer in trainer.lot_controller.layers:
        if parameter_name in layer.parameter_names:
            return layer.name
    raise KeyError(parameter_name)


def fault_messages(caplog):
    return [record.getMessage() for record in caplog.records if record.name == FAULT_LOGGER and record.levelno >= logging.WARNING]


def assert_only_counts_changed(before, after):
    """Check that a skipped step moved nothing of the controller but its step and skip counts."""
    assert after["total_steps"] == before["total_steps"] + 1
    assert after["skipped_steps"] == before["skipped_steps"] + 1
    assert after["task_counts"][-1]["skipped"] == before["task_counts"][-1]["skipped"] + 1
    assert after["factors"] == before["factors"]
    assert after["sharpness_windows"] == before["sharpness_windows"]
    assert after["last_update_step"] == before["last_update_step"]
    assert len(after["history"]) == len(before["history"])
    assert after["history"] == before["history"]
    for key in ("squared_norm", "variance"):
        assert torch.equal(after["noise_sums"][key], before["noise_sums"][key]), key
    assert after["noise_sums"]["items"] == before["noise_sums"]["items"]
    assert after["noise_sums"]["steps"] == before["noise_sums"]["steps"]
    for saved_before, saved_after in zip(before["eigenvectors"], after["eigenvectors"]):
        assert (saved_before is None) == (saved_after is None)
        if saved_before is not None:
            assert all(torch.equal(a, b) for a, b in zip(saved_before, saved_after))
    counts_before = {k: v for k, v in before["task_counts"][-1].items() if k != "skipped"}
    counts_after = {k: v for k, v in after["task_counts"][-1].items() if k != "skipped"}
    assert counts_after == counts_before


# -- NaN and infinity ------------------------------------------------------------


def test_nan_gradient_in_one_layer_skipped(tmp_path, caplog, single_thread):
    caplog.set_level(logging.WARNING, logger=FAULT_LOGGER)
    # Step 4 is both a noise step and a measurement step (interval 2).
    trainer, injector = train_with_faults(tmp_path, steps=[4])
    controller = trainer.lot_controller

    assert_only_counts_changed(injector.before[4], injector.after[4])
    # The scaler skipped the optimizer step, so the parameters did not move either.
    for name, value in injector.parameters_before[4].items():
        assert torch.equal(injector.parameters_after[4][name], value), name

    # The measurement of step 4 was skipped, and those of steps 2 and 6 ran and cooled every layer.
    assert [record["step"] for record in controller.history] == [1, 5]
    assert all(final < at_fault for final, at_fault in zip(controller.factors, injector.after[4]["factors"]))
    assert controller.task_summary()["skipped_steps"] == 1
    assert controller.total_steps == 6

    messages = fault_messages(caplog)
    assert len(messages) == 1
    assert "Optimizer step 4 " in messages[0]
    assert f"gradient in layer(s) {layer_of(trainer, 'output.weight')}" in messages[0]
    assert layer_of(trainer, "hidden.weight") not in messages[0]


def test_repeated_faults_logged_once_and_counted(tmp_path, caplog, single_thread):
    caplog.set_level(logging.WARNING, logger=FAULT_LOGGER)
    trainer, injector = train_with_faults(tmp_path, steps=[2, 3, 5])

    for step in (2, 3, 5):
        assert_only_counts_changed(injector.before[step], injector.after[step])
    controller = trainer.lot_controller
    assert controller.task_summary()["skipped_steps"] == 3
    assert controller.skipped_steps == 3
    # Only the measurements of steps 4 and 6 ran.
    assert [record["step"] for record in controller.history] == [3, 5]
    logged = [entry["lot/skipped_steps"] for entry in trainer.state.log_history if "lot/skipped_steps" in entry]
    assert logged == [2.0, 3.0]

    messages = fault_messages(caplog)
    assert len(messages) == 2
    assert "Optimizer step 2 " in messages[0]
    assert "skipped 3 optimizer steps" in messages[1]
    assert "the first was step 2" in messages[1]


def test_infinite_loss_with_finite_gradient_skipped(tmp_path, caplog, single_thread):
    """A constant infinite term in the loss leaves the gradient finite, but the step must still be skipped."""
    caplog.set_level(logging.WARNING, logger=FAULT_LOGGER)
    trainer, injector = train_with_faults(
        tmp_path, steps=[4], poison_output=False, loss_offset=torch.tensor(math.inf), scaler=False
    )

    assert_only_counts_changed(injector.before[4], injector.after[4])
    # Without a scaler the finite gradient still updates the model, and only the statistics skip the step.
    moved = [
        name
        for name, value in injector.parameters_before[4].items()
        if not torch.equal(injector.parameters_after[4][name], value)
    ]
    assert moved != []
    messages = fault_messages(caplog)
    assert len(messages) == 1
    assert "has a NaN or infinite loss." in messages[0]


def test_skipped_counts_survive_state_dict(tmp_path, single_thread):
    trainer, _ = train_with_faults(tmp_path, steps=[3])
    controller = trainer.lot_controller
    restored = copy.deepcopy(controller)
    restored.skipped_steps = 0
    restored.task_counts = []

    restored.load_state_dict(controller.state_dict())

    assert restored.skipped_steps == 1
    assert restored.task_summary()["skipped_steps"] == 1


# -- loss scaling and bf16 -------------------------------------------------------


def history_values(trainer, key):
    return [[layer[key] for layer in record["layers"].values()] for record in trainer.lot_controller.history]


MONITOR = dict(lot_preset="monitor", lot_interval=1, max_steps=4)


def test_scaled_loss_statistics_match_unscaled(tmp_path, single_thread):
    plain, _ = train_with_faults(tmp_path / "plain", steps=[], scaler=False, **MONITOR)
    scaled, _ = train_with_faults(tmp_path / "scaled", steps=[], scaler=True, **MONITOR)

    assert scaled.accelerator.scaler.get_scale() == 2.0**10
    assert len(scaled.lot_controller.history) == 4
    for key in ("grad_sq", "variance", "sharpness", "alpha"):
        expected = history_values(plain, key)
        measured = history_values(scaled, key)
        for step, (row, expected_row) in enumerate(zip(measured, expected)):
            for value, reference in zip(row, expected_row):
                if math.isnan(reference):
                    assert math.isnan(value), (key, step)
                else:
                    assert value == pytest.approx(reference, rel=1e-6), (key, step)


def test_bf16_autocast_statistics_finite(tmp_path, single_thread):
    full, _ = train_with_faults(tmp_path / "fp32", steps=[], scaler=False, **MONITOR)
    half, _ = train_with_faults(tmp_path / "bf16", steps=[], scaler=False, bf16=True, **MONITOR)

    assert half.accelerator.mixed_precision == "bf16"
    assert len(half.lot_controller.history) == 4
    for key in ("grad_sq", "variance", "sharpness"):
        measured, expected = history_values(half, key), history_values(full, key)
        assert all(math.isfinite(value) for row in measured for value in row), key
        for row, expected_row in zip(measured, expected):
            # bf16 keeps 8 significant bits, so the statistics agree to a few percent, not exactly.
            assert row == pytest.approx(expected_row, rel=0.05), key
    # The comparison is not trivial: autocast changed the gradients.
    assert history_values(half, "grad_sq") != history_values(full, "grad_sq")
    assert all(math.isfinite(factor) for factor in half.lot_controller.factors)
    assert half.lot_controller.skipped_steps == 0


# -- bounded state over steps and tasks --------------------------------------------


class HookCounter(TrainerCallback):
    """Count the tensor hooks on the model's parameters and the optimizer's step hooks after every step."""

    def __init__(self):
        self.tensor_hooks = []
        self.optimizer_hooks = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.tensor_hooks.append(sum(len(p._backward_hooks or {}) for p in model.parameters()))
        self.optimizer_hooks.append(len(unwrap_optimizer(optimizer)._optimizer_step_post_hooks))


def test_state_stays_bounded_over_tasks(tmp_path, single_thread):
    """Hooks, windows and eigenvectors keep their size over tasks, and the history grows by one record per measurement."""
    model = build_model()
    num_parameters = len(list(model.parameters()))
    optimizer, controller = None, None
    counters = []
    window = 3
    for task in range(4):
        counter = HookCounter()
        args = lot_args(tmp_path / f"task{task}", lot_interval=1, lot_window=window, max_steps=5, lot_preset="monitor")
        trainer = LoTTrainer(
            model=model,
            args=args,
            train_dataset=build_dataset(seed=task),
            optimizers=(optimizer, None),
            lot_controller=controller,
            callbacks=[counter],
        )
        trainer.train()
        optimizer, controller = unwrap_optimizer(trainer.optimizer), trainer.lot_controller
        counters.append(counter)

        # After train() the noise hooks are gone, and the scheduler's optimizer hook is replaced, not added.
        assert sum(len(p._backward_hooks or {}) for p in model.parameters()) == 0
        assert len(optimizer._optimizer_step_post_hooks) == 1
        assert all(len(values) == window and values.maxlen == window for values in controller.sharpness_windows)
        assert len(controller.eigenvectors) == len(controller.layers)
        assert len(controller.task_counts) == task + 1
        assert len(controller.history) == 5 * (task + 1)

    # During training: one noise hook per parameter and one scheduler hook, the same in every task.
    assert {count for counter in counters for count in counter.tensor_hooks} == {num_parameters}
    assert {count for counter in counters for count in counter.optimizer_hooks} == {1}


# -- LoTLoop -----------------------------------------------------------------------


def test_loop_counts_nan_gradient_step(caplog, single_thread):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from hf_lot import LoTConfig, LoTLoop

    caplog.set_level(logging.WARNING, logger="hf_lot.loop")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = build_model()
        poison = {"active": False}
        model.output.weight.register_hook(lambda grad: grad * math.nan if poison["active"] else None)
        lot = LoTLoop(model, config=LoTConfig(interval=1, window=3, curvature=False, bound="noise"))
        optimizer = torch.optim.AdamW(lot.param_groups(lr=1e-2))
        scheduler = lot.scheduler(optimizer)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        lot.begin_task(num_steps=3)
        data = build_dataset(num_examples=24)
        features, labels = torch.tensor(data["x"]), torch.tensor(data["labels"])

        records = []
        for step in range(3):
            poison["active"] = step == 1
            for micro in range(2):
                rows = slice(step * 8 + micro * 4, step * 8 + micro * 4 + 4)
                with accelerator.accumulate(model):
                    with lot.micro_batch(accelerator, num_items=4):
                        accelerator.backward(model(features[rows], labels[rows])["loss"])
                    if accelerator.sync_gradients:
                        records.append(lot.end_step(accelerator, model, optimizer))
                    # Skip the update of the poisoned step, as an fp16 loss scaler would, so the model stays finite.
                    if not (poison["active"] and accelerator.sync_gradients):
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
        lot.close()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    controller = lot.controller
    assert records[1] is None
    assert [record["step"] for record in controller.history] == [0, 2]
    assert controller.skipped_steps == 1
    assert controller.task_summary()["skipped_steps"] == 1
    messages = [record.getMessage() for record in caplog.records if record.name == "hf_lot.loop"]
    assert len(messages) == 1
    assert "Optimizer step 2 " in messages[0]
