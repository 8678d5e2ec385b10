"""Tensor-parallel building blocks: column- and row-parallel linear layers, a
vocabulary-parallel embedding, a LayerNorm for sequence-parallel regions.

Problem: one weight matrix is too large (or too slow) for one rank.  Splitting
``Y = X A + b`` across the p ranks of a communicator can be done two ways, and a
transformer alternates them so that each MLP or attention block needs a single
all-reduce forward and a single one backward (Shoeybi et al., 2019, "Megatron-LM"):

* column-parallel: ``A = [A_1, ..., A_p]`` split along its columns (output features);
  X replicated; rank r computes ``Y_r = X A_r + b_r``, its block of the output features;
* row-parallel: ``A = [A_1; ...; A_p]`` split along its rows (input features); X split
  along its last dim; ``Y = sum_r X_r A_r`` (all-reduce), then ``+ b`` (b replicated).

torch stores a linear weight transposed, ``(out, in)``: column-parallel shards dim 0 of
it, row-parallel dim 1.  With ``sequence_parallel=True`` the activations outside the
two layers are split along the sequence (dim ``seq_dim``, default 1 for
``(batch, seq, features)``): the column-parallel layer all-gathers the sequence instead
of copying X, the row-parallel one reduce-scatters instead of all-reducing (same bytes
on the wire, a p-th of the activation memory in between; Korthikanti et al., 2022).
Replicated parameters used on sequence blocks (LayerNorm, row-parallel bias) sum their
gradients over the ranks through :func:`~mpimp.autograd.copy_to_parallel`.

Every layer takes its communicator (usually ``topo.tp_comm``, any communicator works)
and draws its full initial weight from ``generator`` before keeping its slice
(see :mod:`mpimp.nn.sharding`), so the shards equal slices of the tp = 1 layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from ..autograd import (
    copy_to_parallel,
    gather_from_parallel,
    gather_from_sequence,
    linear_with_grad_all_reduce,
    reduce_from_parallel,
    reduce_scatter_to_sequence,
    scatter_to_parallel,
)
from ..errors import ConfigError, rank_prefix
from .sharding import InitMethod, ShardSpec, mark_sharded, normal_init, padded_size, shard_tensor

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ParallelLayerNorm",
    "parallel_lm_logits",
    "vocab_partition",
]


def _sharded_param(shape: tuple[int, ...], comm: MPI.Comm, spec: ShardSpec, init: InitMethod,
                   generator: torch.Generator | None, dtype: torch.dtype | None) -> nn.Parameter:
    """Draw the full weight with ``init`` and keep this rank's shard of it."""
    gen = generator if generator is not None else torch.default_generator
    full = torch.empty(shape, dtype=dtype or torch.get_default_dtype())
    init(full, gen)
    return mark_sharded(nn.Parameter(shard_tensor(full, comm, spec)), spec)


def _divisible(what: str, n: int, p: int, hint: str) -> None:
    if n % p:
        raise ConfigError(f"{rank_prefix()}{what}={n} is not divisible by the {p} tensor-parallel ranks; {hint}")


