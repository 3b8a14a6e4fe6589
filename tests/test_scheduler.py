"""Tests of `LayerwiseLRScheduler`: per-layer controller factors on top of a base schedule.

Expected learning rates are written out by hand as ``BASE_LR * schedule(t) *
factor``, with ``schedule`` the closed form of the base schedule, so no
expected value comes from the scheduler under test.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ExponentialLR, StepLR

from hf_lot import LayerwiseLRScheduler, LoTConfig, LoTController, group_parameters_by_layer, layerwise_param_groups
from hf_lot.noise import NoiseMeasurement

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOP_SCRIPT = REPO_ROOT / "scripts" / "accelerate_loop.py"

BASE_LR = 0.1
DECAY = 0.9
STEP_SIZE = 2
NUM_STEPS = 6

# Controller factors written at the end of some optimizer steps: {step: [factor of layer "0", factor of layer "2"]}.
FACTOR_PLAN = {1: [0.5, 1.0], 3: [0.25, 2.0], 4: [0.25, 1.5]}


def lambda_schedule(step: int) -> float:
    return 1.0 / (1.0 + step)


SCHEDULES = {
    "lambda": lambda step: lambda_schedule(step),
    "exponential": lambda step: DECAY**step,
    "step": lambda step: DECAY ** (step // STEP_SIZE),
}


def build_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def build_setup(kind: str, seed: int = 0):
    """Build model, controller, a per-layer Adam (biases in ``.no_decay`` groups) and the scheduler."""
    model = build_model(seed)
    config = LoTConfig(curvature=False, bound="noise")
    controller = LoTController(group_parameters_by_layer(model), config)
    no_decay = {name for name, _ in model.named_parameters() if name.endswith("bias")}
    groups = layerwise_param_groups(controller.layers, BASE_LR, weight_decay=0.01, no_decay_names=no_decay)
    optimizer = torch.optim.Adam(groups)

    if kind == "lambda":
        base = lambda_schedule
    elif kind == "exponential":
        base = ExponentialLR(optimizer, gamma=DECAY)
    elif kind == "step":
        base = StepLR(optimizer, step_size=STEP_SIZE, gamma=DECAY)
    else:
        raise ValueError(kind)
    scheduler = LayerwiseLRScheduler(optimizer, controller, base=base)
    return model, controller, optimizer, scheduler


def layer_of_group(group: dict) -> int:
    """Return the index of the group's layer from the group name. Layer "0" is index 0 and layer "2" index 1."""
    return {"0": 0, "2": 1}[group["name"].removesuffix(".no_decay")]


