"""Tests of the micro-batch gradient-noise estimator against exact per-item gradients.

The exact reference is the unbiased sample variance ``1/(B-1) sum_i |x_i - mean|^2``
of per-item gradients, each from its own backward pass. It is computed per layer
with `torch.var(correction=1)` summed over coordinates, independently of
`hf_lot.noise.sample_variance`.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_lot.layers import group_parameters_by_layer
from hf_lot.noise import (
    MicroBatchNoiseCollector,
    layer_sums_of_squares,
    noise_bound,
    sample_variance,
    squared_norms_of_gradients,
    variance_from_micro_batches,
)

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH_SIZE = 16
NUM_CLASSES = 3
VOCAB_SIZE = 11
IGNORE_INDEX = -100

# Relative tolerance where the estimator is an algebraic identity or the hooks and
# the per-item gradients describe the same partition. Gradients are float32.
IDENTITY_RTOL = 1e-4

# Random partitions for the unbiasedness checks, and the accepted relative error of
# their mean. The tests assert that the standard error of the mean stays below a
# quarter of the tolerance, so the tolerance is at least four standard errors.
NUM_PARTITIONS = 6000
UNBIASED_RTOL = 0.05


# -- models and exact per-item gradients -------------------------------------


def build_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, NUM_CLASSES))


def make_examples(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(BATCH_SIZE, 5, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (BATCH_SIZE,), generator=generator)
    return inputs, labels


def build_token_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(VOCAB_SIZE, 6), nn.Linear(6, VOCAB_SIZE))


def make_token_micro_batch(valid_lengths: list[int], seq_len: int, generator: torch.Generator):
    """Return ``(input_ids, labels)`` for sequences whose labels past ``valid_lengths`` are ignored."""
    input_ids = torch.randint(0, VOCAB_SIZE, (len(valid_lengths), seq_len), generator=generator)
    labels = torch.randint(0, VOCAB_SIZE, (len(valid_lengths), seq_len), generator=generator)
    for row, length in enumerate(valid_lengths):
        labels[row, length:] = IGNORE_INDEX
    return input_ids, labels


def token_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids)
    return F.cross_entropy(
        logits.reshape(-1, VOCAB_SIZE), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def flat_layer_gradients(layers) -> list[torch.Tensor]:
    """Return the current ``.grad`` of each layer as one float64 vector."""
    return [torch.cat([p.grad.detach().reshape(-1).double() for p in layer.parameters]) for layer in layers]


def per_example_gradients(model, layers, inputs, labels) -> list[torch.Tensor]:
    """Return per layer a ``(B, D_l)`` matrix of per-example gradients, one backward pass per example."""
    rows = [[] for _ in layers]
    for index in range(len(inputs)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs[index : index + 1]), labels[index : index + 1]).backward()
        for layer_rows, gradient in zip(rows, flat_layer_gradients(layers)):
            layer_rows.append(gradient)
    model.zero_grad(set_to_none=True)
    return [torch.stack(layer_rows) for layer_rows in rows]


def per_token_gradients(model, layers, micro_batches) -> list[torch.Tensor]:
    """Return per layer a ``(N, D_l)`` matrix of per-token gradients, in micro-batch order.

    Each row is the gradient of one valid token's cross-entropy, from a forward
    pass of that token's whole micro-batch and its own backward pass.
    """
    rows = [[] for _ in layers]
    for input_ids, labels in micro_batches:
        for row, position in (labels != IGNORE_INDEX).nonzero().tolist():
            model.zero_grad(set_to_none=True)
            logits = model(input_ids)
            F.cross_entropy(logits[row, position][None], labels[row, position][None]).backward()
            for layer_rows, gradient in zip(rows, flat_layer_gradients(layers)):
                layer_rows.append(gradient)
    model.zero_grad(set_to_none=True)
    return [torch.stack(layer_rows) for layer_rows in rows]


def exact_variance(per_item: list[torch.Tensor]) -> torch.Tensor:
    """Return the unbiased per-item variance of each layer, summed over coordinates."""
    return torch.stack([gradients.var(dim=0, correction=1).sum() for gradients in per_item])


def estimate_for_partition(per_item, groups, weights) -> torch.Tensor:
    """Run `variance_from_micro_batches` on the micro-batches ``groups`` of per-item gradients."""
    micro_squared_norms = torch.stack(
        [torch.stack([gradients[group].mean(dim=0).pow(2).sum() for gradients in per_item]) for group in groups]
    )
    combined_squared_norm = torch.stack(
        [sum(weight * gradients[group].mean(dim=0) for weight, group in zip(weights, groups)).pow(2).sum()
         for gradients in per_item]
    )
    return variance_from_micro_batches(
        micro_squared_norms,
        torch.tensor(weights, dtype=torch.float64),
        torch.tensor([len(group) for group in groups], dtype=torch.float64),
        combined_squared_norm,
    )


def mean_over_random_partitions(per_item, sizes, weights, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the mean and standard error of the estimate over random partitions into ``sizes``.

    All partitions go through one `variance_from_micro_batches` call: the
    estimator treats each column independently, so column ``p * L + l`` contains
    partition ``p`` of layer ``l``.
    """
    generator = torch.Generator().manual_seed(seed)
    num_items = per_item[0].shape[0]
    orders = torch.argsort(torch.rand(NUM_PARTITIONS, num_items, generator=generator), dim=1)
    boundaries = torch.tensor([0, *sizes]).cumsum(dim=0).tolist()

    micro_columns = []
    combined_columns = []
    for gradients in per_item:
        shuffled = gradients[orders]
        means = [shuffled[:, start:end].mean(dim=1) for start, end in zip(boundaries[:-1], boundaries[1:])]
        micro_columns.append(torch.stack([mean.pow(2).sum(dim=1) for mean in means]))
        combined = sum(weight * mean for weight, mean in zip(weights, means))
        combined_columns.append(combined.pow(2).sum(dim=1))
    micro_squared_norms = torch.stack(micro_columns, dim=2).reshape(len(sizes), -1)
    combined_squared_norm = torch.stack(combined_columns, dim=1).reshape(-1)

    estimates = variance_from_micro_batches(
        micro_squared_norms,
        torch.tensor(weights, dtype=torch.float64),
        torch.tensor(sizes, dtype=torch.float64),
        combined_squared_norm,
    ).double().reshape(NUM_PARTITIONS, len(per_item))
    return estimates.mean(dim=0), estimates.std(dim=0) / math.sqrt(NUM_PARTITIONS)


