"""Tests of per-layer power iteration against dense Hessian blocks.

The reference eigenvalues come from `torch.linalg.eigvalsh` of the dense block,
built with `torch.autograd.functional.hessian` on a function of the layer's
flattened parameters. BERT references use a copy of the model with eager
attention, so they share no attention kernel with the code under test.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hf_lot.curvature import (
    curvature_context,
    finite_difference_block_hvp,
    finite_difference_eigenvalues,
    finite_difference_epsilon,
    layer_block_hvp,
    measure_block_eigenvalues,
    power_iteration,
    top_block_eigenvalues,
)
from hf_lot.layers import group_parameters_by_layer

pytestmark = pytest.mark.usefixtures("single_thread")

# Power iteration from a random start runs to this many products and this
# relative change of the Rayleigh quotient, which the spectral gaps below allow.
COLD_ITERATIONS = 500
COLD_TOLERANCE = 1e-9
EIGENVALUE_RTOL = 1e-3

# Power iteration converges like (|lambda_2| / |lambda_1|)^k. The tests assert
# this ratio, so that COLD_ITERATIONS are enough by a wide margin.
MAX_GAP_RATIO = 0.95


def dense_block_hessian(model, parameter_names, loss_of_parameters) -> torch.Tensor:
    """Return the dense Hessian of ``loss_of_parameters`` in the named parameters, flattened in order."""
    parameters = dict(model.named_parameters())
    shapes = [parameters[name].shape for name in parameter_names]
    sizes = [math.prod(shape) for shape in shapes]
    start = torch.cat([parameters[name].detach().reshape(-1) for name in parameter_names])

    def loss_of_flat(flat):
        chunks = torch.split(flat, sizes)
        replaced = {name: chunk.reshape(shape) for name, chunk, shape in zip(parameter_names, chunks, shapes)}
        return loss_of_parameters(replaced)

    return torch.autograd.functional.hessian(loss_of_flat, start, vectorize=True)


def dominant_eigenvalue(matrix: torch.Tensor) -> tuple[float, float]:
    """Return the eigenvalue of largest magnitude and the ratio of the next magnitude to it."""
    eigenvalues = torch.linalg.eigvalsh(matrix)
    eigenvalues = eigenvalues[eigenvalues.abs().argsort(descending=True)]
    return float(eigenvalues[0]), float(eigenvalues[1].abs() / eigenvalues[0].abs())


def flatten(tensors) -> torch.Tensor:
    return torch.cat([tensor.reshape(-1) for tensor in tensors])


# -- explicit matrices --------------------------------------------------------


def test_power_iteration_negative_dominant():
    diagonal = torch.tensor([1.0, -5.0, 2.0, 0.5], dtype=torch.float64)

    result = power_iteration(
        lambda vector: [diagonal * vector[0]], [torch.ones(4, dtype=torch.float64)], max_iterations=200, tolerance=1e-12
    )

    assert result.eigenvalue == pytest.approx(-5.0, rel=1e-9)
    assert result.converged
    assert abs(float(result.eigenvector[0][1])) == pytest.approx(1.0, rel=1e-6)


def test_power_iteration_tensor_list():
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(7, 7, generator=generator, dtype=torch.float64))
    eigenvalues = torch.tensor([3.0, -7.0, 1.0, 0.2, -0.5, 6.0, 0.0], dtype=torch.float64)
    matrix = rotation @ torch.diag(eigenvalues) @ rotation.T

    # The operator acts on two tensors of shapes (2, 3) and (1,), flattened in order.
    def matvec(vector):
        product = matrix @ flatten(vector)
        return [product[:6].reshape(2, 3), product[6:]]

    initial = [torch.randn(2, 3, generator=generator, dtype=torch.float64), torch.randn(1, dtype=torch.float64)]
    result = power_iteration(matvec, initial, max_iterations=COLD_ITERATIONS, tolerance=1e-12)

    eigenvector = flatten(result.eigenvector)
    assert result.eigenvalue == pytest.approx(-7.0, rel=1e-9)
    assert [tuple(t.shape) for t in result.eigenvector] == [(2, 3), (1,)]
    assert float(eigenvector.norm()) == pytest.approx(1.0, rel=1e-9)
    # The Rayleigh quotient is accurate to the square of the eigenvector's error,
    # so the eigenvector gets a looser bound than the eigenvalue.
    assert float((matrix @ eigenvector + 7.0 * eigenvector).norm()) < 1e-4 * 7.0


def test_power_iteration_zero_operator():
    result = power_iteration(lambda vector: [torch.zeros_like(vector[0])], [torch.ones(3)], max_iterations=10)

    assert result.eigenvalue == 0.0
    assert result.converged
    assert result.iterations == 1


def test_power_iteration_rejects_zero_iterations():
    with pytest.raises(ValueError, match="max_iterations"):
        power_iteration(lambda vector: vector, [torch.ones(3)], max_iterations=0)


def test_power_iteration_rejects_zero_start():
    with pytest.raises(ValueError, match="zero vector"):
        power_iteration(lambda vector: vector, [torch.zeros(3)], max_iterations=5)


def test_power_iteration_reports_no_convergence():
    # Eigenvalues 2 and -1.9 converge slowly, so 5 products miss a tight tolerance.
    diagonal = torch.tensor([2.0, -1.9], dtype=torch.float64)
    initial = [torch.ones(2, dtype=torch.float64)]

    result = power_iteration(lambda vector: [diagonal * vector[0]], initial, max_iterations=5, tolerance=1e-12)

    assert not result.converged
    assert result.iterations == 5


def test_power_iteration_opposite_pair():
    diagonal = torch.tensor([2.0, -2.0], dtype=torch.float64)
    initial = [torch.tensor([1.0, 0.5], dtype=torch.float64)]

    result = power_iteration(lambda vector: [diagonal * vector[0]], initial, max_iterations=100, tolerance=1e-3)

    assert not result.converged


# -- tiny MLP -------------------------------------------------------------------


class PartlyUsedMLP(nn.Module):
    """An MLP with one extra Linear that the loss never reaches."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.unused = nn.Linear(2, 2)

    def forward(self, inputs):
        return self.body(inputs)


