"""The reference GPT, built from tensor-parallel layers, and its pipeline layer sequence.

Problem: a model must be written once and run at any tp (and, split into layers, at
any pp), with results equal to the single-process model: the same loss, the same
gradients, the same initial weights from the same ``torch.manual_seed``.

Structure (pre-LayerNorm GPT-2)::

    layer 0        embedding: vocabulary-parallel token table (V x d, split by rows) + positions (replicated)
    layers 1..L    blocks: x + attn(ln1(x)), then x + mlp(ln2(x)); heads and MLP features split over tp
    layer L+1      final LayerNorm + head: vocabulary-parallel logits (b, s, V'/tp), V' = V padded to tp

The loss is :func:`~mpimp.nn.vocab_parallel_cross_entropy` over ``tp_comm`` (the padded
columns masked out), so no rank ever holds the full ``(b, s, V)`` logits.  With
``tied_embeddings`` the head multiplies by the token table.

Initialization: construction draws one integer ``seed`` from torch's default generator
(so ``torch.manual_seed(s)`` before construction fixes the model; rank 0's draw is
used by every rank); layer i then draws its full weights from its own generator
seeded by ``(seed, i)`` and keeps its slice (:mod:`mpimp.nn.sharding`).  Weights are
therefore independent of tp and pp: ``GPT(config, topo)`` at tp = 2 holds exact slices
of ``GPT(config, topo)`` at tp = 1, and :func:`gpt_pipeline_layers` builds the same
layers one stage at a time.  Linear weights are N(0, 0.02), the two residual
projections per block N(0, 0.02 / sqrt(2 L)), biases 0, LayerNorm (1, 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from mpi4py import MPI
from torch import nn

from ..autograd import copy_to_parallel, gather_from_parallel
from ..errors import ConfigError, rank_prefix
from ..nn.layers import (
    ParallelLayerNorm,
    VocabParallelEmbedding,
    init_vocab_weight,
    parallel_lm_logits,
)
from ..nn.loss import vocab_parallel_cross_entropy
from ..nn.random import parallel_dropout
from ..nn.sharding import full_grads, full_state_dict, load_full_state_dict, normal_init
from ..nn.transformer import ParallelMLP, ParallelSelfAttention, check_heads
from ..topology import Topology
from ..watchdog import guarded

__all__ = ["GPTConfig", "GPT", "GPTEmbedding", "GPTBlock", "GPTHead", "PipelineParts", "gpt_pipeline_layers",
           "gather_logits"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the GPT.  ``sequence_parallel`` splits LayerNorm/dropout regions along the sequence."""

    vocab_size: int
    seq_len: int
    d_model: int
    n_heads: int
    n_layers: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    tied_embeddings: bool = True
    sequence_parallel: bool = False

    def check(self, tp: int = 1) -> None:
        """Raise ConfigError (identically on every rank: a pure function of the config and tp)."""
        for name in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{rank_prefix()}GPTConfig.{name}={value!r} must be an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{rank_prefix()}GPTConfig.dropout={self.dropout} must lie in [0, 1)")
        check_heads(self.d_model, self.n_heads, tp)
        hidden = self.mlp_ratio * self.d_model
        if hidden % tp:
            raise ConfigError(f"{rank_prefix()}MLP width mlp_ratio*d_model = {hidden} is not divisible by "
                              f"tp={tp}; use a d_model that is a multiple of {tp}")
        if self.sequence_parallel and self.seq_len % tp:
            raise ConfigError(f"{rank_prefix()}sequence_parallel needs seq_len={self.seq_len} divisible by "
                              f"tp={tp}; use seq_len={-(-self.seq_len // tp) * tp} or sequence_parallel=False")

    @property
    def n_params(self) -> int:
        """Parameters of the single-process model (tied head counted once)."""
        d, L, h = self.d_model, self.n_layers, self.mlp_ratio * self.d_model
        block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (h * d + h) + (d * h + d)
        head = 0 if self.tied_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.seq_len * d + L * block + 2 * d + head


def _layer_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + 7919 * (index + 1)) % (2**63 - 1))


