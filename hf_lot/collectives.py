"""All-reduce of small statistics tensors that cannot break gloo's teardown.

With the gloo backend, a worker thread of the process group drops its
reference to each collective's tensors shortly after the collective completes.
For a tensor that Python created, dropping that reference needs the GIL. Two
failures follow when a script all-reduces in its last step and ends right
after (torch 2.13):

- The main thread frees the last reference to the process group (for example
  with a DDP model) and joins the worker threads while it holds the GIL, so
  the waiting worker and the main thread block each other forever. A
  two-process Accelerate loop hung this way in about 4 runs in 10.
- The interpreter is already shutting down when the worker tries to acquire the GIL,
  so the process aborts ("terminate called without an active exception").

`all_reduce` returns only after the worker thread has dropped its reference.
While a C++ object still refers to a Python-created tensor, the tensor holds
one extra reference to its Python object, so `sys.getrefcount` shows when the
worker is done.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

__all__ = ["all_reduce"]

_REDUCTIONS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

# Polling stops after this many seconds even if a reference remains.
_RELEASE_TIMEOUT = 5.0


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
        raise ValueError(f"Invalid reduction {reduction!r}: expected one of {', '.join(sorted(_REDUCTIONS))}.")
    reduced = tensor.clone()
    if not (dist.is_available() and dist.is_initialized()):
        return reduced

    python_references = sys.getrefcount(reduced)
    dist.all_reduce(reduced, op=_REDUCTIONS[reduction], group=group)
    if dist.get_backend(group) == "gloo":
        # Sleeping releases the GIL, which the worker thread may need to drop its reference.
        deadline = time.monotonic() + _RELEASE_TIMEOUT
        while sys.getrefcount(reduced) > python_references and time.monotonic() < deadline:
            time.sleep(1e-4)
    if reduction == "mean":
        reduced /= dist.get_world_size(group)
    return reduced

