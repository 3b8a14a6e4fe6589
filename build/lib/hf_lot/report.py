"""A self-contained report of a continual run, built from its ``results.json``.

`write_report` reads ``results.json`` (schema in ``docs/results_schema.md``)
from a run's output folder and writes into ``<output_dir>/report/``:

- ``accuracy_matrix.png``: the accuracy matrix ``acc[i][j]`` as a heatmap,
- ``accuracy_curves.png``: each task's accuracy after every task, with its
  chance level and the average accuracy,
- ``learning_rates.png``: each layer's learning rate against the optimizer
  step and, with the threshold, each layer's controller factor,
- ``alpha_bounds.png``: each layer's effective step ``alpha_l`` against its
  combined bound ``alpha_tilde*_l`` at every controller measurement,
- ``rho.png``: the risk ``rho`` per task, with its noise and volatility parts,
- ``index.html``: one page with the tables and every figure embedded as a
  base64 data URI, so it opens from disk without a server, also when copied
  away from the PNG files.

A run without the threshold has no controller measurements, so its report
has no ``alpha_bounds.png`` or ``rho.png``, and the page notes why. Run it as
``python -m hf_lot.report OUTPUT_DIR`` or ``hf-lot-report OUTPUT_DIR``.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["REPORT_DIR", "REPORT_PAGE", "load_results", "main", "write_report"]

REPORT_DIR = "report"
REPORT_PAGE = "index.html"
SUPPORTED_SCHEMA_VERSIONS = (1,)
FIGURE_DPI = 110
# Layer panels per row in the alpha figure.
PANEL_COLUMNS = 4


@dataclass
class Figure:
    """One figure of the report: its PNG file name, title and caption."""

    file_name: str
    title: str
    caption: str


# -- input ---------------------------------------------------------------


def load_results(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``results.json`` of a run's output folder.

    Raises FileNotFoundError without the file, and ValueError for a file that
    is not JSON, lacks required keys or has another schema version.
    """
    path = os.path.join(os.fspath(output_dir), "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found. Pass the run.output_dir of a continual run, which contains results.json."
        )
    with open(path, encoding="utf-8") as handle:
        try:
            results = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}). Rerun the task that wrote it.") from error
    if not isinstance(results, dict):
        raise ValueError(f"{path} must contain a JSON object in the results.json schema.")

    version = results.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ValueError(
            f"{path} has schema_version={version!r}; this report reads version(s) "
            f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}. Use the hf_lot release that wrote the file."
        )
    required = ("tasks", "accuracy", "layer_names", "learning_rates", "train", "threshold")
    missing = [key for key in required if key not in results]
    if missing:
        raise ValueError(f"{path} is missing the key(s) {', '.join(missing)} of the results.json schema.")
    return results


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _task_names(results: dict[str, Any]) -> list[str]:
    return [task["name"] for task in results["tasks"]]