@pytest.fixture
def mlp_setup():
    torch.manual_seed(0)
    model = PartlyUsedMLP().double()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(12, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (12,), generator=generator)
    layers = group_parameters_by_layer(model)

    def loss_of_parameters(replaced):
        return F.cross_entropy(functional_call(model, replaced, (inputs,)), labels)

    return model, layers, inputs, labels, loss_of_parameters


def test_mlp_blocks_match_dense(mlp_setup):
    model, layers, inputs, labels, loss_of_parameters = mlp_setup
    used = [layer for layer in layers if layer.name != "unused"]
    loss = F.cross_entropy(model(inputs), labels)

    results = top_block_eigenvalues(
        loss,
        [layer.parameters for layer in used],
        [None] * len(used),
        max_iterations=COLD_ITERATIONS,
        tolerance=COLD_TOLERANCE,
        generator=torch.Generator().manual_seed(0),
    )

    assert [layer.name for layer in used] == ["body.0", "body.2"]
    for layer, result in zip(used, results):
        hessian = dense_block_hessian(model, layer.parameter_names, loss_of_parameters)
        expected, gap_ratio = dominant_eigenvalue(hessian)
        eigenvector = flatten(result.eigenvector)
        assert gap_ratio < MAX_GAP_RATIO, layer.name
        assert result.eigenvalue == pytest.approx(expected, rel=EIGENVALUE_RTOL), layer.name
        assert float((hessian @ eigenvector - expected * eigenvector).norm()) < 1e-3 * abs(expected), layer.name


def test_mlp_warm_start_few_iterations(mlp_setup):
    model, layers, inputs, labels, _ = mlp_setup
    used = [layer for layer in layers if layer.name != "unused"]
    cold = top_block_eigenvalues(
        F.cross_entropy(model(inputs), labels),
        [layer.parameters for layer in used],
        [None] * len(used),
        max_iterations=COLD_ITERATIONS,
        tolerance=COLD_TOLERANCE,
        generator=torch.Generator().manual_seed(0),
    )

    warm = top_block_eigenvalues(
        F.cross_entropy(model(inputs), labels),
        [layer.parameters for layer in used],
        [result.eigenvector for result in cold],
        max_iterations=COLD_ITERATIONS,
        tolerance=1e-6,
    )

    for cold_result, warm_result in zip(cold, warm):
        assert warm_result.converged
        assert warm_result.iterations <= 3
        assert warm_result.eigenvalue == pytest.approx(cold_result.eigenvalue, rel=1e-6)