def collect_step(collector, layers, model, micro_batch_losses, weights, num_items, gradient_scale=1.0):
    """Run one optimizer step's backward passes under the collector and return its measurement.

    ``micro_batch_losses`` are callables, so that each loss is built while its
    micro-batch is open, as a training loop does.
    """
    model.zero_grad(set_to_none=True)
    for make_loss, weight, items in zip(micro_batch_losses, weights, num_items):
        collector.begin_micro_batch(weight=weight, num_items=items, gradient_scale=gradient_scale)
        make_loss().backward()
        collector.end_micro_batch()
    combined = squared_norms_of_gradients(layers, scale=gradient_scale)
    return collector.finish_step(collector.local_sums(), combined)


@pytest.fixture
def classifier_setup():
    model = build_classifier()
    layers = group_parameters_by_layer(model)
    inputs, labels = make_examples()
    per_example = per_example_gradients(model, layers, inputs, labels)
    return model, layers, inputs, labels, per_example


def accumulation_losses(model, inputs, labels, groups, loss_scale=1.0):
    """Return micro-batch losses as a Trainer builds them: mean loss / accumulation steps."""
    return [
        lambda group=group: F.cross_entropy(model(inputs[group]), labels[group]) * loss_scale / len(groups)
        for group in groups
    ]


# -- pure functions ----------------------------------------------------------


