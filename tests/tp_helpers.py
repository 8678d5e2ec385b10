"""Helpers shared by the tensor-parallel tests: sub-communicators of the size a test needs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from mpi4py import MPI

import mpimp


@contextmanager
def tp_topology(comm: MPI.Comm, tp: int, pp: int = 1) -> Iterator[mpimp.Topology | None]:
    """A ``pp x tp`` topology over the first ``k * pp * tp`` ranks of ``comm`` (groups of
    consecutive ranks, each running the test independently); None on the ranks left over
    (e.g. rank 2 at world 3 for tp = 2).  Skips when the world is too small."""
    size, rank, need = comm.Get_size(), comm.Get_rank(), tp * pp
    if size < need:
        pytest.skip(f"needs at least {need} ranks (pp={pp} x tp={tp}), have {size}")
    color = rank // need if rank < (size // need) * need else MPI.UNDEFINED
    sub = comm.Split(color, rank)
    if sub == MPI.COMM_NULL:
        yield None
        return
    topo = mpimp.init(pp=pp, tp=tp, comm=sub)
    try:
        yield topo
    finally:
        topo.free()
        sub.Free()


@contextmanager
def single_topology() -> Iterator[mpimp.Topology]:
    """A one-rank topology (the single-process reference model)."""
    topo = mpimp.init(comm=MPI.COMM_SELF)
    try:
        yield topo
    finally:
        topo.free()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "", tol: float = 1e-5) -> None:
    """|actual - expected| <= tol + tol * |expected| elementwise (torch.testing's rule; its import
    costs seconds per rank)."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bound = tol + tol * expected.double().abs()
    bad = diff > bound
    if bool(bad.any()):
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; "
                             f"max abs diff {float(diff.max()):.3g} (tolerance {tol:g})")
