"""Dropout under tensor parallelism that is reproducible and equal to the tp = 1 model.

Problem: dropout after a tensor-parallel layer must draw the *same* mask on every rank
where the activation is replicated (or the replicas diverge), and *different* bits
for different slices where it is split (attention heads, sequence blocks).  Megatron
keeps two generator states per rank (a shared one and a per-rank one), which makes a
tp = 2 run reproducible but different from the tp = 1 run.

mpimp instead draws the FULL mask (the shape the tp = 1 model would draw) from torch's
default generator and keeps the slice this rank owns.  The default generator is in
the same state on every tp rank as long as every rank called ``torch.manual_seed(s)``
with the same ``s`` (the models check this at construction when dropout is on) and
ran the same code since, which tp ranks do.  So:

* a run is reproducible from its seed, and equal to the tp = 1 run with the same seed
  (same masks), at any tp, with or without sequence parallelism;
* ``torch.utils.checkpoint`` (which saves and restores the default generator state)
  recomputes the same masks.

The cost is tp times the random-number work of each sharded dropout; for large
sharded activations a counter-based (Philox) mask keyed by the global index would
remove it.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

__all__ = ["parallel_dropout"]


def parallel_dropout(x: torch.Tensor, p: float, training: bool, comm: MPI.Comm | None = None,
                     dim: int | None = None) -> torch.Tensor:
    """Inverted dropout with the mask the single-process model would draw.

    ``dim=None``: ``x`` is replicated across the ranks (the mask has ``x``'s shape).
    Otherwise ``x`` is this rank's block along ``dim`` of a tensor split over ``comm``
    in rank order; the full mask is drawn and this rank's block of it is used.
    """
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    shape = list(x.shape)
    if dim is not None and comm is not None and comm.Get_size() > 1:
        d = dim % x.dim()
        shape[d] *= comm.Get_size()
        full = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
        keep = full.narrow(d, comm.Get_rank() * x.shape[d], x.shape[d])
    else:
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)
