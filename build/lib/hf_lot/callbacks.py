"""Console progress callbacks that keep per-layer LoT values out of the terminal.

`LoTTrainer` logs about eight values per layer at every measurement step
(``lot/<statistic>/<layer>``). The ``report_to`` integrations should receive
all of them, but printed as one dict they bury the loss line. These callbacks
replace `transformers.ProgressCallback` and `transformers.PrinterCallback`
and print only the keys without a layer part (``lot/rho``,
``lot/skipped_steps``) next to the usual ones. They change what the console
shows, not what `Trainer.log` records.
"""

from __future__ import annotations

from typing import Any

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

LOT_LOG_PREFIX = "lot/"


def drop_layer_values(logs: dict[str, Any]) -> dict[str, Any]:
    """Return ``logs`` without the per-layer keys ``lot/<statistic>/<layer>``.

    The count of dropped keys goes in ``lot/layer_values`` so the console line
    shows that more values went to the loggers.
    """
    kept: dict[str, Any] = {}
    dropped = 0
    for key, value in logs.items():
        if key.startswith(LOT_LOG_PREFIX) and key.count("/") >= 2:
            dropped += 1
        else:
            kept[key] = value
    if dropped:
        kept["lot/layer_values"] = dropped
    return kept


class LoTProgressCallback(ProgressCallback):
    """`ProgressCallback` that prints log lines without per-layer LoT values."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=drop_layer_values(logs or {}), **kwargs)


class LoTPrinterCallback(PrinterCallback):
    """`PrinterCallback` (used with ``disable_tqdm=True``) without per-layer LoT values."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=drop_layer_values(logs or {}), **kwargs)


def replace_console_callbacks(trainer: Any) -> None:
    """Swap the trainer's stock console callback for the LoT variant that hides per-layer values.

    Only the exact `ProgressCallback` and `PrinterCallback` classes are
    replaced. Subclasses, such as the notebook progress bar or a user's own,
    are left as they are.
    """
    replacements: dict[type[TrainerCallback], type[TrainerCallback]] = {
        ProgressCallback: LoTProgressCallback,
        PrinterCallback: LoTPrinterCallback,
    }
    for callback in list(trainer.callback_handler.callbacks):
        replacement = replacements.get(type(callback))
        if replacement is not None:
            trainer.remove_callback(callback)
            trainer.add_callback(replacement)
