"""Compare shard-aware squared gradient norms under FSDP2 with an unsharded model.

Run by tests/test_sharding.py under two processes (torchrun, gloo on
loopback). Each rank trains on its half of one batch with `fully_shard`
(torch 2.13 FSDP2, which runs on CPU with gloo), so the reduce-scattered
gradient is the full batch's mean gradient. Rank 0 writes the per-layer
squared norms from `sharded_squared_norms` next to those of an unsharded copy
on the full batch.
"""

import argparse
import copy
import json

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from hf_lot.curvature import measure_block_eigenvalues
from hf_lot.layers import group_parameters_by_layer
from hf_lot.noise import squared_norms_of_gradients
from hf_lot.sharding import sharded_squared_norms


class ShardedClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 16)
        # Three output rows over two ranks give uneven shards (2 and 1 rows).
        self.output = nn.Linear(16, 3)
        # Not wrapped by fully_shard on its own, so the root module shards it.
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return self.output(torch.tanh(self.hidden(x)) * self.scale)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    options = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = ShardedClassifier()
    reference = copy.deepcopy(model)
    features = torch.randn(8, 6)
    labels = torch.randint(0, 3, (8,))

    nn.functional.cross_entropy(reference(features), labels).backward()
    expected = squared_norms_of_gradients(group_parameters_by_layer(reference))

    fully_shard(model.hidden)
    fully_shard(model.output)
    fully_shard(model)
    layers = group_parameters_by_layer(model)
    shard = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    nn.functional.cross_entropy(model(features[shard]), labels[shard]).backward()
    measured = sharded_squared_norms(layers)

    try:
        measure_block_eigenvalues(model, lambda: model(features).sum(), [layers[0].parameters], [None], max_iterations=2)
        curvature_error = ""
    except ValueError as error:
        curvature_error = str(error)

    if rank == 0:
        result = {
            "layer_names": [layer.name for layer in layers],
            "placements": [str(p.placements) for p in model.parameters()],
            "expected": expected.tolist(),
            "measured": measured.tolist(),
            "local": [float(sum(p.grad.to_local().pow(2).sum() for p in layer.parameters)) for layer in layers],
            "curvature_error": curvature_error,
        }
        with open(options.output, "w") as handle:
            json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