def test_unreached_layer_zero(mlp_setup):
    model, layers, inputs, labels, _ = mlp_setup
    unused = next(layer for layer in layers if layer.name == "unused")

    (result,) = top_block_eigenvalues(
        F.cross_entropy(model(inputs), labels), [unused.parameters], [None], max_iterations=10
    )

    assert result.eigenvalue == 0.0
    assert result.iterations == 0
    assert [tuple(t.shape) for t in result.eigenvector] == [(2, 2), (2,)]


# -- tiny BERT --------------------------------------------------------------------


def build_tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=32,
        num_labels=3,
        # Weights far above the default 0.02 make attention far from uniform, so
        # the query block has curvature well above rounding error.
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config).double()


@pytest.fixture
def bert_setup():
    model = build_tiny_bert()
    generator = torch.Generator().manual_seed(2)
    batch = {
        "input_ids": torch.randint(0, 50, (4, 6), generator=generator),
        "attention_mask": torch.ones(4, 6, dtype=torch.long),
        "labels": torch.randint(0, 3, (4,), generator=generator),
    }
    batch["attention_mask"][1, 4:] = 0
    return model, batch


def test_bert_default_attention_is_sdpa(bert_setup):
    model, _ = bert_setup

    assert model.config._attn_implementation == "sdpa"


def test_bert_eval_double_backward_fails(bert_setup):
    # Premise of curvature_context on torch 2.13 CPU: in eval mode the default
    # sdpa attention picks a fused kernel without a second derivative.
    model, batch = bert_setup
    model.eval()
    parameters = list(model.parameters())
    gradients = torch.autograd.grad(model(**batch).loss, parameters, create_graph=True)
    inner = sum(gradient.sum() for gradient in gradients)

    with pytest.raises(RuntimeError, match="derivative"):
        torch.autograd.grad(inner, parameters, allow_unused=True)


def test_bert_context_double_backward(bert_setup):
    model, batch = bert_setup
    parameters = list(model.parameters())

    with curvature_context(model):
        gradients = torch.autograd.grad(model(**batch).loss, parameters, create_graph=True)
        inner = sum(gradient.sum() for gradient in gradients)
        products = torch.autograd.grad(inner, parameters, allow_unused=True)

    attention_query = dict(zip([name for name, _ in model.named_parameters()], products))[
        "bert.encoder.layer.0.attention.self.query.weight"
    ]
    assert all(product is None or bool(torch.isfinite(product).all()) for product in products)
    assert attention_query is not None
    assert float(attention_query.abs().sum()) > 0


def test_bert_blocks_match_dense(bert_setup):
    model, batch = bert_setup
    # The query projection of the first block is its own layer, so its Hessian
    # block is reached through the attention softmax of both blocks.
    layers = group_parameters_by_layer(model, rules=[(r"layer\.0\.attention\.self\.query\.", "query")])
    chosen = [layer for layer in layers if layer.name in ("query", "head")]
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    reference.eval()

    def loss_of_parameters(replaced):
        return functional_call(reference, replaced, args=(), kwargs=batch).loss

    with curvature_context(model):
        results = top_block_eigenvalues(
            model(**batch).loss,
            [layer.parameters for layer in chosen],
            [None] * len(chosen),
            max_iterations=COLD_ITERATIONS,
            tolerance=COLD_TOLERANCE,
            generator=torch.Generator().manual_seed(0),
        )

    assert [layer.name for layer in chosen] == ["query", "head"]
    assert [layer.num_parameters for layer in chosen] == [16 * 16 + 16, 16 * 16 + 16 + 16 * 3 + 3]
    for layer, result in zip(chosen, results):
        hessian = dense_block_hessian(reference, layer.parameter_names, loss_of_parameters)
        expected, gap_ratio = dominant_eigenvalue(hessian)
        assert gap_ratio < MAX_GAP_RATIO, layer.name
        assert result.eigenvalue == pytest.approx(expected, rel=EIGENVALUE_RTOL), layer.name


def test_context_restores_training(bert_setup):
    model, _ = bert_setup
    model.train()

    with curvature_context(model):
        inside = model.training

    assert not inside
    assert model.training


def test_context_restores_after_error(bert_setup):
    model, _ = bert_setup
    model.train()

    with pytest.raises(KeyError):
        with curvature_context(model):
            raise KeyError("inside the context")

    assert model.training


