"""hf_lot: keep models trainable during continual fine-tuning."""

from .config import LoTConfig, PRESETS
from .layers import Layer, group_parameters_by_layer

__version__ = "0.1.0"

__all__ = ["Layer", "LoTConfig", "PRESETS", "group_parameters_by_layer"]
