"""Tests of the effective step, the bounds and the controller rule, on hand-computed values."""

import math

import pytest
import torch

from hf_lot.threshold import (
    ControllerAction,
    adam_effective_step,
    combined_bound,
    controller_action,
    volatility,
    volatility_bound,
    window_statistics,
)

LEARNING_RATE = 0.01
BETA1 = 0.9
BETA2 = 0.999
EPS = 1e-8

# Gradients of a (2, 3) weight over three Adam steps. Within a step every
# coordinate has the same magnitude, so mean(v) equals each coordinate's v and
# Adam's update is exactly the effective step times exp_avg.
SIGNS = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)
MAGNITUDES = [0.5, 2.0, 1.0]


def run_adam(num_steps: int):
    """Return the parameter, its Adam state and the last update after ``num_steps`` steps."""
    parameter = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    optimizer = torch.optim.Adam([parameter], lr=LEARNING_RATE, betas=(BETA1, BETA2), eps=EPS)
    update = None
    for step in range(num_steps):
        parameter.grad = SIGNS * MAGNITUDES[step]
        before = parameter.detach().clone()
        optimizer.step()
        update = parameter.detach() - before
    return parameter, optimizer.state[parameter], update


def test_effective_step_hand_formula():
    _, state, _ = run_adam(3)
    # v_t = (1 - beta2) sum_k beta2^(t - k) g_k^2, the same for every coordinate here.
    second_moment = sum((1 - BETA2) * BETA2 ** (3 - k) * MAGNITUDES[k - 1] ** 2 for k in (1, 2, 3))
    expected = LEARNING_RATE / ((1 - BETA1**3) * (math.sqrt(second_moment / (1 - BETA2**3)) + EPS))

    alpha = adam_effective_step(
        LEARNING_RATE, BETA1, BETA2, EPS, int(state["step"]), float(state["exp_avg_sq"].mean())
    )

    assert int(state["step"]) == 3
    assert float(state["exp_avg_sq"].mean()) == pytest.approx(second_moment, rel=1e-12)
    assert alpha == pytest.approx(expected, rel=1e-12)


def test_effective_step_times_momentum_is_update():
    _, state, update = run_adam(3)

    alpha = adam_effective_step(
        LEARNING_RATE, BETA1, BETA2, EPS, int(state["step"]), float(state["exp_avg_sq"].mean())
    )

    assert torch.allclose(-alpha * state["exp_avg"], update, rtol=1e-10, atol=0)


def test_effective_step_first_step():
    _, state, _ = run_adam(1)
    # After one step the bias-corrected v is g^2, so alpha = lr / (|g| + eps) / (1 - beta1).
    expected = LEARNING_RATE / ((1 - BETA1) * (MAGNITUDES[0] + EPS))

    alpha = adam_effective_step(LEARNING_RATE, BETA1, BETA2, EPS, 1, float(state["exp_avg_sq"].mean()))

    assert alpha == pytest.approx(expected, rel=1e-12)


def test_effective_step_zero_step_nan():
    assert math.isnan(adam_effective_step(LEARNING_RATE, BETA1, BETA2, EPS, 0, 1.0))


def test_effective_step_negative_step_nan():
    assert math.isnan(adam_effective_step(LEARNING_RATE, BETA1, BETA2, EPS, -1, 1.0))


def test_effective_step_zero_moment():
    # A layer that never saw a gradient: only eps bounds the step.
    alpha = adam_effective_step(LEARNING_RATE, BETA1, BETA2, EPS, 2, 0.0)

    assert alpha == pytest.approx(LEARNING_RATE / ((1 - BETA1**2) * EPS), rel=1e-12)


# -- window statistics and volatility ------------------------------------------------


def test_window_variance_mode():
    mu, s2 = window_statistics([1.0, 2.0, 3.0, 4.0], mode="window_variance")

    assert mu == pytest.approx(2.5)
    # Population variance: (1.5^2 + 0.5^2 + 0.5^2 + 1.5^2) / 4.
    assert s2 == pytest.approx(1.25)


def test_window_squared_deviation_mode():
    mu, s2 = window_statistics([1.0, 2.0, 3.0, 4.0], mode="squared_deviation")

    assert mu == pytest.approx(2.5)
    assert s2 == pytest.approx((4.0 - 2.5) ** 2)


def test_window_default_mode():
    assert window_statistics([1.0, 2.0, 3.0, 4.0]) == window_statistics([1.0, 2.0, 3.0, 4.0], "window_variance")


def test_window_latest_is_last():
    mu, s2 = window_statistics([4.0, 3.0, 2.0, 1.0], mode="squared_deviation")

    assert mu == pytest.approx(2.5)
    assert s2 == pytest.approx((1.0 - 2.5) ** 2)


def test_window_single_value():
    mu, s2 = window_statistics([3.0])

    assert mu == 3.0
    assert s2 == 0.0


