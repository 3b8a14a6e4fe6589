"""Tests of the plasticity methods against hand-computed values."""

import pytest
import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from hf_lot import CReLU, LoTTrainingArguments, WassersteinRegularizer
from hf_lot.plasticity import (
    L2InitRegularizer,
    RegularizedLoTTrainer,
    RegularizedTrainer,
    apply_crelu,
    reinitialize,
)


def test_crelu_output_hand_values():
    x = torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    expected = torch.tensor([[1.0, 0.0, 0.0, 3.0, 0.0, 2.0, 0.0, 0.0]])
    assert torch.equal(CReLU()(x), expected)


def test_crelu_other_dimension():
    x = torch.tensor([[1.0], [-2.0]])
    expected = torch.tensor([[1.0], [0.0], [0.0], [2.0]])
    assert torch.equal(CReLU(dim=0)(x), expected)


def test_apply_crelu_widens_following_linear():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    replaced = apply_crelu(model)
    assert replaced == 1
    assert isinstance(model[1], CReLU)
    assert model[2].in_features == 6
    assert model[2].out_features == 2
    assert model(torch.randn(5, 4)).shape == (5, 2)


def test_apply_crelu_rejects_trailing_relu():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no following nn.Linear"):
        apply_crelu(model)


def _wasserstein_example():
    first = nn.Parameter(torch.tensor([0.0, 2.0, 1.0]))
    second = nn.Parameter(torch.tensor([[5.0, 0.0]]))
    regularizer = WassersteinRegularizer([first, second], strength=0.5)
    with torch.no_grad():
        first.copy_(torch.tensor([3.0, -1.0, 2.0]))
        second.copy_(torch.tensor([[1.0, 4.0]]))
    return first, second, regularizer


def test_wasserstein_penalty_hand_value():
    # Sorted [-1, 2, 3] against [0, 1, 2] gives 1 + 1 + 1, and sorted [1, 4] against [0, 5] gives 1 + 1, times 0.5.
    _, _, regularizer = _wasserstein_example()
    assert regularizer().item() == pytest.approx(2.5)


def test_wasserstein_gradient_hand_value():
    # d/d theta_i = 2 * 0.5 * (theta_i - sorted_initial[rank of theta_i]).
    first, second, regularizer = _wasserstein_example()
    regularizer().backward()
    assert torch.allclose(first.grad, torch.tensor([1.0, -1.0, 1.0]))
    assert torch.allclose(second.grad, torch.tensor([[1.0, -1.0]]))


def test_wasserstein_ignores_permutations():
    parameter = nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    regularizer = WassersteinRegularizer([parameter], strength=1.0)
    with torch.no_grad():
        parameter.copy_(parameter.flip(0))
    assert regularizer().item() == 0.0


def test_wasserstein_reset_reference():
    parameter = nn.Parameter(torch.tensor([1.0, 2.0]))
    regularizer = WassersteinRegularizer([parameter], strength=1.0)
    with torch.no_grad():
        parameter.add_(1.0)
    assert regularizer().item() == pytest.approx(2.0)
    regularizer.reset_reference()
    assert regularizer().item() == 0.0


def test_l2_init_penalty_and_gradient():
    parameter = nn.Parameter(torch.tensor([1.0, -2.0]))
    regularizer = L2InitRegularizer([parameter], strength=0.25)
    with torch.no_grad():
        parameter.copy_(torch.tensor([3.0, -2.0]))
    penalty = regularizer()
    penalty.backward()
    assert penalty.item() == pytest.approx(1.0)
    assert torch.allclose(parameter.grad, torch.tensor([1.0, 0.0]))


def test_regularizer_rejects_negative_strength():
    with pytest.raises(ValueError, match="strength"):
        WassersteinRegularizer([nn.Parameter(torch.ones(2))], strength=-1.0)


