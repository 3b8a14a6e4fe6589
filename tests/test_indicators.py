"""Tests of the single indicators against hand-computed values, and of `IndicatorCallback` with a plain Trainer."""

import math

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_lot.indicators import (
    IndicatorCallback,
    activation_inputs_and_outputs,
    dormant_unit_fraction,
    gradient_gram_rank,
    per_example_gradients,
    top_hessian_eigenvalue,
    unit_sign_entropy,
    update_to_parameter_ratio,
    weight_magnitude,
)


def test_unit_sign_entropy_known_batch():
    # Unit 0 is positive on 3 of 4 examples: H(0.75) = 0.8113 bits. Unit 1 is never positive: 0 bits.
    preactivations = torch.tensor([[1.0, -1.0], [2.0, -3.0], [-1.0, -2.0], [3.0, -4.0]])
    expected = (-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)) + 0.0) / 2
    assert unit_sign_entropy(preactivations) == pytest.approx(expected)
    assert expected == pytest.approx(0.405639, abs=1e-6)


def test_unit_sign_entropy_even_split_is_one_bit():
    preactivations = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert unit_sign_entropy(preactivations) == pytest.approx(1.0)


def test_unit_sign_entropy_zero_is_not_positive():
    assert unit_sign_entropy(torch.zeros(4, 3)) == 0.0


def test_gram_rank_orthogonal_gradients_full():
    assert gradient_gram_rank(torch.eye(4)) == 1.0


def test_gram_rank_identical_gradients_one():
    gradients = torch.tensor([[1.0, 2.0, 3.0]]).repeat(4, 1)
    assert gradient_gram_rank(gradients) == 0.25


def test_gram_rank_energy_threshold():
    # Gram singular values 100 and 1: the first is 100/101 = 0.990 of the sum, enough for 0.99 but not 0.995.
    gradients = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    assert gradient_gram_rank(gradients, energy=0.99) == 0.5
    assert gradient_gram_rank(gradients, energy=0.995) == 1.0


def test_gram_rank_zero_gradients():
    assert gradient_gram_rank(torch.zeros(3, 5)) == 0.0


def test_dormant_fraction_hand_values():
    # Unit means |h| = 0, 2, 2; the average is 4/3, so the scores are 0, 1.5, 1.5.
    activations = torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 2.0]])
    assert dormant_unit_fraction(activations) == pytest.approx(1 / 3)
    assert dormant_unit_fraction(activations, tau=1.5) == 1.0
    assert dormant_unit_fraction(activations, tau=1.4) == pytest.approx(1 / 3)


def test_weight_magnitude_and_update_ratio():
    before = [torch.tensor([1.0, -3.0]), torch.tensor([[2.0]])]
    after = [torch.tensor([1.5, -3.0]), torch.tensor([[1.0]])]
    assert weight_magnitude(before) == pytest.approx(2.0)
    assert update_to_parameter_ratio(before, after) == pytest.approx(1.5 / 6.0)


def test_per_example_gradients_linear_model():
    # Loss (w . x)^2 / 2 has gradient (w . x) x for each example.
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    batch = {"x": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    gradients = per_example_gradients(model, lambda m, inputs: 0.5 * m(inputs["x"]).pow(2).sum(), batch)
    assert torch.allclose(gradients, torch.tensor([[1.0, 0.0], [3.0, 3.0]]))


def test_top_hessian_eigenvalue_quadratic():
    parameter = nn.Parameter(torch.tensor([1.0, -1.0]))
    matrix = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    loss = 0.5 * parameter @ matrix @ parameter
    expected = float(torch.linalg.eigvalsh(matrix).max())
    assert top_hessian_eigenvalue(loss, [parameter], iterations=100) == pytest.approx(expected, rel=1e-3)


def test_activation_capture_reads_relu_inputs_and_outputs():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    x = torch.randn(4, 2)
    captured = activation_inputs_and_outputs(model, lambda: model(x))
    assert [name for name, _, _ in captured] == ["1"]
    _, inputs, outputs = captured[0]
    assert torch.allclose(inputs, model[0](x))
    assert torch.allclose(outputs, torch.relu(inputs))


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.layers(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class _Examples(torch.utils.data.Dataset):
    def __init__(self, size=32):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 4, generator=generator)
        self.labels = torch.randint(0, 3, (size,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"x": self.x[index], "labels": self.labels[index]}


def test_callback_with_plain_trainer_one_record_per_task(tmp_path, single_thread):
    torch.manual_seed(0)
    model = _Classifier()
    callback = IndicatorCallback(probe_size=10, interval=2, sharpness_iterations=5)
    arguments = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    for _ in range(2):
        trainer = Trainer(model=model, args=arguments, train_dataset=_Examples(), callbacks=[callback])
        trainer.train()

    assert len(callback.records) == 2
    assert [record["task"] for record in callback.records] == [0.0, 1.0]
    for record in callback.records:
        for key in ("gradient_norm", "update_norm", "update_ratio", "gram_rank", "sign_entropy", "sharpness",
                    "weight_magnitude", "dormant_fraction"):
            assert math.isfinite(record[key]), key
        assert 0 < record["gram_rank"] <= 1
        assert 0 <= record["sign_entropy"] <= 1
    logged = [entry for entry in trainer.state.log_history if "indicators/gram_rank" in entry]
    assert len(logged) == 1
    assert model.training


def test_callback_rejects_zero_interval():
    with pytest.raises(ValueError, match="interval"):
        IndicatorCallback(interval=0)