class ColumnParallelLinear(nn.Module):
    """``Y = X A + b`` with A split along its columns (output features) over ``comm``.

    Weight shard ``(out/p, in)`` (rows ``[r*out/p, (r+1)*out/p)`` of torch's ``(out, in)``
    weight), bias shard ``(out/p,)``; X replicated (or, with ``sequence_parallel``, split
    along ``seq_dim`` and all-gathered first).  Output: this rank's ``out/p`` features,
    or all ``out`` features when ``gather_output`` (all-gather of the last dim).
    ``stride=k`` splits each of k equal blocks of the output (a fused ``[q; k; v]``)
    separately, so a rank holds matching pieces of every block.
    """

    def __init__(self, in_features: int, out_features: int, comm: MPI.Comm, *, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False, stride: int = 1,
                 seq_dim: int = 1, init_method: InitMethod | None = None,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        p = comm.Get_size()
        _divisible("out_features", out_features, p * stride,
                   f"use out_features that is a multiple of {p * stride} (tp x stride)")
        if gather_output and stride != 1:
            raise ConfigError(f"{rank_prefix()}gather_output with stride={stride} would interleave the "
                              f"blocks; gather each block yourself or use stride=1")
        self.comm, self.in_features, self.out_features = comm, in_features, out_features
        self.gather_output, self.sequence_parallel, self.seq_dim = gather_output, sequence_parallel, seq_dim
        spec = ShardSpec(dim=0, full=out_features, stride=stride)
        self.weight = _sharded_param((out_features, in_features), comm, spec,
                                     init_method or normal_init(0.02), generator, dtype)
        if bias:
            self.bias = mark_sharded(nn.Parameter(torch.zeros(out_features // p, dtype=self.weight.dtype)), spec)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            y = F.linear(gather_from_sequence(x, self.comm, self.seq_dim), self.weight, self.bias)
        else:  # copy_to_parallel + linear, the gradient all-reduce overlapping the weight gradient
            y = linear_with_grad_all_reduce(x, self.weight, self.bias, self.comm)
        return gather_from_parallel(y, self.comm) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} ({self.weight.shape[0]} here), "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``Y = X A + b`` with A split along its rows (input features) over ``comm``.

    Weight shard ``(out, in/p)`` (columns ``[r*in/p, (r+1)*in/p)`` of torch's weight);
    bias ``(out,)`` replicated, added once after the reduction.  X is split along its
    last dim (``input_is_parallel``, e.g. the output of a column-parallel layer) or
    replicated and scattered here.  ``Y = sum_r X_r A_r``: an all-reduce, or with
    ``sequence_parallel`` a reduce-scatter leaving each rank its block of ``seq_dim``.
    """

    def __init__(self, in_features: int, out_features: int, comm: MPI.Comm, *, bias: bool = True,
                 input_is_parallel: bool = False, sequence_parallel: bool = False, seq_dim: int = 1,
                 init_method: InitMethod | None = None, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        p = comm.Get_size()
        _divisible("in_features", in_features, p, f"use in_features that is a multiple of {p}")
        if sequence_parallel and not input_is_parallel:
            raise ConfigError(f"{rank_prefix()}RowParallelLinear(sequence_parallel=True) needs "
                              f"input_is_parallel=True (its input comes from a column-parallel layer)")
        self.comm, self.in_features, self.out_features = comm, in_features, out_features
        self.input_is_parallel, self.sequence_parallel, self.seq_dim = input_is_parallel, sequence_parallel, seq_dim
        spec = ShardSpec(dim=1, full=in_features)
        self.weight = _sharded_param((out_features, in_features), comm, spec,
                                     init_method or normal_init(0.02), generator, dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.weight.dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_parallel(x, self.comm)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence(y, self.comm, self.seq_dim)
            bias = None if self.bias is None else copy_to_parallel(self.bias, self.comm)
        else:
            y = reduce_from_parallel(y, self.comm, inplace=True)  # y: this layer's fresh matmul output
            bias = self.bias
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features} ({self.weight.shape[1]} here), out={self.out_features}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


def vocab_partition(vocab_size: int, comm: MPI.Comm) -> tuple[int, int, int]:
    """``(padded_vocab, start, rows_per_rank)``: the vocabulary is padded to a multiple of
    the tp size and rank r owns rows ``[start, start + rows_per_rank)``."""
    p, r = comm.Get_size(), comm.Get_rank()
    padded = padded_size(vocab_size, p)
    rows = padded // p
    return padded, r * rows, rows


def init_vocab_weight(vocab_size: int, dim: int, comm: MPI.Comm, init: InitMethod,
                      generator: torch.Generator | None, dtype: torch.dtype | None = None) -> nn.Parameter:
    """This rank's rows of a ``(vocab, dim)`` table; the padding rows are zero."""
    spec = ShardSpec(dim=0, full=vocab_size)
    return _sharded_param((vocab_size, dim), comm, spec, init, generator, dtype)


class VocabParallelEmbedding(nn.Module):
    """Embedding table ``E`` of shape ``(V, d)`` split along the vocabulary (rows) over ``comm``.

    V is padded to a multiple of p (zero rows, never looked up; dropped on export);
    rank r holds rows ``[r*V'/p, (r+1)*V'/p)``.  Each rank looks up the ids it owns, writes
    zeros for the others, and the ranks sum: an all-reduce (output replicated) or, with
    ``sequence_parallel``, a reduce-scatter along ``seq_dim`` (output split along the sequence).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, comm: MPI.Comm, *,
                 sequence_parallel: bool = False, seq_dim: int = 1, init_method: InitMethod | None = None,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.comm, self.num_embeddings, self.embedding_dim = comm, num_embeddings, embedding_dim
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        self.padded, self.start, self.rows = vocab_partition(num_embeddings, comm)
        self.weight = init_vocab_weight(num_embeddings, embedding_dim, comm,
                                        init_method or normal_init(0.02), generator, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise ConfigError(f"{rank_prefix()}token ids must lie in [0, {self.num_embeddings}), got "
                              f"[{int(ids.min())}, {int(ids.max())}]")
        if self.comm.Get_size() == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.start + self.rows)
        out = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.comm, self.seq_dim)
        return reduce_from_parallel(out, self.comm, inplace=True)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (padded {self.padded}, rows {self.start}..{self.start + self.rows} here), "
                f"{self.embedding_dim}, sequence_parallel={self.sequence_parallel}")


class ParallelLayerNorm(nn.LayerNorm):
    """LayerNorm with replicated weight and bias, applied to replicated activations or,
    with ``sequence_parallel``, to this rank's sequence block (then the parameter
    gradients are summed over ``comm``, since each rank saw only its tokens)."""

    def __init__(self, dim: int, comm: MPI.Comm, *, sequence_parallel: bool = False, eps: float = 1e-5) -> None:
        super().__init__(dim, eps=eps)
        self.comm, self.sequence_parallel = comm, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.sequence_parallel:
            w, b = copy_to_parallel(w, self.comm), copy_to_parallel(b, self.comm)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def parallel_lm_logits(x: torch.Tensor, weight: torch.Tensor, comm: MPI.Comm, *,
                       sequence_parallel: bool = False, seq_dim: int = 1) -> torch.Tensor:
    """Vocabulary-parallel logits ``x E_r^T`` for this rank's rows ``E_r`` of the output
    embedding: a column-parallel linear without bias (x replicated, or all-gathered
    along the sequence).  Feed them to :func:`~mpimp.nn.vocab_parallel_cross_entropy`."""
    if sequence_parallel:
        return F.linear(gather_from_sequence(x, comm, seq_dim), weight)
    return linear_with_grad_all_reduce(x, weight, None, comm)
