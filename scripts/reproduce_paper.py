"""Reproduce the random-label MNIST experiment of Baveja, Lewandowski and Schmidt (arXiv 2509.19698).

The grid is {vanilla, reset, per-layer scheduler, global scheduler} x
{CReLU, L2, Wasserstein} x seeds. Every run trains `MLPForImageClassification`
on a sequence of random-label tasks with `LoTTrainer` (one `train()` call per
task, model, optimizer and controller carried between tasks). Vanilla and
reset runs keep the controller in monitor mode, so every run measures the
risk ``rho`` and the single indicators for the prediction study.

Examples::

    # the scaled protocol on 2 CPU cores, written to docs/reproduction.md
    nice -n 10 .venv/bin/python scripts/reproduce_paper.py --workers 2
    # a minute-long check of the whole pipeline (CI)
    .venv/bin/python scripts/reproduce_paper.py --smoke
    # the published protocol (21,000 images, 40 tasks of 250 epochs), on a GPU
    python scripts/reproduce_paper.py --full

Each finished run is saved as JSON in the results folder, and a later command
skips it, so an interrupted grid resumes. ``--report-only`` rebuilds the
report from the saved runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from hf_lot.tasks import apply_overrides, load_yaml  # noqa: E402

logger = logging.getLogger("reproduce_paper")

METHODS = ("crelu", "l2", "wasserstein")
ARMS = ("vanilla", "reset", "layer", "global")
ARM_TITLES = {
    "vanilla": "vanilla (constant lr)",
    "reset": "reset every task",
    "layer": "per-layer scheduler",
    "global": "global scheduler",
}
SIGNALS = (
    "rho",
    "rho_noise",
    "rho_volatility",
    "ratio_combined",
    "ratio_noise",
    "ratio_volatility",
    "gram_rank",
    "sign_entropy",
    "sharpness",
    "weight_magnitude",
    "gradient_norm",
    "update_norm",
    "update_ratio",
    "dormant_fraction",
)
NOTES_HEADING = "## Comparison with the paper"
PROTOCOL_CONFIGS = {
    "scaled": "configs/mnist_scaled.yaml",
    "smoke": "configs/mnist_smoke.yaml",
    "full": "configs/mnist_full.yaml",
}


# -- one run -----------------------------------------------------------------


def _training_arguments(protocol: dict[str, Any], method: dict[str, Any], arm: str, seed: int, output_dir: str):
    from hf_lot import LoTTrainingArguments

    # Method-specific options (the reference code's volatility term differs per method) override the protocol's.
    lot = {**protocol.get("lot", {}), **method.get("lot", {})}
    preset = lot.pop("preset", "paper")
    lot_fields = {f"lot_{key}": value for key, value in lot.items()}
    use_cpu = not (protocol.get("device") == "cuda" and torch.cuda.is_available())
    return LoTTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=protocol["batch_size"],
        num_train_epochs=protocol["epochs"],
        learning_rate=method["learning_rate"],
        weight_decay=method.get("weight_decay", 0.0),
        lr_scheduler_type="constant",
        # The published protocol does not clip gradients, but Trainer clips to norm 1.0 by default.
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=use_cpu,
        seed=seed,
        dataloader_num_workers=0,
        lot_preset=preset,
        lot_control=arm in ("layer", "global"),
        lot_granularity="global" if arm == "global" else "layer",
        **lot_fields,
    )


def _bound_ratios(history: list[dict[str, Any]], task_index: int) -> dict[str, float]:
    """Return, per bound, the task's mean over measurements of ``max_l alpha_l / bound_l``.

    ``rho`` only counts measurements where this ratio exceeds 1; the ratio
    itself is the continuous margin behind it.
    """
    result = {}
    for bound in ("combined", "noise", "volatility"):
        values = []
        for record in history:
            if record["task"] != task_index:
                continue
            ratios = [
                layer["alpha"] / layer[f"alpha_{bound}"]
                for layer in record["layers"].values()
                if math.isfinite(layer["alpha"]) and layer[f"alpha_{bound}"] > 0
            ]
            if ratios:
                values.append(max(ratios))
        result[f"ratio_{bound}"] = float(np.mean(values)) if values else math.nan
    return result


def _make_trainer_class():
    from hf_lot.plasticity import RegularizedLoTTrainer

    class OnlineAccuracyTrainer(RegularizedLoTTrainer):
        """`RegularizedLoTTrainer` that counts correct training predictions (online accuracy)."""

        online_correct = 0
        online_total = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            # Curvature measurements run in eval mode and are not training predictions.
            if model.training and torch.is_grad_enabled() and "labels" in inputs:
                labels = inputs["labels"]
                self.online_correct += int((outputs.logits.argmax(-1) == labels).sum())
                self.online_total += int(labels.numel())
            return (loss, outputs) if return_outputs else loss

    return OnlineAccuracyTrainer


def run_one(protocol: dict[str, Any], method_name: str, arm: str, seed: int) -> dict[str, Any]:
    """Train one (method, arm, seed) run over all tasks and return its per-task results."""
    from transformers import PrinterCallback, default_data_collator
    from transformers.utils import logging as hf_logging

    from hf_lot.indicators import IndicatorCallback
    from hf_lot.models import MLPConfig, MLPForImageClassification
    from hf_lot.optim import unwrap_optimizer
    from hf_lot.plasticity import WassersteinRegularizer, reinitialize
    from hf_lot.vision_tasks import random_label_tasks

    hf_logging.set_verbosity_error()
    torch.set_num_threads(protocol.get("threads", 1))
    method = protocol["methods"][method_name]
    start_time = time.time()

    tasks = random_label_tasks(protocol["num_tasks"], protocol["num_images"], protocol.get("source", "mnist"), seed)
    torch.manual_seed(seed)
    activation = "crelu" if method_name == "crelu" else "relu"
    model = MLPForImageClassification(MLPConfig(hidden_sizes=protocol.get("hidden_sizes", [256, 256]), activation=activation))
    regularizers = []
    if method.get("wasserstein"):
        regularizers.append(WassersteinRegularizer(model, strength=method["wasserstein"]))

    trainer_class = _make_trainer_class()
    # Adam's own weight_decay adds weight_decay * theta to the gradient, the coupled L2 of the published protocol.
    optimizer_spec = (torch.optim.Adam, {"betas": (0.9, 0.999), "eps": 1e-8})
    indicators = IndicatorCallback(**protocol.get("indicators", {}))
    optimizer, controller = None, None
    task_results = []

    with tempfile.TemporaryDirectory() as output_dir:
        args = _training_arguments(protocol, method, arm, seed, output_dir)
        for index, task in enumerate(tasks):
            if arm == "reset" and index > 0:
                reinitialize(model, seed=seed * 100_003 + index)
                for regularizer in regularizers:
                    regularizer.reset_reference()
                optimizer = None

            trainer = trainer_class(
                model=model,
                args=dataclasses.replace(args, seed=seed * 1000 + index),
                train_dataset=task,
                data_collator=default_data_collator,
                optimizers=(optimizer, None),
                optimizer_cls_and_kwargs=None if optimizer is not None else optimizer_spec,
                lot_controller=controller,
                regularizers=regularizers,
                callbacks=[indicators],
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            optimizer, controller = unwrap_optimizer(trainer.optimizer), trainer.lot_controller

            summary = controller.task_summary(index)
            summary.update(_bound_ratios(controller.history, index))
            accuracy = trainer.online_correct / max(trainer.online_total, 1)
            task_results.append({"task": index, "accuracy": accuracy, **summary, **indicators.records[index]})
            logger.info("%s/%s/seed %d task %d: online accuracy %.3f, rho %s", method_name, arm, seed, index, accuracy, summary["rho"])

    learning_rates = [
        {
            "step": record["step"],
            "task": record["task"],
            "lr": {n: v["lr"] for n, v in record["layers"].items()},
            "alpha": {n: v["alpha"] for n, v in record["layers"].items()},
            "alpha_combined": {n: v["alpha_combined"] for n, v in record["layers"].items()},
            "alpha_noise": {n: v["alpha_noise"] for n, v in record["layers"].items()},
        }
        for record in controller.history
    ]
    return {
        "method": method_name,
        "arm": arm,
        "seed": seed,
        "lot_preset": {**protocol.get("lot", {}), **method.get("lot", {})}.get("preset", "paper"),
        "lot_config": controller.config.to_dict(),
        "tasks": task_results,
        "learning_rates": learning_rates,
        "seconds": time.time() - start_time,
    }


def _configure_logging() -> None:
    # Worker processes start without handlers, so each configures its own.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("hf_lot").setLevel(logging.WARNING)


def _run_file(results_dir: str, method: str, arm: str, seed: int) -> str:
    return os.path.join(results_dir, f"{method}_{arm}_seed{seed}.json")


def _run_and_save(job: tuple[dict[str, Any], str, str, int, str]) -> str:
    protocol, method, arm, seed, results_dir = job
    _configure_logging()
    path = _run_file(results_dir, method, arm, seed)
    # Another command on the same results folder may have finished this run since the job list was made.
    if os.path.isfile(path):
        return f"{method}/{arm}/seed {seed}: already saved"
    result = run_one(protocol, method, arm, seed)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"protocol": protocol, **result}, handle)
    os.replace(temporary, path)
    return f"{method}/{arm}/seed {seed}: {result['seconds']:.0f} s"


# -- analysis ----------------------------------------------------------------


def spearman(x: list[float], y: list[float]) -> float:
    """Return Spearman's rank correlation of paired values (average ranks for ties); NaN if undefined."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan

    def ranks(values: np.ndarray) -> np.ndarray:
        order = np.argsort(values, kind="mergesort")
        result = np.empty(len(values))
        sorted_values = values[order]
        start = 0
        while start < len(values):
            stop = start
            while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
                stop += 1
            result[order[start : stop + 1]] = (start + stop) / 2.0
            start = stop + 1
        return result

    a = ranks(np.array([p[0] for p in pairs], dtype=float))
    b = ranks(np.array([p[1] for p in pairs], dtype=float))
    if a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def quarter_means(accuracies: list[float]) -> tuple[float, float]:
    """Return the mean accuracy over the first and over the last quarter of tasks (at least one task each)."""
    size = max(1, len(accuracies) // 4)
    return float(np.mean(accuracies[:size])), float(np.mean(accuracies[-size:]))


def prediction_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Correlate every signal of task t with the accuracy of task t and with the drop to task t+1.

    ``pooled`` ranks all (run, task) pairs together. ``within`` is the mean
    over runs of the correlation along one run's tasks, which measures whether a
    signal tracks the accuracy curve of that run.
    """
    rows = []
    for signal in SIGNALS:
        pooled_signal, pooled_accuracy, pooled_next, pooled_drop = [], [], [], []
        within_accuracy, within_drop = [], []
        for run in runs:
            values = [task.get(signal) for task in run["tasks"]]
            accuracy = [task["accuracy"] for task in run["tasks"]]
            drop = [accuracy[i] - accuracy[i + 1] for i in range(len(accuracy) - 1)]
            pooled_signal += values
            pooled_accuracy += accuracy
            pooled_next += values[:-1]
            pooled_drop += drop
            within_accuracy.append(spearman(values, accuracy))
            within_drop.append(spearman(values[:-1], drop))
        finite_within = [v for v in within_accuracy if math.isfinite(v)]
        finite_drop = [v for v in within_drop if math.isfinite(v)]
        rows.append(
            {
                "signal": signal,
                "pairs": sum(1 for v, a in zip(pooled_signal, pooled_accuracy) if v is not None and math.isfinite(v)),
                "accuracy_pooled": spearman(pooled_signal, pooled_accuracy),
                "accuracy_within": float(np.mean(finite_within)) if finite_within else math.nan,
                "within_runs": len(finite_within),
                "drop_pooled": spearman(pooled_next, pooled_drop),
                "drop_within": float(np.mean(finite_drop)) if finite_drop else math.nan,
            }
        )
    return rows


def _format(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def plot_accuracy(runs: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    figure, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.6), squeeze=False, sharey=True)
    for axis, method in zip(axes[0], methods):
        for arm in ARMS:
            curves = [[t["accuracy"] for t in r["tasks"]] for r in runs if r["method"] == method and r["arm"] == arm]
            if not curves:
                continue
            length = min(map(len, curves))
            values = np.array([c[:length] for c in curves])
            tasks = np.arange(1, length + 1)
            axis.plot(tasks, values.mean(0), label=f"{ARM_TITLES[arm]} ({len(curves)} seeds)")
            axis.fill_between(tasks, values.min(0), values.max(0), alpha=0.2)
        axis.axhline(0.1, color="gray", linestyle=":", linewidth=1)
        axis.set_title(method)
        axis.set_xlabel("task")
    axes[0][0].set_ylabel("online training accuracy")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_learning_rates(runs: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = []
    for method in METHODS:
        for arm in ("layer", "global"):
            candidates = sorted((r for r in runs if r["method"] == method and r["arm"] == arm), key=lambda r: r["seed"])
            if candidates:
                chosen.append(candidates[0])
    if not chosen:
        return
    columns = 2
    rows = math.ceil(len(chosen) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(10, 2.8 * rows), squeeze=False)
    for axis, run in zip(axes.flat, chosen):
        history = run["learning_rates"]
        steps = [h["step"] for h in history]
        for layer in (history[0]["lr"] if history else {}):
            axis.plot(steps, [h["lr"][layer] for h in history], label=layer)
        axis.set_yscale("log")
        axis.set_title(f"{run['method']}, {ARM_TITLES[run['arm']]}, seed {run['seed']}", fontsize=9)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("learning rate")
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(chosen) :]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(runs: list[dict[str, Any]], protocol: dict[str, Any], report_path: str, command: str) -> None:
    """Write the results table, the plots and the prediction table as Markdown to `report_path`."""
    folder = os.path.dirname(os.path.abspath(report_path))
    stem = os.path.splitext(os.path.basename(report_path))[0]
    accuracy_png = f"{stem}_accuracy.png"
    lr_png = f"{stem}_learning_rates.png"
    plot_accuracy(runs, os.path.join(folder, accuracy_png))
    plot_learning_rates(runs, os.path.join(folder, lr_png))

    lines = [
        f"# Reproduction: random-label MNIST, {protocol['name']} protocol",
        "",
        "Generated by `scripts/reproduce_paper.py`. Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Protocol",
        "",
        f"- {protocol['num_images']} images ({protocol.get('source', 'mnist')}), standardized; "
        f"{protocol['num_tasks']} tasks, every label redrawn uniformly from 10 classes per task.",
        f"- MLP 784-{'-'.join(map(str, protocol.get('hidden_sizes', [256, 256])))}-10, Kaiming-uniform, zero biases; "
        f"Adam (0.9, 0.999), batch {protocol['batch_size']}, {protocol['epochs']} epochs per task "
        f"({math.ceil(protocol['num_images'] / protocol['batch_size']) * protocol['epochs']} optimizer steps).",
        "- Methods: "
        + "; ".join(f"{name}: {json.dumps(options)}" for name, options in protocol["methods"].items())
        + ".",
        f"- LoT options: {json.dumps(protocol.get('lot', {}))} (other options from the preset).",
        "- Metric: online training accuracy, the share of correct predictions over all minibatches of a task "
        "(chance 0.1).",
        "",
        "## Accuracy over the first and last quarter of tasks",
        "",
        "Mean over seeds, with the range (min to max) in brackets.",
        "",
        "| method | arm | LoT preset | seeds | first quarter | last quarter |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        for arm in ARMS:
            group = [r for r in runs if r["method"] == method and r["arm"] == arm]
            if not group:
                continue
            quarters = np.array([quarter_means([t["accuracy"] for t in r["tasks"]]) for r in group])
            first, last = quarters[:, 0], quarters[:, 1]
            presets = ", ".join(sorted({r["lot_preset"] for r in group}))
            lines.append(
                f"| {method} | {ARM_TITLES[arm]} | {presets} | {len(group)} | "
                f"{first.mean():.3f} [{first.min():.3f}, {first.max():.3f}] | "
                f"{last.mean():.3f} [{last.min():.3f}, {last.max():.3f}] |"
            )
    lines += [
        "",
        f"![online accuracy per task]({accuracy_png})",
        "",
        f"![learned learning rates]({lr_png})",
        "",
        "## Prediction table",
        "",
        "Spearman correlation of each signal measured during task t with the online accuracy of task t, and "
        "with the drop from task t to task t+1 (accuracy(t) - accuracy(t+1)). `pooled` ranks all (run, task) "
        "pairs of all arms, methods and seeds together; `within run` is the mean over runs of the correlation "
        "along one run's tasks, over the runs (count in brackets) where the signal is not constant. A signal that predicts loss of trainability correlates negatively with accuracy. "
        "`rho` is the share of controller measurements in the task where some layer's effective step exceeded "
        "the combined bound, `rho_noise` and `rho_volatility` the same for the single bounds. `ratio_*` is the "
        "task's mean over measurements of the largest per-layer ratio alpha_l / bound_l, the continuous margin "
        "that `rho` thresholds at 1.",
        "",
        "| signal | pairs | accuracy, pooled | accuracy, within run (runs) | drop, pooled | drop, within run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in prediction_table(runs):
        lines.append(
            f"| {row['signal']} | {row['pairs']} | {_format(row['accuracy_pooled'])} | "
            f"{_format(row['accuracy_within'])} ({row['within_runs']}) | {_format(row['drop_pooled'])} | "
            f"{_format(row['drop_within'])} |"
        )
    lines.append("")
    total = sum(r["seconds"] for r in runs)
    lines.append(f"{len(runs)} runs, {total / 60:.1f} minutes of training in total.")
    lines.append("")

    # A hand-written comparison at the end of an existing report survives regeneration.
    if os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as handle:
            previous = handle.read()
        marker = previous.find(f"\n{NOTES_HEADING}")
        if marker >= 0:
            lines.append(previous[marker:].strip() + "\n")

    with open(report_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))


# -- command line ------------------------------------------------------------


def load_protocol(path: str, overrides: list[str]) -> dict[str, Any]:
    """Read a protocol YAML file and apply ``dotted.key=value`` overrides."""
    with open(path, encoding="utf-8") as handle:
        protocol = load_yaml(handle.read())
    protocol = apply_overrides(protocol, overrides)
    for key in ("name", "num_images", "num_tasks", "epochs", "batch_size", "methods"):
        if key not in protocol:
            raise ValueError(f"Protocol file {path} has no {key!r}; see configs/mnist_scaled.yaml for the fields.")
    unknown = sorted(set(protocol["methods"]) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown method(s) {', '.join(unknown)} in {path}; expected {', '.join(METHODS)}.")
    return protocol


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--smoke", action="store_true", help="Run the minute-long CI protocol (configs/mnist_smoke.yaml).")
    choice.add_argument("--full", action="store_true", help="Run the published protocol (configs/mnist_full.yaml); needs a GPU.")
    choice.add_argument("--config", help="Protocol YAML file; default configs/mnist_scaled.yaml.")
    parser.add_argument("--seeds", type=int, nargs="+", help="Seeds to run; default: the protocol's seeds.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--workers", type=int, default=1, help="Runs trained in parallel processes (one thread each).")
    parser.add_argument("--results-dir", help="Folder of the per-run JSON files; default outputs/reproduction/<protocol name>.")
    parser.add_argument("--report", help="Markdown report path; default: the protocol's report field.")
    parser.add_argument("--report-only", action="store_true", help="Rebuild the report from saved runs without training.")
    parser.add_argument("overrides", nargs="*", help="Protocol overrides such as epochs=10 or lot.preset=reference.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    _configure_logging()
    if arguments.config:
        config_path = arguments.config
    elif arguments.smoke:
        config_path = os.path.join(REPO_ROOT, PROTOCOL_CONFIGS["smoke"])
    elif arguments.full:
        config_path = os.path.join(REPO_ROOT, PROTOCOL_CONFIGS["full"])
    else:
        config_path = os.path.join(REPO_ROOT, PROTOCOL_CONFIGS["scaled"])
    protocol = load_protocol(config_path, arguments.overrides)

    results_dir = arguments.results_dir or os.path.join(REPO_ROOT, "outputs", "reproduction", protocol["name"])
    os.makedirs(results_dir, exist_ok=True)
    report = arguments.report or os.path.join(REPO_ROOT, protocol.get("report", f"outputs/reproduction/{protocol['name']}/reproduction.md"))
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    seeds = arguments.seeds or protocol.get("seeds", [0, 1, 2])

    jobs = [
        (protocol, method, arm, seed, results_dir)
        for seed in seeds
        for method in arguments.methods
        for arm in arguments.arms
        if not os.path.isfile(_run_file(results_dir, method, arm, seed))
    ]
    if not arguments.report_only and jobs:
        logger.info("Training %d runs with %d worker(s); results in %s", len(jobs), arguments.workers, results_dir)
        if arguments.workers > 1:
            with multiprocessing.get_context("spawn").Pool(arguments.workers, maxtasksperchild=1) as pool:
                for message in pool.imap_unordered(_run_and_save, jobs):
                    logger.info("Finished %s", message)
        else:
            for job in jobs:
                logger.info("Finished %s", _run_and_save(job))

    runs = []
    for seed in seeds:
        for method in arguments.methods:
            for arm in arguments.arms:
                path = _run_file(results_dir, method, arm, seed)
                if os.path.isfile(path):
                    with open(path, encoding="utf-8") as handle:
                        runs.append(json.load(handle))
    if not runs:
        logger.error("No finished runs in %s; run without --report-only first.", results_dir)
        return 1
    command = "python scripts/reproduce_paper.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    write_report(runs, protocol, report, command.strip())
    logger.info("Wrote %s from %d runs", report, len(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
