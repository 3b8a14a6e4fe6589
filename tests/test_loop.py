"""Tests of `LoTLoop` in a hand-written Accelerate loop with gradient accumulation.

The reference for the noise statistics is built from per-example gradients,
each from its own backward pass on a copy of the model taken before the
optimizer step. The per-layer variance is ``torch.var(correction=1)`` over
examples summed over coordinates, independent of `hf_lot.noise`.
"""

import copy
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from hf_lot import LoTConfig, LoTLoop

NUM_FEATURES = 5
NUM_CLASSES = 3
ACCUMULATION = 4
LEARNING_RATE = 1e-2


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def build_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(NUM_FEATURES, 8), nn.Tanh(), nn.Linear(8, NUM_CLASSES))


def make_examples(num_examples: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_examples, NUM_FEATURES, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (num_examples,), generator=generator)
    return inputs, labels


def per_example_gradients(model: nn.Module, inputs, labels, layers) -> list[torch.Tensor]:
    """Return, per layer, a ``(B, D)`` tensor of flattened per-example gradients.

    `model` is a copy, so layers are matched by parameter name, not identity.
    """
    rows = [[] for _ in layers]
    for example in range(len(labels)):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs[example : example + 1]), labels[example : example + 1])
        loss.backward()
        gradients = dict((n, p.grad.detach().double().flatten()) for n, p in model.named_parameters())
        for index, layer in enumerate(layers):
            rows[index].append(torch.cat([gradients[n] for n in layer.parameter_names]))
    return [torch.stack(layer_rows) for layer_rows in rows]


def run_loop(config: LoTConfig, inputs, labels, micro_batch_size: int, num_steps: int, with_reference: bool):
    """Train with LoTLoop and return the loop, a copy of the model before each step, and the scheduler."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    model = build_model()
    lot = LoTLoop(model, config=config)
    optimizer = torch.optim.AdamW(lot.param_groups(lr=LEARNING_RATE))
    scheduler = lot.scheduler(optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    lot.begin_task(num_steps=num_steps)

    snapshots = []
    examples_per_step = micro_batch_size * ACCUMULATION
    for step in range(num_steps):
        if with_reference:
            snapshots.append(copy.deepcopy(accelerator.unwrap_model(model)))
        for micro in range(ACCUMULATION):
            start = step * examples_per_step + micro * micro_batch_size
            batch_inputs = inputs[start : start + micro_batch_size]
            batch_labels = labels[start : start + micro_batch_size]
            with accelerator.accumulate(model):
                with lot.micro_batch(accelerator, num_items=len(batch_labels)):
                    loss = nn.functional.cross_entropy(model(batch_inputs), batch_labels)
                    accelerator.backward(loss)
                if accelerator.sync_gradients:
                    def loss_fn(module, x=batch_inputs, y=batch_labels):
                        return nn.functional.cross_entropy(module(x), y)

                    lot.end_step(accelerator, model, optimizer, loss_fn=loss_fn)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
    lot.close()
    return lot, snapshots, scheduler


NOISE_ONLY = dict(interval=1, curvature=False, bound="noise")


def test_loop_noise_equals_sample_variance():
    num_steps = 3
    inputs, labels = make_examples(ACCUMULATION * num_steps)
    lot, snapshots, _ = run_loop(LoTConfig(**NOISE_ONLY), inputs, labels, 1, num_steps, with_reference=True)
    history = lot.controller.history
    assert len(history) == num_steps

    for step, snapshot in enumerate(snapshots):
        start = step * ACCUMULATION
        stop = start + ACCUMULATION
        rows = per_example_gradients(snapshot, inputs[start:stop], labels[start:stop], lot.layers)
        record = history[step]
        assert record["batch_size"] == ACCUMULATION
        for layer, layer_rows in zip(lot.layers, rows):
            expected_variance = float(layer_rows.var(dim=0, correction=1).sum())
            expected_squared_norm = float(layer_rows.mean(dim=0).pow(2).sum())
            measured = record["layers"][layer.name]
            assert measured["variance"] == pytest.approx(expected_variance, rel=1e-4), (step, layer.name)
            assert measured["grad_sq"] == pytest.approx(expected_squared_norm, rel=1e-4), (step, layer.name)


def test_loop_noise_with_micro_batches_of_two():
    micro_batch_size = 2
    num_steps = 2
    inputs, labels = make_examples(ACCUMULATION * micro_batch_size * num_steps)
    config = LoTConfig(**NOISE_ONLY)
    lot, snapshots, _ = run_loop(config, inputs, labels, micro_batch_size, num_steps, with_reference=True)
    history = lot.controller.history
    examples_per_step = ACCUMULATION * micro_batch_size

    for step, snapshot in enumerate(snapshots):
        start = step * examples_per_step
        stop = start + examples_per_step
        rows = per_example_gradients(snapshot, inputs[start:stop], labels[start:stop], lot.layers)
        assert history[step]["batch_size"] == examples_per_step
        for layer, layer_rows in zip(lot.layers, rows):
            # Two-batch-size estimator, written out: b n / (n - 1) (mean_j |g_j|^2 - |G|^2).
            micro_means = layer_rows.reshape(ACCUMULATION, micro_batch_size, -1).mean(dim=1)
            mean_micro_norm = float(micro_means.pow(2).sum(dim=1).mean())
            combined_norm = float(layer_rows.mean(dim=0).pow(2).sum())
            expected = micro_batch_size * ACCUMULATION / (ACCUMULATION - 1) * (mean_micro_norm - combined_norm)
            measured = history[step]["layers"][layer.name]["variance"]
            assert measured == pytest.approx(expected, rel=1e-4, abs=1e-7), (step, layer.name)


def test_loop_records_every_interval():
    interval = 3
    num_steps = 9
    inputs, labels = make_examples(ACCUMULATION * 2 * num_steps)
    config = LoTConfig(interval=interval, window=3, hvp_cold_iterations=10, hvp_iterations=5)
    lot, _, scheduler = run_loop(config, inputs, labels, 2, num_steps, with_reference=False)
    history = lot.controller.history

    assert [record["step"] for record in history] == [2, 5, 8]
    assert lot.controller.total_steps == num_steps
    assert scheduler.scheduler.last_epoch == num_steps
    for record in history:
        for name, layer in record["layers"].items():
            assert not math.isnan(layer["sharpness"]), name


def test_end_step_needs_loss_fn():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=1)
    model = build_model()
    lot = LoTLoop(model, config=LoTConfig(interval=1))
    optimizer = torch.optim.AdamW(lot.param_groups(lr=LEARNING_RATE))
    model, optimizer = accelerator.prepare(model, optimizer)
    lot.begin_task(num_steps=1)
    inputs, labels = make_examples(4)

    with lot.micro_batch(accelerator, num_items=len(labels)):
        accelerator.backward(nn.functional.cross_entropy(model(inputs), labels))
    with pytest.raises(ValueError, match="loss_fn"):
        lot.end_step(accelerator, model, optimizer)
    lot.close()
