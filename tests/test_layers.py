"""Tests of the default and rule-based mapping from parameters to layers."""

import pytest
import torch
from torch import nn

from hf_lot.layers import find_block_list, format_layer_table, group_parameters_by_layer

pytestmark = pytest.mark.usefixtures("single_thread")


def build_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))


def build_bert(num_layers: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=16,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def build_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def layer_names(layers) -> list[str]:
    return [layer.name for layer in layers]


def assert_covers_trainable(model, layers):
    """Check that every trainable parameter sits in exactly one layer, in model order."""
    expected = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    grouped = [name for layer in layers for name in layer.parameter_names]
    assert sorted(grouped) == sorted(expected)
    assert len(grouped) == len(set(grouped))
    first_positions = [expected.index(layer.parameter_names[0]) for layer in layers]
    assert first_positions == sorted(first_positions)


# -- default mapping ------------------------------------------------------------------


def test_mlp_one_layer_per_linear():
    model = build_mlp()

    layers = group_parameters_by_layer(model)

    assert layer_names(layers) == ["0", "2", "4"]
    assert [layer.parameter_names for layer in layers] == [
        ["0.weight", "0.bias"],
        ["2.weight", "2.bias"],
        ["4.weight", "4.bias"],
    ]
    assert_covers_trainable(model, layers)


def test_mlp_layer_parameters():
    model = build_mlp()

    first = group_parameters_by_layer(model)[0]

    assert first.parameters[0] is model[0].weight
    assert first.parameters[1] is model[0].bias
    assert first.num_parameters == 3 * 4 + 4
    assert len(first.matrix_parameters) == 1
    assert first.matrix_parameters[0] is model[0].weight


def test_bert_blocks():
    model = build_bert()

    layers = group_parameters_by_layer(model)

    assert layer_names(layers) == ["embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "head"]
    assert_covers_trainable(model, layers)


def test_bert_embeddings_and_head():
    model = build_bert()

    layers = {layer.name: layer for layer in group_parameters_by_layer(model)}

    assert "bert.embeddings.word_embeddings.weight" in layers["embeddings"].parameter_names
    assert "bert.embeddings.LayerNorm.bias" in layers["embeddings"].parameter_names
    assert layers["head"].parameter_names == [
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    ]
    assert all(name.startswith("bert.encoder.layer.1.") for name in layers["bert.encoder.layer.1"].parameter_names)


def test_bert_block_list():
    model = build_bert()

    path, module_list = find_block_list(model)

    assert path == "bert.encoder.layer"
    assert module_list is model.bert.encoder.layer


def test_gpt2_blocks():
    model = build_gpt2()

    layers = group_parameters_by_layer(model)

    # lm_head.weight is tied to transformer.wte.weight, so named_parameters
    # lists it once, in the embeddings.
    assert layer_names(layers) == ["embeddings", "transformer.h.0", "transformer.h.1", "head"]
    assert layers[0].parameter_names == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert layers[-1].parameter_names == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert_covers_trainable(model, layers)


def test_llama_blocks():
    model = build_llama()

    layers = group_parameters_by_layer(model)

    assert layer_names(layers) == ["embeddings", "model.layers.0", "model.layers.1", "head"]
    assert layers[0].parameter_names == ["model.embed_tokens.weight"]
    assert layers[-1].parameter_names == ["model.norm.weight", "lm_head.weight"]
    assert_covers_trainable(model, layers)


def test_module_list_root():
    model = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)])

    layers = group_parameters_by_layer(model)

    assert layer_names(layers) == ["0", "1", "2"]


def test_mixed_module_list_not_blocks():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = nn.ModuleList([nn.Linear(2, 3), nn.Conv1d(3, 3, 1), nn.Linear(3, 1)])

        def forward(self, inputs):
            return inputs

    model = Mixed()

    layers = group_parameters_by_layer(model)

    assert find_block_list(model) is None
    assert layer_names(layers) == ["parts.0", "parts.1", "parts.2"]


