"""Single indicators of trainability, and dormant units, as pure functions and a `TrainerCallback`.

These are the signals that earlier work proposed as explanations of loss of
trainability, each of which Baveja, Lewandowski and Schmidt (arXiv 2509.19698)
show failing on a counterexample:

- gradient-Gram rank: effective rank of the Gram matrix of per-example gradients;
- unit-sign entropy: how evenly each hidden unit's pre-activation sign splits a batch;
- sharpness: top eigenvalue of the loss Hessian;
- weight magnitude: mean absolute parameter value;
- gradient norm and update norm;
- update-to-parameter ratio: mean absolute update over mean absolute parameter.

Dormant units are added: the share of hidden units whose mean absolute
activation is at most ``tau`` times the layer's average.

`IndicatorCallback` computes them during training with a plain `Trainer` or
with `LoTTrainer`, and stores one record per `train()` call (one task).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .curvature import power_iteration
from .plasticity import CReLU

__all__ = [
    "ACTIVATION_TYPES",
    "IndicatorCallback",
    "activation_inputs_and_outputs",
    "dormant_unit_fraction",
    "gradient_gram_rank",
    "per_example_gradients",
    "top_hessian_eigenvalue",
    "unit_sign_entropy",
    "update_to_parameter_ratio",
    "weight_magnitude",
]

logger = logging.getLogger(__name__)

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, CReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU, nn.ELU)


def gradient_gram_rank(gradients: torch.Tensor, energy: float = 0.99) -> float:
    """Return the effective rank of the per-example gradient Gram matrix, divided by the number of examples.

    Args:
        gradients: Per-example gradients, shape ``(n, num_parameters)``.
        energy: Share of the sum of singular values to keep.

    Returns:
        ``k / n`` for the smallest ``k`` whose ``k`` largest singular values of
        ``G = J J^T`` hold at least `energy` of their sum; 0.0 when every
        gradient is zero.
    """
    if gradients.ndim != 2 or gradients.shape[0] < 1:
        raise ValueError(f"Expected per-example gradients of shape (n, num_parameters), got {tuple(gradients.shape)}.")
    matrix = gradients.double()
    gram = matrix @ matrix.T
    singular_values = torch.linalg.svdvals(gram)
    total = float(singular_values.sum())
    if total <= 0:
        return 0.0
    cumulative = torch.cumsum(singular_values, dim=0) / total
    # The small tolerance keeps float rounding of an exact `energy` share from needing one more value.
    k = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype)).item()) + 1
    return min(k, gradients.shape[0]) / gradients.shape[0]


def unit_sign_entropy(preactivations: torch.Tensor) -> float:
    """Return the mean over units of the binary entropy, in bits, of each unit's pre-activation sign.

    Args:
        preactivations: Shape ``(batch, units)`` (more leading dimensions are
            flattened into the batch).

    For unit ``j``, ``p_j`` is the share of the batch with a positive
    pre-activation and ``H(p) = -p log2 p - (1 - p) log2 (1 - p)``, with
    ``H(0) = H(1) = 0``. The result lies in [0, 1]: 0 when every unit has one
    sign on the whole batch, 1 when every unit is positive on half of it.
    """
    values = preactivations.reshape(-1, preactivations.shape[-1]).detach().double()
    positive = (values > 0).double().mean(dim=0)
    entropy = torch.zeros_like(positive)
    inside = (positive > 0) & (positive < 1)
    p = positive[inside]
    entropy[inside] = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))
    return float(entropy.mean())


def dormant_unit_fraction(activations: torch.Tensor, tau: float = 0.0) -> float:
    """Return the share of units whose score ``mean|h_j| / mean_k mean|h_k|`` is at most `tau`.

    Args:
        activations: Post-activation values, shape ``(batch, units)``.
        tau: Threshold on the normalized score; 0.0 counts units that are
            zero on the whole batch.
    """
    values = activations.reshape(-1, activations.shape[-1]).detach().double().abs().mean(dim=0)
    average = float(values.mean())
    if average == 0:
        return 1.0
    return float(((values / average) <= tau).double().mean())


def weight_magnitude(parameters: Sequence[torch.Tensor]) -> float:
    """Return the mean absolute value over all entries of `parameters`."""
    total = sum(float(p.detach().abs().sum()) for p in parameters)
    count = sum(p.numel() for p in parameters)
    return total / count if count else math.nan


def update_to_parameter_ratio(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """Return ``mean |after - before| / mean |before|`` over all entries."""
    change = sum(float((a.detach() - b.detach()).abs().sum()) for a, b in zip(after, before))
    size = sum(float(b.detach().abs().sum()) for b in before)
    return change / size if size > 0 else math.nan


def per_example_gradients(
    model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor], batch: dict[str, Any]
) -> torch.Tensor:
    """Return the flattened gradient of each example's loss, shape ``(n, num_trainable_parameters)``.

    Runs one backward pass per example, so it suits probe batches of about a
    hundred examples. `loss_fn(model, inputs)` returns the scalar loss of
    `inputs`, a batch of one example.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim >= 1)
    rows = []
    for index in range(size):
        single = {k: v[index : index + 1] if isinstance(v, torch.Tensor) and v.ndim >= 1 else v for k, v in batch.items()}
        gradients = torch.autograd.grad(loss_fn(model, single), parameters, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gradients, parameters)])
        )
    return torch.stack(rows)