def test_sample_variance_matches_torch_var():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(9, 4, generator=generator, dtype=torch.float64) * 3 + 1

    expected = rows.var(dim=0, correction=1).sum()

    assert float(sample_variance(rows)) == pytest.approx(float(expected), rel=1e-12)


def test_estimator_one_item_identity(classifier_setup):
    _, _, _, _, per_example = classifier_setup
    groups = [torch.tensor([index]) for index in range(BATCH_SIZE)]

    estimate = estimate_for_partition(per_example, groups, [1.0 / BATCH_SIZE] * BATCH_SIZE)

    expected = exact_variance(per_example)
    for layer_index in range(len(per_example)):
        assert float(estimate[layer_index]) == pytest.approx(float(expected[layer_index]), rel=IDENTITY_RTOL)


def test_estimator_equal_batches_unbiased(classifier_setup):
    _, _, _, _, per_example = classifier_setup
    expected = exact_variance(per_example)

    mean, standard_error = mean_over_random_partitions(per_example, sizes=[4, 4, 4, 4], weights=[0.25] * 4)

    for layer_index in range(len(per_example)):
        assert float(standard_error[layer_index]) < UNBIASED_RTOL / 4 * float(expected[layer_index])
        assert float(mean[layer_index]) == pytest.approx(float(expected[layer_index]), rel=UNBIASED_RTOL)


def test_estimator_rejects_one_micro_batch():
    with pytest.raises(ValueError, match="At least two non-empty micro-batches"):
        variance_from_micro_batches(torch.ones(1, 2), torch.tensor([1.0]), torch.tensor([4.0]), torch.ones(2))


def test_estimator_rejects_one_nonempty():
    with pytest.raises(ValueError, match="got 1"):
        variance_from_micro_batches(
            torch.ones(2, 2), torch.tensor([1.0, 0.0]), torch.tensor([4.0, 0.0]), torch.ones(2)
        )


def test_estimator_ignores_empty_micro_batch(classifier_setup):
    _, _, _, _, per_example = classifier_setup
    groups = [torch.arange(0, 8), torch.arange(8, 16)]
    reference = estimate_for_partition(per_example, groups, [0.5, 0.5])
    micro = torch.stack([torch.stack([x[g].mean(0).pow(2).sum() for x in per_example]) for g in groups])
    combined = torch.stack([x.mean(0).pow(2).sum() for x in per_example])

    # A third micro-batch without items contributes nothing, whatever its norm.
    estimate = variance_from_micro_batches(
        torch.cat([micro, torch.full((1, len(per_example)), 123.0, dtype=torch.float64)]),
        torch.tensor([0.5, 0.5, 0.0]),
        torch.tensor([8.0, 8.0, 0.0]),
        combined,
    )

    assert torch.allclose(estimate, reference, rtol=1e-6)


def test_noise_bound_values():
    bound = noise_bound(16, torch.tensor([2.0, 3.0, 1.0, 0.5]), torch.tensor([4.0, 0.0, -1.0, 2.0]))

    assert float(bound[0]) == pytest.approx(16 * 2.0 / 4.0)
    assert math.isinf(float(bound[1]))
    assert float(bound[1]) > 0
    assert math.isinf(float(bound[2]))
    assert float(bound[2]) > 0
    assert float(bound[3]) == pytest.approx(16 * 0.5 / 2.0)


def test_squared_norms_of_gradients_values():
    model = build_classifier()
    layers = group_parameters_by_layer(model)
    first, second = model[0], model[2]
    first.weight.grad = torch.full_like(first.weight, 2.0)  # first.bias.grad stays None
    second.weight.grad = torch.ones_like(second.weight)
    second.bias.grad = torch.full_like(second.bias, -3.0)

    norms = squared_norms_of_gradients(layers)
    scaled = squared_norms_of_gradients(layers, scale=2.0)

    assert [layer.name for layer in layers] == ["0", "2"]
    assert float(norms[0]) == pytest.approx(7 * 5 * 4.0)
    assert float(norms[1]) == pytest.approx(7 * 3 * 1.0 + 3 * 9.0)
    assert float(scaled[0]) == pytest.approx(7 * 5 * 4.0 / 4)
    assert float(scaled[1]) == pytest.approx((7 * 3 * 1.0 + 3 * 9.0) / 4)


