"""Two CPU processes (gloo, loopback) against one process over the same global batches."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "USE_LIBUV": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    _run(
        [sys.executable, str(WORKER), "--gradient_accumulation_steps", "4", "--per_device_train_batch_size", "4",
         "--output", str(tmp_path / "single")],
        tmp_path,
    )
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(WORKER), "--gradient_accumulation_steps", "2",
         "--per_device_train_batch_size", "4", "--output", str(tmp_path / "ddp")],
        tmp_path,
    )
    load = lambda name: json.loads((tmp_path / name).read_text())  # noqa: E731
    return load("single.rank0.json"), load("ddp.rank0.json"), load("ddp.rank1.json")


@pytest.mark.slow
def test_ddp_runs_on_two_processes(runs):
    single, rank0, rank1 = runs
    assert single["world_size"] == 1
    assert rank0["world_size"] == 2
    assert rank1["world_size"] == 2


@pytest.mark.slow
def test_all_reduce_combines_both_ranks(runs):
    single, rank0, rank1 = runs
    # Rank r contributes [r + 1, -r].
    expected = {"sum": [3.0, -1.0], "mean": [1.5, -0.5], "max": [2.0, 0.0], "min": [1.0, -1.0]}
    assert rank0["reductions"] == expected
    assert rank1["reductions"] == expected
    # Without a process group the values come back unchanged.
    assert single["reductions"] == {reduction: [1.0, 0.0] for reduction in expected}


@pytest.mark.slow
def test_ddp_ranks_end_with_identical_learning_rates(runs):
    _, rank0, rank1 = runs
    assert rank0["learning_rates"] == rank1["learning_rates"]
    assert rank0["factors"] == rank1["factors"]


@pytest.mark.slow
def test_ddp_ranks_record_identical_statistics(runs):
    _, rank0, rank1 = runs
    assert rank0["history"] == rank1["history"]


@pytest.mark.slow
def test_ddp_noise_matches_single_process(runs):
    # Four micro-batches of 4 per step: on one process by accumulation, on two
    # by 2 ranks x 2 accumulation steps. The sequential sampler gives both the
    # same global batches, so the noise estimator receives the same micro-batches.
    single, rank0, _ = runs
    assert len(single["history"]) == len(rank0["history"]) >= 2
    for expected, measured in zip(single["history"], rank0["history"]):
        assert expected["step"] == measured["step"]
        assert expected["batch_size"] == measured["batch_size"] == 16
        for layer, values in expected["layers"].items():
            for key in ("variance", "grad_sq", "alpha", "alpha_noise"):
                assert measured["layers"][layer][key] == pytest.approx(values[key], rel=1e-4), (layer, key)
