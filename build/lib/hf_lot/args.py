"""`LoTTrainingArguments`: `TrainingArguments` plus one ``lot_<option>`` field per `LoTConfig` option.

Every `LoTConfig` option ``x`` becomes a field ``lot_x`` whose default, None,
means "take the value from the preset". Because they are dataclass fields,
`HfArgumentParser` exposes them as command-line flags (``--lot_interval 20``),
and they are saved with the rest of the arguments in checkpoints.

The config is resolved in this order, later entries winning:

1. the preset ``lot_preset`` (default ``"paper"``),
2. a saved config ``lot_config`` (a local folder or file, or a Hub id),
3. every ``lot_<option>`` that is not None.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from transformers import TrainingArguments

from .config import LoTConfig

__all__ = ["LoTTrainingArguments"]

_LIST_OPTIONS = {"layer_rules"}


def _lot_fields() -> list[tuple[str, type, dataclasses.Field]]:
    fields = [
        (
            "lot_preset",
            str,
            dataclasses.field(default="paper", metadata={"help": "LoT preset: 'paper', 'reference' or 'monitor'."}),
        ),
        (
            "lot_config",
            Optional[str],
            dataclasses.field(
                default=None,
                metadata={"help": "Local folder, JSON file or Hub id of a saved LoTConfig, applied over the preset."},
            ),
        ),
    ]
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    for option in dataclasses.fields(LoTConfig):
        help_text = option.metadata.get("help", "")
        if option.name in _LIST_OPTIONS:
            # HfArgumentParser has no type for pairs, so rules travel as a JSON string.
            annotation = Optional[str]
            help_text += ' On the command line, a JSON list such as \'[["encoder\\\\.layer\\\\.(\\\\d+)", "block.\\\\1"]]\'.'
        else:
            type_name = option.type if isinstance(option.type, str) else option.type.__name__
            base = hints.get(type_name.split(" ")[0].split("|")[0].strip(), str)
            annotation = Optional[base]
        metadata = {"help": f"{help_text} Default: from lot_preset."}
        if "choices" in option.metadata:
            metadata["choices"] = list(option.metadata["choices"])
        fields.append((f"lot_{option.name}", annotation, dataclasses.field(default=None, metadata=metadata)))
    return fields


def _to_lot_config(self) -> LoTConfig:
    """Resolve the preset, the saved config and the ``lot_*`` overrides into one `LoTConfig`."""
    values = LoTConfig.from_preset(self.lot_preset).to_dict()
    if self.lot_config:
        values.update(LoTConfig.from_pretrained(self.lot_config).to_dict())
    for option in dataclasses.fields(LoTConfig):
        value = getattr(self, f"lot_{option.name}")
        if value is None:
            continue
        if option.name in _LIST_OPTIONS and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"Invalid lot_{option.name}={value!r}: expected a JSON list of [regex, layer_name] pairs ({error})."
                ) from error
        values[option.name] = value
    return LoTConfig.from_dict(values)


def _post_init(self) -> None:
    TrainingArguments.__post_init__(self)
    # Invalid lot_* values fail here, when the flags are parsed, not later when the trainer is built.
    # A saved config (lot_config) may be a Hub id, so it is only read by to_lot_config().
    if self.lot_config is None:
        self.to_lot_config()


LoTTrainingArguments = dataclasses.make_dataclass(
    "LoTTrainingArguments",
    _lot_fields(),
    bases=(TrainingArguments,),
    namespace={"to_lot_config": _to_lot_config, "__post_init__": _post_init},
)
LoTTrainingArguments.__module__ = __name__
LoTTrainingArguments.__doc__ = (
    "`transformers.TrainingArguments` plus the LoT options: `lot_preset`, `lot_config`, and `lot_<option>` for every "
    "`hf_lot.LoTConfig` option (None takes the preset's value). `to_lot_config()` resolves them into a `LoTConfig`."
)
