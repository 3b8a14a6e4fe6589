"""Per-layer sharpness: the top eigenvalue of each diagonal Hessian block.

For layer ``l`` with parameters ``theta_l``, ``H_ll = d^2 L / d theta_l^2`` is
the layer's diagonal block of the Hessian of the minibatch loss. Power
iteration ``v <- H_ll v / |H_ll v|`` converges to the eigenvector of the
eigenvalue with the largest magnitude, and the Rayleigh quotient ``v^T H_ll v``
gives that eigenvalue. Near a minimum it is the top (positive) eigenvalue.

All blocks are served by one graph: the gradient is computed once with
``create_graph=True``, and ``H_ll v_l`` is the gradient of ``g_l . v_l`` with
respect to ``theta_l`` alone. Each iteration therefore costs one double
backward per layer. Starting from the previous measurement's eigenvector (a
warm start) usually needs a few iterations where a random start needs about
a hundred.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "PowerIterationResult",
    "curvature_context",
    "layer_block_hvp",
    "power_iteration",
    "top_block_eigenvalues",
]

TensorList = list[torch.Tensor]


@dataclass
class PowerIterationResult:
    """Outcome of power iteration on one symmetric operator."""

    eigenvalue: float
    eigenvector: TensorList
    iterations: int
    converged: bool


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _normalize(vectors: Sequence[torch.Tensor]) -> TensorList:
    norm = _dot(vectors, vectors).sqrt()
    if norm == 0:
        raise ValueError("Cannot normalize a zero vector in power iteration.")
    return [v / norm.to(v.dtype) for v in vectors]


def power_iteration(
    matvec: Callable[[TensorList], TensorList],
    initial: Sequence[torch.Tensor],
    max_iterations: int,
    tolerance: float = 1e-3,
) -> PowerIterationResult:
    """Find the eigenvalue of largest magnitude of a symmetric operator.

    Args:
        matvec: Maps a list of tensors ``v`` to ``A v`` with the same shapes.
        initial: Start vector, for example the previous eigenvector.
        max_iterations: Maximum number of products with ``A``.
        tolerance: Stop when the Rayleigh quotient changes by less than this
            fraction of its magnitude between two iterations and the residual
            ``|A v - lambda v|`` is below ``sqrt(tolerance) |lambda|``.

    Returns:
        The Rayleigh quotient of the last iterate, the normalized eigenvector,
        the number of products used, and whether the tolerance was met.
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be at least 1, got {max_iterations}.")
    vector = _normalize([t.detach() for t in initial])
    eigenvalue = math.nan

    for iteration in range(1, max_iterations + 1):
        product = [p.detach() for p in matvec(vector)]
        new_eigenvalue = float(_dot(vector, product))
        product_norm = float(_dot(product, product).sqrt())

        if product_norm == 0.0:
            # The block is zero on this vector, for example a layer without a path to the loss.
            return PowerIterationResult(0.0, vector, iteration, True)

        # The Rayleigh quotient can stall without converging (two dominant eigenvalues
        # +l and -l), so the residual |Av - lambda v| must be small as well.
        residual_vector = [p - new_eigenvalue * v for p, v in zip(product, vector)]
        residual = float(_dot(residual_vector, residual_vector).sqrt())
        stalled = abs(new_eigenvalue - eigenvalue) <= tolerance * abs(new_eigenvalue)
        converged = stalled and residual <= math.sqrt(tolerance) * abs(new_eigenvalue)
        eigenvalue = new_eigenvalue
        vector = [p / product_norm for p in product]
        if converged:
            return PowerIterationResult(eigenvalue, vector, iteration, True)

    return PowerIterationResult(eigenvalue, vector, max_iterations, False)


def layer_block_hvp(
    gradients: Sequence[torch.Tensor], parameters: Sequence[torch.Tensor]
) -> Callable[[TensorList], TensorList]:
    """Return ``v -> H_ll v`` for a layer, given gradients built with ``create_graph=True``."""

    def matvec(vector: TensorList) -> TensorList:
        inner = sum((g * v.to(g.dtype)).sum() for g, v in zip(gradients, vector))
        products = torch.autograd.grad(inner, parameters, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h for h, p in zip(products, parameters)]

    return matvec


def top_block_eigenvalues(
    loss: torch.Tensor,
    layer_parameters: Sequence[Sequence[torch.Tensor]],
    initial_vectors: Sequence[Sequence[torch.Tensor] | None],
    max_iterations: int,
    tolerance: float = 1e-3,
    generator: torch.Generator | None = None,
) -> list[PowerIterationResult]:
    """Run power iteration on every layer's diagonal Hessian block of `loss`.

    Args:
        loss: A scalar loss whose graph supports double backward.
        layer_parameters: The parameters of each layer.
        initial_vectors: Per layer, the previous eigenvector (warm start) or
            None for a random Gaussian start.
        max_iterations: Maximum products per layer.
        tolerance: Relative change of the eigenvalue that stops iteration.
        generator: Random generator for cold starts (on the CPU).

    Returns:
        One result per layer, in order.
    """
    flat_parameters = [p for parameters in layer_parameters for p in parameters]
    flat_gradients = torch.autograd.grad(loss, flat_parameters, create_graph=True, allow_unused=True)

    results = []
    offset = 0
    for parameters, initial in zip(layer_parameters, initial_vectors):
        gradients = flat_gradients[offset : offset + len(parameters)]
        offset += len(parameters)
        if all(g is None for g in gradients):
            zero = [torch.zeros_like(p) for p in parameters]
            results.append(PowerIterationResult(0.0, zero, 0, True))
            continue
        gradients = [torch.zeros_like(p) if g is None else g for g, p in zip(gradients, parameters)]

        if initial is None:
            initial = [
                torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
                for p in parameters
            ]
        results.append(power_iteration(layer_block_hvp(gradients, parameters), initial, max_iterations, tolerance))
    return results


@contextlib.contextmanager
def curvature_context(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Prepare `model` for Hessian-vector products and restore it afterwards.

    The fused scaled-dot-product attention kernels have no second derivative
    (torch 2.13), so the math kernel is forced. With ``eval_mode`` dropout is
    off, which keeps the loss identical across the products of one power
    iteration. Activation checkpointing would recompute without the graph that
    double backward needs, so it is switched off for the duration.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was_training = model.training
    # transformers marks checkpointed modules with a `gradient_checkpointing` flag;
    # clearing it keeps the settings (such as every_n_layers) that re-enabling would lose.
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in checkpointed:
        module.gradient_checkpointing = False
    if eval_mode:
        model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
            yield
    finally:
        model.train(was_training)
        for module in checkpointed:
            module.gradient_checkpointing = True
