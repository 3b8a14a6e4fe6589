"""All-reduce of small statistics tensors, safe to run right before a gloo process group is destroyed.

With the gloo backend, a worker thread of the process group releases each
collective's tensors after the collective completes. Releasing a tensor that
Python created needs the GIL. If the main thread is already destroying the
process group at that moment, it holds the GIL while it joins the worker
threads, and both wait forever. A script that all-reduces a statistic in its
last step and then returns (so the DDP reducer and its process group are
freed) hit this in about 4 runs in 10 on a loaded 2-core machine (torch 2.13).

`all_reduce` keeps the last few collectives' work handles alive in Python, so
the worker thread never holds the last reference and never needs the GIL. The
handles, and with them the tensors, are released later on the main thread.
"""

from __future__ import annotations

import atexit
from collections import deque

import torch
import torch.distributed as dist

__all__ = ["all_reduce", "release_held_work"]

# Older handles are dropped when newer ones arrive; by then their worker
# threads have long finished with them.
_HELD_WORK: deque = deque(maxlen=8)

_REDUCTIONS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(tensor: torch.Tensor, reduction: str = "sum", group=None) -> torch.Tensor:
    """Return `tensor` reduced over all processes of `group`, leaving `tensor` unchanged.

    Args:
        tensor: The values of this process, on a device the backend supports
            (CPU for gloo, CUDA for NCCL).
        reduction: ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``.
        group: The process group; the default group when None.

    Without an initialized process group the values are returned as a copy.
    Every process of `group` must call this with a tensor of the same shape.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(_REDUCTIONS)}, got {reduction!r}.")
    reduced = tensor.clone()
    if not (dist.is_available() and dist.is_initialized()):
        return reduced
    work = dist.all_reduce(reduced, op=_REDUCTIONS[reduction], group=group, async_op=True)
    work.wait()
    _HELD_WORK.append(work)
    if reduction == "mean":
        reduced /= dist.get_world_size(group)
    return reduced


@atexit.register
def release_held_work() -> None:
    """Release the held work handles now, on the calling thread.

    Runs at interpreter exit, while the interpreter can still free tensors.
    """
    _HELD_WORK.clear()