def test_context_keeps_eval_model(bert_setup):
    model, _ = bert_setup
    model.eval()

    with curvature_context(model):
        pass

    assert not model.training


def test_context_without_eval_mode(bert_setup):
    model, _ = bert_setup
    model.train()

    with curvature_context(model, eval_mode=False):
        inside = model.training

    assert inside
    assert model.training


def test_context_pauses_checkpointing(bert_setup):
    model, _ = bert_setup
    model.activation_checkpointing_enable()

    with curvature_context(model):
        inside = model.is_activation_checkpointing

    assert not inside
    assert model.is_activation_checkpointing


# -- finite-difference products ------------------------------------------------

# Central differences in float64 with the default step: the truncation error is
# O(step^2) relative, far below this tolerance for the models here.
FINITE_DIFFERENCE_RTOL = 1e-3


def relative_difference(first, second) -> float:
    return float((flatten(first) - flatten(second)).norm() / flatten(second).norm())


def test_finite_difference_epsilon_uses_rms():
    parameters = [torch.full((4, 25), 2.0, dtype=torch.float64)]
    vector = [torch.full((4, 25), 0.5, dtype=torch.float64)]

    epsilon = finite_difference_epsilon(parameters, vector, relative_step=1e-2)

    # RMS(theta) = 2 and |v| = 0.5 * sqrt(100) = 5, so |eps v| = 1e-2 * 2.
    assert epsilon == pytest.approx(1e-2 * 2.0 / 5.0, rel=1e-12)


def test_finite_difference_epsilon_zero_parameters():
    epsilon = finite_difference_epsilon([torch.zeros(3)], [torch.tensor([3.0, 0.0, 4.0])], relative_step=1e-2)

    assert epsilon == pytest.approx(1e-2 / 5.0, rel=1e-6)


def test_finite_difference_rejects_zero_vector():
    with pytest.raises(ValueError, match="zero vector"):
        finite_difference_epsilon([torch.ones(3)], [torch.zeros(3)], relative_step=1e-2)


def test_finite_difference_quadratic_exact():
    # For a quadratic loss central differences are exact up to rounding.
    generator = torch.Generator().manual_seed(3)
    root = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    matrix = root @ root.T
    parameter = nn.Parameter(torch.randn(5, generator=generator, dtype=torch.float64))
    vector = [torch.randn(5, generator=generator, dtype=torch.float64)]

    matvec = finite_difference_block_hvp(lambda: 0.5 * parameter @ matrix @ parameter, [parameter])

    assert relative_difference(matvec(vector), [matrix @ vector[0]]) < 1e-9


def test_finite_difference_restores_parameters(mlp_setup):
    model, layers, inputs, labels, _ = mlp_setup
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    layer = layers[0]
    vector = [torch.ones_like(p) for p in layer.parameters]

    finite_difference_block_hvp(lambda: F.cross_entropy(model(inputs), labels), layer.parameters)(vector)

    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_finite_difference_restores_after_error(mlp_setup):
    model, layers, _, _, _ = mlp_setup
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    layer = layers[0]

    def failing_loss():
        raise KeyError("inside the loss")

    with pytest.raises(KeyError):
        finite_difference_block_hvp(failing_loss, layer.parameters)([torch.ones_like(p) for p in layer.parameters])

    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_finite_difference_rejects_zero_step(mlp_setup):
    _, layers, _, _, _ = mlp_setup

    with pytest.raises(ValueError, match="relative_step"):
        finite_difference_block_hvp(lambda: torch.zeros(()), layers[0].parameters, relative_step=0.0)


def test_finite_difference_mlp_matches_dense(mlp_setup):
    model, layers, inputs, labels, loss_of_parameters = mlp_setup
    used = [layer for layer in layers if layer.name != "unused"]

    results = finite_difference_eigenvalues(
        lambda: F.cross_entropy(model(inputs), labels),
        [layer.parameters for layer in used],
        [None] * len(used),
        max_iterations=COLD_ITERATIONS,
        tolerance=COLD_TOLERANCE,
        generator=torch.Generator().manual_seed(0),
    )

    for layer, result in zip(used, results):
        hessian = dense_block_hessian(model, layer.parameter_names, loss_of_parameters)
        expected, gap_ratio = dominant_eigenvalue(hessian)
        assert gap_ratio < MAX_GAP_RATIO, layer.name
        assert result.eigenvalue == pytest.approx(expected, rel=FINITE_DIFFERENCE_RTOL), layer.name


