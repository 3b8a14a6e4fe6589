"""`LoTController`: per-layer statistics, thresholds and learning-rate factors.

The controller is the stateful part of the method. Every `interval` optimizer
steps it combines

- the noise statistics recorded since the previous update (`record_noise`),
- the per-layer sharpness measured on the current minibatch, and
- Adam's effective step read from the optimizer state,

into the per-layer bounds, and cools or warms each layer's learning-rate
factor. The factors are its own state: a `LayerwiseLRScheduler` multiplies
them onto any base schedule, so neither overwrites the other.

It does not run forward or backward passes. `LoTTrainer` and hand-written
loops (`hf_lot.loop.LoTLoopHelper`) feed it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from .config import LoTConfig
from .layers import Layer
from .noise import NoiseMeasurement, noise_bound
from .threshold import (
    ControllerAction,
    adam_effective_step,
    combined_bound,
    controller_action,
    volatility,
    volatility_bound,
    window_statistics,
)

__all__ = ["LoTController", "layer_param_group_indices", "layerwise_param_groups"]


def layerwise_param_groups(
    layers: Sequence[Layer],
    learning_rate: float,
    weight_decay: float = 0.0,
    no_decay_names: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Build optimizer parameter groups with one group per layer.

    Parameters named in `no_decay_names` go to a second group of the same
    layer, ``<layer>.no_decay``, with zero weight decay. Every group carries
    its layer name under ``"name"``, which optimizers ignore and logs show.
    """
    groups = []
    for layer in layers:
        decay = [p for n, p in zip(layer.parameter_names, layer.parameters) if not no_decay_names or n not in no_decay_names]
        no_decay = [p for n, p in zip(layer.parameter_names, layer.parameters) if no_decay_names and n in no_decay_names]
        if decay:
            groups.append({"params": decay, "lr": learning_rate, "weight_decay": weight_decay, "name": layer.name})
        if no_decay:
            groups.append({"params": no_decay, "lr": learning_rate, "weight_decay": 0.0, "name": f"{layer.name}.no_decay"})
    return groups


def layer_param_group_indices(layers: Sequence[Layer], optimizer: torch.optim.Optimizer) -> list[list[int]]:
    """Return, per layer, the indices of the optimizer's parameter groups that hold its parameters.

    Raises:
        ValueError: If a group mixes layers, or a layer parameter is missing
            from the optimizer. Both would make per-layer learning rates
            impossible.
    """
    group_of = {}
    for group_index, group in enumerate(optimizer.param_groups):
        for parameter in group["params"]:
            group_of[id(parameter)] = group_index

    layer_of_group: dict[int, str] = {}
    indices = []
    for layer in layers:
        layer_groups = []
        for name, parameter in zip(layer.parameter_names, layer.parameters):
            if id(parameter) not in group_of:
                raise ValueError(
                    f"Parameter {name!r} of layer {layer.name!r} is not in the optimizer; build the optimizer "
                    "from hf_lot.layerwise_param_groups(layers, ...) so every layer has its own groups."
                )
            group_index = group_of[id(parameter)]
            owner = layer_of_group.setdefault(group_index, layer.name)
            if owner != layer.name:
                raise ValueError(
                    f"Optimizer parameter group {group_index} contains parameters of layers {owner!r} and "
                    f"{layer.name!r}; per-layer learning rates need one group per layer. Build the groups "
                    "with hf_lot.layerwise_param_groups(layers, ...)."
                )
            if group_index not in layer_groups:
                layer_groups.append(group_index)
        indices.append(layer_groups)
    return indices