def top_hessian_eigenvalue(
    loss: torch.Tensor, parameters: Sequence[torch.Tensor], iterations: int = 20, seed: int = 0
) -> float:
    """Return the largest eigenvalue of the Hessian of `loss` over all `parameters`, by power iteration."""
    parameters = list(parameters)
    gradients = torch.autograd.grad(loss, parameters, create_graph=True)

    def hessian_vector_product(vectors):
        products = torch.autograd.grad(gradients, parameters, grad_outputs=vectors, retain_graph=True)
        return [p.detach() for p in products]

    generator = torch.Generator().manual_seed(seed)
    start = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in parameters]
    result = power_iteration(hessian_vector_product, start, max_iterations=iterations)
    return float(result.eigenvalue)


def activation_inputs_and_outputs(
    model: nn.Module, run: Callable[[], Any], types: tuple[type[nn.Module], ...] = ACTIVATION_TYPES
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Run `run()` and return ``(module name, input, output)`` of every activation module of `types` it calls."""
    captured: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, types):

            def hook(module, inputs, output, name=name):
                captured.append((name, inputs[0].detach(), output.detach()))

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _default_loss(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    # Mirrors Trainer.compute_loss: a dict or ModelOutput with "loss", else a tuple whose first item is the loss.
    outputs = model(**inputs)
    return outputs["loss"] if isinstance(outputs, dict) else outputs[0]


class IndicatorCallback(TrainerCallback):
    """Compute the single indicators and dormant units during training, one record per task.

    Works with `transformers.Trainer` and `LoTTrainer`. Every `interval`
    optimizer steps it records the gradient norm (before the optimizer step),
    the update norm and the update-to-parameter ratio (across the step). At
    the end of each `train()` call it computes, on a probe batch in eval mode,
    the gradient-Gram rank, unit-sign entropy, sharpness, weight magnitude and
    dormant-unit share, and appends one record to `records`, averaging the
    per-step values over the task. The record also goes into the trainer
    state's ``log_history``, which `Trainer` saves in ``trainer_state.json``.

    Args:
        probe_batch: Inputs of the probe batch, as the model's forward takes
            them (with labels). None takes the first `probe_size` examples of
            the first training batch of each task.
        probe_size: Examples used for the probe-batch indicators (100 for the
            Gram rank in the original definition).
        interval: Optimizer steps between per-step measurements.
        loss_fn: ``loss_fn(model, inputs) -> loss``; by default ``model(**inputs).loss``.
        sharpness_iterations: Power-iteration steps for the top Hessian eigenvalue.
        dormant_tau: Threshold of the dormant-unit score.
    """

    def __init__(
        self,
        probe_batch: dict[str, torch.Tensor] | None = None,
        probe_size: int = 100,
        interval: int = 10,
        loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor] | None = None,
        sharpness_iterations: int = 20,
        dormant_tau: float = 0.0,
    ):
        if interval < 1:
            raise ValueError(f"Invalid interval={interval}: expected a positive number of optimizer steps.")
        self.probe_batch = probe_batch
        self.probe_size = probe_size
        self.interval = interval
        self.loss_fn = loss_fn or _default_loss
        self.sharpness_iterations = sharpness_iterations
        self.dormant_tau = dormant_tau
        self.records: list[dict[str, float]] = []
        self._task_probe: dict[str, torch.Tensor] | None = None
        self._before: list[torch.Tensor] | None = None
        self._step_values: dict[str, list[float]] = {}

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._step_values = {"gradient_norm": [], "update_norm": [], "update_ratio": []}
        self._task_probe = self.probe_batch
        if self._task_probe is None and train_dataloader is not None:
            first = next(iter(train_dataloader))
            self._task_probe = {k: v[: self.probe_size] if isinstance(v, torch.Tensor) else v for k, v in first.items()}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or (state.global_step + 1) % self.interval != 0:
            return
        parameters = [p for p in model.parameters() if p.requires_grad]
        squared = sum(float(p.grad.detach().double().pow(2).sum()) for p in parameters if p.grad is not None)
        self._step_values["gradient_norm"].append(math.sqrt(squared))
        self._before = [p.detach().clone() for p in parameters]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or self._before is None:
            return
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        squared = sum(float((a - b).double().pow(2).sum()) for a, b in zip(after, self._before))
        self._step_values["update_norm"].append(math.sqrt(squared))
        self._step_values["update_ratio"].append(update_to_parameter_ratio(self._before, after))
        self._before = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        record: dict[str, float] = {"task": float(len(self.records))}
        for key, values in self._step_values.items():
            record[key] = sum(values) / len(values) if values else math.nan
        record.update(self.probe_indicators(model, self._task_probe, args.device))
        self.records.append(record)
        state.log_history.append({f"indicators/{key}": value for key, value in record.items()} | {"step": state.global_step})
        logger.info("Indicators after task %d: %s", len(self.records) - 1, record)

    def probe_indicators(
        self, model: nn.Module, probe: dict[str, torch.Tensor] | None, device: torch.device | str
    ) -> dict[str, float]:
        """Compute the probe-batch indicators of `model` in eval mode; NaN for each one without a probe batch."""
        names = ("gram_rank", "sign_entropy", "sharpness", "weight_magnitude", "dormant_fraction")
        parameters = [p for p in model.parameters() if p.requires_grad]
        values = {name: math.nan for name in names}
        values["weight_magnitude"] = weight_magnitude(parameters)
        if probe is None:
            return values

        probe = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in probe.items()}
        was_training = model.training
        model.eval()
        try:
            values["gram_rank"] = gradient_gram_rank(per_example_gradients(model, self.loss_fn, probe))
            values["sharpness"] = top_hessian_eigenvalue(
                self.loss_fn(model, probe), parameters, iterations=self.sharpness_iterations
            )
            captured = activation_inputs_and_outputs(model, lambda: self.loss_fn(model, probe))
            if captured:
                values["sign_entropy"] = sum(unit_sign_entropy(pre) for _, pre, _ in captured) / len(captured)
                dormant = [dormant_unit_fraction(post, self.dormant_tau) for _, _, post in captured]
                values["dormant_fraction"] = sum(dormant) / len(dormant)
        finally:
            model.train(was_training)
        return values