def test_finite_difference_unreached_layer_zero(mlp_setup):
    model, layers, inputs, labels, _ = mlp_setup
    unused = next(layer for layer in layers if layer.name == "unused")

    for central in (True, False):
        (result,) = finite_difference_eigenvalues(
            lambda: F.cross_entropy(model(inputs), labels), [unused.parameters], [None], max_iterations=10,
            central=central,
        )
        assert result.eigenvalue == 0.0, central


def test_finite_difference_bert_matches_dense(bert_setup):
    model, batch = bert_setup
    layers = group_parameters_by_layer(model, rules=[(r"layer\.0\.attention\.self\.query\.", "query")])
    chosen = [layer for layer in layers if layer.name in ("query", "head")]
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    reference.eval()

    def loss_of_parameters(replaced):
        return functional_call(reference, replaced, args=(), kwargs=batch).loss

    with curvature_context(model):
        results = finite_difference_eigenvalues(
            lambda: model(**batch).loss,
            [layer.parameters for layer in chosen],
            [None] * len(chosen),
            max_iterations=COLD_ITERATIONS,
            tolerance=COLD_TOLERANCE,
            generator=torch.Generator().manual_seed(0),
        )

    for layer, result in zip(chosen, results):
        hessian = dense_block_hessian(reference, layer.parameter_names, loss_of_parameters)
        expected, gap_ratio = dominant_eigenvalue(hessian)
        assert gap_ratio < MAX_GAP_RATIO, layer.name
        assert result.eigenvalue == pytest.approx(expected, rel=FINITE_DIFFERENCE_RTOL), layer.name


def build_float32_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


@pytest.mark.parametrize("central, rtol", [(True, 2e-3), (False, 5e-2)])
def test_finite_difference_float32_matches_double_backward(central, rtol):
    # fp32 with the default step, every default layer of a BERT with
    # initializer_range 0.02. Forward differences carry an O(eps) error.
    model = build_float32_bert()
    generator = torch.Generator().manual_seed(4)
    batch = {
        "input_ids": torch.randint(0, 100, (8, 12), generator=generator),
        "attention_mask": torch.ones(8, 12, dtype=torch.long),
        "labels": torch.randint(0, 3, (8,), generator=generator),
    }
    layers = group_parameters_by_layer(model)
    vectors = [[torch.randn(p.shape, generator=generator) for p in layer.parameters] for layer in layers]

    with curvature_context(model):
        all_parameters = [p for layer in layers for p in layer.parameters]
        gradients = torch.autograd.grad(model(**batch).loss, all_parameters, create_graph=True)
        base = torch.autograd.grad(model(**batch).loss, all_parameters)
        offset = 0
        for layer, vector in zip(layers, vectors):
            count = len(layer.parameters)
            exact = layer_block_hvp(gradients[offset : offset + count], layer.parameters)(vector)
            layer_base = None if central else base[offset : offset + count]
            offset += count
            approximate = finite_difference_block_hvp(
                lambda: model(**batch).loss, layer.parameters, base_gradients=layer_base
            )(vector)
            assert relative_difference(approximate, exact) < rtol, layer.name


def test_double_backward_method_raises_without_derivative(bert_setup):
    # Outside curvature_context, eval-mode sdpa attention has no second derivative.
    model, batch = bert_setup
    model.eval()
    layers = group_parameters_by_layer(model)

    with pytest.raises(RuntimeError, match="derivative"):
        measure_block_eigenvalues(
            model, lambda: model(**batch).loss, [layers[1].parameters], [None], max_iterations=5,
            method="double_backward",
        )


