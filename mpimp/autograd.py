"""Collectives paired with their gradients, as autograd functions over an explicit communicator.

Problem: a tensor-parallel layer calls a collective in its forward pass, and autograd
must call the *adjoint* collective in the backward pass, or the gradients are silently
wrong (too small by a factor of tp, or summed twice).  A bare ``all_reduce`` inside
``forward`` is invisible to autograd.  Each function here is one forward collective
and its adjoint, after Megatron's ``tensor_parallel/mappings.py``, but taking the
communicator as an argument (no global process group):

===============================  =====================================  ==============================
function                         forward                                backward
===============================  =====================================  ==============================
``copy_to_parallel``             identity (x replicated on every rank)  all-reduce (sum) of the grads
``reduce_from_parallel``         all-reduce (sum) of partial results    identity
``scatter_to_parallel``          keep this rank's block of the last dim all-gather along the last dim
``gather_from_parallel``         all-gather along the last dim          keep this rank's block
``gather_from_sequence``         all-gather along ``dim`` (sequence)    reduce-scatter along ``dim``
``reduce_scatter_to_sequence``   reduce-scatter along ``dim``           all-gather along ``dim``
===============================  =====================================  ==============================

``linear_with_grad_all_reduce(x, w, b, comm)`` is ``F.linear(copy_to_parallel(x), w, b)``
in one function, so that backward can start the all-reduce of the input gradient
(non-blocking) and compute the weight gradient while it is in flight (Megatron's
asynchronous gradient all-reduce): a slower peer's lateness is hidden behind useful work.

Why the pairs: if ``y = x`` on p ranks and each rank computes a different function of
its copy, then dL/dx = sum_r dL_r/dy (all-reduce); if ``y = sum_r x_r`` then
dL/dx_r = dL/dy (identity).  Gather and scatter (and all-gather and reduce-scatter)
are adjoint in the same way.  Blocks along a dimension are equal, in rank order:
rank r holds ``[r * n/p, (r+1) * n/p)``.

On a communicator of size 1 every function is the identity, so a layer written with
them runs unchanged (and at no cost) on one rank.  Gradients are never reduced in
place: the incoming gradient tensor may be shared with another branch of the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from mpi4py import MPI

from .comm import all_gather, all_reduce, iall_reduce, reduce_scatter
from .errors import ConfigError, rank_prefix

__all__ = [
    "copy_to_parallel",
    "reduce_from_parallel",
    "scatter_to_parallel",
    "gather_from_parallel",
    "gather_from_sequence",
    "reduce_scatter_to_sequence",
    "linear_with_grad_all_reduce",
    "split_block",
]


def split_block(x: torch.Tensor, comm: MPI.Comm, dim: int) -> torch.Tensor:
    """This rank's block of ``x`` along ``dim`` (a view); the size must divide evenly."""
    p, r = comm.Get_size(), comm.Get_rank()
    n = x.shape[dim]
    if n % p:
        raise ConfigError(
            f"{rank_prefix()}dimension {dim} of shape {list(x.shape)} has size {n}, not divisible "
            f"by the {p} tensor-parallel ranks; use a size that is a multiple of {p}"
        )
    return x.narrow(dim, r * (n // p), n // p)


def _all_reduce_copy(x: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:
    out = x.contiguous().clone()  # never reduce the caller's tensor in place
    return all_reduce(out, comm)


def _reduce_scatter_dim(x: torch.Tensor, comm: MPI.Comm, dim: int) -> torch.Tensor:
    d = dim % x.dim()
    if d == 0:
        return reduce_scatter(x, comm)
    return reduce_scatter(x.movedim(d, 0), comm).movedim(0, d)


class _CopyToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce_copy(grad, ctx.comm), None


class _ReduceFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: MPI.Comm, inplace: bool) -> torch.Tensor:
        if inplace and x.is_contiguous():
            ctx.mark_dirty(x)  # autograd raises if anything saved x for backward
            return all_reduce(x, comm)
        return _all_reduce_copy(x, comm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


class _ScatterToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:
        ctx.comm = comm
        return split_block(x, comm, -1).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather(grad, ctx.comm, dim=-1), None


class _GatherFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:
        ctx.comm = comm
        return all_gather(x, comm, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return split_block(grad, ctx.comm, -1).contiguous(), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: MPI.Comm, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        return all_gather(x, comm, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _reduce_scatter_dim(grad, ctx.comm, ctx.dim), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: MPI.Comm, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        return _reduce_scatter_dim(x, comm, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return all_gather(grad, ctx.comm, dim=ctx.dim), None, None


class _LinearGradAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                comm: MPI.Comm) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.comm, ctx.has_bias = comm, bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = req = None
        if need_x:
            grad_x = grad.matmul(weight)  # a fresh tensor: reduced in place
            req = iall_reduce(grad_x, ctx.comm)
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = g2.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
        grad_b = g2.sum(0) if need_b and ctx.has_bias else None
        if req is not None:
            req.wait()
        return grad_x, grad_w, grad_b, None


def linear_with_grad_all_reduce(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                comm: MPI.Comm) -> torch.Tensor:
    """``F.linear(copy_to_parallel(x, comm), weight, bias)``, with the backward all-reduce
    of the input gradient overlapping the weight-gradient computation."""
    if comm.Get_size() == 1:
        return torch.nn.functional.linear(x, weight, bias)
    return _LinearGradAllReduce.apply(x, weight, bias, comm)


def copy_to_parallel(x: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:
    """Identity forward; backward sums the gradients of every rank's copy (all-reduce)."""
    if comm.Get_size() == 1:
        return x
    return _CopyToParallel.apply(x, comm)


def reduce_from_parallel(x: torch.Tensor, comm: MPI.Comm, *, inplace: bool = False) -> torch.Tensor:
    """All-reduce (sum) of every rank's partial result forward; identity backward.

    ``inplace=True`` reduces ``x`` itself (no copy): for a fresh intermediate, such as
    the output of the matmul of a row-parallel layer, that nothing else reads.
    """
    if comm.Get_size() == 1:
        return x
    return _ReduceFromParallel.apply(x, comm, inplace)


def scatter_to_parallel(x: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:
    """Keep this rank's block of the last dim forward; all-gather the gradient backward."""
    if comm.Get_size() == 1:
        return x
    return _ScatterToParallel.apply(x, comm)


def gather_from_parallel(x: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:
    """All-gather blocks of the last dim forward; keep this rank's block of the gradient backward."""
    if comm.Get_size() == 1:
        return x
    return _GatherFromParallel.apply(x, comm)


def gather_from_sequence(x: torch.Tensor, comm: MPI.Comm, dim: int = 1) -> torch.Tensor:
    """All-gather sequence blocks along ``dim`` forward; reduce-scatter the gradient backward.

    Enters a tensor-parallel region from a sequence-parallel one: every rank computes
    partial gradients for the whole sequence, the reduce-scatter sums them and hands
    each rank its block.
    """
    if comm.Get_size() == 1:
        return x
    return _GatherFromSequence.apply(x, comm, dim)


def reduce_scatter_to_sequence(x: torch.Tensor, comm: MPI.Comm, dim: int = 1) -> torch.Tensor:
    """Reduce-scatter partial sums along ``dim`` forward; all-gather the gradient backward.

    Leaves a tensor-parallel region into a sequence-parallel one: replaces the
    all-reduce of a row-parallel layer by a reduce-scatter of the same bytes / p.
    """
    if comm.Get_size() == 1:
        return x
    split_block(x, comm, dim)  # validates divisibility with a clear message
    return _ReduceScatterToSequence.apply(x, comm, dim)