# -- collector with real backward passes -------------------------------------


def test_collector_one_example_identity(classifier_setup):
    model, layers, inputs, labels, per_example = classifier_setup
    groups = [torch.tensor([index]) for index in range(BATCH_SIZE)]
    collector = MicroBatchNoiseCollector(layers)
    collector.attach()

    measurement = collect_step(
        collector,
        layers,
        model,
        accumulation_losses(model, inputs, labels, groups),
        [1.0 / BATCH_SIZE] * BATCH_SIZE,
        [1] * BATCH_SIZE,
    )

    expected = exact_variance(per_example)
    for layer_index in range(len(layers)):
        assert float(measurement.variance[layer_index]) == pytest.approx(
            float(expected[layer_index]), rel=IDENTITY_RTOL
        )
    assert measurement.num_micro_batches == BATCH_SIZE
    assert measurement.num_items == BATCH_SIZE


def test_collector_accumulation_partition(classifier_setup):
    model, layers, inputs, labels, per_example = classifier_setup
    order = torch.randperm(BATCH_SIZE, generator=torch.Generator().manual_seed(5))
    groups = [order[start : start + 4] for start in range(0, BATCH_SIZE, 4)]
    collector = MicroBatchNoiseCollector(layers)
    collector.attach()

    measurement = collect_step(
        collector, layers, model, accumulation_losses(model, inputs, labels, groups), [0.25] * 4, [4] * 4
    )

    expected = estimate_for_partition(per_example, groups, [0.25] * 4)
    expected_norm = torch.stack([gradients.mean(dim=0).pow(2).sum() for gradients in per_example])
    for layer_index in range(len(layers)):
        assert float(measurement.variance[layer_index]) == pytest.approx(
            float(expected[layer_index]), rel=IDENTITY_RTOL
        )
        assert float(measurement.squared_gradient_norm[layer_index]) == pytest.approx(
            float(expected_norm[layer_index]), rel=IDENTITY_RTOL
        )
    assert measurement.num_micro_batches == 4
    assert measurement.num_items == BATCH_SIZE


def test_collector_gradient_scale(classifier_setup):
    model, layers, inputs, labels, _ = classifier_setup
    groups = [torch.arange(start, start + 4) for start in range(0, BATCH_SIZE, 4)]
    collector = MicroBatchNoiseCollector(layers)
    collector.attach()

    plain = collect_step(
        collector, layers, model, accumulation_losses(model, inputs, labels, groups), [0.25] * 4, [4] * 4
    )
    scaled = collect_step(
        collector,
        layers,
        model,
        accumulation_losses(model, inputs, labels, groups, loss_scale=8.0),
        [0.25] * 4,
        [4] * 4,
        gradient_scale=8.0,
    )

    for layer_index in range(len(layers)):
        assert float(scaled.variance[layer_index]) == pytest.approx(float(plain.variance[layer_index]), rel=1e-5)
        assert float(scaled.squared_gradient_norm[layer_index]) == pytest.approx(
            float(plain.squared_gradient_norm[layer_index]), rel=1e-5
        )


def test_collector_split_fallback(classifier_setup):
    model, layers, inputs, labels, per_example = classifier_setup
    groups = [torch.arange(0, 7), torch.arange(7, BATCH_SIZE)]
    weights = [len(group) / BATCH_SIZE for group in groups]
    # One micro-batch of 16 run as two halves: each half's summed loss over the
    # whole batch size, so the accumulated gradient is the full batch's.
    losses = [
        lambda group=group: F.cross_entropy(model(inputs[group]), labels[group], reduction="sum") / BATCH_SIZE
        for group in groups
    ]
    collector = MicroBatchNoiseCollector(layers)
    collector.attach()

    measurement = collect_step(collector, layers, model, losses, weights, [7, 9])
    split_gradients = flat_layer_gradients(layers)

    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs), labels).backward()
    full_gradients = flat_layer_gradients(layers)
    expected = estimate_for_partition(per_example, groups, weights)
    for layer_index in range(len(layers)):
        assert torch.allclose(split_gradients[layer_index], full_gradients[layer_index], rtol=1e-5, atol=1e-7)
        assert float(measurement.variance[layer_index]) == pytest.approx(
            float(expected[layer_index]), rel=IDENTITY_RTOL
        )
    assert measurement.num_micro_batches == 2