def test_order_deterministic():
    first = group_parameters_by_layer(build_bert(seed=0))
    second = group_parameters_by_layer(build_bert(seed=1))

    assert layer_names(first) == layer_names(second)
    assert [layer.parameter_names for layer in first] == [layer.parameter_names for layer in second]


# -- rules ------------------------------------------------------------------------------


def test_rules_rename_blocks():
    model = build_bert()

    layers = group_parameters_by_layer(model, rules=[(r"encoder\.layer\.(\d+)\.", r"block.\1")])

    assert layer_names(layers) == ["embeddings", "block.0", "block.1", "head"]
    assert_covers_trainable(model, layers)


def test_rules_split_head():
    model = build_bert()

    layers = group_parameters_by_layer(model, rules=[(r"^classifier\.", "classifier")])

    assert layer_names(layers) == ["embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "head", "classifier"]
    assert layers[-1].parameter_names == ["classifier.weight", "classifier.bias"]
    assert layers[-2].parameter_names == ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]


def test_rules_first_match_wins():
    model = build_mlp()

    layers = group_parameters_by_layer(model, rules=[(r"^0\.", "input"), (r"\.weight$", "weights")])

    assert layer_names(layers) == ["input", "weights", "2", "4"]
    assert layers[0].parameter_names == ["0.weight", "0.bias"]
    assert layers[1].parameter_names == ["2.weight", "4.weight"]


def test_rules_merge_layers():
    model = build_mlp()

    layers = group_parameters_by_layer(model, rules=[(r"^[24]\.", "top")])

    assert layer_names(layers) == ["0", "top"]
    assert layers[1].parameter_names == ["2.weight", "2.bias", "4.weight", "4.bias"]


def test_rules_list_pairs():
    model = build_mlp()

    layers = group_parameters_by_layer(model, rules=[[r"^0\.", "input"]])

    assert layer_names(layers) == ["input", "2", "4"]


def test_invalid_regex_raises():
    with pytest.raises(ValueError, match=r"Invalid regex '\('"):
        group_parameters_by_layer(build_mlp(), rules=[("(", "broken")])


@pytest.mark.parametrize("rule", [("only_regex",), ("a", "b", "c"), "ab"])
def test_malformed_rule_raises(rule):
    with pytest.raises(ValueError, match="Invalid layer rule"):
        group_parameters_by_layer(build_mlp(), rules=[rule])


# -- frozen parameters -------------------------------------------------------------------


def test_frozen_weight_excluded():
    model = build_mlp()
    model[0].weight.requires_grad_(False)

    layers = group_parameters_by_layer(model)

    assert layer_names(layers) == ["0", "2", "4"]
    assert layers[0].parameter_names == ["0.bias"]
    assert layers[0].matrix_parameters == []


def test_frozen_layer_dropped():
    model = build_mlp()
    model[2].requires_grad_(False)

    layers = group_parameters_by_layer(model)

    assert layer_names(layers) == ["0", "4"]
    assert_covers_trainable(model, layers)


def test_frozen_bert_embeddings():
    model = build_bert()
    model.bert.embeddings.requires_grad_(False)

    layers = group_parameters_by_layer(model)

    assert layer_names(layers) == ["bert.encoder.layer.0", "bert.encoder.layer.1", "head"]


def test_all_frozen_raises():
    model = build_mlp()
    model.requires_grad_(False)

    with pytest.raises(ValueError, match="no trainable parameter"):
        group_parameters_by_layer(model)


# -- layer table ----------------------------------------------------------------------


def test_layer_table_names():
    layers = group_parameters_by_layer(build_bert())

    table = format_layer_table(layers)

    for layer in layers:
        assert layer.name in table
        assert layer.parameter_names[0] in table


def test_layer_table_counts():
    layers = group_parameters_by_layer(build_bert())

    lines = format_layer_table(layers).splitlines()

    # One header, one rule line, one row per layer.
    assert len(lines) == 2 + len(layers)
    assert lines[0].split() == ["layer", "tensors", "parameters", "first", "tensor"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    for line, layer in zip(lines[2:], layers):
        assert line.split()[:3] == [layer.name, str(len(layer.parameters)), f"{layer.num_parameters:,}"]