def test_auto_method_falls_back(bert_setup, caplog):
    model, batch = bert_setup
    layers = group_parameters_by_layer(model, rules=[(r"layer\.0\.attention\.self\.query\.", "query")])
    chosen = [layer.parameters for layer in layers if layer.name in ("query", "head")]
    arguments = dict(max_iterations=COLD_ITERATIONS, tolerance=COLD_TOLERANCE)
    with curvature_context(model):
        expected = top_block_eigenvalues(
            model(**batch).loss, chosen, [None] * 2, generator=torch.Generator().manual_seed(0), **arguments
        )
    model.eval()

    with caplog.at_level("WARNING", logger="hf_lot.curvature"):
        results = measure_block_eigenvalues(
            model, lambda: model(**batch).loss, chosen, [None] * 2, generator=torch.Generator().manual_seed(0),
            method="auto", **arguments,
        )

    assert "switching to finite-difference" in caplog.text
    for result, reference in zip(results, expected):
        assert result.eigenvalue == pytest.approx(reference.eigenvalue, rel=FINITE_DIFFERENCE_RTOL)


def test_auto_method_remembers_fallback(bert_setup, caplog):
    model, batch = bert_setup
    model.eval()
    layers = group_parameters_by_layer(model)
    arguments = dict(max_iterations=2, generator=torch.Generator().manual_seed(0), method="auto")

    with caplog.at_level("WARNING", logger="hf_lot.curvature"):
        for _ in range(2):
            measure_block_eigenvalues(model, lambda: model(**batch).loss, [layers[1].parameters], [None], **arguments)

    assert caplog.text.count("Double backward failed") == 1


def test_auto_method_uses_double_backward(mlp_setup):
    model, layers, inputs, labels, _ = mlp_setup
    calls = []

    def loss_fn():
        calls.append(1)
        return F.cross_entropy(model(inputs), labels)

    measure_block_eigenvalues(model, loss_fn, [layers[0].parameters], [None], max_iterations=4, tolerance=1e-12, method="auto")

    # One loss and graph serves every double-backward product; finite differences need two per product.
    assert len(calls) == 1


def test_unknown_method_rejected(mlp_setup):
    model, layers, inputs, labels, _ = mlp_setup

    with pytest.raises(ValueError, match="Unknown Hessian-vector product method 'jvp'"):
        measure_block_eigenvalues(
            model, lambda: F.cross_entropy(model(inputs), labels), [layers[0].parameters], [None],
            max_iterations=3, method="jvp",
        )


@pytest.mark.parametrize("overrides", [{"hvp_method": "jvp"}, {"hvp_fd_step": 0.0}, {"hvp_fd_step": math.inf}])
def test_config_rejects_invalid_hvp_options(overrides):
    from hf_lot import LoTConfig

    with pytest.raises(ValueError, match=f"Invalid LoT option {next(iter(overrides))}="):
        LoTConfig(**overrides)


class FakeAccelerator:
    num_processes = 1


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_measure_layer_sharpness_methods_agree(mlp_setup, method):
    from hf_lot import LoTConfig, LoTController
    from hf_lot.loop import measure_layer_sharpness

    model, layers, inputs, labels, loss_of_parameters = mlp_setup
    used = [layer for layer in layers if layer.name != "unused"]
    config = LoTConfig(hvp_method=method, hvp_cold_iterations=COLD_ITERATIONS, hvp_tolerance=COLD_TOLERANCE)
    controller = LoTController(used, config)

    sharpness = measure_layer_sharpness(
        FakeAccelerator(), model, lambda module: F.cross_entropy(module(inputs), labels), controller,
        torch.Generator().manual_seed(0),
    )

    for layer, value in zip(used, sharpness):
        expected, _ = dominant_eigenvalue(dense_block_hessian(model, layer.parameter_names, loss_of_parameters))
        assert value == pytest.approx(expected, rel=FINITE_DIFFERENCE_RTOL), layer.name
    assert all(vector is not None for vector in controller.eigenvectors)


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_initial_list_updated_in_place(mlp_setup, method):
    model, layers, inputs, labels, _ = mlp_setup
    vectors = [None] * len(layers)

    results = measure_block_eigenvalues(
        model, lambda: F.cross_entropy(model(inputs), labels), [layer.parameters for layer in layers], vectors,
        max_iterations=5, generator=torch.Generator().manual_seed(0), method=method,
    )

    for vector, result in zip(vectors, results):
        assert vector is result.eigenvector


def test_training_arguments_pass_hvp_options(tmp_path):
    from hf_lot import LoTTrainingArguments

    args = LoTTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, lot_hvp_method="finite_difference",
        lot_hvp_fd_step=0.02,
    )

    config = args.to_lot_config()
    assert config.hvp_method == "finite_difference"
    assert config.hvp_fd_step == 0.02
