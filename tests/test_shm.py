"""mpimp.shm.SharedBuckets: the shared-memory all-reduce against a sum computed in this process.

Every rank fills its buckets with data that is a pure function of (rank, bucket), so each
rank can compute the expected sum of all ranks locally.
"""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

import mpimp
from mpimp.shm import SharedBuckets, shm_available, shm_wanted


def data(rank: int, k: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(1000 * k + rank))


@pytest.fixture
def group(comm: MPI.Comm, request: pytest.FixtureRequest):
    """The first ``p`` ranks of the world (None elsewhere); skipped when the world is smaller."""
    p = request.param
    if comm.Get_size() < p:
        pytest.skip(f"needs {p} ranks, have {comm.Get_size()}")
    sub = comm.Split(0 if comm.Get_rank() < p else MPI.UNDEFINED, comm.Get_rank())
    yield None if sub == MPI.COMM_NULL else sub
    if sub != MPI.COMM_NULL:
        sub.Free()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("group", [1, 2, 4], indirect=True)
def test_sum_of_every_rank_in_every_segment(group: MPI.Comm | None) -> None:
    if group is None:
        return
    p, rank = group.Get_size(), group.Get_rank()
    assert shm_available(group)
    sizes = [1, 3, 0, 1001, 4097, 2 * 65536 + 7]  # odd lengths, shorter than p, empty
    shared = SharedBuckets(group, sizes)
    try:
        for step in range(2):  # a second round reuses the buckets (counters keep counting)
            for k, n in enumerate(sizes):
                shared.bucket(k).copy_(data(rank, k + step, n))
            for k in [1, 0, 2, 3, 4, 5]:  # any order, as long as it is the same on every rank
                scale = 1.0 / p if k % 2 else 1.0
                shared.reduce(k, scale)
            for k, n in enumerate(sizes):
                expected = sum(data(r, k + step, n) for r in range(p)) * (1.0 / p if k % 2 else 1.0)
                torch.testing.assert_close(shared.bucket(k), expected, rtol=1e-6, atol=1e-6)
                # one rank computed each element: bit-identical on every rank
                for r in range(p):
                    assert torch.equal(shared.bucket(k, r), shared.bucket(k)), (k, r)
            mpimp.barrier(group)  # nobody refills a bucket a peer is still comparing
    finally:
        shared.close()
        shared.close()  # idempotent


@pytest.mark.mpi(min_size=2)
def test_a_missing_peer_raises_deadline_error_naming_bucket_and_rank(comm: MPI.Comm) -> None:
    shared = SharedBuckets(comm, [10, 20])
    try:
        if comm.Get_rank() == 0:
            shared.reduce(0)
            with pytest.raises(mpimp.DeadlineError, match=r"bucket 1 \(20 elements.*rank\(s\) \[1") as info:
                shared.reduce(1, timeout=0.5)  # rank 1 never reduces bucket 1
            assert "MPIMP_SHM=0" in str(info.value)
        else:
            shared.reduce(0)
    finally:
        shared.close()


def test_mpimp_shm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPIMP_SHM", "0")
    assert not shm_wanted()
    monkeypatch.setenv("MPIMP_SHM", "yes")
    with pytest.raises(mpimp.ConfigError, match="MPIMP_SHM='yes'"):
        shm_wanted()
    monkeypatch.setenv("MPIMP_SHM", "1")
    assert shm_wanted()
    monkeypatch.delenv("MPIMP_SHM")
    assert not shm_wanted()  # opt-in
