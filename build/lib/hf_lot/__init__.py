"""hf_lot: keep models trainable during continual fine-tuning.

`LoTTrainer` replaces `transformers.Trainer` and keeps each layer's Adam
effective step under a per-layer limit derived from gradient noise and
curvature volatility. `LayerwiseLRScheduler` and `LoTController` bring the
same control to hand-written Accelerate loops.
"""

from .args import LoTTrainingArguments
from .config import PRESETS, LoTConfig
from .controller import LoTController, layerwise_param_groups
from .layers import Layer, format_layer_table, group_parameters_by_layer
from .loop import LoTLoop
from .optim import unwrap_optimizer
from .plasticity import CReLU, WassersteinRegularizer
from .scheduler import LayerwiseLRScheduler
from .trainer import LoTTrainer

__version__ = "0.1.0"

__all__ = [
    "CReLU",
    "Layer",
    "LayerwiseLRScheduler",
    "LoTConfig",
    "LoTController",
    "LoTLoop",
    "LoTTrainer",
    "LoTTrainingArguments",
    "PRESETS",
    "WassersteinRegularizer",
    "format_layer_table",
    "group_parameters_by_layer",
    "layerwise_param_groups",
    "unwrap_optimizer",
]
