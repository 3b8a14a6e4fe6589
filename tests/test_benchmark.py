"""The overhead benchmark's smoke run: output structure and finite, positive measurements.

Timing and accuracy targets are not asserted: they depend on the machine and
its load. docs/benchmarks.md records the measured values.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from hf_lot import LoTConfig

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark_overhead.py"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look up the module of the Settings class while the script is executed.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    output = tmp_path_factory.mktemp("benchmark") / "results.json"
    assert load_script().main(["--smoke", "--output", str(output)]) == 0
    return json.loads(output.read_text())


def is_finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_sections(smoke):
    assert set(smoke) >= {"machine", "settings", "data", "memory_method", "models", "sweep"}
    assert list(smoke["models"]) == ["tiny-bert"]
    assert set(smoke["models"]["tiny-bert"]) >= {"parameters", "overhead", "noise", "lambda"}


def test_smoke_machine_description(smoke):
    machine = smoke["machine"]
    assert machine["cpu_count"] >= 1
    assert len(machine["load_average"]) == 3
    assert machine["torch"]


def test_smoke_step_time_ratios(smoke):
    ratios = smoke["models"]["tiny-bert"]["overhead"]["ratios"]
    for arm in ("noise", "full"):
        assert is_finite_positive(ratios[arm]["median_step_time"]), arm
        assert is_finite_positive(ratios[arm]["mean_step_time"]), arm
        assert is_finite_positive(ratios[arm]["median_interval_step_time"]), arm


def test_smoke_memory_ratios(smoke):
    overhead = smoke["models"]["tiny-bert"]["overhead"]
    assert is_finite_positive(overhead["parameter_bytes"])
    # The full arm keeps one warm-start eigenvector per layer: one float32 copy of the parameters.
    assert overhead["memory"]["full"]["persistent_bytes"] == overhead["parameter_bytes"]
    assert overhead["memory"]["noise"]["persistent_bytes"] == 0
    for arm in ("noise", "full"):
        assert math.isfinite(overhead["ratios"][arm]["extra_memory_per_parameter_copy"]), arm
        assert overhead["ratios"][arm]["peak_memory"] >= 0, arm


def test_smoke_step_counts(smoke):
    steps = smoke["models"]["tiny-bert"]["overhead"]["steps"]
    settings = smoke["settings"]
    timed = settings["intervals"] * settings["interval"] // settings["block"] * (settings["block"] - 1)
    for arm in ("plain", "noise", "full"):
        assert steps[arm]["steps"] == timed, arm
        assert is_finite_positive(steps[arm]["median_s"]), arm
    assert len(smoke["models"]["tiny-bert"]["overhead"]["curvature_step_s"]) == settings["intervals"]


def test_smoke_noise_comparison(smoke):
    noise = smoke["models"]["tiny-bert"]["noise"]
    assert len(noise["per_step_relative_error"]) == len(noise["layers"])
    assert len(noise["averaged_relative_error"]) == len(noise["layers"])
    assert all(math.isfinite(error) and error >= 0 for error in noise["averaged_relative_error"])
    assert is_finite_positive(noise["cost_ratio"])
    assert is_finite_positive(noise["exact_cost_in_steps"])
    assert noise["extra_backward_passes"] == {"exact": noise["batch_size"], "estimate": 0}


def test_smoke_lambda_comparison(smoke):
    curvature = smoke["models"]["tiny-bert"]["lambda"]
    settings = smoke["settings"]
    assert len(curvature["measurements"]) == settings["lambda_measurements"]
    assert [record["cold_start"] for record in curvature["measurements"]] == [True] + [False] * (
        settings["lambda_measurements"] - 1
    )
    for record in curvature["measurements"]:
        assert len(record["lambda"]) == len(record["lambda_reference"]) == len(curvature["layers"])
        assert record["hvps_reference"] <= 100 * len(curvature["layers"])
    assert math.isfinite(curvature["warm_mean_relative_error"])
    assert is_finite_positive(curvature["warm_hvp_ratio"])


def test_smoke_lambda_compares_lanczos(smoke):
    curvature = smoke["models"]["tiny-bert"]["lambda"]
    config = LoTConfig()
    for record in curvature["measurements"]:
        assert len(record["lambda_lanczos"]) == len(curvature["layers"])
        # Lanczos gets the same product budget per layer as power iteration.
        budget = config.hvp_cold_iterations if record["cold_start"] else config.hvp_iterations
        assert record["hvps_lanczos"] <= budget * len(curvature["layers"])
    assert math.isfinite(curvature["lanczos_warm_mean_relative_error"])
    assert is_finite_positive(curvature["lanczos_warm_hvp_ratio"])


def test_smoke_sweep(smoke):
    assert len(smoke["sweep"]) == 1
    entry = smoke["sweep"][0]
    assert is_finite_positive(entry["parameters"])
    assert is_finite_positive(entry["overhead"]["ratios"]["full"]["mean_step_time"])
