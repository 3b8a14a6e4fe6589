"""Map a model's parameters to named layers.

A *layer* is the unit that shares one learning rate and one set of noise and
curvature statistics. `group_parameters_by_layer` chooses layers as follows:

1. User rules, given as ``(regex, layer_name)`` pairs, are tried first and in
   order. A parameter whose full name matches ``regex`` (``re.search``) goes to
   the layer named by expanding ``layer_name`` with the match, so
   ``(r"encoder\\.layer\\.(\\d+)\\.", r"block.\\1")`` puts each BERT block in
   its own layer ``block.N``.
2. Transformer models: every ``nn.ModuleList`` of blocks (see
   `find_block_lists`) wherever it sits (``bert.encoder.layer``,
   ``model.layers``, ``transformer.h``, and both stacks of an encoder-decoder)
   contributes one layer per block, named by its module path. Parameters
   registered before the first block form the layer ``embeddings`` and all
   other parameters outside blocks form ``head``.
3. Other models (plain MLPs, CNNs): each module that directly owns parameters
   is one layer named by its module path, so every ``nn.Linear`` is a layer
   with its weight and bias.

Layers are ordered by the position of their first parameter in
``model.named_parameters()``, so the mapping is deterministic for a given
architecture. Frozen parameters (``requires_grad=False``) are left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

__all__ = ["Layer", "find_block_list", "find_block_lists", "format_layer_table", "group_parameters_by_layer"]


@dataclass
class Layer:
    """A named group of parameters that shares one learning rate."""

    name: str
    parameter_names: list[str] = field(default_factory=list)
    parameters: list[nn.Parameter] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters)

    @property
    def matrix_parameters(self) -> list[nn.Parameter]:
        """Parameters with two or more dimensions: the tensors behind Adam's effective step."""
        return [p for p in self.parameters if p.ndim >= 2]


# Attribute names under which transformers models keep their block lists. A list
# with one of these names counts even when it holds a single block.
BLOCK_LIST_NAMES = frozenset({"layer", "layers", "h", "blocks", "block"})


def find_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Return ``(path, module_list)`` for every list of transformer blocks, in registration order.

    A block list is an ``nn.ModuleList`` whose children share one class and own
    parameters, with at least two children or a conventional name
    (`BLOCK_LIST_NAMES`). Lists inside a block list (for example the experts of
    a mixture-of-experts block) are part of their block, not lists of their own.
    Encoder-decoder models have two block lists.
    """
    found: list[tuple[str, nn.ModuleList]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(f"{outer}.") for outer, _ in found if outer):
            continue
        attribute = path.rsplit(".", 1)[-1]
        if len(module) < 2 and attribute not in BLOCK_LIST_NAMES:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(True for _ in module[0].parameters()):
            continue
        found.append((path, module))
    return found


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """Return the first block list of `find_block_lists`, or None."""
    lists = find_block_lists(model)
    return lists[0] if lists else None


def _compile_rules(rules: Sequence[tuple[str, str]] | None) -> list[tuple[re.Pattern, str]]:
    compiled = []
    for rule in rules or ():
        if not isinstance(rule, (tuple, list)) or len(rule) != 2:
            raise ValueError(
                f"Invalid layer rule {rule!r}: expected a (regex, layer_name) pair such as "
                "('encoder\\.layer\\.(\\d+)\\.', 'block.\\1')."
            )
        pattern, template = rule
        try:
            compiled.append((re.compile(pattern), template))
        except re.error as error:
            raise ValueError(f"Invalid regex {pattern!r} in layer rule: {error}.") from error
    return compiled


def _default_layer_names(model: nn.Module) -> dict[str, str]:
    """Map each parameter name to its default layer name."""
    names: dict[str, str] = {}
    block_prefixes = []
    for block_path, block_list in find_block_lists(model):
        prefix = f"{block_path}." if block_path else ""
        block_prefixes.extend(f"{prefix}{index}." for index in range(len(block_list)))

    if block_prefixes:
        seen_block = False
        for name, _ in model.named_parameters():
            for block_prefix in block_prefixes:
                if name.startswith(block_prefix):
                    names[name] = block_prefix[:-1]
                    seen_block = True
                    break
            else:
                names[name] = "head" if seen_block else "embeddings"
        return names

    owner_of: dict[int, str] = {}
    for module_path, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            owner_of.setdefault(id(parameter), module_path or "root")
    for name, parameter in model.named_parameters():
        names[name] = owner_of[id(parameter)]
    return names


def group_parameters_by_layer(
    model: nn.Module, rules: Sequence[tuple[str, str]] | None = None
) -> list[Layer]:
    """Group the trainable parameters of `model` into named layers.

    Args:
        model: Any `nn.Module`. Wrappers such as DDP should be unwrapped first,
            so that names match the ones in checkpoints.
        rules: Optional ``(regex, layer_name)`` pairs that take precedence over
            the defaults. ``layer_name`` may use backreferences (``\\1``).

    Returns:
        The layers, ordered by their first parameter in ``named_parameters()``.

    Raises:
        ValueError: If a rule is malformed or the model has no trainable parameter.
    """
    compiled_rules = _compile_rules(rules)
    default_names = _default_layer_names(model)

    layers: dict[str, Layer] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer_name = default_names[name]
        for pattern, template in compiled_rules:
            match = pattern.search(name)
            if match is not None:
                layer_name = match.expand(template)
                break
        layer = layers.setdefault(layer_name, Layer(layer_name))
        layer.parameter_names.append(name)
        layer.parameters.append(parameter)

    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter; unfreeze at least one "
            "parameter (requires_grad=True) before training."
        )
    return list(layers.values())


def format_layer_table(layers: Sequence[Layer]) -> str:
    """Render the layer mapping as a plain-text table for the training log."""
    rows = [("layer", "tensors", "parameters", "first tensor")]
    for layer in layers:
        rows.append((layer.name, str(len(layer.parameters)), f"{layer.num_parameters:,}", layer.parameter_names[0]))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)
