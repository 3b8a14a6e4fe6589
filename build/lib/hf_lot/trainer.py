"""`LoTTrainer`: a `transformers.Trainer` that enforces the per-layer noise-curvature threshold.

Use it in place of `Trainer`, with `LoTTrainingArguments` in place of
`TrainingArguments`. On top of ordinary training it

- builds one optimizer parameter group per layer (`group_parameters_by_layer`),
- measures per-layer gradient noise from the micro-batch gradients that
  gradient accumulation and data-parallel ranks already compute,
- every ``lot_interval`` optimizer steps measures per-layer sharpness with
  Hessian-vector products on the current micro-batch, computes the bounds and
  lets the controller cool or warm each layer's learning rate, and
- logs per-layer learning rates, effective steps, bounds and the risk through
  `Trainer.log`, so every ``report_to`` integration receives them.

Each `train()` call is one task for the controller. Pass the previous
trainer's `lot_controller` (and optimizer) to the next trainer to continue
across tasks. The controller's state is part of the scheduler's `state_dict`,
so checkpoints restore it on resume.

Only public extension points of `Trainer` are overridden: `create_optimizer`,
`create_scheduler`, `training_step`, `compute_loss`, and callbacks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .callbacks import replace_console_callbacks
from .collectives import all_reduce
from .config import LoTConfig
from .controller import LoTController, _require_adam_state, layer_param_group_indices, layerwise_param_groups
from .layers import format_layer_table, group_parameters_by_layer
from .loop import measure_layer_sharpness, record_step_noise
from .noise import MicroBatchNoiseCollector, squared_norms_of_gradients
from .optim import unwrap_optimizer
from .scheduler import LayerwiseLRScheduler

__all__ = ["LoTTrainer", "unwrap_optimizer"]

logger = logging.get_logger(__name__)


def loss_depends_on_item_count(model: nn.Module, loss_at: Any, num_items: int) -> bool:
    """Return whether a model's loss is ``sum / num_items_in_batch`` rather than a plain mean.

    `Trainer` passes ``num_items_in_batch`` to every model whose forward
    accepts ``**kwargs``, then skips its division by the accumulation steps.
    Some models (BERT sequence classification in transformers 5.25, for one)
    accept the argument and ignore it. `loss_at(n)` returns the loss of one
    fixed batch with ``num_items_in_batch=n``. It runs twice, in eval mode and
    without gradients, with `num_items` and twice that, and the loss must
    change. A model whose forward rejects the argument (TypeError) counts as
    not normalizing.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            first = float(loss_at(num_items))
            second = float(loss_at(2 * num_items))
    except TypeError:
        return False
    finally:
        model.train(was_training)
    return not math.isclose(first, second, rel_tol=1e-4, abs_tol=1e-12)


def _count_items(inputs: dict[str, Any], shifts_labels: bool) -> int:
    """Count the items behind a micro-batch's loss: label positions that are not -100, else examples."""
    labels = inputs.get("shift_labels")
    if labels is None:
        labels = inputs.get("labels")
        if isinstance(labels, torch.Tensor) and shifts_labels and labels.ndim >= 2:
            labels = labels[..., 1:]
    if isinstance(labels, torch.Tensor):
        return int(labels.ne(-100).sum())
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    return 0


