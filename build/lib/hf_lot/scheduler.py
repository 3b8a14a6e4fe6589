"""`LayerwiseLRScheduler`: per-layer controller factors on top of any base schedule.

Each parameter group's learning rate is ``base_lr(t) * factor[layer]``, where
``base_lr(t)`` comes from an ordinary schedule (a multiplier function or any
`LRScheduler`) and ``factor`` from a `LoTController`. The two are kept apart,
so a decaying base schedule and the controller never overwrite each other.

Stepping semantics. Accelerate's `AcceleratedScheduler` calls `step()` once
per process for every optimizer step (unless ``split_batches=True``), and it
skips the call when the optimizer step was skipped. This scheduler counts
real optimizer steps with an optimizer step hook and advances only when that
count has grown since its last advance, so it moves exactly once per optimizer
step however many times `step()` is called.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from .controller import LoTController, layer_param_group_indices

__all__ = ["LayerwiseLRScheduler"]


class LayerwiseLRScheduler(LRScheduler):
    """Multiply a base schedule by the controller's per-layer factors.

    Args:
        optimizer: An optimizer with one or more parameter groups per layer
            (see `hf_lot.layerwise_param_groups`).
        controller: The `LoTController` whose factors apply. Its state is
            saved in this scheduler's `state_dict`, so a `Trainer` checkpoint
            (``scheduler.pt``) restores it on resume.
        base: The base schedule: None (constant), a function of the step count
            returning a multiplier of each group's initial learning rate (as in
            `LambdaLR`), or an `LRScheduler` built on the same optimizer.
        last_epoch: Index of the last step, as in `LRScheduler`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        controller: LoTController,
        base: Callable[[int], float] | LRScheduler | None = None,
        last_epoch: int = -1,
    ):
        self.controller = controller
        self.group_layers = self._group_to_layer(controller, optimizer)

        if isinstance(base, LRScheduler):
            if base.optimizer is not optimizer:
                raise ValueError("The base scheduler must be built on the same optimizer as LayerwiseLRScheduler.")
            self.base_scheduler: LRScheduler | None = base
            self.lr_lambda = None
        elif base is None or callable(base):
            self.base_scheduler = None
            self.lr_lambda = base
        else:
            raise TypeError(
                f"base must be None, a callable step -> multiplier, or an LRScheduler; got {type(base).__name__}."
            )

        # Learning rates the base schedule would set, before the factors.
        self.base_group_lrs = [group["lr"] for group in optimizer.param_groups]
        self.optimizer_steps = 0
        self._advanced_at = 0
        # A scheduler built for the next task on the same optimizer replaces this one's
        # hook, so hooks do not pile up over a long sequence of tasks.
        previous = getattr(optimizer, "_hf_lot_step_hook", None)
        if previous is not None:
            previous.remove()
        self._hook = optimizer.register_step_post_hook(self._count_optimizer_step)
        optimizer._hf_lot_step_hook = self._hook
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _group_to_layer(controller: LoTController, optimizer: torch.optim.Optimizer) -> list[int]:
        group_layers = [-1] * len(optimizer.param_groups)
        for layer_index, groups in enumerate(layer_param_group_indices(controller.layers, optimizer)):
            for group_index in groups:
                group_layers[group_index] = layer_index
        return group_layers

    def _count_optimizer_step(self, optimizer, args, kwargs) -> None:
        self.optimizer_steps += 1

    def _factor(self, group_index: int) -> float:
        layer_index = self.group_layers[group_index]
        return 1.0 if layer_index < 0 else self.controller.factors[layer_index]

    def get_lr(self) -> list[float]:
        if self.base_scheduler is None:
            multiplier = 1.0 if self.lr_lambda is None else float(self.lr_lambda(self.last_epoch))
            self.base_group_lrs = [base_lr * multiplier for base_lr in self.base_lrs]
        return [base_lr * self._factor(index) for index, base_lr in enumerate(self.base_group_lrs)]

    def step(self, epoch: int | None = None) -> None:
        """Advance one step, once per optimizer step however often it is called.

        The first call, made by `LRScheduler.__init__`, sets the initial rates.
        """
        if epoch is not None:
            warnings.warn(
                "LayerwiseLRScheduler.step() ignores its epoch argument; it counts optimizer steps itself.",
                UserWarning,
                stacklevel=2,
            )
        if not hasattr(self, "_initial_step_done"):
            self._initial_step_done = True
            super().step()
            return
        if self.optimizer_steps == self._advanced_at:
            return
        self._advanced_at = self.optimizer_steps

        if self.base_scheduler is not None:
            # The base scheduler may be chainable (it reads group["lr"]), so hand it its own rates.
            for group, base_lr in zip(self.optimizer.param_groups, self.base_group_lrs):
                group["lr"] = base_lr
            self.base_scheduler.step()
            self.base_group_lrs = [group["lr"] for group in self.optimizer.param_groups]
        super().step()

    def apply_factors(self) -> None:
        """Write ``base_lr * factor`` into the groups now, without advancing the schedule.

        Call after the controller changed its factors so that the coming
        optimizer step already uses them.
        """
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.base_group_lrs[index] * self._factor(index)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Return the schedule position, the base scheduler's state and the controller's state.

        The `lr_lambda` function itself is not saved; pass the same one again
        when rebuilding the scheduler.
        """
        return {
            "last_epoch": self.last_epoch,
            "base_lrs": list(self.base_lrs),
            "base_group_lrs": list(self.base_group_lrs),
            "optimizer_steps": self.optimizer_steps,
            "advanced_at": self._advanced_at,
            "last_lr": list(self._last_lr),
            "base_scheduler": None if self.base_scheduler is None else self.base_scheduler.state_dict(),
            "controller": self.controller.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["base_group_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(
                f"Saved scheduler state has {len(state_dict['base_group_lrs'])} parameter groups, but the optimizer "
                f"has {len(self.optimizer.param_groups)}; resume with the same model and layer_rules."
            )
        # The controller checks its layer names first, so a rejected state changes nothing here.
        self.controller.load_state_dict(state_dict["controller"])
        self.last_epoch = state_dict["last_epoch"]
        self.base_lrs = list(state_dict["base_lrs"])
        self.base_group_lrs = list(state_dict["base_group_lrs"])
        self.optimizer_steps = state_dict["optimizer_steps"]
        self._advanced_at = state_dict["advanced_at"]
        self._last_lr = list(state_dict["last_lr"])
        if self.base_scheduler is not None and state_dict["base_scheduler"] is not None:
            self.base_scheduler.load_state_dict(state_dict["base_scheduler"])
        self.apply_factors()

    def close(self) -> None:
        """Remove the optimizer hook, for a scheduler that is replaced while its optimizer lives on."""
        self._hook.remove()

