"""Tests of the MLP classifier: shapes, initialization, saving, and training with LoTTrainer."""

import math

import pytest
import torch
from torch import nn

from hf_lot import CReLU, LoTTrainer, LoTTrainingArguments
from hf_lot.models import MLPConfig, MLPForImageClassification
from hf_lot.plasticity import apply_crelu


def _linear_shapes(model):
    return [(m.in_features, m.out_features) for m in model.layers if isinstance(m, nn.Linear)]


def test_default_shape_is_784_256_256_10():
    model = MLPForImageClassification(MLPConfig())
    assert _linear_shapes(model) == [(784, 256), (256, 256), (256, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in model.layers) == 2


def test_crelu_doubles_following_inputs():
    model = MLPForImageClassification(MLPConfig(activation="crelu"))
    assert _linear_shapes(model) == [(784, 256), (512, 256), (512, 10)]
    assert sum(isinstance(m, CReLU) for m in model.layers) == 2


def test_kaiming_uniform_weights_and_zero_biases():
    torch.manual_seed(0)
    model = MLPForImageClassification(MLPConfig())
    for module in model.layers:
        if isinstance(module, nn.Linear):
            bound = math.sqrt(6.0 / module.in_features)
            assert module.weight.abs().max() <= bound
            # A uniform sample of tens of thousands of values comes within 1% of its bound.
            assert module.weight.abs().max() > 0.99 * bound
            # Uniform on [-b, b] has standard deviation b / sqrt(3).
            assert module.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
            assert torch.count_nonzero(module.bias) == 0


def test_forward_loss_is_cross_entropy():
    torch.manual_seed(0)
    model = MLPForImageClassification(MLPConfig(input_size=12, hidden_sizes=[5], num_labels=3))
    pixels = torch.randn(4, 3, 4)
    labels = torch.tensor([0, 2, 1, 1])
    output = model(pixel_values=pixels, labels=labels)
    assert output.logits.shape == (4, 3)
    assert output.loss.item() == pytest.approx(nn.functional.cross_entropy(output.logits, labels).item())


def test_forward_rejects_wrong_feature_count():
    model = MLPForImageClassification(MLPConfig(input_size=12, hidden_sizes=[5], num_labels=3))
    with pytest.raises(ValueError, match="input_size=12"):
        model(pixel_values=torch.randn(2, 10))


def test_config_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        MLPConfig(activation="tanh")


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MLPForImageClassification(MLPConfig(input_size=12, hidden_sizes=[6, 5], num_labels=3, activation="crelu"))
    model.save_pretrained(tmp_path)
    loaded = MLPForImageClassification.from_pretrained(tmp_path)
    pixels = torch.randn(2, 12)
    assert loaded.config.activation == "crelu"
    assert torch.equal(model(pixels).logits, loaded(pixels).logits)


def test_apply_crelu_matches_crelu_config(tmp_path):
    model = MLPForImageClassification(MLPConfig(input_size=12, hidden_sizes=[6, 5], num_labels=3))
    assert apply_crelu(model) == 2
    assert _linear_shapes(model) == [(12, 6), (12, 5), (10, 3)]
    assert torch.count_nonzero(model.layers[2].bias) == 0
    model.save_pretrained(tmp_path)
    assert _linear_shapes(MLPForImageClassification.from_pretrained(tmp_path)) == _linear_shapes(model)


class _Images(torch.utils.data.Dataset):
    def __init__(self, size=32, features=12):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(size, features, generator=generator)
        self.labels = (self.pixels[:, 0] > 0).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def test_lot_trainer_trains_mlp(tmp_path, single_thread):
    torch.manual_seed(0)
    model = MLPForImageClassification(MLPConfig(input_size=12, hidden_sizes=[8, 8], num_labels=2))
    dataset = _Images()
    with torch.no_grad():
        initial_loss = model(dataset.pixels, labels=dataset.labels).loss.item()
    arguments = LoTTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=5, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, lot_interval=4, lot_window=3,
    )
    trainer = LoTTrainer(model=model, args=arguments, train_dataset=dataset)
    trainer.train()
    with torch.no_grad():
        final_loss = model(dataset.pixels, labels=dataset.labels).loss.item()
    assert final_loss < initial_loss
    assert trainer.lot_controller.layer_names == ["layers.0", "layers.2", "layers.4"]
    assert len(trainer.lot_controller.history) == 5
