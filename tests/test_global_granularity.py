"""Tests of the controller's global granularity: one decision from network-wide quantities for all layers."""

import pytest
import torch
from torch import nn

from hf_lot import LoTConfig, LoTController, group_parameters_by_layer, layerwise_param_groups
from hf_lot.noise import NoiseMeasurement


def _controller_and_optimizer(granularity, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    values = {"curvature": False, "beta": 0.0, "interval": 1, "alpha_min": 0.0, **options}
    config = LoTConfig(granularity=granularity, **values)
    controller = LoTController(group_parameters_by_layer(model), config)
    optimizer = torch.optim.Adam(layerwise_param_groups(controller.layers, 1e-2))
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    controller.begin_task(10)
    return controller, optimizer


def _record(controller, squared_norm, variance, batch_size=8):
    controller.record_noise(
        NoiseMeasurement(torch.tensor(squared_norm), torch.tensor(variance), num_items=batch_size, num_micro_batches=2)
    )


def test_global_option_validated():
    with pytest.raises(ValueError, match="granularity"):
        LoTConfig(granularity="block")


def test_layer_mode_cools_only_noisy_layer():
    controller, optimizer = _controller_and_optimizer("layer", warm_phase="never")
    alpha = controller.effective_steps(optimizer)
    # Layer 0: bound B|g|^2/sigma2 far below alpha. Layer 1: far above.
    _record(controller, [1e-6, 1.0], [8.0, 1e-6])
    record = controller.update(optimizer, None)
    assert record["layers"]["0"]["alpha_noise"] < alpha[0]
    assert controller.factors == [pytest.approx(0.99), 1.0]
    assert "global" not in record


def test_global_mode_one_decision_from_summed_noise():
    controller, optimizer = _controller_and_optimizer("global", warm_phase="never")
    alpha = controller.effective_steps(optimizer)
    squared_norm, variance = [1e-6, 1.0], [8.0, 1e-6]
    _record(controller, squared_norm, variance)
    record = controller.update(optimizer, None)

    network_alpha = float(alpha.mean())
    network_bound = 8 * sum(squared_norm) / sum(variance)
    assert record["global"]["alpha"] == pytest.approx(network_alpha)
    assert record["global"]["alpha_noise"] == pytest.approx(network_bound, rel=1e-5)
    assert record["global"]["alpha_combined"] == pytest.approx(network_bound, rel=1e-5)
    # Summed over layers the gradient dominates the noise: the network bound (about 1) sits above alpha.
    assert network_alpha < 0.8 * network_bound
    assert record["global"]["action"] == "keep"
    assert controller.factors == [1.0, 1.0]


def test_global_mode_cools_every_layer_together():
    controller, optimizer = _controller_and_optimizer("global", warm_phase="never")
    _record(controller, [1e-6, 1e-6], [8.0, 8.0])
    record = controller.update(optimizer, None)
    assert record["global"]["action"] == "cool"
    assert controller.factors == [pytest.approx(0.99), pytest.approx(0.99)]
    assert {layer["action"] for layer in record["layers"].values()} == {"cool"}


def test_global_mode_warms_every_layer_together():
    controller, optimizer = _controller_and_optimizer("global", warm_phase="always")
    _record(controller, [1.0, 1.0], [1e-6, 1e-6])
    controller.update(optimizer, None)
    assert controller.factors == [pytest.approx(1.01), pytest.approx(1.01)]


def test_global_volatility_weighted_by_gradient():
    controller, _ = _controller_and_optimizer("global", beta=2.0, curvature=True)
    alpha = torch.tensor([0.1, 0.3])
    squared_norm = torch.tensor([1.0, 3.0])
    variance = torch.tensor([2.0, 4.0])
    volatility = torch.tensor([0.5, 1.5])
    decision = controller._global_decision(alpha, 8.0, squared_norm, variance, volatility, warm=False)
    # Vol = (1 * 0.5 + 3 * 1.5) / 4 = 1.25; inflated noise 6 + 2 * 4 * 1.25 = 16; bound 8 * 4 / 16 = 2.
    assert decision["volatility"] == pytest.approx(1.25)
    assert decision["alpha_combined"] == pytest.approx(2.0)
    assert decision["alpha_volatility"] == pytest.approx(1 / 1.25)
    assert decision["alpha"] == pytest.approx(0.2)
