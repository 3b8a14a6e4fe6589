"""Per-layer gradient noise from the micro-batch gradients of one optimizer step.

Notation. One optimizer step combines micro-batch gradients ``g_j`` (on every
data-parallel rank), each the mean of the per-item gradients of its ``b_j``
items (examples, or tokens for token-level losses), into

    G = sum_j a_j g_j,        sum_j a_j = 1.

The weights ``a_j`` depend on how the loss was normalized. They are ``1/n``
when every micro-batch loss is a mean divided by the number of accumulation
steps, and ``b_j / B`` when the loss is a sum divided by the number of items in
the whole step (``num_items_in_batch``).

If per-item gradients have mean ``mu`` and covariance trace ``sigma2`` (the
per-example variance), then ``E|g_j|^2 = |mu|^2 + sigma2 / b_j`` and
``E|G|^2 = |mu|^2 + sigma2 * sum_j a_j^2 / b_j``. Hence

    sigma2_hat = (sum_j a_j |g_j|^2 - |G|^2) / sum_j a_j (1 - a_j) / b_j

is unbiased for any ``b_j`` and ``a_j``. For ``n`` equal micro-batches of
``b`` items this is ``b n / (n - 1) * (mean_j |g_j|^2 - |G|^2)``, the
two-batch-size estimator of McCandlish et al. (2018, "An Empirical Model of
Large-Batch Training"). It needs at least two micro-batches. When the ``n``
micro-batches partition a fixed batch at random, its mean over partitions is
the unbiased sample variance ``1/(B-1) sum_i |x_i - G|^2`` of that batch, and
with one item per micro-batch it equals that variance exactly.

`MicroBatchNoiseCollector` obtains the ``|g_j|^2`` from tensor hooks, which see
each micro-batch gradient before it is added to ``.grad`` (and, under DDP,
before the all-reduce), so no extra backward pass is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .layers import Layer

__all__ = [
    "MicroBatchNoiseCollector",
    "NoiseMeasurement",
    "noise_bound",
    "sample_variance",
    "layer_sums_of_squares",
    "squared_norm",
    "squared_norms_of_gradients",
    "variance_from_micro_batches",
]


def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``|tensor|^2`` accumulated in at least fp32 (fp64 stays fp64)."""
    accumulate = torch.promote_types(tensor.dtype, torch.float32)
    return torch.linalg.vector_norm(tensor.detach(), dtype=accumulate).pow(2).float()


def layer_sums_of_squares(norms: Sequence[torch.Tensor], layer_indices: Sequence[int], num_layers: int) -> torch.Tensor:
    """Return, per layer, the sum of the squares of the tensor `norms` that belong to it, in fp32.

    Args:
        norms: 0-dimensional norms, one per tensor, on any devices.
        layer_indices: The layer of each norm.
        num_layers: Length of the result.

    The result is on the device of the first norm (CPU when there are none).
    One stack, square and scatter-add replace several small operations per
    tensor, which dominate the cost for models with many small tensors.
    """
    if not norms:
        return torch.zeros(num_layers, dtype=torch.float32)
    device = norms[0].device
    if any(norm.device != device for norm in norms):
        norms = [norm.to(device) for norm in norms]
    squares = torch.stack(norms).float().square()
    index = torch.tensor(layer_indices, dtype=torch.long, device=device)
    return torch.zeros(num_layers, dtype=torch.float32, device=device).index_add_(0, index, squares)


