"""Tensor-parallel self-attention and MLP: one all-reduce forward and one backward each.

Problem: a transformer block has four weight matrices; split naively, each would need
its own all-reduce.  Pairing a column-parallel layer with a row-parallel one keeps the
intermediate activation split, so each sub-block costs exactly one reduction of
``batch x seq x d_model`` forward (and one backward):

* attention: the fused ``qkv`` projection is column-parallel with the heads split over
  the ranks (rank r holds heads ``[r*h/p, (r+1)*h/p)`` of q, k and v alike:
  ``stride=3``); attention runs on the local heads only (heads are independent); the
  output projection is row-parallel over the same head slice.
* MLP: ``fc1`` (d -> m*d) column-parallel, GELU on the local m*d/p features, ``fc2``
  (m*d -> d) row-parallel.

With ``sequence_parallel`` the input and output are split along the sequence (dim 1)
and the two reductions become all-gather / reduce-scatter (see :mod:`mpimp.nn.layers`).
Dropout inside attention uses :func:`~mpimp.nn.random.parallel_dropout` on the local
heads, so masks equal the single-process model's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from ..errors import ConfigError, rank_prefix
from .layers import ColumnParallelLinear, RowParallelLinear
from .random import parallel_dropout
from .sharding import normal_init

__all__ = ["ParallelSelfAttention", "ParallelMLP", "check_heads"]


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_heads(d_model: int, n_heads: int, tp: int) -> None:
    """Raise ConfigError (the same on every rank) unless heads split evenly."""
    if n_heads < 1 or d_model < 1:
        raise ConfigError(f"{rank_prefix()}n_heads={n_heads} and d_model={d_model} must be >= 1")
    if d_model % n_heads:
        raise ConfigError(
            f"{rank_prefix()}d_model={d_model} is not divisible by n_heads={n_heads} (head size "
            f"{d_model}/{n_heads} = {d_model / n_heads:g}); use n_heads in {_divisors(d_model)} "
            f"or d_model={-(-d_model // n_heads) * n_heads}"
        )
    if n_heads % tp:
        fits = _divisors(n_heads)
        raise ConfigError(
            f"{rank_prefix()}n_heads={n_heads} is not divisible by tp={tp}: attention heads are "
            f"split over the tensor-parallel ranks; use tp in {fits} or n_heads="
            f"{-(-n_heads // tp) * tp}"
        )


class ParallelSelfAttention(nn.Module):
    """Causal multi-head self-attention with the heads split over ``comm``.

    ``qkv``: column-parallel ``(3d, d)``, rank r holding rows of heads
    ``[r*h/p, (r+1)*h/p)`` of each of q, k, v; ``proj``: row-parallel ``(d, d)`` over the
    same slice of its input features, bias replicated.  Input/output ``(b, s, d)``,
    replicated (or ``(b, s/p, d)`` with ``sequence_parallel``).
    """

    def __init__(self, d_model: int, n_heads: int, comm: MPI.Comm, *, dropout: float = 0.0,
                 sequence_parallel: bool = False, generator: torch.Generator | None = None,
                 init_std: float = 0.02, out_std: float | None = None, bias: bool = True) -> None:
        super().__init__()
        p = comm.Get_size()
        check_heads(d_model, n_heads, p)
        self.comm, self.d_model, self.n_heads, self.dropout = comm, d_model, n_heads, dropout
        self.local_heads, self.head_dim = n_heads // p, d_model // n_heads
        self.qkv = ColumnParallelLinear(d_model, 3 * d_model, comm, bias=bias, stride=3,
                                        sequence_parallel=sequence_parallel,
                                        init_method=normal_init(init_std), generator=generator)
        self.proj = RowParallelLinear(d_model, d_model, comm, bias=bias, input_is_parallel=True,
                                      sequence_parallel=sequence_parallel,
                                      init_method=normal_init(init_std if out_std is None else out_std),
                                      generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        width = self.local_heads * self.head_dim
        q, k, v = (t.view(b, s, self.local_heads, self.head_dim).transpose(1, 2)
                   for t in qkv.split(width, dim=-1))
        if self.training and self.dropout > 0.0:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu_(1)
            att = att.masked_fill(causal, float("-inf")).softmax(dim=-1)
            att = parallel_dropout(att, self.dropout, True, self.comm, dim=1)  # heads split
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, width))


class ParallelMLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` with ``fc1`` (hidden x d) column-parallel and ``fc2``
    (d x hidden) row-parallel over ``comm``: the hidden features are split, x and the
    output replicated (or split along the sequence with ``sequence_parallel``)."""

    def __init__(self, d_model: int, hidden: int, comm: MPI.Comm, *, sequence_parallel: bool = False,
                 generator: torch.Generator | None = None, init_std: float = 0.02,
                 out_std: float | None = None, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(d_model, hidden, comm, bias=bias, sequence_parallel=sequence_parallel,
                                        init_method=normal_init(init_std), generator=generator)
        self.fc2 = RowParallelLinear(hidden, d_model, comm, bias=bias, input_is_parallel=True,
                                     sequence_parallel=sequence_parallel,
                                     init_method=normal_init(init_std if out_std is None else out_std),
                                     generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
