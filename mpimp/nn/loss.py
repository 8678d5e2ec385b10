"""Cross-entropy over vocabulary-parallel logits, without gathering the vocabulary.

Problem: the output layer of a language model produces ``tokens x V`` logits; with the
vocabulary split over p ranks, gathering them to compute the loss would put the full
``tokens x V`` tensor (the largest activation of the model) on every rank.  Instead,
with ``z`` this rank's block of the logits of one token and ``t`` its target::

    m   = max over ranks of max_j z_j                      (all-reduce, max)
    S   = sum over ranks of sum_j exp(z_j - m)             \\ one all-reduce (sum)
    z_t = the logit of t, from the rank that owns t         / of a (2, tokens) tensor
    loss = log S - (z_t - m)

and the gradient, computed locally in backward with no communication, is
``softmax(z) - onehot(t)`` restricted to this rank's columns.  Padding columns
(the vocabulary padded to a multiple of p) are masked to -inf, so they get
probability 0 and gradient 0.  Memory per rank: ``tokens x V/p``.
"""

from __future__ import annotations

from typing import Any

import torch
from mpi4py import MPI

from ..comm import all_reduce
from ..errors import ConfigError, rank_prefix

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, comm: MPI.Comm,
                vocab_size: int, ignore_index: int) -> torch.Tensor:
        rows = logits.shape[-1]
        start = comm.Get_rank() * rows
        z = logits.reshape(-1, rows).float()
        if start + rows > vocab_size:  # this rank holds padding columns
            z = z.masked_fill(torch.arange(start, start + rows, device=z.device) >= vocab_size, float("-inf"))
        zmax = z.max(dim=-1).values
        if comm.Get_size() > 1:
            all_reduce(zmax, comm, op="max")
        z = z - zmax.unsqueeze(-1)
        t = targets.reshape(-1)
        mine = (t >= start) & (t < start + rows)
        local_t = (t - start).masked_fill(~mine, 0)
        picked = torch.where(mine, torch.gather(z, 1, local_t.unsqueeze(1)).squeeze(1), 0.0)
        exp = z.exp_()  # z is a fresh tensor: exp(z - m) in place
        sums = torch.stack([exp.sum(dim=-1), picked])
        if comm.Get_size() > 1:
            all_reduce(sums, comm)
        valid = t != ignore_index
        loss = (sums[0].log() - sums[1]) * valid
        ctx.save_for_backward(exp.div_(sums[0].unsqueeze(-1)), local_t, mine, valid)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return loss.view(targets.shape).to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, local_t, mine, valid = ctx.saved_tensors
        g = softmax.clone()  # a copy, so backward may run again with retain_graph
        g[torch.arange(g.shape[0], device=g.device), local_t] -= mine.to(g.dtype)
        g.mul_((grad.reshape(-1).float() * valid).unsqueeze(-1))
        return g.view(ctx.shape).to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, comm: MPI.Comm, *,
                                 vocab_size: int | None = None, ignore_index: int = -100,
                                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of vocabulary-parallel ``logits`` (``(..., V/p)``, rank r holding
    columns ``[r*V/p, (r+1)*V/p)`` of the padded vocabulary) against ``targets`` (``(...)``,
    the same on every rank).  Equals ``F.cross_entropy`` of the gathered, unpadded
    logits; the result is the same on every rank of ``comm``.

    ``vocab_size``: the real vocabulary (columns at or beyond it are padding and are
    masked out); default: all ``p * V/p`` columns.  ``reduction``: mean (over targets
    not equal to ``ignore_index``), sum or none.
    """
    rows, p = logits.shape[-1], comm.Get_size()
    total = rows * p
    vocab = total if vocab_size is None else vocab_size
    if not total - rows < vocab <= total:
        raise ConfigError(f"{rank_prefix()}vocab_size={vocab} does not fit logits with {rows} columns on each "
                          f"of {p} ranks ({total} in all); pass the vocabulary the logits were padded from")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ConfigError(f"{rank_prefix()}targets of shape {list(targets.shape)} do not match logits "
                          f"{list(logits.shape)} (expected {list(logits.shape[:-1])})")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ConfigError(f"{rank_prefix()}targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                          f"got {int(targets[bad][0])}")
    losses = _VocabParallelCE.apply(logits, targets, comm, vocab, ignore_index)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / (targets != ignore_index).sum()
    raise ConfigError(f"reduction={reduction!r}: use 'mean', 'sum' or 'none'")