def test_collector_one_micro_batch_none(classifier_setup):
    model, layers, inputs, labels, _ = classifier_setup
    collector = MicroBatchNoiseCollector(layers)
    collector.attach()

    measurement = collect_step(
        collector, layers, model, accumulation_losses(model, inputs, labels, [torch.arange(BATCH_SIZE)]), [1.0], [16]
    )

    assert measurement is None
    assert collector.num_micro_batches == 0


def test_collector_ignores_closed_backward(classifier_setup):
    model, layers, inputs, labels, _ = classifier_setup
    groups = [torch.arange(start, start + 4) for start in range(0, BATCH_SIZE, 4)]
    collector = MicroBatchNoiseCollector(layers)
    collector.attach()
    reference = collect_step(
        collector, layers, model, accumulation_losses(model, inputs, labels, groups), [0.25] * 4, [4] * 4
    )

    model.zero_grad(set_to_none=True)
    for group in groups:
        collector.begin_micro_batch(weight=0.25, num_items=4, gradient_scale=1.0)
        (F.cross_entropy(model(inputs[group]), labels[group]) / 4).backward()
        collector.end_micro_batch()
        # A backward pass outside any micro-batch, such as an evaluation
        # gradient, must not be recorded. Its gradient is removed again.
        before = [p.grad.clone() for layer in layers for p in layer.parameters]
        F.cross_entropy(model(inputs), labels).backward()
        for parameter, saved in zip([p for layer in layers for p in layer.parameters], before):
            parameter.grad = saved
    combined = squared_norms_of_gradients(layers)
    measurement = collector.finish_step(collector.local_sums(), combined)

    for layer_index in range(len(layers)):
        assert float(measurement.variance[layer_index]) == pytest.approx(
            float(reference.variance[layer_index]), rel=1e-6
        )


def test_collector_detach_stops_hooks(classifier_setup):
    model, layers, inputs, labels, _ = classifier_setup
    collector = MicroBatchNoiseCollector(layers)
    collector.attach()
    collector.detach()

    collector.begin_micro_batch(weight=0.5, num_items=8, gradient_scale=1.0)
    F.cross_entropy(model(inputs[:8]), labels[:8]).backward()
    collector.end_micro_batch()

    sums = collector.local_sums()
    for layer_index in range(len(layers)):
        assert float(sums[layer_index]) == 0.0


def test_collector_float64_model():
    model = build_classifier().double()
    layers = group_parameters_by_layer(model)
    inputs, labels = make_examples()
    collector = MicroBatchNoiseCollector(layers)
    collector.attach()

    groups = [torch.arange(0, 8), torch.arange(8, 16)]
    measurement = collect_step(
        collector, layers, model, accumulation_losses(model, inputs.double(), labels, groups), [0.5, 0.5], [8, 8]
    )

    assert measurement is not None


# -- token-level losses normalized by num_items_in_batch ----------------------


def run_token_step(collector, layers, model, micro_batches):
    """Run micro-batch losses ``sum over valid tokens / N`` under the collector, N the step's valid tokens."""
    counts = [int((labels != IGNORE_INDEX).sum()) for _, labels in micro_batches]
    total = sum(counts)
    losses = [
        lambda input_ids=input_ids, labels=labels: token_loss_sum(model, input_ids, labels) / total
        for input_ids, labels in micro_batches
    ]
    weights = [count / total for count in counts]
    return collect_step(collector, layers, model, losses, weights, counts), counts