def variance_from_micro_batches(
    micro_squared_norms: torch.Tensor,
    weights: torch.Tensor,
    num_items: torch.Tensor,
    combined_squared_norm: torch.Tensor,
) -> torch.Tensor:
    """Estimate the per-item gradient variance ``sigma2`` from micro-batch gradient norms.

    Args:
        micro_squared_norms: ``|g_j|^2`` per micro-batch and layer, shape ``(n, L)``,
            where ``g_j`` is the mean gradient over the micro-batch's items.
        weights: ``a_j``, shape ``(n,)``, the weights that combine the ``g_j`` into
            the step gradient ``G``. They must sum to 1.
        num_items: ``b_j``, shape ``(n,)``, the number of items per micro-batch.
        combined_squared_norm: ``|G|^2`` per layer, shape ``(L,)``.

    Returns:
        ``sigma2_hat`` per layer, shape ``(L,)``. Individual estimates can be
        negative when the noise is small, so callers average several steps
        before dividing by them.

    Raises:
        ValueError: With fewer than two non-empty micro-batches, where the
            variance is not identifiable.
    """
    weights = weights.double()
    num_items = num_items.double()
    nonempty = num_items > 0
    if int(nonempty.sum()) < 2:
        raise ValueError(
            f"At least two non-empty micro-batches are needed to estimate gradient noise, got "
            f"{int(nonempty.sum())}; use gradient_accumulation_steps >= 2, several processes, "
            "or the split fallback."
        )
    weights, num_items = weights[nonempty], num_items[nonempty]
    micro = micro_squared_norms.double()[nonempty]

    numerator = (weights[:, None] * micro).sum(dim=0) - combined_squared_norm.double()
    denominator = (weights * (1.0 - weights) / num_items).sum()
    return (numerator / denominator).to(torch.float32)


def sample_variance(per_item_gradients: torch.Tensor) -> torch.Tensor:
    """Return the unbiased sample variance ``1/(B-1) sum_i |x_i - mean|^2`` of rows of ``(B, D)``."""
    mean = per_item_gradients.mean(dim=0, keepdim=True)
    return (per_item_gradients - mean).pow(2).sum() / (per_item_gradients.shape[0] - 1)


