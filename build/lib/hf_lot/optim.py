"""Small optimizer helpers shared by the Trainer integration and hand-written loops."""

import torch

__all__ = ["unwrap_optimizer"]


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Return the torch optimizer inside Accelerate's `AcceleratedOptimizer` wrapper, if any."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer
