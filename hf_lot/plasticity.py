"""Plasticity methods for continual learning: CReLU, parameter regularizers and resets.

- `CReLU` concatenates ``relu(x)`` and ``relu(-x)``, so one of the two outputs
  is active for any nonzero pre-activation. `apply_crelu` converts the ReLUs of
  a model's `nn.Sequential` blocks and widens each following Linear.
- `WassersteinRegularizer`: ``strength * sum over tensors of
  |sort(theta) - sort(theta_0)|^2``, a penalty on the distance between the
  current and the initial distribution of each tensor's values.
- `L2InitRegularizer`: ``strength * sum |theta - theta_0|^2``.
- L2 towards zero needs no module: Adam's coupled ``weight_decay`` (that is
  `torch.optim.Adam`, not AdamW) adds ``weight_decay * theta`` to the gradient.
- `RegularizedTrainer` adds regularizers to the loss of a `Trainer`, and
  `RegularizedLoTTrainer` does the same for `LoTTrainer`, so the curvature
  that `LoTTrainer` measures includes the regularizer.
- `reinitialize` draws fresh weights for the "reset" baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from transformers import Trainer

from .trainer import LoTTrainer

__all__ = [
    "CReLU",
    "L2InitRegularizer",
    "RegularizedLoTTrainer",
    "RegularizedTrainer",
    "WassersteinRegularizer",
    "apply_crelu",
    "reinitialize",
]


class CReLU(nn.Module):
    """Concatenated ReLU: ``cat([relu(x), relu(-x)], dim)``, so the output has twice the features along `dim`."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def apply_crelu(model: nn.Module) -> int:
    """Replace every `nn.ReLU` inside an `nn.Sequential` of `model` by `CReLU`, in place.

    The first `nn.Linear` after each replaced ReLU in the same Sequential is
    replaced by a new Linear with twice the input features. The new layer is
    initialized by the model's `_init_weights` when it has one (Hugging Face
    models), else by `nn.Linear`'s default. A model with
    an `activation` field in its config has it set to ``"crelu"``, so
    `save_pretrained` and `from_pretrained` rebuild the same shapes.

    Returns:
        The number of ReLUs replaced.

    Raises:
        ValueError: If a ReLU has no following Linear in its Sequential, whose
            inputs would then not match the doubled features.
    """
    replaced = 0
    for sequential in [module for module in model.modules() if isinstance(module, nn.Sequential)]:
        children = list(sequential.named_children())
        for position, (name, child) in enumerate(children):
            if type(child) is not nn.ReLU:
                continue
            following = next(
                ((n, c) for n, c in children[position + 1 :] if isinstance(c, nn.Linear)),
                None,
            )
            if following is None:
                raise ValueError(
                    f"ReLU {name!r} has no following nn.Linear in its nn.Sequential, so CReLU's doubled output "
                    "would not fit the next layer; replace that activation by hand."
                )
            linear_name, linear = following
            widened = nn.Linear(
                2 * linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                device=linear.weight.device,
                dtype=linear.weight.dtype,
            )
            init = getattr(model, "_init_weights", None)
            if callable(init):
                init(widened)
            setattr(sequential, name, CReLU())
            setattr(sequential, linear_name, widened)
            children = list(sequential.named_children())
            replaced += 1

    config = getattr(model, "config", None)
    if replaced and config is not None and hasattr(config, "activation"):
        config.activation = "crelu"
    return replaced


def _named_trainable(parameters: Iterable[nn.Parameter] | nn.Module) -> list[nn.Parameter]:
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    return [p for p in parameters if p.requires_grad]


class _ReferenceRegularizer(nn.Module):
    """Base of the penalties that compare parameters with a stored reference taken at construction."""

    def __init__(self, parameters: Iterable[nn.Parameter] | nn.Module, strength: float = 1e-3):
        super().__init__()
        if not strength >= 0:
            raise ValueError(f"Invalid strength={strength!r}: expected a non-negative number.")
        self.strength = float(strength)
        self.tracked = _named_trainable(parameters)
        self.reset_reference()

    def reset_reference(self) -> None:
        raise NotImplementedError


