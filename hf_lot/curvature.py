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

Where double backward is unavailable (an operation without a second
derivative), ``H_ll v`` comes from finite differences of ordinary gradients,

    H_ll v ~= (g_l(theta + eps v) - g_l(theta - eps v)) / (2 eps),

where only layer ``l`` is perturbed, so the difference contains the diagonal
block alone. Each product costs two forward and backward passes (one with
the forward-difference variant, which reuses ``g_l(theta)``). The error is
``O(eps^2)`` from the third derivative plus ``O(u |g| / eps)`` from rounding,
with ``u`` the unit roundoff of the parameters' dtype. The perturbation
norm ``|eps v|`` is a fixed fraction of the layer's root-mean-square parameter
value. A fraction of the parameter norm itself is far too large for the
blocks of all-MiniLM-L6-v2, whose loss is strongly nonlinear at that scale.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "DEFAULT_FINITE_DIFFERENCE_STEP",
    "EIGENSOLVERS",
    "HVP_METHODS",
    "PowerIterationResult",
    "curvature_context",
    "finite_difference_block_hvp",
    "finite_difference_eigenvalues",
    "finite_difference_epsilon",
    "lanczos",
    "layer_block_hvp",
    "measure_block_eigenvalues",
    "power_iteration",
    "top_block_eigenvalues",
]

logger = logging.getLogger(__name__)

TensorList = list[torch.Tensor]

HVP_METHODS = ("auto", "double_backward", "finite_difference")
EIGENSOLVERS = ("power", "lanczos")

# Perturbation norm |eps v| as a fraction of the layer's root-mean-square parameter value.
# In fp32 on CPU, central differences with this step matched double backward within 0.03%
# along the top eigenvector of the embeddings and of the first and last block of
# all-MiniLM-L6-v2 (8 examples of 32 tokens).
# tests/test_curvature.py checks a 2-block BERT within 0.2% along random vectors.
DEFAULT_FINITE_DIFFERENCE_STEP = 1e-2

# Models on which double backward failed once: "auto" goes straight to finite differences for them.
_NO_DOUBLE_BACKWARD: weakref.WeakSet = weakref.WeakSet()


@dataclass
class PowerIterationResult:
    """Outcome of power iteration on one symmetric operator."""

    eigenvalue: float
    eigenvector: TensorList
    iterations: int
    converged: bool


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    # Products in the tensors' dtype, sums in float64: the temporary is one tensor, not one layer.
    return sum((x * y.to(x.dtype)).sum(dtype=torch.float64) for x, y in zip(a, b))


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
        matvec: Maps a list of tensors ``v`` to ``A v`` with the same shapes,
            as new tensors: the next iterate is normalized in place.
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
        # +l and -l), so the residual |Av - lambda v| must be small as well. Expanding
        # |Av|^2 - 2 lambda v.Av + lambda^2 |v|^2 avoids a residual tensor as large as the layer.
        squared_residual = product_norm**2 - 2 * new_eigenvalue**2 + new_eigenvalue**2 * float(_dot(vector, vector))
        residual = math.sqrt(max(squared_residual, 0.0))
        stalled = abs(new_eigenvalue - eigenvalue) <= tolerance * abs(new_eigenvalue)
        converged = stalled and residual <= math.sqrt(tolerance) * abs(new_eigenvalue)
        eigenvalue = new_eigenvalue
        del vector
        vector = [p.div_(product_norm) for p in product]
        if converged:
            return PowerIterationResult(eigenvalue, vector, iteration, True)

    return PowerIterationResult(eigenvalue, vector, max_iterations, False)