def test_collector_one_token_identity():
    model = build_token_model()
    layers = group_parameters_by_layer(model)
    generator = torch.Generator().manual_seed(3)
    micro_batches = []
    for index in range(10):
        input_ids, labels = make_token_micro_batch([4], seq_len=4, generator=generator)
        keep = index % 4  # the one valid token moves through the positions
        labels[0, [position for position in range(4) if position != keep]] = IGNORE_INDEX
        micro_batches.append((input_ids, labels))
    per_token = per_token_gradients(model, layers, micro_batches)
    collector = MicroBatchNoiseCollector(layers)
    collector.attach()

    measurement, counts = run_token_step(collector, layers, model, micro_batches)

    expected = exact_variance(per_token)
    assert counts == [1] * 10
    for layer_index in range(len(layers)):
        assert float(measurement.variance[layer_index]) == pytest.approx(
            float(expected[layer_index]), rel=IDENTITY_RTOL
        )
    assert measurement.num_items == 10


@pytest.fixture
def variable_length_setup():
    model = build_token_model()
    layers = group_parameters_by_layer(model)
    generator = torch.Generator().manual_seed(4)
    lengths_per_micro_batch = [[5, 2], [1, 3], [4, 4], [0, 0], [2, 0]]
    micro_batches = [
        make_token_micro_batch(lengths, seq_len=5, generator=generator) for lengths in lengths_per_micro_batch
    ]
    per_token = per_token_gradients(model, layers, micro_batches)
    return model, layers, micro_batches, per_token


def test_collector_variable_length_partition(variable_length_setup):
    model, layers, micro_batches, per_token = variable_length_setup
    collector = MicroBatchNoiseCollector(layers)
    collector.attach()

    measurement, counts = run_token_step(collector, layers, model, micro_batches)

    # per_token rows follow micro-batch order, so the partition is contiguous.
    nonempty = [count for count in counts if count > 0]
    boundaries = torch.tensor([0, *nonempty]).cumsum(dim=0).tolist()
    groups = [torch.arange(start, end) for start, end in zip(boundaries[:-1], boundaries[1:])]
    total = sum(counts)
    expected = estimate_for_partition(per_token, groups, [count / total for count in nonempty])
    expected_norm = torch.stack([gradients.mean(dim=0).pow(2).sum() for gradients in per_token])
    assert counts == [7, 4, 8, 0, 2]
    for layer_index in range(len(layers)):
        assert float(measurement.variance[layer_index]) == pytest.approx(
            float(expected[layer_index]), rel=IDENTITY_RTOL
        )
        assert float(measurement.squared_gradient_norm[layer_index]) == pytest.approx(
            float(expected_norm[layer_index]), rel=IDENTITY_RTOL
        )
    assert measurement.num_micro_batches == 4
    assert measurement.num_items == 21


def test_estimator_unequal_batches_unbiased(variable_length_setup):
    _, _, _, per_token = variable_length_setup
    sizes = [7, 4, 8, 2]
    total = sum(sizes)
    expected = exact_variance(per_token)

    mean, standard_error = mean_over_random_partitions(
        per_token, sizes=sizes, weights=[size / total for size in sizes]
    )

    assert per_token[0].shape[0] == total
    for layer_index in range(len(per_token)):
        assert float(standard_error[layer_index]) < UNBIASED_RTOL / 4 * float(expected[layer_index])
        assert float(mean[layer_index]) == pytest.approx(float(expected[layer_index]), rel=UNBIASED_RTOL)


def test_layer_sums_of_squares_groups_by_layer():
    norms = [torch.tensor(3.0), torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0), torch.tensor(4.0)]

    sums = layer_sums_of_squares(norms, [2, 0, 2, 0], num_layers=4)

    assert sums.dtype == torch.float32
    assert sums.tolist() == [17.0, 0.0, 13.0, 0.0]


def test_layer_sums_of_squares_without_norms():
    sums = layer_sums_of_squares([], [], num_layers=3)

    assert sums.tolist() == [0.0, 0.0, 0.0]
