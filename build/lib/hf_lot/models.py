"""A small multilayer perceptron as a `transformers` model, for continual-learning benchmarks.

The default shape is the network of the loss-of-trainability experiments on
random-label MNIST (Baveja, Lewandowski and Schmidt, arXiv 2509.19698):
784-256-256-10 with ReLU, Kaiming-uniform weights and zero biases. Because it
is a `PreTrainedModel`, `Trainer`, `LoTTrainer`, `save_pretrained` and
`from_pretrained` handle it like any Hugging Face classifier.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .plasticity import CReLU

__all__ = ["MLPConfig", "MLPForImageClassification", "MLP_ACTIVATIONS"]

MLP_ACTIVATIONS = ("relu", "crelu")


class MLPConfig(PretrainedConfig):
    """Shape of `MLPForImageClassification`.

    Args:
        input_size: Number of input features; images are flattened to this length.
        hidden_sizes: Output width of each hidden `nn.Linear`.
        activation: ``"relu"``, or ``"crelu"`` (``[relu(x), relu(-x)]``), which
            doubles the inputs of every following layer.
        num_labels: Number of classes (a `PretrainedConfig` argument).
    """

    model_type = "lot_mlp"

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: list[int] | tuple[int, ...] = (256, 256),
        activation: str = "relu",
        **kwargs,
    ):
        # A saved config carries id2label instead of num_labels; a default beside it would conflict.
        if "num_labels" not in kwargs and "id2label" not in kwargs:
            kwargs["num_labels"] = 10
        super().__init__(**kwargs)
        if activation not in MLP_ACTIVATIONS:
            raise ValueError(f"Invalid activation={activation!r}: expected one of {', '.join(MLP_ACTIVATIONS)}.")
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"Invalid input_size={input_size!r}: expected a positive integer such as 784.")
        hidden_sizes = list(hidden_sizes)
        if not all(isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in hidden_sizes):
            raise ValueError(f"Invalid hidden_sizes={hidden_sizes!r}: expected a list of positive integers.")
        self.input_size = input_size
        self.hidden_sizes = hidden_sizes
        self.activation = activation


def _activation_module(name: str) -> nn.Module:
    return CReLU() if name == "crelu" else nn.ReLU()


class MLPForImageClassification(PreTrainedModel):
    """Fully connected classifier over flattened images, returning logits and a cross-entropy loss.

    The layers live in one `nn.Sequential`, ``layers``: Linear, activation,
    Linear, activation, ..., Linear. `hf_lot.plasticity.apply_crelu` can turn
    a ReLU model into a CReLU one in place.
    """

    config_class = MLPConfig
    main_input_name = "pixel_values"
    base_model_prefix = "mlp"

    def __init__(self, config: MLPConfig):
        super().__init__(config)
        widths = [config.input_size, *config.hidden_sizes]
        # CReLU outputs [relu(x), relu(-x)] per hidden unit, so the next layer takes twice the inputs.
        expansion = 2 if config.activation == "crelu" else 1
        modules: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            modules.append(nn.Linear(fan_in * (expansion if index > 0 else 1), fan_out))
            modules.append(_activation_module(config.activation))
        last_fan_in = widths[-1] * (expansion if config.hidden_sizes else 1)
        modules.append(nn.Linear(last_fan_in, config.num_labels))
        self.layers = nn.Sequential(*modules)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Initialize a Linear with Kaiming-uniform weights for ReLU (bound sqrt(6 / fan_in)) and zero bias."""
        if isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=0.0, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def reset_parameters(self) -> None:
        """Draw fresh initial weights from the current torch random state."""
        for module in self.modules():
            self._init_weights(module)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        """Classify `pixel_values` of shape ``(batch, ...)`` with ``input_size`` features per example.

        The loss is the mean cross-entropy over the batch when `labels` is given.
        """
        features = pixel_values.reshape(pixel_values.shape[0], -1).to(self.layers[0].weight.dtype)
        if features.shape[1] != self.config.input_size:
            raise ValueError(
                f"pixel_values has {features.shape[1]} features per example but the model expects "
                f"input_size={self.config.input_size}; resize the inputs or build the model with that input_size."
            )
        logits = self.layers(features)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None

        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        if not return_dict:
            return (logits,) if loss is None else (loss, logits)
        return ImageClassifierOutput(loss=loss, logits=logits)

