"""mpimp: MPI-native model-parallel training for PyTorch.

Each MPI rank owns a shard of the model; pipeline (layer-wise), tensor (intra-layer)
and data parallelism compose in a dp x pp x tp grid of ranks (:func:`init`).
Activations and gradients travel as MPI messages through mpi4py (:mod:`mpimp.comm`).
"""

from __future__ import annotations

from . import models, nn
from .comm import (
    Request,
    all_gather,
    all_reduce,
    barrier,
    broadcast,
    iall_reduce,
    ibroadcast,
    irecv,
    isend,
    recv,
    reduce_scatter,
    send,
    wait_all,
)
from .data_parallel import DataParallel
from .errors import ConfigError, DeadlineError, MpimpError, TransportError
from .optim import ShardedOptimizer
from .pipeline import Pipeline
from .topology import Topology, init
from .trainer import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "init",
    "Topology",
    "Pipeline",
    "DataParallel",
    "ShardedOptimizer",
    "Trainer",
    "TrainConfig",
    "nn",
    "models",
    "send",
    "recv",
    "isend",
    "irecv",
    "all_reduce",
    "iall_reduce",
    "ibroadcast",
    "reduce_scatter",
    "all_gather",
    "broadcast",
    "barrier",
    "wait_all",
    "Request",
    "MpimpError",
    "ConfigError",
    "TransportError",
    "DeadlineError",
]