# -- figures -------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: str) -> None:
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.tmp.png")
    figure.savefig(temporary, dpi=FIGURE_DPI, bbox_inches="tight")
    os.replace(temporary, path)


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def plot_accuracy_matrix(results: dict[str, Any], path: str) -> None:
    """Draw ``acc[i][j]`` as a heatmap with its values. Entries not measured stay blank."""
    plt = _pyplot()
    names = [_short(name) for name in _task_names(results)]
    matrix = np.array([[_as_float(value) for value in row] for row in results["accuracy"]], dtype=float)
    size = len(names)

    figure, axis = plt.subplots(figsize=(2.5 + 0.9 * size, 2.0 + 0.8 * size))
    image = axis.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(size):
        for j in range(size):
            if np.isnan(matrix[i, j]):
                continue
            # Dark text on the light (yellow-green) end of viridis, light text on the dark end.
            color = "black" if matrix[i, j] > 0.55 else "white"
            axis.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color=color, fontsize=9)
    axis.set_xticks(range(size), names, rotation=30, ha="right")
    axis.set_yticks(range(size), names)
    axis.set_xlabel("evaluated task j")
    axis.set_ylabel("after training task i")
    axis.set_title("accuracy acc[i][j]")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="accuracy")
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plot_accuracy_curves(results: dict[str, Any], path: str) -> None:
    """Draw each task's accuracy after every task, its chance level (dotted) and the average accuracy (dashed)."""
    plt = _pyplot()
    names = _task_names(results)
    matrix = np.array([[_as_float(value) for value in row] for row in results["accuracy"]], dtype=float)
    positions = np.arange(len(names))
    colors = plt.get_cmap("tab10")

    figure, axis = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 3.5), 4.2))
    for j, task in enumerate(results["tasks"]):
        values = matrix[:, j]
        measured = ~np.isnan(values)
        if not measured.any():
            continue
        color = colors(j % 10)
        axis.plot(positions[measured], values[measured], marker="o", color=color, label=_short(task["name"]))
        chance = task.get("chance_accuracy")
        if chance is not None:
            axis.axhline(chance, color=color, linestyle=":", linewidth=1)
    averages = np.array([_as_float(value) for value in results.get("average_accuracy", [])], dtype=float)
    if averages.size and not np.all(np.isnan(averages)):
        axis.plot(positions, averages, color="black", linestyle="--", linewidth=1.5, label="average (trained tasks)")

    axis.set_xticks(positions, [_short(name) for name in names], rotation=30, ha="right")
    axis.set_xlabel("after training task")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0.0, 1.02)
    axis.set_title("accuracy of each task (dotted: its chance level)")
    axis.grid(axis="y", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        axis.text(0.5, 0.5, "no task evaluated yet", transform=axis.transAxes, ha="center")
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def _layer_colors(plt: Any, count: int) -> list[Any]:
    # Colors ordered by depth (embeddings first, head last), so neighbouring layers look alike.
    colormap = plt.get_cmap("viridis")
    return [colormap(0.9 * index / max(count - 1, 1)) for index in range(count)]


def _line_style(index: int, color: Any) -> dict[str, Any]:
    # Layers often share one learning rate (the baseline, or before the controller acts). Cycling the
    # dash pattern and thinning later lines keeps every layer visible where the lines overlap.
    dashes = ("-", "--", "-.", ":")
    return {"color": color, "linestyle": dashes[index % len(dashes)], "linewidth": max(2.6 - 0.25 * index, 1.0)}


def _draw_task_boundaries(axis: Any, results: dict[str, Any], label: bool) -> None:
    names = _task_names(results)
    start = 0
    for index, boundary in enumerate(results.get("task_boundaries", [])):
        axis.axvline(boundary + 0.5, color="gray", linestyle="--", linewidth=0.8)
        if label and index < len(names):
            axis.text(
                (start + boundary) / 2 + 0.5,
                1.01,
                _short(names[index], 16),
                transform=axis.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        start = boundary


def _history_series(results: dict[str, Any], layer: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (optimizer step, value) of one layer's field over the controller records.

    A record's ``step`` counts the steps before the measured one, so the
    measured step, counted from 1 as in ``learning_rates``, is ``step + 1``.
    """
    steps, values = [], []
    for record in results.get("lot_history", []):
        fields = record.get("layers", {}).get(layer)
        if fields is None:
            continue
        steps.append(record["step"] + 1)
        values.append(_as_float(fields.get(key)))
    return np.array(steps, dtype=float), np.array(values, dtype=float)


def plot_learning_rates(results: dict[str, Any], path: str) -> None:
    """Draw every layer's learning rate against the step and, with controller records, every layer's factor."""
    plt = _pyplot()
    trajectories = results["learning_rates"]
    steps = np.asarray(trajectories["step"], dtype=float)
    layers = results["layer_names"]
    colors = _layer_colors(plt, len(layers))
    has_factors = bool(results.get("lot_history"))

    rows = 2 if has_factors else 1
    figure, axes = plt.subplots(rows, 1, figsize=(10, 3.6 * rows), sharex=True, squeeze=False)
    rate_axis = axes[0, 0]
    low, high = math.inf, -math.inf
    for index, (layer, color) in enumerate(zip(layers, colors)):
        values = np.array([_as_float(value) for value in trajectories["layers"].get(layer, [])], dtype=float)
        if values.size == 0 or np.all(np.isnan(values)):
            continue
        rate_axis.plot(steps, values, drawstyle="steps-post", label=layer, **_line_style(index, color))
        low, high = min(low, float(np.nanmin(values))), max(high, float(np.nanmax(values)))
    if low > 0 and high / low > 10:
        rate_axis.set_yscale("log")
    if math.isinf(low):
        rate_axis.text(0.5, 0.5, "no learning rates recorded yet", transform=rate_axis.transAxes, ha="center")
    rate_axis.set_ylabel("learning rate")
    rate_axis.set_title(
        f"per-layer learning rates, threshold {'on' if results['threshold'] else 'off'} (dashed: task boundaries)",
        pad=18,
    )
    _draw_task_boundaries(rate_axis, results, label=True)
    rate_axis.grid(alpha=0.3)
    if not math.isinf(low):
        rate_axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="layer", title_fontsize=8)

    if has_factors:
        factor_axis = axes[1, 0]
        for index, (layer, color) in enumerate(zip(layers, colors)):
            factor_steps, factors = _history_series(results, layer, "factor")
            if factors.size:
                factor_axis.plot(factor_steps, factors, marker=".", label=layer, **_line_style(index, color))
        factor_axis.axhline(1.0, color="black", linewidth=0.8)
        factor_axis.set_ylabel("controller factor\n(lr / base schedule)")
        _draw_task_boundaries(factor_axis, results, label=False)
        factor_axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step (all tasks)")
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def _label_minor_log_ticks(axis: Any, low: float, high: float) -> None:
    """Label the minor ticks 2 and 5 of each decade on a log axis of under two decades, and none on a longer one.

    Matplotlib labels every minor tick as ``6 x 10^0`` when the axis spans
    less than a decade, which crowds a small panel, and labels none when a
    panel has a single decade tick, which leaves no scale.
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def label(value: float, _position: int) -> str:
        mantissa = value / 10 ** math.floor(math.log10(value))
        return f"{value:g}" if round(mantissa, 6) in (2.0, 5.0) else ""

    short = high / low < 100
    axis.yaxis.set_minor_formatter(FuncFormatter(label) if short else NullFormatter())


def plot_alpha_bounds(results: dict[str, Any], path: str) -> None:
    """Draw, per layer, the effective step ``alpha_l`` and the combined bound ``alpha_tilde*_l`` over the measurements.

    Cooling and warming decisions are marked on the ``alpha_l`` line. The y
    axis is logarithmic because effective steps of different layers can
    differ by several orders of magnitude.
    """
    plt = _pyplot()
    layers = results["layer_names"]
    columns = min(PANEL_COLUMNS, len(layers))
    rows = math.ceil(len(layers) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns, 2.9 * rows + 0.6), sharex=True, squeeze=False, layout="constrained"
    )

    for index, layer in enumerate(layers):
        axis = axes[index // columns, index % columns]
        steps, alpha = _history_series(results, layer, "alpha")
        _, bound = _history_series(results, layer, "alpha_combined")
        axis.plot(steps, alpha, color="tab:blue", linewidth=1.4, label="alpha_l (effective step)")
        axis.plot(steps, bound, color="tab:orange", linewidth=1.4, linestyle="--", label="alpha_tilde*_l (bound)")
        actions = [
            (record.get("layers", {}).get(layer) or {}).get("action")
            for record in results.get("lot_history", [])
            if layer in record.get("layers", {})
        ]
        for action, marker, color in (("cool", "v", "tab:cyan"), ("warm", "^", "tab:red")):
            chosen = np.array([value == action for value in actions], dtype=bool)
            if chosen.any():
                axis.scatter(steps[chosen], alpha[chosen], marker=marker, color=color, s=22, zorder=3, label=action)
        positive = np.concatenate([alpha[alpha > 0], bound[bound > 0]])
        if positive.size:
            axis.set_yscale("log")
            _label_minor_log_ticks(axis, float(positive.min()), float(positive.max()))
        _draw_task_boundaries(axis, results, label=False)
        axis.set_title(_short(layer, 30), fontsize=9)
        axis.grid(alpha=0.3)
        axis.tick_params(labelsize=8)
    for index in range(len(layers), rows * columns):
        axes[index // columns, index % columns].axis("off")
    for column in range(columns):
        axes[-1, column].set_xlabel("optimizer step", fontsize=8)

    # One legend for all panels, from the labels that were drawn.
    handles, labels = {}, []
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    # Constrained layout makes room below the panels for an "outside" legend (matplotlib 3.7 or later).
    # Above them, it would overlap the title in matplotlib 3.11.
    figure.legend([handles[label] for label in labels], labels, loc="outside lower center", ncol=len(labels), fontsize=9)
    figure.suptitle("effective step against the combined bound, per layer (log scale)")
    _save(figure, path)
    plt.close(figure)


def plot_rho(results: dict[str, Any], path: str) -> None:
    """Draw the risk ``rho`` of each task next to its noise-only and volatility-only shares."""
    plt = _pyplot()
    names = _task_names(results)
    series = (("rho", "rho (combined bound)", "tab:purple"), ("rho_noise", "noise bound", "tab:blue"),
              ("rho_volatility", "volatility bound", "tab:green"))
    positions = np.arange(len(names))
    width = 0.8 / len(series)

    figure, axis = plt.subplots(figsize=(max(6.0, 1.4 * len(names) + 3.0), 3.8))
    for offset, (key, label, color) in enumerate(series):
        values = np.array([_as_float((train or {}).get(key)) for train in results["train"]], dtype=float)
        shifted = positions + (offset - (len(series) - 1) / 2) * width
        bars = axis.bar(shifted, np.nan_to_num(values, nan=0.0), width=width, color=color, label=label)
        for bar, value in zip(bars, values):
            text = "-" if np.isnan(value) else f"{value:.2f}"
            axis.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02, text, ha="center", fontsize=7)
    axis.set_xticks(positions, [_short(name) for name in names], rotation=30, ha="right")
    axis.set_ylim(0.0, 1.15)
    axis.set_ylabel("share of measurements")
    axis.set_title("risk rho per task: share of measurements with some layer above the bound")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


# -- HTML ----------------------------------------------------------------


def _format(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        # Fixed decimals suit accuracies and shares, but learning rates and effective steps need significant digits.
        if value != 0 and not 0.01 <= abs(value) < 1000:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format(cell))}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_rows(results: dict[str, Any]) -> list[list[Any]]:
    timing = results.get("timing") or {}
    return [
        ["status", results.get("status")],
        ["threshold", "on (LoTTrainer)" if results["threshold"] else "off (transformers.Trainer baseline)"],
        ["tasks completed", f"{results.get('tasks_completed', '-')} of {len(results['tasks'])}"],
        ["final average accuracy", results.get("final_average_accuracy")],
        ["average forgetting", results.get("average_forgetting")],
        ["classification head outputs (num_labels)", results.get("num_labels")],
        ["layers", len(results["layer_names"])],
        ["controller measurements", len(results.get("lot_history", []))],
        ["processes", results.get("world_size")],
        ["total time (s)", timing.get("total_s")],
    ]


def _task_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows = []
    train_seconds = (results.get("timing") or {}).get("train_s") or []
    for index, task in enumerate(results["tasks"]):
        train = results["train"][index] if index < len(results["train"]) else None
        train = train or {}
        rows.append(
            [
                index,
                task["name"],
                task.get("num_classes"),
                task.get("chance_accuracy"),
                task.get("train_examples"),
                task.get("eval_examples"),
                train.get("steps"),
                train.get("train_loss"),
                train.get("rho"),
                train.get("rho_noise"),
                train.get("rho_volatility"),
                train.get("measurements"),
                train_seconds[index] if index < len(train_seconds) else None,
            ]
        )
    return rows


def _layer_rows(results: dict[str, Any]) -> list[list[Any]]:
    rates = results["learning_rates"]["layers"]
    history = results.get("lot_history", [])
    rows = []
    for layer in results["layer_names"]:
        values = [value for value in rates.get(layer, []) if value is not None]
        records = [record["layers"][layer] for record in history if layer in record.get("layers", {})]
        last = records[-1] if records else {}
        rows.append(
            [
                layer,
                values[0] if values else None,
                values[-1] if values else None,
                last.get("factor"),
                sum(record.get("action") == "cool" for record in records) if records else None,
                sum(record.get("action") == "warm" for record in records) if records else None,
                last.get("alpha"),
                last.get("alpha_combined"),
            ]
        )
    return rows


def _accuracy_rows(results: dict[str, Any]) -> list[list[Any]]:
    names = _task_names(results)
    rows = [[names[i], *row, results.get("average_accuracy", [None] * len(names))[i]] for i, row in enumerate(results["accuracy"])]
    rows.append(["forgetting", *results.get("forgetting", [None] * len(names)), results.get("average_forgetting")])
    return rows


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; } .note { color: #a15c00; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _figure_html(folder: str, figure: Figure) -> str:
    with open(os.path.join(folder, figure.file_name), "rb") as handle:
        encoded = base64.b64encode(handle.read()).decode("ascii")
    return (
        f"<figure><img src=\"data:image/png;base64,{encoded}\" alt=\"{html.escape(figure.title)}\">"
        f"<figcaption>{html.escape(figure.caption)} File: <a href=\"{html.escape(figure.file_name)}\">"
        f"{html.escape(figure.file_name)}</a></figcaption></figure>"
    )


def render_html(results: dict[str, Any], folder: str, figures: list[Figure], notes: list[str], source: str) -> str:
    """Return the report page: summary, tables, the figures in `folder` as data URIs, and the config."""
    names = _task_names(results)
    parts = [
        "<!DOCTYPE html>",
        "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>hf_lot report: {html.escape(source)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Continual run report</h1><p>From <code>{html.escape(source)}</code>.</p>",
        "<h2>Summary</h2>",
        _table(["", "value"], _summary_rows(results)),
        "<h2>Accuracy</h2>",
        "<p>Row i: accuracy on every task after training task i. The last column is the mean over tasks "
        "trained so far; the last row is each task's forgetting after the last trained task.</p>",
        _table(["after task", *names, "average"], _accuracy_rows(results)),
        "<h2>Tasks</h2>",
        _table(
            ["#", "task", "classes", "chance", "train examples", "eval examples", "steps", "train loss", "rho",
             "rho noise", "rho volatility", "measurements", "train time (s)"],
            _task_rows(results),
        ),
        "<h2>Layers</h2>",
        "<p>Learning rates at the first and last recorded step; the controller's factor, its cooling and warming "
        "decisions, and alpha_l and alpha_tilde*_l at its last measurement (empty without the threshold).</p>",
        _table(
            ["layer", "first lr", "last lr", "last factor", "cooled", "warmed", "last alpha_l", "last alpha_tilde*_l"],
            _layer_rows(results),
        ),
        "<h2>Figures</h2>",
    ]
    parts.extend(f"<p class=\"note\">{html.escape(note)}</p>" for note in notes)
    for figure in figures:
        parts.append(f"<h3>{html.escape(figure.title)}</h3>")
        parts.append(_figure_html(folder, figure))
    config = json.dumps(results.get("config", {}), indent=2, sort_keys=True)
    parts.append(f"<h2>Config</h2><pre>{html.escape(config)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# -- report --------------------------------------------------------------


def write_report(output_dir: str | os.PathLike, report_dir: str | os.PathLike | None = None) -> str:
    """Write the PNG figures and ``index.html`` for the run in `output_dir`. Return the page's path.

    `report_dir` defaults to ``<output_dir>/report``. Existing report files
    there are replaced, each through a temporary file and `os.replace`.
    """
    output_dir = os.fspath(output_dir)
    results = load_results(output_dir)
    folder = os.fspath(report_dir) if report_dir is not None else os.path.join(output_dir, REPORT_DIR)
    os.makedirs(folder, exist_ok=True)

    figures = [
        Figure("accuracy_matrix.png", "Accuracy matrix", "acc[i][j]: accuracy on task j after training task i."),
        Figure(
            "accuracy_curves.png",
            "Accuracy of each task",
            "Each task's accuracy after every task; dotted: its chance level; dashed: average over trained tasks.",
        ),
        Figure(
            "learning_rates.png",
            "Per-layer learning rates",
            "Learning rate of each layer after every optimizer step"
            + (", and the controller's factor per layer at each measurement." if results.get("lot_history") else "."),
        ),
    ]
    plot_accuracy_matrix(results, os.path.join(folder, figures[0].file_name))
    plot_accuracy_curves(results, os.path.join(folder, figures[1].file_name))
    plot_learning_rates(results, os.path.join(folder, figures[2].file_name))

    notes = []
    if results.get("lot_history"):
        figures.append(
            Figure(
                "alpha_bounds.png",
                "Effective step against the combined bound",
                "Per layer: Adam's effective step alpha_l (solid) and the combined noise-curvature bound "
                "alpha_tilde*_l (dashed) at each controller measurement; triangles mark cooling and warming.",
            )
        )
        plot_alpha_bounds(results, os.path.join(folder, figures[-1].file_name))
        figures.append(
            Figure("rho.png", "Risk per task", "Share of a task's measurements in which some layer exceeded each bound.")
        )
        plot_rho(results, os.path.join(folder, figures[-1].file_name))
    else:
        reason = "the threshold was off" if not results["threshold"] else "no controller measurement was recorded yet"
        notes.append(f"No effective-step or risk figures: {reason}, so results.json has no lot_history.")
        # Figures of an earlier report in the same folder would no longer match this run.
        for name in ("alpha_bounds.png", "rho.png"):
            if os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))

    page = render_html(results, folder, figures, notes, os.path.abspath(output_dir))
    path = os.path.join(folder, REPORT_PAGE)
    temporary = os.path.join(folder, f".{REPORT_PAGE}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(page)
    os.replace(temporary, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: write the report of one output folder and print the page's path."""
    parser = argparse.ArgumentParser(
        prog="hf-lot-report",
        description="Write PNG figures and a self-contained HTML page from a continual run's results.json.",
    )
    parser.add_argument("output_dir", help="The run.output_dir of a continual run, which contains results.json.")
    parser.add_argument(
        "--report-dir", default=None, help="Folder for the report files (default: OUTPUT_DIR/report)."
    )
    arguments = parser.parse_args(argv)
    try:
        path = write_report(arguments.output_dir, arguments.report_dir)
    except (OSError, ValueError) as error:
        # OSError covers a missing results.json and a report folder that cannot be created, such as a file path.
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