def backward_once(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(5, 3, generator=generator)
    model.zero_grad()
    model(inputs).pow(2).mean().backward()


# -- base schedule times factors -----------------------------------------------


def test_groups_are_per_layer():
    _, _, optimizer, _ = build_setup("lambda")
    names = [group["name"] for group in optimizer.param_groups]
    assert names == ["0", "0.no_decay", "2", "2.no_decay"]


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_initial_lr_is_base(kind):
    _, _, optimizer, scheduler = build_setup(kind)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(BASE_LR * SCHEDULES[kind](0), rel=1e-12), group["name"]
    assert scheduler.last_epoch == 0


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_schedule_and_factors_compose(kind):
    model, controller, optimizer, scheduler = build_setup(kind)
    schedule = SCHEDULES[kind]
    factors = [1.0, 1.0]

    for step in range(1, NUM_STEPS + 1):
        backward_once(model, step)
        optimizer.step()
        scheduler.step()
        for group in optimizer.param_groups:
            expected = BASE_LR * schedule(step) * factors[layer_of_group(group)]
            assert group["lr"] == pytest.approx(expected, rel=1e-12), (step, group["name"])

        if step in FACTOR_PLAN:
            factors = list(FACTOR_PLAN[step])
            controller.factors = list(factors)
            scheduler.apply_factors()
            # The new factors apply at once, to the same base value.
            for group in optimizer.param_groups:
                expected = BASE_LR * schedule(step) * factors[layer_of_group(group)]
                assert group["lr"] == pytest.approx(expected, rel=1e-12), (step, group["name"], "after apply_factors")

    assert scheduler.last_epoch == NUM_STEPS
    assert scheduler.get_last_lr() == [group["lr"] for group in optimizer.param_groups]


@pytest.mark.parametrize("kind", ["exponential", "step"])
def test_chainable_base_advances_in_step(kind):
    model, controller, optimizer, scheduler = build_setup(kind)
    controller.factors = [0.5, 3.0]
    scheduler.apply_factors()
    for step in range(1, NUM_STEPS + 1):
        backward_once(model, step)
        optimizer.step()
        scheduler.step()
    assert scheduler.base_scheduler.last_epoch == NUM_STEPS
    # The base scheduler's own rates never include the factors.
    for base_lr in scheduler.base_group_lrs:
        assert base_lr == pytest.approx(BASE_LR * SCHEDULES[kind](NUM_STEPS), rel=1e-12)


def test_base_on_other_optimizer_rejected():
    model, controller, optimizer, _ = build_setup("lambda")
    other = torch.optim.Adam(layerwise_param_groups(controller.layers, BASE_LR))
    with pytest.raises(ValueError, match="same optimizer"):
        LayerwiseLRScheduler(optimizer, controller, base=ExponentialLR(other, gamma=DECAY))


# -- stepping semantics ----------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_repeated_step_advances_once(kind):
    model, _, optimizer, scheduler = build_setup(kind)
    schedule = SCHEDULES[kind]
    for step in range(1, 4):
        backward_once(model, step)
        optimizer.step()
        # Accelerate's AcceleratedScheduler calls step() once per process.
        for _ in range(3):
            scheduler.step()
        assert scheduler.last_epoch == step
        assert scheduler.optimizer_steps == step
        assert optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR * schedule(step), rel=1e-12)


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_step_without_optimizer_step_holds(kind):
    model, _, optimizer, scheduler = build_setup(kind)
    backward_once(model, 1)
    optimizer.step()
    scheduler.step()
    before = [group["lr"] for group in optimizer.param_groups]

    scheduler.step()
    scheduler.step()

    assert scheduler.last_epoch == 1
    assert [group["lr"] for group in optimizer.param_groups] == before


def test_skipped_amp_step_holds():
    model, _, optimizer, scheduler = build_setup("exponential")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    inputs = torch.randn(5, 3)

    loss = model(inputs).sum() * math.inf
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()

    assert scheduler.optimizer_steps == 0
    assert scheduler.last_epoch == 0
    assert scheduler.base_scheduler.last_epoch == 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR, rel=1e-12)


def test_amp_step_after_skip_advances():
    model, _, optimizer, scheduler = build_setup("exponential")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    inputs = torch.randn(5, 3)

    scaler.scale(model(inputs).sum() * math.inf).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad()

    scaler.scale(model(inputs).pow(2).mean()).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()

    assert scheduler.last_epoch == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR * DECAY, rel=1e-12)


def test_epoch_argument_warns():
    model, _, optimizer, scheduler = build_setup("lambda")
    backward_once(model, 1)
    optimizer.step()
    with pytest.warns(UserWarning, match="ignores its epoch"):
        scheduler.step(5)
    assert scheduler.last_epoch == 1


# -- state_dict ------------------------------------------------------------------


