"""Shard-aware squared gradient norms, and LoTTrainer's rejection of FSDP and DeepSpeed.

FSDP through `Trainer` does not run on CPU here (transformers 5.25,
accelerate 1.16, torch 2.13): FSDP version 1 rejects CPU parameter
initialization, and version 2 with ``use_cpu=True`` silently trains as plain
multi-process data parallelism. `fully_shard` (FSDP2) itself runs on CPU with
gloo, so the two-process test uses it directly.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from hf_lot import LoTTrainer, LoTTrainingArguments
from hf_lot.collectives import all_reduce
from hf_lot.layers import group_parameters_by_layer
from hf_lot.noise import squared_norms_of_gradients
from hf_lot.sharding import layer_squared_norms_of_shards, local_shards, sharded_squared_norms

WORKER = Path(__file__).with_name("sharding_worker.py")


@pytest.fixture
def model_with_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    inputs, labels = torch.randn(10, 5), torch.randint(0, 3, (10,))
    nn.functional.cross_entropy(model(inputs), labels).backward()
    return model, group_parameters_by_layer(model)


def simulate_ranks(layers, world_size: int) -> list[list[list[tuple[torch.Tensor, int]]]]:
    """Split each weight gradient along dim 0 as FSDP does (uneven last shard) and replicate each bias."""
    ranks = [[[] for _ in layers] for _ in range(world_size)]
    for index, layer in enumerate(layers):
        for parameter in layer.parameters:
            if parameter.ndim >= 2:
                for rank, shard in enumerate(torch.tensor_split(parameter.grad, world_size, dim=0)):
                    ranks[rank][index].append((shard, 1))
            else:
                for rank in range(world_size):
                    ranks[rank][index].append((parameter.grad.clone(), world_size))
    return ranks


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_simulated_shards_sum_to_full_norm(model_with_gradients, world_size):
    _, layers = model_with_gradients
    expected = squared_norms_of_gradients(layers).double()

    per_rank = [layer_squared_norms_of_shards(shards) for shards in simulate_ranks(layers, world_size)]

    assert torch.allclose(sum(per_rank), expected, rtol=1e-6)


def test_simulated_single_shard_is_partial(model_with_gradients):
    # One rank's shards alone miss the other ranks' rows, so the reduction is needed.
    _, layers = model_with_gradients
    expected = squared_norms_of_gradients(layers).double()

    first_rank = layer_squared_norms_of_shards(simulate_ranks(layers, 2)[0])

    assert bool((first_rank < expected).all())


def test_replicated_tensor_counted_once():
    gradient = torch.tensor([3.0, 4.0])

    per_rank = [layer_squared_norms_of_shards([[(gradient, 2)]]) for _ in range(2)]

    assert float(sum(per_rank)[0]) == pytest.approx(25.0)


def test_zero_copies_rejected():
    with pytest.raises(ValueError, match="copies must be at least 1"):
        layer_squared_norms_of_shards([[(torch.ones(2), 0)]])


def test_plain_tensor_is_replicated():
    gradient = torch.ones(3)

    local, copies = local_shards(gradient, world_size=4)

    assert local is gradient
    assert copies == 4


def test_single_process_matches_full_norms(model_with_gradients):
    _, layers = model_with_gradients

    measured = sharded_squared_norms(layers, scale=2.0)

    assert torch.allclose(measured, squared_norms_of_gradients(layers, scale=2.0), rtol=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_result(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fsdp")
    output = tmp_path / "norms.json"
    env = {**os.environ, "USE_LIBUV": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(WORKER), "--output", str(output),
    ]
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.mark.slow
def test_fsdp2_parameters_are_sharded(fsdp_result):
    assert fsdp_result["placements"] == ["(Shard(dim=0),)"] * 5


@pytest.mark.slow
def test_fsdp2_shard_norms_match_unsharded(fsdp_result):
    assert fsdp_result["layer_names"] == ["root", "hidden", "output"]
    assert fsdp_result["measured"] == pytest.approx(fsdp_result["expected"], rel=1e-5)


@pytest.mark.slow
def test_fsdp2_local_norms_are_partial(fsdp_result):
    for local, expected in zip(fsdp_result["local"], fsdp_result["expected"]):
        assert local < expected


@pytest.mark.slow
def test_fsdp2_curvature_rejected(fsdp_result):
    assert "FSDP-sharded (DTensor) parameters are not supported" in fsdp_result["curvature_error"]


# -- LoTTrainer under FSDP and DeepSpeed ------------------------------------------


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize(
    "engine, unsupported, alternative",
    [
        (DistributedType.FSDP, "does not support FSDP", "Train with DDP"),
        (DistributedType.DEEPSPEED, "does not support DeepSpeed", "Train with DDP"),
    ],
)
def test_trainer_rejects_sharded_engine(monkeypatch, tmp_path, engine, unsupported, alternative):
    # The accelerator reports the engine, as it does under `accelerate launch` with an FSDP or DeepSpeed plugin.
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: engine))
    args = LoTTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)

    with pytest.raises(ValueError) as raised:
        LoTTrainer(model=TinyClassifier(), args=args)

    message = str(raised.value)
    assert unsupported in message
    assert alternative in message
    assert str(engine) in message


def test_trainer_accepts_multi_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.MULTI_CPU))
    args = LoTTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)

    trainer = LoTTrainer(model=TinyClassifier(), args=args)

    assert [layer.name for layer in trainer.lot_layers] == ["linear"]


def test_all_reduce_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="'median'"):
        all_reduce(torch.ones(2), "median")
