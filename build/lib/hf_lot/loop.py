"""`LoTLoop`: the threshold in a hand-written Accelerate training loop.

`LoTTrainer` does this wiring inside `Trainer`. For a loop of your own::

    lot = LoTLoop(model, config=LoTConfig(interval=20))
    optimizer = torch.optim.AdamW(lot.param_groups(lr=1e-4, weight_decay=0.01))
    scheduler = lot.scheduler(optimizer)               # constant base schedule
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    lot.begin_task(num_steps=len(loader) // accumulation)

    for batch in loader:
        with accelerator.accumulate(model):
            with lot.micro_batch(accelerator, num_items=len(batch["labels"])):
                loss = model(**batch).loss             # a mean over the micro-batch
                accelerator.backward(loss)
            if accelerator.sync_gradients:
                lot.end_step(accelerator, model, optimizer, loss_fn=lambda m: m(**batch).loss)
            optimizer.step()
            scheduler.step()                           # advances once per optimizer step
            optimizer.zero_grad()

The loss must be the mean over the micro-batch's items, which
`accelerator.backward` divides by the accumulation steps: each micro-batch
gradient then enters the step gradient with weight ``1 / (steps * ranks)``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .collectives import all_reduce
from .config import LoTConfig
from .controller import LoTController, layerwise_param_groups
from .curvature import curvature_context, measure_block_eigenvalues
from .layers import format_layer_table, group_parameters_by_layer
from .noise import MicroBatchNoiseCollector, squared_norms_of_gradients
from .optim import unwrap_optimizer
from .scheduler import LayerwiseLRScheduler

__all__ = ["LoTLoop", "measure_layer_sharpness", "record_step_noise"]

logger = logging.getLogger(__name__)


def measure_layer_sharpness(
    accelerator,
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    controller: LoTController,
    generator: torch.Generator,
) -> list[float]:
    """Measure each layer's top Hessian-block eigenvalue, warm-started, and average it over ranks.

    `loss_fn` maps the unwrapped `model` to a scalar loss on the current
    micro-batch; finite-difference products (``config.hvp_method``) call it
    twice per product. The new eigenvectors are stored in the controller.
    """
    config = controller.config
    cold = any(vector is None for vector in controller.eigenvectors)
    with curvature_context(model, eval_mode=config.hvp_eval_mode):
        results = measure_block_eigenvalues(
            model,
            lambda: loss_fn(model),
            [layer.parameters for layer in controller.layers],
            controller.eigenvectors,
            max_iterations=config.hvp_cold_iterations if cold else config.hvp_iterations,
            tolerance=config.hvp_tolerance,
            generator=generator,
            method=config.hvp_method,
            relative_step=config.hvp_fd_step,
            solver=config.hvp_solver,
        )
    controller.eigenvectors = [result.eigenvector for result in results]
    sharpness = torch.tensor([result.eigenvalue for result in results], dtype=torch.float64)
    if accelerator.num_processes > 1:
        sharpness = all_reduce(sharpness.to(accelerator.device), reduction="mean").cpu()
    return sharpness.tolist()


def record_step_noise(
    accelerator, collector: MicroBatchNoiseCollector, controller: LoTController, squared_norms: torch.Tensor
) -> bool:
    """Reduce the collector's per-rank sums, combine them with ``|G|^2`` and record the step's noise.

    Returns:
        False when the step had fewer than two non-empty micro-batches.
    """
    sums = collector.local_sums()
    if accelerator.num_processes > 1:
        sums = all_reduce(sums.to(accelerator.device), reduction="sum").cpu()
    measurement = collector.finish_step(sums, squared_norms)
    if measurement is None:
        return False
    controller.record_noise(measurement)
    return True


class LoTLoop:
    """Noise collection, curvature measurement and control for a hand-written loop.

    Args:
        model: The unwrapped model (before `accelerator.prepare`).
        config: LoT options; the ``paper`` preset by default.
        controller: A controller to continue from, instead of a new one.
    """

    def __init__(self, model: nn.Module, config: LoTConfig | None = None, controller: LoTController | None = None):
        self.config = config or (controller.config if controller is not None else LoTConfig())
        if controller is None:
            controller = LoTController(group_parameters_by_layer(model, self.config.layer_rules), self.config)
        self.controller = controller
        self.layers = controller.layers
        self.collector = MicroBatchNoiseCollector(self.layers)
        self.collector.attach()
        self._scheduler: LayerwiseLRScheduler | None = None
        self._collecting = False
        self._micro_batches = 0
        self._generator = torch.Generator().manual_seed(self.config.seed)
        logger.info("LoT layers:\n%s", format_layer_table(self.layers))

    def param_groups(self, lr: float, weight_decay: float = 0.0, no_decay_names: set[str] | None = None) -> list[dict[str, Any]]:
        """Return one optimizer parameter group per layer, for the optimizer's constructor."""
        return layerwise_param_groups(self.layers, lr, weight_decay, no_decay_names)

    def scheduler(self, optimizer: torch.optim.Optimizer, base=None) -> LayerwiseLRScheduler:
        """Create the `LayerwiseLRScheduler` that applies this loop's factors on top of `base`."""
        self._scheduler = LayerwiseLRScheduler(unwrap_optimizer(optimizer), self.controller, base=base)
        return self._scheduler

    def begin_task(self, num_steps: int) -> None:
        self.controller.begin_task(num_steps)

    @contextlib.contextmanager
    def micro_batch(self, accelerator, num_items: int) -> Iterator[None]:
        """Record the gradient norms of the backward pass run inside this context."""
        if self._micro_batches == 0:
            self._collecting = self.controller.is_noise_step()
        self._micro_batches += 1
        if not self._collecting:
            yield
            return
        world_size = accelerator.num_processes
        accumulation = max(accelerator.gradient_accumulation_steps, 1)
        scaler = getattr(accelerator, "scaler", None)
        amp_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self.collector.begin_micro_batch(
            1.0 / (accumulation * world_size), num_items, world_size * amp_scale, device=accelerator.device
        )
        try:
            yield
        finally:
            self.collector.end_micro_batch()

    def end_step(
        self,
        accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
    ) -> dict[str, Any] | None:
        """Finish the optimizer step's statistics and, every interval, update the learning rates.

        Call once per optimizer step, after the last backward and before
        `optimizer.step()`. `loss_fn` computes the current micro-batch's loss
        on the unwrapped model it receives; it is needed when curvature is on.

        Returns:
            The controller's history record when this step was a measurement.
        """
        self._micro_batches = 0
        scaler = getattr(accelerator, "scaler", None)
        amp_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        squared_norms = squared_norms_of_gradients(self.layers, scale=amp_scale)
        controller = self.controller

        if not torch.isfinite(squared_norms).all():
            # As in LoTTrainer: the step moves no statistic, and only the first one is logged.
            self.collector.discard_step()
            controller.record_skipped_step()
            if controller.skipped_steps == 1:
                logger.warning(
                    "Optimizer step %d has a NaN or infinite gradient. LoT statistics skip such steps and count them "
                    "in controller.skipped_steps.",
                    controller.total_steps + 1,
                )
            controller.advance()
            return None

        if self._collecting:
            record_step_noise(accelerator, self.collector, controller, squared_norms)
        self._collecting = False

        record = None
        if controller.is_measurement_step():
            sharpness = None
            if self.config.curvature:
                if loss_fn is None:
                    raise ValueError("LoTLoop.end_step needs loss_fn when curvature is on (LoTConfig.curvature=True).")
                sharpness = measure_layer_sharpness(
                    accelerator, accelerator.unwrap_model(model), loss_fn, controller, self._generator
                )
            record = controller.update(unwrap_optimizer(optimizer), sharpness)
            if record is not None and self._scheduler is not None:
                self._scheduler.apply_factors()
        controller.advance()
        return record

    def close(self) -> None:
        """Remove the gradient hooks."""
        self.collector.detach()