def test_reinitialize_seeded_and_changes_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    original = [p.detach().clone() for p in model.parameters()]
    reinitialize(model, seed=7)
    first_draw = [p.detach().clone() for p in model.parameters()]
    reinitialize(model, seed=7)
    assert not torch.equal(original[0], first_draw[0])
    for drawn, again in zip(first_draw, model.parameters()):
        assert torch.equal(drawn, again)


class _TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(3, 4)
        self.output = nn.Linear(4, 2)

    def forward(self, x, labels=None):
        logits = self.output(torch.relu(self.hidden(x)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class _Examples(torch.utils.data.Dataset):
    def __init__(self, size=8):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 3, generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"x": self.x[index], "labels": self.labels[index]}


class _GradientRecorder(TrainerCallback):
    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.gradients is None:
            self.gradients = [p.grad.detach().clone() for p in model.parameters()]


def _expected_gradients(model, dataset, regularizer):
    model.zero_grad()
    loss = model(dataset.x, labels=dataset.labels)["loss"] + regularizer()
    return torch.autograd.grad(loss, list(model.parameters()))


def _common_arguments(tmp_path, **extra):
    return dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=1e-2,
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        **extra,
    )


@pytest.mark.parametrize("accumulation", [1, 2])
def test_regularized_trainer_counts_penalty_once(tmp_path, single_thread, accumulation):
    torch.manual_seed(0)
    model = _TinyModel()
    dataset = _Examples()
    regularizer = L2InitRegularizer(model, strength=0.5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3)
    expected = _expected_gradients(model, dataset, regularizer)

    recorder = _GradientRecorder()
    arguments = _common_arguments(tmp_path, gradient_accumulation_steps=accumulation)
    arguments["per_device_train_batch_size"] = 8 // accumulation
    trainer = RegularizedTrainer(
        model=model, args=TrainingArguments(**arguments), train_dataset=dataset,
        regularizers=[regularizer], callbacks=[recorder],
    )
    trainer.train()
    for got, want in zip(recorder.gradients, expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_regularized_lot_trainer_split_counts_penalty_once(tmp_path, single_thread):
    # One micro-batch on one process: LoTTrainer runs it as two weighted halves on noise steps.
    torch.manual_seed(0)
    model = _TinyModel()
    dataset = _Examples()
    regularizer = WassersteinRegularizer(model, strength=0.5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    expected = _expected_gradients(model, dataset, regularizer)

    recorder = _GradientRecorder()
    arguments = LoTTrainingArguments(**_common_arguments(tmp_path, lot_interval=1, lot_window=2))
    trainer = RegularizedLoTTrainer(
        model=model, args=arguments, train_dataset=dataset, regularizers=[regularizer], callbacks=[recorder]
    )
    trainer.train()
    for got, want in zip(recorder.gradients, expected):
        assert torch.allclose(got, want, atol=1e-6)
    assert len(trainer.lot_controller.history) == 1


def test_regularized_trainer_eval_loss_has_no_penalty(tmp_path, single_thread):
    torch.manual_seed(0)
    model = _TinyModel()
    dataset = _Examples()
    regularizer = L2InitRegularizer(model, strength=100.0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    trainer = RegularizedTrainer(
        model=model, args=TrainingArguments(**_common_arguments(tmp_path)), eval_dataset=dataset,
        regularizers=[regularizer],
    )
    with torch.no_grad():
        data_loss = model(dataset.x, labels=dataset.labels)["loss"].item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(data_loss, rel=1e-5)


def test_wasserstein_resorts_after_in_place_update():
    parameter = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    regularizer = WassersteinRegularizer([parameter], strength=1.0)
    assert regularizer().item() == 0.0
    with torch.no_grad():
        parameter.copy_(torch.tensor([3.0, 5.0, 1.0]))
    # Sorted [1, 3, 5] against [1, 2, 3]: 0 + 1 + 4.
    penalty = regularizer()
    penalty.backward()
    assert penalty.item() == pytest.approx(5.0)
    assert torch.allclose(parameter.grad, torch.tensor([2.0, 4.0, 0.0]))