def _batch_size(inputs: dict[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    return 0


def _slice_batch(inputs: dict[str, Any], start: int, stop: int, batch_size: int) -> dict[str, Any]:
    return {
        key: value[start:stop] if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch_size else value
        for key, value in inputs.items()
    }


def _reject_sharded_engine(accelerator) -> None:
    """Raise ValueError when `accelerator` runs FSDP or DeepSpeed, which LoTTrainer does not support."""
    engine = str(accelerator.distributed_type)
    if "FSDP" in engine:
        raise ValueError(
            f"LoTTrainer does not support FSDP ({engine}): its noise statistics read each micro-batch's full "
            "per-layer gradient through tensor hooks, which are not wired to FSDP's sharded gradients. Train "
            "with DDP (accelerate launch --multi_gpu) or one process. In a custom FSDP loop, "
            "hf_lot.sharding.sharded_squared_norms sums per-layer squared gradient norms over the shards."
        )
    if "DEEPSPEED" in engine:
        raise ValueError(
            f"LoTTrainer does not support DeepSpeed ({engine}): from ZeRO stage 1 on, Adam's second moment is "
            "partitioned across ranks, so the per-layer effective step cannot be read, and stages 2 and 3 "
            "partition the gradients as well (stage 0 is untested). Train with DDP (accelerate launch "
            "--multi_gpu) or one process, or use transformers.Trainer without the threshold."
        )


class _LoTTaskCallback(TrainerCallback):
    """Start a controller task at the beginning of each `train()` call and manage the noise hooks."""

    def __init__(self, trainer: LoTTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if state.global_step == 0:
            trainer.lot_controller.begin_task(state.max_steps)
        trainer._lot_skipped_steps = 0
        trainer._lot_first_skipped_step = None
        logger.info(
            "LoT layers (one optimizer parameter group per layer):\n%s", format_layer_table(trainer.lot_layers)
        )
        trainer._lot_collector.attach()

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._lot_collector.detach()
        trainer._lot_collector.discard_step()
        trainer._lot_step_loss = None
        if trainer._lot_skipped_steps > 1:
            # The first skipped step had its own warning; the repeats are reported once, as a count.
            logger.warning(
                "LoT statistics skipped %d optimizer steps of this training run with a NaN or infinite loss or "
                "gradient; the first was step %d.",
                trainer._lot_skipped_steps,
                trainer._lot_first_skipped_step,
            )


class LoTTrainer(Trainer):
    """`Trainer` with per-layer learning rates controlled by the noise-curvature threshold.

    Args:
        *args, **kwargs: As for `transformers.Trainer`. ``args`` should be a
            `LoTTrainingArguments`; a plain `TrainingArguments` uses the
            ``paper`` preset unless `lot_config` is given.
        lot_config: Overrides the config resolved from ``args``.
        lot_controller: A controller to continue from, for example the previous
            task's `trainer.lot_controller`. It must describe the same model.
    """

    def __init__(self, *args, lot_config: LoTConfig | None = None, lot_controller: LoTController | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model is None:
            raise ValueError("LoTTrainer needs a model; model_init is not supported.")
        _reject_sharded_engine(self.accelerator)

        if lot_controller is not None:
            self.lot_config = lot_controller.config if lot_config is None else lot_config
            self.lot_controller = lot_controller
            self.lot_controller.config = self.lot_config
        else:
            if lot_config is None:
                lot_config = self.args.to_lot_config() if hasattr(self.args, "to_lot_config") else LoTConfig()
            self.lot_config = lot_config
            layers = group_parameters_by_layer(self.model, self.lot_config.layer_rules)
            self.lot_controller = LoTController(layers, self.lot_config)
        self.lot_layers = self.lot_controller.layers

        self._lot_collector = MicroBatchNoiseCollector(self.lot_layers)
        self._lot_loss_weight: float | None = None
        self._lot_model_normalizes_items: bool | None = None
        self._lot_collecting = False
        self._lot_micro_step = 0
        self._lot_warned: set[str] = set()
        # Sum of this optimizer step's micro-batch losses, checked once when the step ends.
        self._lot_step_loss: torch.Tensor | None = None
        # Steps of the current train() call skipped for a non-finite loss or gradient, and the first one.
        self._lot_skipped_steps = 0
        self._lot_first_skipped_step: int | None = None
        self._lot_generator = torch.Generator().manual_seed(self.lot_config.seed)
        self.add_callback(_LoTTaskCallback(self))
        # Per-layer values go to report_to integrations; the console line shows only the summary keys.
        replace_console_callbacks(self)

    # -- optimizer and scheduler ------------------------------------------

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Create an optimizer with one parameter group per layer (and one without weight decay)."""
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay_names = set(self.get_decay_parameter_names(opt_model))
            no_decay = {n for layer in self.lot_layers for n in layer.parameter_names if n not in decay_names}
            groups = layerwise_param_groups(self.lot_layers, self.args.learning_rate, self.args.weight_decay, no_decay)

            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            unsupported = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
            if unsupported:
                raise ValueError(
                    f"optim={self.args.optim!r} builds its own parameter groups ({', '.join(sorted(unsupported))}), "
                    "which per-layer learning rates cannot use; choose an Adam-family optimizer such as "
                    "optim='adamw_torch'."
                )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)

        raw = unwrap_optimizer(self.optimizer)
        _require_adam_state(raw)
        layer_param_group_indices(self.lot_layers, raw)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """Wrap the base schedule from ``lr_scheduler_type`` in a `LayerwiseLRScheduler`."""
        optimizer = unwrap_optimizer(self.optimizer if optimizer is None else optimizer)
        if isinstance(self.lr_scheduler, LayerwiseLRScheduler):
            return self.lr_scheduler
        base = super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = LayerwiseLRScheduler(optimizer, self.lot_controller, base=base)
        return self.lr_scheduler

    # -- loss ------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Compute the loss as `Trainer` does, times the weight of the current half-batch when splitting."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._lot_loss_weight is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss * self._lot_loss_weight, outputs
        return result * self._lot_loss_weight

    def _loss_is_normalized_by_items(self, model, inputs, num_items_in_batch) -> bool:
        """Decide whether this micro-batch's loss is ``sum / num_items_in_batch`` rather than a mean.

        `Trainer` assumes the former whenever the model's forward accepts
        ``**kwargs``, but some models (BERT sequence classification in
        transformers 5.x, for one) accept and ignore ``num_items_in_batch``.
        The first call checks once, with two forward passes in eval mode,
        whether doubling ``num_items_in_batch`` halves the loss.
        """
        flagged = self._trainer_skips_accumulation_division(num_items_in_batch)
        if not flagged or num_items_in_batch is None or self.compute_loss_func is not None:
            return flagged
        if self._lot_model_normalizes_items is None:
            unwrapped = self.accelerator.unwrap_model(model)
            prepared = self._prepare_inputs(dict(inputs))

            def loss_at(count: int) -> torch.Tensor:
                return super(LoTTrainer, self).compute_loss(unwrapped, dict(prepared), num_items_in_batch=count)

            self._lot_model_normalizes_items = loss_depends_on_item_count(unwrapped, loss_at, num_items_in_batch)
            if not self._lot_model_normalizes_items:
                logger.info(
                    "%s ignores num_items_in_batch, so each micro-batch loss is a mean that Trainer does not divide "
                    "by gradient_accumulation_steps; LoT noise statistics account for it.",
                    type(unwrapped).__name__,
                )
        return self._lot_model_normalizes_items

    # -- training step -----------------------------------------------------

    def _trainer_skips_accumulation_division(self, num_items_in_batch) -> bool:
        """Mirror `Trainer.training_step`: True when it does not divide the loss by the accumulation steps."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )

    def _loss_rank_multiplier(self, num_items_in_batch) -> int:
        """Mirror `Trainer.compute_loss`, which multiplies the loss by the number of ranks in one case."""
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
            and num_items_in_batch is not None
        ):
            return self.accelerator.num_processes
        return 1

    def _noise_weights(self, model, inputs, num_items_in_batch) -> tuple[float, float, float]:
        """Return ``(a_j, b_j, gradient_scale)`` of one micro-batch for the noise collector.

        ``a_j`` is the weight of the micro-batch mean gradient ``g_j`` in the
        step gradient ``G``, and ``gradient_scale`` is the factor between what
        the hooks see and ``a_j g_j``.
        """
        world_size = self.accelerator.num_processes
        accumulation = max(int(getattr(self, "current_gradient_accumulation_steps", 1)), 1)
        items = _count_items(inputs, bool(getattr(self, "_loss_shifts_labels", False)))
        share = 1.0 if self._lot_loss_weight is None else self._lot_loss_weight

        if self._loss_is_normalized_by_items(model, inputs, num_items_in_batch):
            # Loss = sum over items / num_items_in_batch; num_items_in_batch is global when averaged across ranks.
            total = float(num_items_in_batch)
            if not (self.args.average_tokens_across_devices and world_size > 1):
                total *= world_size
            weight, scale = items / total, float(world_size)
        elif self._trainer_skips_accumulation_division(num_items_in_batch):
            # A mean loss that Trainer treats as normalized: every micro-batch mean enters with weight one.
            weight = share / (accumulation * world_size)
            scale = float(self._loss_rank_multiplier(num_items_in_batch) * accumulation * world_size)
        else:
            weight, scale = share / (accumulation * world_size), float(world_size)
        return weight, float(items), scale * self._amp_scale()

    def _combined_gradient_scale(self, model, num_items_in_batch) -> float:
        """Return the factor between ``p.grad`` at the end of the step and the step gradient ``G``."""
        scale = self._amp_scale()
        if self._trainer_skips_accumulation_division(num_items_in_batch) and self._lot_model_normalizes_items is False:
            accumulation = max(int(getattr(self, "current_gradient_accumulation_steps", 1)), 1)
            scale *= self._loss_rank_multiplier(num_items_in_batch) * accumulation
        return scale

    def _amp_scale(self) -> float:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        return 1.0

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Run one micro-batch, recording its gradient norms, and end the optimizer step on the last one."""
        controller = self.lot_controller
        if self._lot_micro_step == 0:
            self._lot_collecting = controller.is_noise_step()
        self._lot_micro_step += 1
        is_last = self.accelerator.sync_gradients

        split = (
            self._lot_collecting
            and self.lot_config.noise_fallback == "split"
            and self.accelerator.num_processes == 1
            and int(getattr(self, "current_gradient_accumulation_steps", 1)) == 1
            and _batch_size(inputs) >= 2
        )
        if split:
            loss = self._split_training_step(model, inputs, num_items_in_batch)
        elif self._lot_collecting:
            weight, items, scale = self._noise_weights(model, inputs, num_items_in_batch)
            self._lot_collector.begin_micro_batch(weight, items, scale, device=self.args.device)
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._lot_collector.end_micro_batch()
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)

        # Summed on the device and checked once at the end of the step, where the gradient norms are read too.
        step_loss = loss.detach().float().sum()
        self._lot_step_loss = step_loss if self._lot_step_loss is None else self._lot_step_loss + step_loss
        if is_last:
            self._lot_micro_step = 0
            self._end_optimizer_step(model, inputs, num_items_in_batch)
        return loss

    def _split_training_step(self, model, inputs, num_items_in_batch) -> torch.Tensor:
        """Run a lone micro-batch as two halves, so noise is measurable with no extra examples.

        Each half's loss is weighted by its share of the items (mean losses) or
        keeps the shared ``num_items_in_batch`` (summed losses), so the
        accumulated gradient equals the whole micro-batch's gradient.
        """
        batch_size = _batch_size(inputs)
        middle = batch_size // 2
        shifts = bool(getattr(self, "_loss_shifts_labels", False))
        halves = [_slice_batch(inputs, 0, middle, batch_size), _slice_batch(inputs, middle, batch_size, batch_size)]
        counts = [_count_items(half, shifts) for half in halves]
        total_items = sum(counts)
        summed_loss = self._loss_is_normalized_by_items(model, inputs, num_items_in_batch)

        total = None
        for half, count in zip(halves, counts):
            if summed_loss:
                self._lot_loss_weight = None
            elif total_items:
                self._lot_loss_weight = count / total_items
            else:
                self._lot_loss_weight = 0.5
            weight, items, scale = self._noise_weights(model, half, num_items_in_batch)
            self._lot_collector.begin_micro_batch(weight, items, scale, device=self.args.device)
            try:
                half_loss = super().training_step(model, half, num_items_in_batch)
            finally:
                self._lot_collector.end_micro_batch()
                self._lot_loss_weight = None
            total = half_loss if total is None else total + half_loss
        return total

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._lot_warned:
            self._lot_warned.add(key)
            logger.warning(message, *args)

    def _end_optimizer_step(self, model, inputs, num_items_in_batch) -> None:
        """Finish the step's noise measurement and, every interval, update the controller."""
        controller = self.lot_controller
        raw_optimizer = unwrap_optimizer(self.optimizer)
        combined_scale = self._combined_gradient_scale(model, num_items_in_batch)
        squared_norms = squared_norms_of_gradients(self.lot_layers, scale=combined_scale)

        loss_is_finite = self._step_loss_is_finite()
        if not (loss_is_finite and torch.isfinite(squared_norms).all()):
            self._skip_nonfinite_step(squared_norms, loss_is_finite)
            return

        if self._lot_collecting:
            if not record_step_noise(self.accelerator, self._lot_collector, controller, squared_norms):
                self._warn_once(
                    "no-noise",
                    "Gradient noise needs two or more micro-batches per optimizer step; set "
                    "gradient_accumulation_steps >= 2, run several processes, or use lot_noise_fallback='split' "
                    "with a per-device batch of at least 2.",
                )
        self._lot_collecting = False

        if controller.is_measurement_step():
            sharpness = self._measure_sharpness(model, inputs) if self.lot_config.curvature else None
            # Adam receives the gradients after AMP unscaling, so only the loss-scaling part of the factor applies.
            record = controller.update(raw_optimizer, sharpness, gradient_scale=combined_scale / self._amp_scale())
            if record is not None:
                if isinstance(self.lr_scheduler, LayerwiseLRScheduler):
                    self.lr_scheduler.apply_factors()
                values = controller.log_values(record)
                values["lot/skipped_steps"] = float(controller.task_counts[-1].get("skipped", 0))
                self.log(values)
                self._warn_nonfinite_sharpness(record)
        controller.advance()

    def _step_loss_is_finite(self) -> bool:
        """Return whether this step's loss is finite on every process, and reset the step's loss sum.

        With several processes the flag is reduced over them, so that all
        ranks skip the same steps and keep their collective calls in step.
        """
        loss, self._lot_step_loss = self._lot_step_loss, None
        if loss is None:
            return True
        nonfinite = (~torch.isfinite(loss)).float().reshape(1)
        if self.accelerator.num_processes > 1:
            nonfinite = all_reduce(nonfinite.to(self.accelerator.device), reduction="sum")
        return not bool(nonfinite.item() > 0)

    def _skip_nonfinite_step(self, squared_norms: torch.Tensor, loss_is_finite: bool) -> None:
        """Discard the statistics of a step with a NaN or infinite loss or gradient, and count it.

        Such a step changes no noise sum, sharpness window, factor or history
        record. Only the controller's step count and skip counts advance. The
        first such step of a training run is logged with its step and the
        layers whose gradient is not finite. Later ones are counted and
        reported once at the end of the training run (and as ``lot/skipped_steps``).
        An AMP scaler that finds inf or NaN gradients skips the optimizer step
        too, as it checks the same gradients.
        """
        controller = self.lot_controller
        self._lot_collector.discard_step()
        self._lot_collecting = False
        controller.record_skipped_step()
        self._lot_skipped_steps += 1
        step = self.state.global_step + 1
        if self._lot_first_skipped_step is None:
            self._lot_first_skipped_step = step
            bad = [name for name, value in zip(controller.layer_names, squared_norms.tolist()) if not math.isfinite(value)]
            cause = "loss"
            if bad:
                cause = f"gradient in layer(s) {', '.join(bad)}"
                if not loss_is_finite:
                    cause = "loss and " + cause
            logger.warning(
                "Optimizer step %d of this training run has a NaN or infinite %s. LoT statistics skip this step, and "
                "later such steps are counted and reported when training ends.",
                step,
                cause,
            )
        controller.advance()

    def _warn_nonfinite_sharpness(self, record: dict[str, Any]) -> None:
        bad = [name for name, layer in record["layers"].items() if self.lot_config.curvature and not math.isfinite(layer["sharpness"])]
        if bad:
            self._warn_once(
                "nonfinite-sharpness",
                "The Hessian-vector products gave a NaN or infinite sharpness at step %d in layer(s) %s. Those layers' "
                "volatility windows keep their values, and their bound uses the gradient noise alone.",
                self.state.global_step + 1,
                ", ".join(bad),
            )

    def _measure_sharpness(self, model, inputs) -> list[float]:
        """Return each layer's top Hessian-block eigenvalue on this micro-batch, averaged over ranks."""
        config = self.lot_config
        unwrapped = self.accelerator.unwrap_model(model)
        inputs = self._prepare_inputs(dict(inputs))
        batch_size = _batch_size(inputs)
        if config.hvp_batch_size is not None and batch_size > config.hvp_batch_size:
            inputs = _slice_batch(inputs, 0, config.hvp_batch_size, batch_size)

        def loss_fn(module: nn.Module) -> torch.Tensor:
            # self.compute_loss, so that a subclass's regularizer is part of the curvature.
            return self.compute_loss(module, inputs)

        return measure_layer_sharpness(self.accelerator, unwrapped, loss_fn, self.lot_controller, self._lot_generator)
