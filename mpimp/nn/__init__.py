"""Tensor-parallel layers (Megatron-style) over an explicit communicator.

Every layer takes the communicator its weights are split over (``topo.tp_comm``, or any
communicator) and is a plain ``nn.Module``; on a communicator of size 1 it is the
ordinary single-process layer.  See :mod:`mpimp.nn.layers` for the partition math.
"""

from __future__ import annotations

from .layers import (
    ColumnParallelLinear,
    ParallelLayerNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    parallel_lm_logits,
    vocab_partition,
)
from .loss import vocab_parallel_cross_entropy
from .random import parallel_dropout
from .sharding import (
    ShardSpec,
    full_grads,
    full_state_dict,
    load_full_state_dict,
    normal_init,
    shard_tensor,
    unshard_tensor,
)
from .transformer import ParallelMLP, ParallelSelfAttention, check_heads

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ParallelLayerNorm",
    "ParallelSelfAttention",
    "ParallelMLP",
    "parallel_lm_logits",
    "vocab_parallel_cross_entropy",
    "vocab_partition",
    "parallel_dropout",
    "check_heads",
    "ShardSpec",
    "shard_tensor",
    "unshard_tensor",
    "normal_init",
    "full_state_dict",
    "full_grads",
    "load_full_state_dict",
]