def noise_bound(batch_size: float, squared_gradient_norm: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Return the gradient-noise bound ``alpha_g* = B |g|^2 / sigma2`` per layer.

    A non-positive variance (possible for a noisy estimate) gives ``inf``: no
    noise-limited bound.
    """
    variance = variance.float()
    bound = batch_size * squared_gradient_norm.float() / variance.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(variance > 0, bound, torch.full_like(bound, float("inf")))


@dataclass
class NoiseMeasurement:
    """Per-layer noise statistics of one optimizer step, in units of the per-item mean loss."""

    squared_gradient_norm: torch.Tensor
    variance: torch.Tensor
    num_items: float
    num_micro_batches: int


class MicroBatchNoiseCollector:
    """Collect ``|g_j|^2`` per layer from each micro-batch backward with tensor hooks.

    Usage for one optimizer step::

        collector.begin_micro_batch(weight=a_j, num_items=b_j, gradient_scale=k_j)
        loss.backward()            # hooks add |k_j a_j g_j|^2 per layer
        ...                        # one call pair per micro-batch
        measurement = collector.finish_step(model_parameters_grads, reduce_fn)

    ``gradient_scale`` is the factor between the gradient the hooks see and
    ``a_j g_j``: the number of data-parallel ranks (DDP averages their sums)
    times the AMP loss scale. The hooks only record while a micro-batch is
    open, so Hessian-vector products and evaluation passes are ignored.
    """

    def __init__(self, layers: Sequence[Layer]):
        self.layers = list(layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._open = False
        self._device = None
        # Norms of the open micro-batch's gradient tensors and their layers, summed when it ends.
        self._pending_norms: list[torch.Tensor] = []
        self._pending_layers: list[int] = []
        self._micro_norms: list[torch.Tensor] = []
        self._weights: list[float] = []
        self._num_items: list[float] = []
        self._scales: list[float] = []

    def attach(self) -> None:
        if self._handles:
            return
        for index, layer in enumerate(self.layers):
            for parameter in layer.parameters:
                accumulate = torch.promote_types(parameter.dtype, torch.float32)
                self._handles.append(parameter.register_hook(self._make_hook(index, accumulate)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, layer_index: int, accumulate: torch.dtype):
        # The hook runs once per tensor and micro-batch, so it only takes the norm and defers the rest.
        def hook(grad: torch.Tensor) -> None:
            if self._open:
                self._pending_norms.append(torch.linalg.vector_norm(grad.detach(), dtype=accumulate))
                self._pending_layers.append(layer_index)
            return None

        return hook

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def num_micro_batches(self) -> int:
        return len(self._micro_norms)

    def begin_micro_batch(self, weight: float, num_items: float, gradient_scale: float, device=None) -> None:
        self._device = device
        self._pending_norms.clear()
        self._pending_layers.clear()
        self._weights.append(float(weight))
        self._num_items.append(float(num_items))
        self._scales.append(float(gradient_scale))
        self._open = True

    def end_micro_batch(self) -> None:
        if not self._open:
            return
        sums = layer_sums_of_squares(self._pending_norms, self._pending_layers, len(self.layers))
        self._micro_norms.append(sums.to(self._device) if self._device is not None else sums)
        self._pending_norms.clear()
        self._pending_layers.clear()
        self._open = False

    def discard_step(self) -> None:
        """Drop everything recorded since the last `finish_step`."""
        self._open = False
        self._pending_norms.clear()
        self._pending_layers.clear()
        self._micro_norms.clear()
        self._weights.clear()
        self._num_items.clear()
        self._scales.clear()

    def local_sums(self) -> torch.Tensor:
        """Return this process's sums ``[sum_j a_j |g_j|^2 (L values), sum_j a_j (1 - a_j) / b_j, sum_j b_j, n]``.

        These are the only values that cross the network under data parallelism:
        summed over ranks they give the global estimator's inputs.
        """
        num_layers = len(self.layers)
        sums = torch.zeros(num_layers + 3, dtype=torch.float64)
        for norms, weight, items, scale in zip(self._micro_norms, self._weights, self._num_items, self._scales):
            if items <= 0 or weight <= 0:
                continue
            # The hook saw |scale * a_j * g_j|^2.
            mean_gradient_squared = norms.double().cpu() / (scale * weight) ** 2
            sums[:num_layers] += weight * mean_gradient_squared
            sums[num_layers] += weight * (1.0 - weight) / items
            sums[num_layers + 1] += items
            sums[num_layers + 2] += 1
        return sums

    def finish_step(self, global_sums: torch.Tensor, combined_squared_norm: torch.Tensor) -> NoiseMeasurement | None:
        """Combine globally reduced sums with ``|G|^2`` into this step's measurement.

        Args:
            global_sums: `local_sums()` summed over all data-parallel ranks.
            combined_squared_norm: ``|G|^2`` per layer for the step gradient,
                in the same units as ``g_j`` (AMP scale removed).

        Returns:
            The measurement, or None when the step had fewer than two
            non-empty micro-batches.
        """
        self.discard_step()
        num_layers = len(self.layers)
        if global_sums[num_layers + 2] < 2 or global_sums[num_layers] <= 0:
            return None
        numerator = global_sums[:num_layers] - combined_squared_norm.double().cpu()
        variance = (numerator / global_sums[num_layers]).to(torch.float32)
        return NoiseMeasurement(
            squared_gradient_norm=combined_squared_norm.float().cpu(),
            variance=variance,
            num_items=float(global_sums[num_layers + 1]),
            num_micro_batches=int(global_sums[num_layers + 2]),
        )


def squared_norms_of_gradients(layers: Sequence[Layer], scale: float = 1.0) -> torch.Tensor:
    """Return ``|p.grad / scale|^2`` summed per layer in fp32; a missing gradient counts as zero.

    The sums stay on the gradients' device until the end, so a GPU run
    synchronizes once per call, not once per tensor.
    """
    norms, layer_indices = [], []
    for index, layer in enumerate(layers):
        for parameter in layer.parameters:
            if parameter.grad is not None:
                accumulate = torch.promote_types(parameter.grad.dtype, torch.float32)
                norms.append(torch.linalg.vector_norm(parameter.grad.detach(), dtype=accumulate))
                layer_indices.append(index)
    return layer_sums_of_squares(norms, layer_indices, len(layers)).cpu() / scale**2