class WassersteinRegularizer(_ReferenceRegularizer):
    """Penalty ``strength * sum_k |sort(theta_k) - sort(theta_k_0)|^2`` over parameter tensors ``theta_k``.

    For two tensors with the same number of values, the squared distance
    between their sorted values is the squared 2-Wasserstein distance between
    their empirical distributions, times the number of values. The penalty
    keeps each tensor's distribution of values near its initial one while
    letting individual values move to other positions. Its gradient with
    respect to ``theta_i`` is ``2 * strength * (theta_i - sort(theta_0)[r_i])``
    with ``r_i`` the rank of ``theta_i``.

    Args:
        parameters: A module or its parameters, in their initial state; the
            initial sorted values are stored now.
        strength: The coefficient ``lambda`` (1e-3 in the random-label MNIST
            experiments).
    """

    @torch.no_grad()
    def reset_reference(self) -> None:
        """Store the current values as the initial distribution, for example after a reset."""
        self.sorted_initial = [p.detach().flatten().sort().values.clone() for p in self.tracked]
        self._orders: list[tuple[int, torch.Tensor] | None] = [None] * len(self.tracked)

    def _sorted(self, index: int, parameter: torch.Tensor) -> torch.Tensor:
        """Return the parameter's values in ascending order, differentiably.

        The sorting permutation is cached until the parameter changes in place
        (its version counter moves), so the several loss evaluations of one
        optimizer step (micro-batches, curvature products) sort only once.
        After a change, the values are sorted starting from the previous order.
        That is faster when a step moves values little compared with their
        spacing: nearly sorted input took a third of the time of a fresh sort
        (200,704 values, torch 2.13, one CPU thread).
        """
        cached = self._orders[index]
        if cached is not None and cached[0] == parameter._version:
            return parameter.flatten()[cached[1]]

        values = parameter.detach().flatten()
        if cached is None:
            order = torch.argsort(values)
        else:
            previous = cached[1]
            order = previous[torch.argsort(values[previous])]
        self._orders[index] = (parameter._version, order)
        return parameter.flatten()[order]

    def forward(self) -> torch.Tensor:
        total = None
        for index, (parameter, reference) in enumerate(zip(self.tracked, self.sorted_initial)):
            distance = (self._sorted(index, parameter) - reference).pow(2).sum()
            total = distance if total is None else total + distance
        if total is None:
            return torch.zeros(())
        return self.strength * total


class L2InitRegularizer(_ReferenceRegularizer):
    """Penalty ``strength * sum_k |theta_k - theta_k_0|^2``: squared distance to the initial parameters.

    Args:
        parameters: A module or its parameters, in their initial state.
        strength: The coefficient of the penalty.
    """

    @torch.no_grad()
    def reset_reference(self) -> None:
        """Store the current values as the initial parameters."""
        self.initial = [p.detach().clone() for p in self.tracked]

    def forward(self) -> torch.Tensor:
        total = None
        for parameter, reference in zip(self.tracked, self.initial):
            distance = (parameter - reference).pow(2).sum()
            total = distance if total is None else total + distance
        if total is None:
            return torch.zeros(())
        return self.strength * total


class RegularizedTrainer(Trainer):
    """`Trainer` whose training loss adds the value of each regularizer.

    Args:
        regularizers: Callables without arguments that return a scalar
            penalty, such as `WassersteinRegularizer` or `L2InitRegularizer`.
        *args, **kwargs: As for `Trainer`.

    The penalty is added to every micro-batch's loss. `Trainer` divides the
    loss by the gradient-accumulation steps unless it treats the loss as
    already normalized by ``num_items_in_batch``. In that case the penalty is
    divided here, so each optimizer step counts it once. Under DDP every rank
    adds it and gradients are averaged, which also counts it once.
    """

    def __init__(self, *args, regularizers: Sequence[Callable[[], torch.Tensor]] | None = None, **kwargs):
        self.regularizers = list(regularizers or [])
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # Evaluation and prediction run without gradients and report the data loss alone.
        if not self.regularizers or not torch.is_grad_enabled():
            return result
        loss, outputs = result if return_outputs else (result, None)

        penalty = sum(regularizer() for regularizer in self.regularizers)
        loss_is_normalized = (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None
        if loss_is_normalized:
            penalty = penalty / max(int(getattr(self, "current_gradient_accumulation_steps", 1)), 1)
        loss = loss + penalty.to(loss.device)
        return (loss, outputs) if return_outputs else loss


class RegularizedLoTTrainer(LoTTrainer, RegularizedTrainer):
    """`LoTTrainer` with regularizers added to the loss, including the loss its curvature measurement uses.

    The method order puts `LoTTrainer.compute_loss` first, so when it runs a
    micro-batch as two weighted halves, the penalty is weighted with the data
    loss and counted once per step.
    """


@torch.no_grad()
def reinitialize(model: nn.Module, seed: int | None = None) -> None:
    """Draw fresh initial weights for every submodule, for the reset baseline.

    Uses the model's `_init_weights` when it has one (Hugging Face models),
    else each submodule's `reset_parameters`. With `seed`, the draw is
    reproducible and does not depend on the global random state.
    """
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        init = getattr(model, "_init_weights", None)
        for module in model.modules():
            if callable(init):
                init(module)
            elif module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