def _require_adam_state(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if "betas" not in group or "eps" not in group:
            raise ValueError(
                f"{type(optimizer).__name__} has no Adam moments (param group options {sorted(group)}); the "
                "LoT threshold reads Adam's second moment. Use an Adam-family optimizer (optim='adamw_torch' "
                "or torch.optim.Adam/AdamW), or disable the threshold."
            )


class LoTController:
    """Per-layer noise-curvature thresholds and learning-rate factors.

    Args:
        layers: The layers, as returned by `group_parameters_by_layer`.
        config: The options; see `LoTConfig`.
    """

    def __init__(self, layers: Sequence[Layer], config: LoTConfig | None = None):
        self.layers = list(layers)
        self.config = config or LoTConfig()
        self.layer_names = [layer.name for layer in self.layers]
        num_layers = len(self.layers)

        self.factors = [1.0] * num_layers
        self.total_steps = 0
        self.task_index = -1
        self.task_start_step = 0
        self.task_num_steps = 0
        self.first_task_num_steps = 0
        self.last_update_step = -1
        self.sharpness_windows = [deque(maxlen=self.config.window) for _ in range(num_layers)]
        self.eigenvectors: list[list[torch.Tensor] | None] = [None] * num_layers
        self.history: list[dict[str, Any]] = []
        self.task_counts: list[dict[str, int]] = []
        # Optimizer steps whose statistics were discarded because their loss or gradient was not finite.
        self.skipped_steps = 0
        self._reset_noise_sums()

    # -- bookkeeping -----------------------------------------------------

    def _reset_noise_sums(self) -> None:
        num_layers = len(self.layers)
        self._noise_squared_norm = torch.zeros(num_layers, dtype=torch.float64)
        self._noise_variance = torch.zeros(num_layers, dtype=torch.float64)
        self._noise_items = 0.0
        self._noise_steps = 0

    def begin_task(self, num_steps: int) -> None:
        """Start a new task of `num_steps` optimizer steps: the unit of the risk and the warm phase."""
        self.task_index += 1
        self.task_start_step = self.total_steps
        self.task_num_steps = int(num_steps)
        if self.task_index == 0:
            self.first_task_num_steps = int(num_steps)
        self.task_counts.append({"measurements": 0, "combined": 0, "noise": 0, "volatility": 0, "skipped": 0})

    def advance(self) -> None:
        """Count one completed optimizer step."""
        self.total_steps += 1

    def record_skipped_step(self) -> None:
        """Count an optimizer step whose loss or gradient was NaN or infinite.

        The caller discards the step's statistics and calls `advance` as for
        any step. Nothing else of the controller changes, so the step moves no
        statistic, window or factor.
        """
        self.skipped_steps += 1
        if self.task_counts:
            counts = self.task_counts[-1]
            counts["skipped"] = counts.get("skipped", 0) + 1

    def is_measurement_step(self) -> bool:
        """True when the optimizer step about to run ends an interval of `config.interval` steps."""
        return (self.total_steps + 1) % self.config.interval == 0

    def is_noise_step(self) -> bool:
        return self.total_steps % self.config.noise_every == 0

    def in_warm_phase(self) -> bool:
        phase = self.config.warm_phase
        if phase == "always":
            return True
        if phase == "never":
            return False
        if phase == "run_fraction":
            return self.total_steps < self.config.warm_fraction * max(self.first_task_num_steps, 1)
        progress = (self.total_steps - self.task_start_step) / max(self.task_num_steps, 1)
        return progress < self.config.warm_fraction

    def record_noise(self, measurement: NoiseMeasurement) -> None:
        """Add one optimizer step's noise statistics to the current interval's averages."""
        if not (torch.isfinite(measurement.variance).all() and torch.isfinite(measurement.squared_gradient_norm).all()):
            return
        self._noise_squared_norm += measurement.squared_gradient_norm.double()
        self._noise_variance += measurement.variance.double()
        self._noise_items += measurement.num_items
        self._noise_steps += 1

    def learning_rates(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Return each layer's current learning rate (its first parameter group's)."""
        indices = layer_param_group_indices(self.layers, optimizer)
        return {name: optimizer.param_groups[groups[0]]["lr"] for name, groups in zip(self.layer_names, indices)}

    # -- optimizer statistics ---------------------------------------------

    def effective_steps(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Return Adam's effective step ``alpha_l`` per layer; NaN for a layer without weight matrices or state."""
        _require_adam_state(optimizer)
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        result = torch.full((len(self.layers),), math.nan)
        for index, layer in enumerate(self.layers):
            values = []
            for parameter in layer.matrix_parameters:
                state = optimizer.state.get(parameter, {})
                if "exp_avg_sq" not in state:
                    continue
                group = group_of[id(parameter)]
                beta1, beta2 = group["betas"]
                step = int(state["step"]) if "step" in state else 0
                mean_v = float(state["exp_avg_sq"].float().mean())
                values.append(adam_effective_step(group["lr"], beta1, beta2, group["eps"], step, mean_v))
            if values:
                result[index] = sum(values) / len(values)
        return result

    def sharpness_scales(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Return ``alpha_agg`` per layer, the factor that turns sharpness into normalized sharpness."""
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        result = torch.full((len(self.layers),), math.nan)

        if self.config.sharpness_scale == "global":
            # Reference code: mean of v over all parameters, no bias correction, first group's lr.
            total, count = 0.0, 0
            for state in optimizer.state.values():
                if "exp_avg_sq" in state:
                    total += float(state["exp_avg_sq"].float().sum())
                    count += state["exp_avg_sq"].numel()
            if count:
                group = optimizer.param_groups[0]
                result.fill_(group["lr"] / (math.sqrt(total / count) + group["eps"]))
            return result

        for index, layer in enumerate(self.layers):
            total, count = 0.0, 0
            learning_rate = eps = None
            for parameter in layer.parameters:
                state = optimizer.state.get(parameter, {})
                if "exp_avg_sq" not in state or int(state.get("step", 0)) == 0:
                    continue
                group = group_of[id(parameter)]
                correction = 1.0 - group["betas"][1] ** int(state["step"])
                total += float(state["exp_avg_sq"].float().sum()) / correction
                count += state["exp_avg_sq"].numel()
                learning_rate, eps = group["lr"], group["eps"]
            if count:
                result[index] = learning_rate / (math.sqrt(total / count) + eps)
        return result

    # -- the update ---------------------------------------------------------

    def update(
        self, optimizer: torch.optim.Optimizer, sharpness: Sequence[float] | None, gradient_scale: float = 1.0
    ) -> dict[str, Any] | None:
        """Compute the bounds for the interval that ends now and change the layer factors.

        Args:
            optimizer: The (unwrapped) Adam-family optimizer, before this
                step's `optimizer.step()`.
            sharpness: Top eigenvalue of each layer's Hessian block on the
                current minibatch, or None when curvature is off.
            gradient_scale: Factor between the gradients Adam receives and
                the step gradient ``G``, for example the accumulation steps
                when `Trainer` does not divide a mean loss by them. Adam's
                second moment grows with its square, so ``alpha_l`` and
                ``alpha_agg`` are multiplied by it to refer to ``G``.

        Returns:
            The history record of this measurement, or None when this step was
            already processed (repeated calls within one optimizer step change
            nothing).
        """
        if self.last_update_step == self.total_steps:
            return None
        self.last_update_step = self.total_steps
        config = self.config
        num_layers = len(self.layers)

        alpha = self.effective_steps(optimizer) * gradient_scale

        if self._noise_steps:
            squared_norm = (self._noise_squared_norm / self._noise_steps).float()
            variance = (self._noise_variance / self._noise_steps).float()
            batch_size = self._noise_items / self._noise_steps
            alpha_noise = noise_bound(batch_size, squared_norm, variance)
        else:
            squared_norm = variance = torch.full((num_layers,), math.nan)
            batch_size = math.nan
            alpha_noise = torch.full((num_layers,), math.nan)

        normalized = torch.full((num_layers,), math.nan)
        volatility_values = torch.zeros(num_layers)
        if sharpness is not None:
            scales = self.sharpness_scales(optimizer) * gradient_scale
            for index in range(num_layers):
                value = float(scales[index]) * float(sharpness[index])
                if not math.isfinite(value):
                    continue
                normalized[index] = value
                window = self.sharpness_windows[index]
                window.append(value)
                mu, s2 = window_statistics(window, config.volatility)
                volatility_values[index] = volatility(value, mu, s2, config.volatility, config.eps)
        alpha_volatility = volatility_bound(volatility_values, config.kappa)
        alpha_combined = combined_bound(batch_size, squared_norm, variance, volatility_values, config.beta)

        bound = {"combined": alpha_combined, "noise": alpha_noise, "volatility": alpha_volatility}[config.bound]
        warm = self.in_warm_phase()
        indices = layer_param_group_indices(self.layers, optimizer)

        global_record = None
        if config.granularity == "global":
            global_record = self._global_decision(alpha, batch_size, squared_norm, variance, volatility_values, warm)

        layers_record = {}
        for index, name in enumerate(self.layer_names):
            if global_record is not None:
                action = ControllerAction(global_record["action"])
            else:
                action = controller_action(
                    float(alpha[index]), float(bound[index]), config.gamma, config.alpha_min, config.warm_ratio, warm
                )
            old_factor = self.factors[index]
            if config.control and action is ControllerAction.COOL:
                self.factors[index] *= config.cool_factor
            elif config.control and action is ControllerAction.WARM:
                self.factors[index] *= config.warm_factor
            # The rate from this step on: LayerwiseLRScheduler sets base * factor.
            current_lr = optimizer.param_groups[indices[index][0]]["lr"]
            layers_record[name] = {
                "lr": current_lr * self.factors[index] / old_factor,
                "factor": self.factors[index],
                "alpha": float(alpha[index]),
                "alpha_noise": float(alpha_noise[index]),
                "alpha_volatility": float(alpha_volatility[index]),
                "alpha_combined": float(alpha_combined[index]),
                "sharpness": float(sharpness[index]) if sharpness is not None else math.nan,
                "normalized_sharpness": float(normalized[index]),
                "volatility": float(volatility_values[index]),
                "variance": float(variance[index]),
                "grad_sq": float(squared_norm[index]),
                "action": action.value,
            }

        def exceeds(bounds: torch.Tensor) -> bool:
            valid = torch.isfinite(alpha) & ~torch.isnan(bounds)
            return bool((alpha[valid] > bounds[valid]).any())

        events = {
            "combined": exceeds(alpha_combined),
            "noise": exceeds(alpha_noise),
            "volatility": exceeds(alpha_volatility),
        }
        if self.task_counts:
            counts = self.task_counts[-1]
            counts["measurements"] += 1
            for key, event in events.items():
                counts[key] += int(event)

        record = {
            "step": self.total_steps,
            "task": self.task_index,
            "batch_size": batch_size,
            "warm_phase": warm,
            "rho_event": events["combined"],
            "noise_event": events["noise"],
            "volatility_event": events["volatility"],
            "layers": layers_record,
        }
        if global_record is not None:
            record["global"] = global_record
        self.history.append(record)
        self._reset_noise_sums()
        return record

    def _global_decision(
        self,
        alpha: torch.Tensor,
        batch_size: float,
        squared_norm: torch.Tensor,
        variance: torch.Tensor,
        volatility_values: torch.Tensor,
        warm: bool,
    ) -> dict[str, Any]:
        """Make one controller decision from network-wide quantities, for ``granularity='global'``.

        The network's effective step is the mean of the layers' ``alpha_l``.
        Its squared gradient norm and noise are the sums over layers, and its
        volatility is the mean of the layers' ``Vol_l`` weighted by ``|g_l|^2``,
        so the inflated noise ``sigma2 + beta |g|^2 Vol`` is the sum of the
        layers' inflated noises.
        """
        config = self.config
        finite_alpha = alpha[torch.isfinite(alpha)]
        network_alpha = float(finite_alpha.mean()) if finite_alpha.numel() else math.nan

        measured = torch.isfinite(squared_norm) & torch.isfinite(variance)
        total_squared_norm = squared_norm[measured].sum().reshape(1)
        total_variance = variance[measured].sum().reshape(1)
        if not bool(measured.any()):
            total_squared_norm = total_variance = torch.full((1,), math.nan)
        weights = squared_norm.nan_to_num(0.0)
        weight_sum = float(weights.sum())
        network_volatility = float((weights * volatility_values).sum()) / weight_sum if weight_sum > 0 else 0.0
        network_volatility = torch.tensor([network_volatility])

        bounds = {
            "noise": float(noise_bound(batch_size, total_squared_norm, total_variance)[0]),
            "volatility": float(volatility_bound(network_volatility, config.kappa)[0]),
            "combined": float(
                combined_bound(batch_size, total_squared_norm, total_variance, network_volatility, config.beta)[0]
            ),
        }
        action = controller_action(
            network_alpha, bounds[config.bound], config.gamma, config.alpha_min, config.warm_ratio, warm
        )
        return {
            "alpha": network_alpha,
            "alpha_noise": bounds["noise"],
            "alpha_volatility": bounds["volatility"],
            "alpha_combined": bounds["combined"],
            "volatility": float(network_volatility[0]),
            "action": action.value,
        }

    def task_summary(self, task_index: int | None = None) -> dict[str, Any]:
        """Return the risk of one task: the share of measurements where some layer exceeded each bound.

        ``rho`` uses the combined bound, ``rho_noise`` and ``rho_volatility``
        the single bounds. All are None for a task without measurements.
        """
        task_index = self.task_index if task_index is None else task_index
        counts = self.task_counts[task_index]
        measurements = counts["measurements"]

        def share(key: str) -> float | None:
            return counts[key] / measurements if measurements else None

        return {
            "measurements": measurements,
            "rho": share("combined"),
            "rho_noise": share("noise"),
            "rho_volatility": share("volatility"),
            "skipped_steps": counts.get("skipped", 0),
        }

    def log_values(self, record: dict[str, Any]) -> dict[str, float]:
        """Flatten a history record into ``lot/<quantity>/<layer>`` scalars for `Trainer.log`."""
        values: dict[str, float] = {}
        for name, layer in record["layers"].items():
            for key in ("lr", "alpha", "alpha_noise", "alpha_volatility", "alpha_combined", "sharpness", "variance", "grad_sq"):
                value = layer[key]
                if math.isfinite(value):
                    values[f"lot/{key}/{name}"] = value
        if self.task_counts:
            summary = self.task_summary()
            if summary["rho"] is not None:
                values["lot/rho"] = summary["rho"]
        return values

    # -- serialization ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to continue exactly where the controller is.

        The warm-start eigenvectors are included (one tensor per parameter), so
        a resumed run does not restart power iteration from random vectors.
        """
        return {
            "layer_names": list(self.layer_names),
            "config": self.config.to_dict(),
            "factors": list(self.factors),
            "total_steps": self.total_steps,
            "task_index": self.task_index,
            "task_start_step": self.task_start_step,
            "task_num_steps": self.task_num_steps,
            "first_task_num_steps": self.first_task_num_steps,
            "last_update_step": self.last_update_step,
            "sharpness_windows": [list(window) for window in self.sharpness_windows],
            "eigenvectors": [None if v is None else [t.detach().cpu() for t in v] for v in self.eigenvectors],
            "history": self.history,
            "task_counts": self.task_counts,
            "skipped_steps": self.skipped_steps,
            "noise_sums": {
                "squared_norm": self._noise_squared_norm.clone(),
                "variance": self._noise_variance.clone(),
                "items": self._noise_items,
                "steps": self._noise_steps,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["layer_names"] != self.layer_names:
            raise ValueError(
                f"Saved LoT state is for layers {state['layer_names']}, but this model maps to {self.layer_names}; "
                "resume with the same model and layer_rules."
            )
        self.factors = [float(f) for f in state["factors"]]
        for key in ("total_steps", "task_index", "task_start_step", "task_num_steps", "first_task_num_steps", "last_update_step"):
            setattr(self, key, int(state[key]))
        self.sharpness_windows = [deque(values, maxlen=self.config.window) for values in state["sharpness_windows"]]
        self.eigenvectors = []
        for saved, layer in zip(state["eigenvectors"], self.layers):
            if saved is None:
                self.eigenvectors.append(None)
            else:
                self.eigenvectors.append([t.to(p.device, p.dtype) for t, p in zip(saved, layer.parameters)])
        self.history = list(state["history"])
        self.task_counts = [dict(counts) for counts in state["task_counts"]]
        # States saved before the count existed have none.
        self.skipped_steps = int(state.get("skipped_steps", 0))
        noise = state["noise_sums"]
        self._noise_squared_norm = noise["squared_norm"].clone().double()
        self._noise_variance = noise["variance"].clone().double()
        self._noise_items = float(noise["items"])
        self._noise_steps = int(noise["steps"])
