"""Per-layer squared gradient norms when parameters are sharded across ranks (FSDP).

Under FSDP each rank stores a shard of every sharded tensor, so the squared
norm of a layer's gradient is the sum over ranks of the squared norms of the
local shards. Tensors that every rank stores in full (replicated DTensor
placements, or plain tensors that FSDP does not manage) would be counted once
per rank, so their local squared norm is divided by the number of copies
before the sum. Only ``L`` float64 scalars per call cross the network.

`layer_squared_norms_of_shards` is the pure part, testable without processes.
`local_shards` reads the local shard and copy count of a `DTensor`.
`sharded_squared_norms` combines both with one ``all_reduce``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .collectives import all_reduce
from .layers import Layer
from .noise import squared_norm

__all__ = ["layer_squared_norms_of_shards", "local_shards", "sharded_squared_norms"]


def layer_squared_norms_of_shards(layer_shards: Sequence[Sequence[tuple[torch.Tensor, int]]]) -> torch.Tensor:
    """Return this rank's contribution to each layer's squared norm, shape ``(L,)``, in float64.

    Args:
        layer_shards: Per layer, ``(local_tensor, copies)`` pairs. ``copies``
            is the number of ranks that store the same values (1 for a shard
            that no other rank stores, the world size for a replicated tensor).

    Summed over all ranks, the result is the squared norm of each layer's full
    tensors, because every element is held by ``copies`` ranks and each adds
    ``1 / copies`` of its square.
    """
    result = torch.zeros(len(layer_shards), dtype=torch.float64)
    for index, shards in enumerate(layer_shards):
        for tensor, copies in shards:
            if copies < 1:
                raise ValueError(f"copies must be at least 1, got {copies} in layer {index}.")
            result[index] += squared_norm(tensor).double().cpu() / copies
    return result


def local_shards(tensor: torch.Tensor, world_size: int) -> tuple[torch.Tensor, int]:
    """Return ``(local values, copies)`` of a gradient for `layer_squared_norms_of_shards`.

    A `DTensor` contributes its local shard, held by as many ranks as the
    product of the mesh sizes of its replicated dimensions. A plain tensor is
    taken to be held in full by all `world_size` ranks.

    Raises:
        ValueError: For a `Partial` placement, whose local values are
            unreduced summands, not a shard of the gradient.
    """
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate
    except ImportError:
        return tensor, world_size
    if not isinstance(tensor, DTensor):
        return tensor, world_size

    copies = 1
    for dimension, placement in enumerate(tensor.placements):
        if isinstance(placement, Partial):
            raise ValueError(
                f"Gradient with placements {tensor.placements} is not reduced yet (Partial); read squared norms "
                "after the reduce-scatter, that is after backward with gradient synchronization on."
            )
        if isinstance(placement, Replicate):
            copies *= tensor.device_mesh.size(dimension)
    return tensor.to_local(), copies


def sharded_squared_norms(layers: Sequence[Layer], group=None, scale: float = 1.0) -> torch.Tensor:
    """Return ``|p.grad / scale|^2`` summed per layer over all shards, shape ``(L,)``, in float32.

    Every rank of `group` must call this (it runs one ``all_reduce``), and
    every rank receives the same values. A missing gradient counts as zero.
    Without an initialized process group the local values are the full ones.
    """
    distributed = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size(group) if distributed else 1
    layer_shards = [
        [local_shards(p.grad, world_size) for p in layer.parameters if p.grad is not None] for layer in layers
    ]
    totals = layer_squared_norms_of_shards(layer_shards)
    if distributed:
        device = next((p.grad.device for layer in layers for p in layer.parameters if p.grad is not None), None)
        # gloo reduces CPU tensors and NCCL only device tensors.
        if device is not None and dist.get_backend(group) != "gloo":
            totals = totals.to(device)
        totals = all_reduce(totals, reduction="sum", group=group)
    return totals.cpu().float() / scale**2
