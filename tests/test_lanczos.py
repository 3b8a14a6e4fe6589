"""Tests of the Lanczos eigensolver against dense eigendecompositions and against power iteration."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from hf_lot import LoTConfig
from hf_lot.curvature import lanczos, measure_block_eigenvalues, power_iteration
from hf_lot.layers import group_parameters_by_layer

pytestmark = pytest.mark.usefixtures("single_thread")


def symmetric_matrix(eigenvalues, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = len(eigenvalues)
    rotation, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return rotation @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ rotation.T


def matrix_operator(matrix):
    return lambda vector: [matrix @ vector[0]]


def clustered_spectrum(size: int = 200, top: float = 10.0, ratio: float = 0.95) -> list[float]:
    """Return a spectrum whose two largest magnitudes have the given ratio, the rest spread below."""
    generator = torch.Generator().manual_seed(3)
    rest = (torch.rand(size - 2, generator=generator, dtype=torch.float64) * 2 - 1) * top * ratio * 0.9
    return [top, -top * ratio, *rest.tolist()]


def test_lanczos_exact_on_small_matrix():
    # Krylov space of dimension n spans everything, so n products give the exact eigenvalue.
    matrix = symmetric_matrix([3.0, -7.0, 1.0, 0.2, 6.0])
    start = [torch.ones(5, dtype=torch.float64)]

    result = lanczos(matrix_operator(matrix), start, max_iterations=5, tolerance=1e-12)

    eigenvector = result.eigenvector[0]
    assert result.eigenvalue == pytest.approx(-7.0, rel=1e-10)
    assert float(eigenvector.norm()) == pytest.approx(1.0, rel=1e-10)
    assert float((matrix @ eigenvector + 7.0 * eigenvector).norm()) < 1e-8


def test_lanczos_beats_power_on_close_pair():
    matrix = symmetric_matrix(clustered_spectrum(ratio=0.95), seed=1)
    start = [torch.randn(200, generator=torch.Generator().manual_seed(2), dtype=torch.float64)]

    krylov = lanczos(matrix_operator(matrix), start, max_iterations=20, tolerance=1e-12)
    power = power_iteration(matrix_operator(matrix), start, max_iterations=20, tolerance=1e-12)

    krylov_error = abs(krylov.eigenvalue - 10.0) / 10.0
    power_error = abs(power.eigenvalue - 10.0) / 10.0
    assert krylov.iterations == 20
    assert krylov_error < 1e-3
    assert power_error > 10 * krylov_error


def test_lanczos_tensor_list_shapes():
    matrix = symmetric_matrix([2.0, 0.5, -0.1, 1.0, 0.3, -4.0, 0.0])

    def operator(vector):
        product = matrix @ torch.cat([t.reshape(-1) for t in vector])
        return [product[:6].reshape(2, 3), product[6:]]

    start = [torch.ones(2, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)]
    result = lanczos(operator, start, max_iterations=7, tolerance=1e-12)

    assert result.eigenvalue == pytest.approx(-4.0, rel=1e-9)
    assert [tuple(t.shape) for t in result.eigenvector] == [(2, 3), (1,)]


def test_lanczos_stops_on_invariant_subspace():
    # The start vector is an eigenvector, so one product spans an invariant subspace.
    diagonal = torch.tensor([1.0, 4.0, -2.0], dtype=torch.float64)
    start = [torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)]

    result = lanczos(lambda vector: [diagonal * vector[0]], start, max_iterations=10)

    assert result.eigenvalue == pytest.approx(4.0, rel=1e-12)
    assert result.converged
    assert result.iterations == 1


def test_lanczos_zero_operator():
    result = lanczos(lambda vector: [torch.zeros_like(vector[0])], [torch.ones(3)], max_iterations=10)

    assert result.eigenvalue == 0.0
    assert result.converged
    assert result.iterations == 1
    assert float(result.eigenvector[0].norm()) == pytest.approx(1.0)


def test_lanczos_converges_before_limit():
    matrix = symmetric_matrix([10.0, 1.0, 0.5, -0.5, 0.1, 0.0, 0.2, -0.3])
    start = [torch.ones(8, dtype=torch.float64)]

    result = lanczos(matrix_operator(matrix), start, max_iterations=50, tolerance=1e-6)

    assert result.converged
    assert result.iterations <= 8
    assert result.eigenvalue == pytest.approx(10.0, rel=1e-6)


def test_lanczos_reports_no_convergence():
    matrix = symmetric_matrix(clustered_spectrum(ratio=0.99), seed=4)
    start = [torch.ones(200, dtype=torch.float64)]

    result = lanczos(matrix_operator(matrix), start, max_iterations=3, tolerance=1e-12)

    assert not result.converged
    assert result.iterations == 3


@pytest.mark.parametrize("bad", [0, -1])
def test_lanczos_rejects_bad_iterations(bad):
    with pytest.raises(ValueError, match="max_iterations"):
        lanczos(lambda vector: vector, [torch.ones(3)], max_iterations=bad)


def test_lanczos_mlp_blocks_match_dense():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (16,), generator=generator)
    layers = group_parameters_by_layer(model)
    parameters = dict(model.named_parameters())

    for method in ("double_backward", "finite_difference"):
        results = measure_block_eigenvalues(
            model,
            lambda: F.cross_entropy(model(inputs), labels),
            [layer.parameters for layer in layers],
            [None] * len(layers),
            max_iterations=40,
            tolerance=1e-10,
            generator=torch.Generator().manual_seed(0),
            method=method,
            solver="lanczos",
        )
        for layer, result in zip(layers, results):
            names = layer.parameter_names
            shapes = [parameters[name].shape for name in names]
            sizes = [math.prod(shape) for shape in shapes]

            def loss_of_flat(flat, names=names, shapes=shapes, sizes=sizes):
                chunks = torch.split(flat, sizes)
                replaced = {name: chunk.reshape(shape) for name, chunk, shape in zip(names, chunks, shapes)}
                return F.cross_entropy(functional_call(model, replaced, (inputs,)), labels)

            start = torch.cat([parameters[name].detach().reshape(-1) for name in names])
            eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of_flat, start))
            expected = float(eigenvalues[eigenvalues.abs().argmax()])
            rtol = 1e-6 if method == "double_backward" else 1e-3
            assert result.eigenvalue == pytest.approx(expected, rel=rtol), (method, layer.name)


def test_measure_rejects_unknown_solver():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="'arnoldi'"):
        measure_block_eigenvalues(
            model, lambda: model(torch.ones(1, 2)).sum(), [list(model.parameters())], [None], 3, solver="arnoldi"
        )


def test_config_rejects_unknown_solver():
    with pytest.raises(ValueError, match="hvp_solver='arnoldi'"):
        LoTConfig(hvp_solver="arnoldi")