def test_window_empty_raises():
    with pytest.raises(ValueError, match="at least one value"):
        window_statistics([])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("window_variance", 1.25 / (2.5 + 1e-8)),
        ("squared_deviation", 1.25 / (2.5 + 1e-8)),
        ("sharpness", 4.0),
        ("squared_ratio", (4.0**2 / (2.5 + 1e-8)) ** 2),
    ],
)
def test_volatility_modes(mode, expected):
    assert volatility(4.0, mu=2.5, s2=1.25, mode=mode, eps=1e-8) == pytest.approx(expected, rel=1e-12)


def test_volatility_unknown_mode():
    with pytest.raises(ValueError, match="'bogus'"):
        volatility(1.0, mu=1.0, s2=1.0, mode="bogus")


def test_volatility_zero_mean_uses_eps():
    assert volatility(0.0, mu=0.0, s2=2e-8, mode="window_variance", eps=1e-8) == pytest.approx(2.0)


# -- bounds -------------------------------------------------------------------------


def test_volatility_bound_values():
    bound = volatility_bound(torch.tensor([0.5, 4.0, 0.0]), kappa=2.0)

    assert float(bound[0]) == pytest.approx(1.0 / (2.0 * 0.5))
    assert float(bound[1]) == pytest.approx(1.0 / (2.0 * 4.0))
    assert math.isinf(float(bound[2]))
    assert float(bound[2]) > 0


def test_combined_bound_values():
    bound = combined_bound(
        16,
        squared_gradient_norm=torch.tensor([2.0, 3.0, 1.0, 1.0]),
        variance=torch.tensor([4.0, 1.0, -1.0, 0.0]),
        volatility_value=torch.tensor([0.5, 0.0, 0.0, 0.0]),
        beta=2.0,
    )

    # Inflated variances: 4 + 2 * 2 * 0.5 = 6, then 1, -1 and 0.
    assert float(bound[0]) == pytest.approx(16 * 2.0 / 6.0)
    assert float(bound[1]) == pytest.approx(16 * 3.0 / 1.0)
    assert math.isinf(float(bound[2]))
    assert math.isinf(float(bound[3]))


def test_combined_bound_volatility_rescues():
    # A negative noise estimate inflated to a positive value gives a finite bound.
    bound = combined_bound(
        8,
        squared_gradient_norm=torch.tensor([2.0]),
        variance=torch.tensor([-1.0]),
        volatility_value=torch.tensor([1.0]),
        beta=1.0,
    )

    assert float(bound[0]) == pytest.approx(8 * 2.0 / (-1.0 + 2.0))


def test_combined_bound_zero_beta():
    from hf_lot.noise import noise_bound

    squared_norm = torch.tensor([2.0, 0.3])
    variance = torch.tensor([4.0, 0.7])

    combined = combined_bound(32, squared_norm, variance, torch.tensor([5.0, 9.0]), beta=0.0)

    assert torch.allclose(combined, noise_bound(32, squared_norm, variance))


# -- controller rule ----------------------------------------------------------------

GAMMA = 0.8
ALPHA_MIN = 0.12
WARM_RATIO = 0.3


@pytest.mark.parametrize(
    ("alpha", "bound", "warm_phase", "expected"),
    [
        # alpha > gamma * bound and alpha > alpha_min.
        (1.0, 1.0, False, ControllerAction.COOL),
        (1.0, 1.0, True, ControllerAction.COOL),
        # Above gamma * bound but not above alpha_min: cooling is blocked.
        (0.10, 0.1, False, ControllerAction.KEEP),
        (0.12, 0.1, True, ControllerAction.KEEP),
        # Just above alpha_min cools again.
        (0.13, 0.1, False, ControllerAction.COOL),
        # Below warm_ratio * gamma * bound = 0.24: warm only in the warm phase.
        (0.2, 1.0, True, ControllerAction.WARM),
        (0.2, 1.0, False, ControllerAction.KEEP),
        # Between 0.24 and 0.8: keep.
        (0.5, 1.0, True, ControllerAction.KEEP),
        (0.5, 1.0, False, ControllerAction.KEEP),
        # Exactly on a threshold neither cools nor warms.
        (GAMMA * 1.0, 1.0, True, ControllerAction.KEEP),
        (WARM_RATIO * GAMMA * 1.0, 1.0, True, ControllerAction.KEEP),
        # No noise limit: warm in the warm phase, never cool.
        (5.0, math.inf, True, ControllerAction.WARM),
        (5.0, math.inf, False, ControllerAction.KEEP),
        # Nothing measured yet.
        (math.nan, 1.0, True, ControllerAction.KEEP),
        (1.0, math.nan, True, ControllerAction.KEEP),
        (math.nan, math.nan, False, ControllerAction.KEEP),
    ],
)
def test_controller_action_cases(alpha, bound, warm_phase, expected):
    action = controller_action(alpha, bound, GAMMA, ALPHA_MIN, WARM_RATIO, warm_phase)

    assert action is expected


def test_controller_action_string_value():
    assert controller_action(1.0, 1.0, GAMMA, ALPHA_MIN, WARM_RATIO, False) == "cool"