def lanczos(
    matvec: Callable[[TensorList], TensorList],
    initial: Sequence[torch.Tensor],
    max_iterations: int,
    tolerance: float = 1e-3,
) -> PowerIterationResult:
    """Find the eigenvalue of largest magnitude of a symmetric operator by the Lanczos method.

    Arguments and result as for `power_iteration`: the same number of products
    with ``A`` gives a much better estimate when the largest eigenvalues are
    close in magnitude. The basis is reorthogonalized in full at every step,
    so it keeps up to `max_iterations` vectors of the operator's size.

    Convergence is judged on the Ritz pair ``(theta, y)`` of largest
    magnitude: ``theta`` changed by at most `tolerance` of its magnitude and
    the residual ``|A y - theta y|`` is at most ``sqrt(tolerance) |theta|``.
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be at least 1, got {max_iterations}.")
    basis = [_normalize([t.detach() for t in initial])]
    diagonal: list[float] = []
    off_diagonal: list[float] = []
    previous = math.nan

    for iteration in range(1, max_iterations + 1):
        product = [p.detach() for p in matvec(basis[-1])]
        diagonal.append(float(_dot(basis[-1], product)))
        # Two passes of Gram-Schmidt against the whole basis keep it orthonormal in floating point.
        for _ in range(2):
            for vector in basis:
                coefficient = float(_dot(vector, product))
                for p, v in zip(product, vector):
                    p.sub_(v, alpha=coefficient)
        norm = float(_dot(product, product).sqrt())

        tridiagonal = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
        if off_diagonal:
            steps = torch.tensor(off_diagonal, dtype=torch.float64)
            tridiagonal += torch.diag(steps, 1) + torch.diag(steps, -1)
        ritz_values, ritz_vectors = torch.linalg.eigh(tridiagonal)
        index = int(ritz_values.abs().argmax())
        eigenvalue = float(ritz_values[index])
        residual = norm * abs(float(ritz_vectors[-1, index]))

        # norm == 0: the basis spans an invariant subspace, so the Ritz values are exact.
        invariant = norm <= 1e-12 * max(abs(eigenvalue), 1e-30)
        stalled = abs(eigenvalue - previous) <= tolerance * abs(eigenvalue)
        converged = invariant or (stalled and residual <= math.sqrt(tolerance) * abs(eigenvalue))
        previous = eigenvalue
        if converged or iteration == max_iterations:
            weights = ritz_vectors[:, index].tolist()
            eigenvector = [torch.zeros_like(t) for t in basis[0]]
            for weight, vector in zip(weights, basis):
                for e, v in zip(eigenvector, vector):
                    e.add_(v, alpha=weight)
            return PowerIterationResult(eigenvalue, _normalize(eigenvector), iteration, converged)

        off_diagonal.append(norm)
        basis.append([p.div_(norm) for p in product])

    raise AssertionError("unreachable: the loop returns on its last iteration")


def layer_block_hvp(
    gradients: Sequence[torch.Tensor], parameters: Sequence[torch.Tensor]
) -> Callable[[TensorList], TensorList]:
    """Return ``v -> H_ll v`` for a layer, given gradients built with ``create_graph=True``."""

    def matvec(vector: TensorList) -> TensorList:
        # vdot keeps no elementwise product in the graph, which saves one copy of the layer.
        inner = sum(torch.vdot(g.reshape(-1), v.to(g.dtype).reshape(-1)) for g, v in zip(gradients, vector))
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
    solver: str = "power",
) -> list[PowerIterationResult]:
    """Run power iteration (or Lanczos) on every layer's diagonal Hessian block of `loss`.

    Args:
        loss: A scalar loss whose graph supports double backward.
        layer_parameters: The parameters of each layer.
        initial_vectors: Per layer, the previous eigenvector (warm start) or
            None for a random Gaussian start. A list is updated in place:
            each entry becomes the layer's new eigenvector as soon as it is
            computed, so the old one can be freed before the next layer runs.
        max_iterations: Maximum products per layer.
        tolerance: Relative change of the eigenvalue that stops iteration.
        generator: Random generator for cold starts (on the CPU).
        solver: "power" (`power_iteration`) or "lanczos" (`lanczos`).

    Returns:
        One result per layer, in order.
    """
    solve = _solver(solver)
    flat_parameters = [p for parameters in layer_parameters for p in parameters]
    flat_gradients = torch.autograd.grad(loss, flat_parameters, create_graph=True, allow_unused=True)

    results: list[PowerIterationResult] = []
    offset = 0
    for index, (parameters, initial) in enumerate(zip(layer_parameters, initial_vectors)):
        gradients = flat_gradients[offset : offset + len(parameters)]
        offset += len(parameters)
        if all(g is None for g in gradients):
            zero = [torch.zeros_like(p) for p in parameters]
            results.append(PowerIterationResult(0.0, zero, 0, True))
        else:
            gradients = [torch.zeros_like(p) if g is None else g for g, p in zip(gradients, parameters)]
            if initial is None:
                initial = _random_start(parameters, generator)
            results.append(solve(layer_block_hvp(gradients, parameters), initial, max_iterations, tolerance))
        _replace_vector(initial_vectors, index, results[-1].eigenvector)
        del initial
    return results


def _solver(name: str) -> Callable[..., PowerIterationResult]:
    solvers = {"power": power_iteration, "lanczos": lanczos}
    if name not in solvers:
        raise ValueError(f"Unknown eigensolver {name!r}; expected one of {', '.join(EIGENSOLVERS)}.")
    return solvers[name]


def _replace_vector(vectors: Sequence, index: int, new: TensorList) -> None:
    if isinstance(vectors, list):
        vectors[index] = new


def _random_start(parameters: Sequence[torch.Tensor], generator: torch.Generator | None) -> TensorList:
    return [
        torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        for p in parameters
    ]


def finite_difference_epsilon(
    parameters: Sequence[torch.Tensor], vector: Sequence[torch.Tensor], relative_step: float
) -> float:
    """Return ``eps`` such that ``|eps v| = relative_step * RMS(theta_l)``.

    ``RMS(theta_l) = |theta_l| / sqrt(n_l)`` over the layer's ``n_l`` values.
    A layer whose parameters are all zero counts as RMS 1.
    """
    parameter_norm = float(_dot(parameters, parameters).sqrt())
    count = sum(p.numel() for p in parameters)
    vector_norm = float(_dot(vector, vector).sqrt())
    if vector_norm == 0.0:
        raise ValueError("Cannot take a finite-difference Hessian-vector product along a zero vector.")
    root_mean_square = parameter_norm / math.sqrt(count) if parameter_norm > 0.0 else 1.0
    return relative_step * root_mean_square / vector_norm


def finite_difference_block_hvp(
    loss_fn: Callable[[], torch.Tensor],
    parameters: Sequence[torch.Tensor],
    relative_step: float = DEFAULT_FINITE_DIFFERENCE_STEP,
    base_gradients: Sequence[torch.Tensor] | None = None,
) -> Callable[[TensorList], TensorList]:
    """Return ``v -> H_ll v`` from finite differences of ordinary gradients of one layer.

    Args:
        loss_fn: Computes the scalar loss at the parameters' current values.
            It must be deterministic (dropout off), because the products
            compare losses of separate forward passes.
        parameters: The layer's parameters. They are perturbed in place during
            a product and restored from a copy afterwards, also on error.
        relative_step: Norm of the perturbation as a fraction of the layer's
            root-mean-square parameter value (see `finite_difference_epsilon`).
        base_gradients: ``g_l(theta)``. When given, products use the forward
            difference ``(g_l(theta + eps v) - g_l(theta)) / eps``: one pass
            instead of two, with an ``O(eps)`` instead of ``O(eps^2)`` error.

    Returns:
        The product function, for `power_iteration`.
    """
    parameters = list(parameters)
    if not relative_step > 0:
        raise ValueError(f"relative_step must be positive, got {relative_step}.")

    def gradient_at(vector: TensorList, shift: float) -> TensorList:
        saved = [p.detach().clone() for p in parameters]
        try:
            with torch.no_grad():
                for parameter, direction in zip(parameters, vector):
                    parameter.add_(direction.to(parameter.dtype), alpha=shift)
            loss = loss_fn()
            gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
        finally:
            with torch.no_grad():
                for parameter, value in zip(parameters, saved):
                    parameter.copy_(value)
        return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(gradients, parameters)]

    def matvec(vector: TensorList) -> TensorList:
        epsilon = finite_difference_epsilon([p.detach() for p in parameters], vector, relative_step)
        forward = gradient_at(vector, epsilon)
        if base_gradients is not None:
            return [(f - b.to(f.dtype)) / epsilon for f, b in zip(forward, base_gradients)]
        backward = gradient_at(vector, -epsilon)
        return [(f - b) / (2.0 * epsilon) for f, b in zip(forward, backward)]

    return matvec


def finite_difference_eigenvalues(
    loss_fn: Callable[[], torch.Tensor],
    layer_parameters: Sequence[Sequence[torch.Tensor]],
    initial_vectors: Sequence[Sequence[torch.Tensor] | None],
    max_iterations: int,
    tolerance: float = 1e-3,
    generator: torch.Generator | None = None,
    relative_step: float = DEFAULT_FINITE_DIFFERENCE_STEP,
    central: bool = True,
    solver: str = "power",
) -> list[PowerIterationResult]:
    """Run power iteration on every layer's diagonal Hessian block with finite-difference products.

    Arguments as for `top_block_eigenvalues`, except that `loss_fn` computes
    the loss afresh on every call instead of a graph that supports double
    backward, and a list of `initial_vectors` is updated in the same way. With
    ``central=False`` one gradient at the unperturbed parameters is reused by
    all forward differences.
    """
    solve = _solver(solver)
    flat_parameters = [p for parameters in layer_parameters for p in parameters]
    base: Sequence[torch.Tensor | None] = [None] * len(flat_parameters)
    if not central:
        base = torch.autograd.grad(loss_fn(), flat_parameters, allow_unused=True)

    results: list[PowerIterationResult] = []
    offset = 0
    for index, (parameters, initial) in enumerate(zip(layer_parameters, initial_vectors)):
        parameters = list(parameters)
        layer_base = base[offset : offset + len(parameters)]
        offset += len(parameters)
        if not central and all(g is None for g in layer_base):
            results.append(PowerIterationResult(0.0, [torch.zeros_like(p) for p in parameters], 0, True))
        else:
            base_gradients = None
            if not central:
                base_gradients = [
                    torch.zeros_like(p) if g is None else g.detach() for g, p in zip(layer_base, parameters)
                ]
            if initial is None:
                initial = _random_start(parameters, generator)
            matvec = finite_difference_block_hvp(loss_fn, parameters, relative_step, base_gradients)
            results.append(solve(matvec, initial, max_iterations, tolerance))
        _replace_vector(initial_vectors, index, results[-1].eigenvector)
        del initial
    return results


def _reject_sharded_parameters(layer_parameters: Sequence[Sequence[torch.Tensor]]) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return
    if any(isinstance(p, DTensor) for parameters in layer_parameters for p in parameters):
        # FSDP2 computes with all-gathered copies, so torch.autograd.grad with respect to the
        # sharded parameters returns None (torch 2.13), which would read as zero curvature.
        raise ValueError(
            "Hessian-vector products on FSDP-sharded (DTensor) parameters are not supported: the sharded "
            "parameters receive no autograd gradient. Measure curvature on an unsharded copy of the model, "
            "or set curvature=False."
        )


def measure_block_eigenvalues(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    layer_parameters: Sequence[Sequence[torch.Tensor]],
    initial_vectors: Sequence[Sequence[torch.Tensor] | None],
    max_iterations: int,
    tolerance: float = 1e-3,
    generator: torch.Generator | None = None,
    method: str = "auto",
    relative_step: float = DEFAULT_FINITE_DIFFERENCE_STEP,
    solver: str = "power",
) -> list[PowerIterationResult]:
    """Find each layer's extreme Hessian-block eigenvalue with the chosen product method and solver.

    Args:
        model: The module that `loss_fn` evaluates; "auto" remembers per model
            that double backward failed.
        loss_fn: Computes the scalar loss on the current batch.
        method: "double_backward", "finite_difference" (central differences),
            or "auto": double backward, and finite differences after a
            `RuntimeError` in double backward (an operation without a second
            derivative), from then on for this model.
        relative_step: Finite-difference perturbation norm as a fraction of
            each layer's root-mean-square parameter value.
        solver: "power" or "lanczos".

    Other arguments are as for `top_block_eigenvalues`.

    Raises:
        ValueError: For an unknown method or solver, or FSDP-sharded (DTensor) parameters.
    """
    if method not in HVP_METHODS:
        raise ValueError(f"Unknown Hessian-vector product method {method!r}; expected one of {', '.join(HVP_METHODS)}.")
    _solver(solver)
    _reject_sharded_parameters(layer_parameters)
    use_finite_difference = method == "finite_difference" or (method == "auto" and model in _NO_DOUBLE_BACKWARD)

    # NOTE: "auto" only notices an error. A custom autograd.Function whose backward is marked
    # once_differentiable cuts the second-derivative path without raising (torch 2.13). Double
    # backward then returns zero products for the layers behind it, so such models need
    # "finite_difference".
    if not use_finite_difference:
        try:
            return top_block_eigenvalues(
                loss_fn(), layer_parameters, initial_vectors, max_iterations, tolerance, generator, solver
            )
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            if method != "auto":
                raise
            _NO_DOUBLE_BACKWARD.add(model)
            logger.warning(
                "Double backward failed on %s (%s); switching to finite-difference Hessian-vector products for "
                "this model. Set hvp_method='finite_difference' to skip the attempt.",
                type(model).__name__,
                str(error).splitlines()[0],
            )

    return finite_difference_eigenvalues(
        loss_fn, layer_parameters, initial_vectors, max_iterations, tolerance, generator, relative_step, solver=solver
    )


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