def _agree_seed(config: GPTConfig, topo: Topology) -> int:
    """One draw from the default generator; rank 0's value for all.  With dropout, every
    tp group must share its generator state (dropout masks are drawn on every rank)."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    seeds = guarded("GPT: allgather of the seeds", lambda: topo.world.allgather(seed))
    if config.dropout > 0 and topo.tp > 1:
        for d in range(topo.dp):
            for p in range(topo.pp):
                group = {seeds[topo.world_rank_of(d, p, t)] for t in range(topo.tp)}
                if len(group) > 1:
                    raise ConfigError(
                        f"{rank_prefix()}dropout={config.dropout} with tp={topo.tp}: the ranks of tensor-parallel "
                        f"group (dp {d}, pp {p}) have different torch random states; call "
                        f"torch.manual_seed(s) with the same s on every rank before building the model")
    return seeds[0]


class GPTEmbedding(nn.Module):
    """Layer 0: token (vocabulary-parallel) + position embedding, dropout.  ``(b, s)`` ids ->
    ``(b, s, d)`` replicated, or ``(b, s/tp, d)`` (this rank's block) with sequence parallelism."""

    def __init__(self, config: GPTConfig, comm: MPI.Comm, generator: torch.Generator) -> None:
        super().__init__()
        self.config, self.comm = config, comm
        self.tok = VocabParallelEmbedding(config.vocab_size, config.d_model, comm,
                                          sequence_parallel=config.sequence_parallel, generator=generator)
        self.pos = nn.Parameter(torch.empty(config.seq_len, config.d_model))
        normal_init(0.02)(self.pos, generator)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        c, p = self.config, self.comm.Get_size()
        if idx.dim() != 2 or idx.shape[1] > c.seq_len:
            raise ConfigError(f"{rank_prefix()}GPT input must be (batch, seq) with seq <= {c.seq_len}, "
                              f"got shape {list(idx.shape)}")
        s = idx.shape[1]
        if c.sequence_parallel and s % p:
            raise ConfigError(f"{rank_prefix()}sequence_parallel: sequence length {s} is not divisible by "
                              f"tp={p}; pad the batch to a multiple of {p} tokens")
        x = self.tok(idx)
        if c.sequence_parallel:
            n = s // p
            pos = copy_to_parallel(self.pos, self.comm).narrow(0, self.comm.Get_rank() * n, n)
        else:
            pos = self.pos[:s]
        x = x + pos
        return parallel_dropout(x, c.dropout, self.training, self.comm,
                                dim=1 if c.sequence_parallel else None)


class GPTBlock(nn.Module):
    """Layers 1..L: ``x + drop(attn(ln1(x)))`` then ``x + drop(mlp(ln2(x)))``."""

    def __init__(self, config: GPTConfig, comm: MPI.Comm, generator: torch.Generator) -> None:
        super().__init__()
        self.config, self.comm = config, comm
        sp, d = config.sequence_parallel, config.d_model
        out_std = 0.02 / math.sqrt(2 * config.n_layers)
        self.ln1 = ParallelLayerNorm(d, comm, sequence_parallel=sp)
        self.attn = ParallelSelfAttention(d, config.n_heads, comm, dropout=config.dropout,
                                          sequence_parallel=sp, generator=generator, out_std=out_std)
        self.ln2 = ParallelLayerNorm(d, comm, sequence_parallel=sp)
        self.mlp = ParallelMLP(d, config.mlp_ratio * d, comm, sequence_parallel=sp,
                               generator=generator, out_std=out_std)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return parallel_dropout(x, self.config.dropout, self.training, self.comm,
                                dim=1 if self.config.sequence_parallel else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._drop(self.attn(self.ln1(x)))
        return x + self._drop(self.mlp(self.ln2(x)))


class GPTHead(nn.Module):
    """Layer L+1: final LayerNorm and the vocabulary-parallel output projection ->
    logits ``(b, s, V'/tp)`` (full sequence; with sequence parallelism it is gathered first).

    ``tied_weight``: share the token table's Parameter (same stage); otherwise the weight
    is drawn from ``generator`` (for a tied head on another pipeline stage, pass the
    embedding's generator: the table is its first draw, so the copies start equal).
    """

    def __init__(self, config: GPTConfig, comm: MPI.Comm, generator: torch.Generator | None,
                 tied_weight: nn.Parameter | None = None) -> None:
        super().__init__()
        self.config, self.comm = config, comm
        self.ln_f = ParallelLayerNorm(config.d_model, comm, sequence_parallel=config.sequence_parallel)
        if tied_weight is not None:
            self.weight = tied_weight
        else:
            self.weight = init_vocab_weight(config.vocab_size, config.d_model, comm, normal_init(0.02), generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return parallel_lm_logits(self.ln_f(x), self.weight, self.comm,
                                  sequence_parallel=self.config.sequence_parallel)


def gather_logits(logits: torch.Tensor, comm: MPI.Comm, vocab_size: int) -> torch.Tensor:
    """Full ``(..., V)`` logits from vocabulary-parallel ones (all-gather, padding dropped)."""
    return gather_from_parallel(logits, comm)[..., :vocab_size]


class GPT(nn.Module):
    """GPT whose layers are split over ``topo.tp_comm`` (see the module docstring).

    ``model(idx, targets)`` -> the mean cross-entropy (a scalar, equal on every tp rank);
    ``model(idx)`` -> vocabulary-parallel logits ``(b, s, V'/tp)``, or with
    ``gather=True`` the full ``(b, s, V)`` logits.  Collective over ``topo.world`` at
    construction (the seed agreement) and over ``topo.tp_comm`` in every call.
    """

    def __init__(self, config: GPTConfig, topo: Topology) -> None:
        super().__init__()
        config.check(topo.tp)
        self.config, self.comm = config, topo.tp_comm
        seed = _agree_seed(config, topo)
        self.embed = GPTEmbedding(config, self.comm, _layer_generator(seed, 0))
        self.blocks = nn.ModuleList(GPTBlock(config, self.comm, _layer_generator(seed, i + 1))
                                    for i in range(config.n_layers))
        if config.tied_embeddings:
            self.head = GPTHead(config, self.comm, None, tied_weight=self.embed.tok.weight)
        else:
            self.head = GPTHead(config, self.comm, _layer_generator(seed, config.n_layers + 1))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                gather: bool = False) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        if targets is not None:
            return vocab_parallel_cross_entropy(logits, targets, self.comm, vocab_size=self.config.vocab_size)
        return gather_logits(logits, self.comm, self.config.vocab_size) if gather else logits

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-process (tp = 1) state dict, on every rank (collective over tp_comm)."""
        return full_state_dict(self, self.comm)

    def export_grads(self) -> dict[str, torch.Tensor]:
        """Gradients as the tp = 1 model would hold them, by parameter name (collective)."""
        return full_grads(self, self.comm)

    def import_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a single-process state dict (every rank keeps its slice; no communication)."""
        load_full_state_dict(self, state, self.comm)

    @staticmethod
    def pipeline_layers(config: GPTConfig, topo: Topology) -> PipelineParts:
        """See :func:`gpt_pipeline_layers`."""
        return gpt_pipeline_layers(config, topo)


class PipelineParts(NamedTuple):
    """What ``mpimp.Pipeline`` needs to run the GPT: ``Pipeline(parts.layers, topo,
    loss_fn=parts.loss_fn, shared=parts.shared, ...)``."""

    layers: list[Callable[[], nn.Module]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    shared: list[list[str]]


class _GPTStages:
    """The layer factories and the loss of a pipelined GPT."""

    def __init__(self, config: GPTConfig, topo: Topology) -> None:
        config.check(topo.tp)
        self.config, self.topo, self.comm = config, topo, topo.tp_comm
        self.seed = _agree_seed(config, topo)

    def _make(self, index: int) -> nn.Module:
        c, L = self.config, self.config.n_layers
        if index == 0:
            return GPTEmbedding(c, self.comm, _layer_generator(self.seed, 0))
        if index <= L:
            return GPTBlock(c, self.comm, _layer_generator(self.seed, index))
        gen_index = 0 if c.tied_embeddings else L + 1
        return GPTHead(c, self.comm, _layer_generator(self.seed, gen_index))

    def factories(self) -> list[Callable[[], nn.Module]]:
        return [lambda i=i: self._make(i) for i in range(self.config.n_layers + 2)]

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(output, target, self.comm, vocab_size=self.config.vocab_size)

    def shared(self) -> list[list[str]]:
        """The tied token table: the embedding's and the head's copies are one weight."""
        if not self.config.tied_embeddings:
            return []
        return [["0.tok.weight", f"{self.config.n_layers + 1}.weight"]]


def gpt_pipeline_layers(config: GPTConfig, topo: Topology) -> PipelineParts:
    """The GPT as ``n_layers + 2`` zero-argument layer factories for ``mpimp.Pipeline``:
    embedding, blocks, final norm + head (producing vocabulary-parallel logits); the
    matching ``loss_fn(logits, targets)`` (vocabulary-parallel cross-entropy over
    ``topo.tp_comm``); and ``shared``, the names of the tied token table's two copies
    (the embedding's and the head's) for ``Pipeline(shared=...)``, which keeps them one
    weight: equal at the start and their gradients summed after every backward, over a
    communicator of the first and the last pipeline rank (one per (dp, tp) column), or
    on one rank when both layers are there.

    Collective over ``topo.world`` (call it on every rank, with the same
    ``torch.manual_seed`` as for the single-process model: the layers are then equal to
    ``GPT(config, ...)``'s).  Factories build one layer each, on the stage that owns it.
    """
    stages = _GPTStages(config, topo)
    return PipelineParts(stages.factories(), stages.loss_fn, stages.shared())
