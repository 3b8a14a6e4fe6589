"""The per-layer safe limit on Adam's effective step, and the controller rule.

Every function here is pure: tensors or floats in, tensors or floats out, one
value per layer. Source of the formulas: G. S. Baveja, A. Lewandowski and
M. Schmidt, "A Unified Noise-Curvature View of Loss of Trainability" (OPT
workshop at NeurIPS 2025, arXiv 2509.19698), and its reference code.

Quantities, per layer ``l``:

- ``alpha_l``, Adam's effective step: the mean over the layer's weight
  matrices ``W`` (``ndim >= 2``) of
  ``eta_l / ((1 - beta1^t) (sqrt(mean(v_W) / (1 - beta2^t)) + eps))``.
- ``alpha_g*_l = B |g_l|^2 / sigma2_l``, the gradient-noise bound.
- ``lambda_bar_l = alpha_agg * lambda_l``, the normalized sharpness, with
  ``alpha_agg = eta / (sqrt(mean(v_hat)) + eps)``.
- ``Vol_l = s2 / (mu + eps)`` over a window of ``lambda_bar_l``, and the
  volatility bound ``alpha_vol*_l = 1 / (kappa Vol_l)``.
- ``sigma2_tilde_l = sigma2_l + beta |g_l|^2 Vol_l`` and the combined bound
  ``alpha_tilde*_l = B |g_l|^2 / sigma2_tilde_l``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch

__all__ = [
    "ControllerAction",
    "VOLATILITY_MODES",
    "adam_effective_step",
    "combined_bound",
    "controller_action",
    "volatility",
    "volatility_bound",
    "window_statistics",
]

VOLATILITY_MODES = ("window_variance", "squared_deviation", "sharpness", "squared_ratio")


def adam_effective_step(
    learning_rate: float, beta1: float, beta2: float, eps: float, step: int, mean_exp_avg_sq: float
) -> float:
    """Return Adam's effective step ``eta / ((1 - beta1^t) (sqrt(mean(v) / (1 - beta2^t)) + eps))``.

    ``mean_exp_avg_sq`` is the mean of the second moment ``v`` over one tensor.
    Before the first optimizer step (``step == 0``) the moments are undefined
    and the result is NaN.
    """
    if step <= 0:
        return math.nan
    first_correction = 1.0 - beta1**step
    second_correction = 1.0 - beta2**step
    return learning_rate / (first_correction * (math.sqrt(mean_exp_avg_sq / second_correction) + eps))


def window_statistics(values: Sequence[float], mode: str = "window_variance") -> tuple[float, float]:
    """Return ``(mu, s2)`` of a window of normalized sharpness values, latest last.

    ``mu`` is the window mean. ``s2`` is the population variance of the window
    for ``"window_variance"`` and the squared deviation of the latest value
    from ``mu`` for every other mode, as in the reference code.
    """
    if len(values) == 0:
        raise ValueError("window_statistics needs at least one value.")
    if mode not in VOLATILITY_MODES:
        raise ValueError(f"Unknown volatility mode {mode!r}; expected one of {', '.join(VOLATILITY_MODES)}.")
    window = torch.tensor(list(values), dtype=torch.float64)
    mu = float(window.mean())
    if mode == "window_variance":
        s2 = float(window.var(unbiased=False))
    else:
        s2 = (float(window[-1]) - mu) ** 2
    return mu, s2


def volatility(latest: float, mu: float, s2: float, mode: str = "window_variance", eps: float = 1e-8) -> float:
    """Return the curvature-volatility term of one layer.

    Modes:
        ``window_variance``: ``s2 / (|mu| + eps)`` with the window variance
            (the paper's definition, which assumes ``mu > 0``).
        ``squared_deviation``: ``(lambda_bar - mu)^2 / (|mu| + eps)`` (the
            reference code's CReLU runs).
        ``sharpness``: ``lambda_bar`` itself (the reference code's L2 runs).
        ``squared_ratio``: ``(lambda_bar^2 / (|mu| + eps))^2`` (the reference
            code's Wasserstein runs).
    """
    if mode in ("window_variance", "squared_deviation"):
        return s2 / (abs(mu) + eps)
    if mode == "sharpness":
        return latest
    if mode == "squared_ratio":
        return (latest**2 / (abs(mu) + eps)) ** 2
    raise ValueError(f"Unknown volatility mode {mode!r}; expected one of {', '.join(VOLATILITY_MODES)}.")


def volatility_bound(volatility_value: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """Return ``alpha_vol* = 1 / (kappa Vol)``; zero volatility gives ``inf``."""
    volatility_value = volatility_value.float()
    safe = volatility_value.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(volatility_value > 0, 1.0 / (kappa * safe), torch.full_like(safe, math.inf))


def combined_bound(
    batch_size: float,
    squared_gradient_norm: torch.Tensor,
    variance: torch.Tensor,
    volatility_value: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Return ``alpha_tilde* = B |g|^2 / (sigma2 + beta |g|^2 Vol)`` per layer.

    A non-positive inflated variance (a noisy ``sigma2`` estimate with no
    volatility) gives ``inf``: the layer is not noise-limited.
    """
    squared_gradient_norm = squared_gradient_norm.float()
    inflated = variance.float() + beta * squared_gradient_norm * volatility_value.float()
    bound = batch_size * squared_gradient_norm / inflated.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(inflated > 0, bound, torch.full_like(bound, math.inf))


class ControllerAction(str, Enum):
    COOL = "cool"
    WARM = "warm"
    KEEP = "keep"


def controller_action(
    alpha: float,
    bound: float,
    gamma: float,
    alpha_min: float,
    warm_ratio: float,
    warm_phase: bool,
) -> ControllerAction:
    """Decide how to change one layer's learning rate.

    Cool when ``alpha > gamma * bound`` and ``alpha > alpha_min``. Otherwise
    warm when in the warm phase and ``alpha < warm_ratio * gamma * bound``.
    Otherwise keep. A NaN ``alpha`` or ``bound`` (nothing measured yet) keeps.
    """
    if math.isnan(alpha) or math.isnan(bound):
        return ControllerAction.KEEP
    if alpha > gamma * bound and alpha > alpha_min:
        return ControllerAction.COOL
    if warm_phase and alpha < warm_ratio * gamma * bound:
        return ControllerAction.WARM
    return ControllerAction.KEEP
