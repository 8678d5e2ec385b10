"""Topology: the grid layout, sub-communicators and bad shapes (at every world size)."""

from __future__ import annotations

import pytest
from mpi4py import MPI

import mpimp
from mpimp.topology import suggest_layouts


def _layouts(size: int) -> list[tuple[int, int, int]]:
    out = []
    for tp in range(1, size + 1):
        for pp in range(1, size // tp + 1):
            if size % (tp * pp) == 0:
                out.append((size // (tp * pp), pp, tp))
    return out


@pytest.mark.mpi(min_size=1)
def test_every_layout_matches_the_reference_formula(comm: MPI.Comm) -> None:
    size, rank = comm.Get_size(), comm.Get_rank()
    for dp, pp, tp in _layouts(size):
        with mpimp.init(pp=pp, tp=tp, comm=comm) as topo:
            # single-process reference: the documented formula r = (dp_rank*pp + pp_rank)*tp + tp_rank
            assert (topo.dp, topo.pp, topo.tp) == (dp, pp, tp)
            assert topo.rank == rank and topo.size == size
            assert topo.tp_rank == rank % tp
            assert topo.pp_rank == (rank // tp) % pp
            assert topo.dp_rank == rank // (tp * pp)
            assert topo.world_rank_of(topo.dp_rank, topo.pp_rank, topo.tp_rank) == rank
            assert topo.tp_comm.Get_size() == tp and topo.tp_comm.Get_rank() == topo.tp_rank
            assert topo.pp_comm.Get_size() == pp and topo.pp_comm.Get_rank() == topo.pp_rank
            assert topo.dp_comm.Get_size() == dp and topo.dp_comm.Get_rank() == topo.dp_rank
            assert topo.model_comm.Get_size() == pp * tp
            # members of each sub-communicator, checked against the formula
            tp_members = topo.tp_comm.allgather(rank)
            assert tp_members == [topo.world_rank_of(topo.dp_rank, topo.pp_rank, t) for t in range(tp)]
            pp_members = topo.pp_comm.allgather(rank)
            assert pp_members == [topo.world_rank_of(topo.dp_rank, p, topo.tp_rank) for p in range(pp)]
            dp_members = topo.dp_comm.allgather(rank)
            assert dp_members == [topo.world_rank_of(d, topo.pp_rank, topo.tp_rank) for d in range(dp)]
            assert topo.is_first_stage == (topo.pp_rank == 0)
            assert topo.is_last_stage == (topo.pp_rank == pp - 1)
            assert topo.is_coordinator == (rank == 0)
            assert topo.prev_stage == (None if topo.pp_rank == 0 else topo.pp_rank - 1)
            assert 0 <= topo.local_rank < topo.local_size
            # the world is a private duplicate, never the user's communicator
            assert MPI.Comm.Compare(topo.world, comm) == MPI.CONGRUENT
            assert f"rank {rank}/{size}" in repr(topo)


@pytest.mark.mpi(min_size=1)
def test_default_comm_is_a_private_duplicate_of_world() -> None:
    with mpimp.init() as topo:
        assert topo.dp == MPI.COMM_WORLD.Get_size()
        assert MPI.Comm.Compare(topo.world, MPI.COMM_WORLD) == MPI.CONGRUENT


@pytest.mark.mpi(min_size=1)
def test_bad_shape_raises_config_error_on_every_rank_without_hanging(comm: MPI.Comm) -> None:
    size = comm.Get_size()
    with pytest.raises(mpimp.ConfigError, match=f"world size {size}"):
        mpimp.init(dp=1, pp=size + 1, comm=comm)
    with pytest.raises(mpimp.ConfigError, match="try dp="):
        mpimp.init(pp=size + 1, comm=comm)
    with pytest.raises(mpimp.ConfigError, match="must be an integer >= 1"):
        mpimp.init(tp=0, comm=comm)
    # still usable afterwards: nothing was left half-collective
    with mpimp.init(comm=comm) as topo:
        assert topo.dp == size


@pytest.mark.mpi(min_size=2)
def test_ranks_that_disagree_get_a_config_error(comm: MPI.Comm) -> None:
    pp = 2 if comm.Get_rank() == 1 else 1
    with pytest.raises(mpimp.ConfigError, match="ranks disagree"):
        mpimp.init(pp=pp, comm=comm)


def test_suggest_layouts_are_valid() -> None:
    for size in (1, 2, 6, 8, 12):
        for d, p, t in suggest_layouts(size, pp=4, tp=2):
            assert d * p * t == size
    assert suggest_layouts(8, pp=2, tp=2)[0] == (2, 2, 2)