def advance_with_history(model, controller, optimizer, scheduler, num_steps: int) -> None:
    """Run optimizer steps with a controller update on each, so history and factors are non-trivial."""
    for step in range(1, num_steps + 1):
        backward_once(model, step)
        measurement = NoiseMeasurement(
            squared_gradient_norm=torch.tensor([1.0, 2.0]),
            variance=torch.tensor([4.0, 8.0 * step]),
            num_items=8.0,
            num_micro_batches=2,
        )
        controller.record_noise(measurement)
        controller.update(optimizer, None)
        controller.factors = [factor * (0.9 if index == 0 else 1.1) for index, factor in enumerate(controller.factors)]
        scheduler.apply_factors()
        optimizer.step()
        scheduler.step()
        controller.advance()


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_state_dict_round_trip(kind, tmp_path):
    model, controller, optimizer, scheduler = build_setup(kind)
    controller.begin_task(10)
    advance_with_history(model, controller, optimizer, scheduler, 4)
    path = tmp_path / "scheduler.pt"
    torch.save(scheduler.state_dict(), path)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    restored_model, restored_controller, restored_optimizer, restored = build_setup(kind, seed=1)
    restored_model.load_state_dict(model.state_dict())
    restored_optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    restored.load_state_dict(torch.load(path, weights_only=True))

    assert restored_controller.factors == controller.factors
    assert restored_controller.total_steps == controller.total_steps == 4
    assert len(restored_controller.history) == 4
    # json keeps NaN fields comparable, where == on floats would not.
    assert json.dumps(restored_controller.history) == json.dumps(controller.history)
    assert restored_controller.task_counts == controller.task_counts
    assert restored.last_epoch == scheduler.last_epoch == 4
    assert restored.optimizer_steps == scheduler.optimizer_steps == 4
    assert [g["lr"] for g in restored_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]

    # Both continue from the same position.
    for current_model, current_optimizer, current_scheduler in (
        (model, optimizer, scheduler),
        (restored_model, restored_optimizer, restored),
    ):
        backward_once(current_model, 99)
        current_optimizer.step()
        current_scheduler.step()
    assert restored.last_epoch == 5
    for group, restored_group in zip(optimizer.param_groups, restored_optimizer.param_groups):
        expected = BASE_LR * SCHEDULES[kind](5) * controller.factors[layer_of_group(group)]
        assert group["lr"] == pytest.approx(expected, rel=1e-12), group["name"]
        assert restored_group["lr"] == pytest.approx(expected, rel=1e-12), restored_group["name"]


def test_state_dict_rejects_other_model(tmp_path):
    _, controller, _, scheduler = build_setup("lambda")
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    other_controller = LoTController(group_parameters_by_layer(model), controller.config)
    other_optimizer = torch.optim.Adam(layerwise_param_groups(other_controller.layers, BASE_LR))
    other = LayerwiseLRScheduler(other_optimizer, other_controller)
    with pytest.raises(ValueError, match="same model"):
        other.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))


def test_rejected_load_keeps_scheduler(tmp_path):
    _, controller, _, scheduler = build_setup("lambda")
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    other_controller = LoTController(group_parameters_by_layer(model), controller.config)
    other_optimizer = torch.optim.Adam(layerwise_param_groups(other_controller.layers, BASE_LR))
    other = LayerwiseLRScheduler(other_optimizer, other_controller, base=lambda_schedule)
    with pytest.raises(ValueError, match="same model"):
        other.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))

    model(torch.randn(2, 3)).sum().backward()
    other_optimizer.step()
    other.step()
    assert other.last_epoch == 1
    for group in other_optimizer.param_groups:
        assert group["lr"] == pytest.approx(BASE_LR * lambda_schedule(1), rel=1e-12), group["name"]


# -- Accelerate ------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accelerator_prepare_advances_once(fresh_accelerate_state):
    from accelerate import Accelerator

    accumulation = 2
    num_steps = 4
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model, controller, optimizer, scheduler = build_setup("exponential")
    model, optimizer, prepared = accelerator.prepare(model, optimizer, scheduler)

    generator = torch.Generator().manual_seed(0)
    for micro_step in range(num_steps * accumulation):
        with accelerator.accumulate(model):
            loss = model(torch.randn(4, 3, generator=generator)).pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            prepared.step()
            optimizer.zero_grad()
        if micro_step == accumulation - 1:
            controller.factors = [0.5, 2.0]
            scheduler.apply_factors()

    assert scheduler.optimizer_steps == num_steps
    assert scheduler.last_epoch == num_steps
    assert scheduler.base_scheduler.last_epoch == num_steps
    for group in optimizer.optimizer.param_groups:
        expected = BASE_LR * DECAY**num_steps * controller.factors[layer_of_group(group)]
        assert group["lr"] == pytest.approx(expected, rel=1e-12), group["name"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_loop_advances_once(tmp_path):
    steps = 12
    output = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        str(LOOP_SCRIPT), "--steps", str(steps), "--interval", "4", "--output", str(output),
    ]  # fmt: skip
    env = {
        **os.environ,
        "USE_LIBUV": "0",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "CUDA_VISIBLE_DEVICES": "",
        # The launched script imports hf_lot from this checkout, not from wherever it is installed.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    result = json.loads(output.read_text())
    assert result["num_processes"] == 2
    assert result["optimizer_steps"] == steps
    assert result["scheduler_last_epoch"] == steps
    assert result["measurements"] == steps // 4
