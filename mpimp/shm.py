"""Intra-node all-reduce of flat fp32 buckets through MPI-3 shared memory.

Problem: when every rank of a data-parallel group sits on one node, an MPI all-reduce
of the gradients still moves them through the library's transport: each rank copies
its buffer into shared fragments, the peer copies them out and sums, and the caller
has already copied the gradients into a contiguous bucket and must copy the mean back
into ``.grad`` afterwards.  For a 25 MiB gradient on two ranks that is ~11 ms of the
library plus two passes of copies per step, most of it exposed (measured in
bench/bench_dp.py).  The ranks can instead read and write each other's memory.

So each rank owns a segment of one ``MPI_Win_allocate_shared`` window that every other
rank maps; the segment holds the flat buckets (the gradients live there: ``.grad`` of
each parameter is a view into it, see :mod:`mpimp.data_parallel`).  Reducing bucket
``k`` of ``n`` elements on ``p`` ranks, with ``S_r`` rank r's segment::

    chunk i = [i*n // p, (i+1)*n // p)                       (odd n: chunks differ by 1)
    rank i:   s = sum_r S_r[k][chunk i]    (fp32, r = 0..p-1, in rank order)
              S_r[k][chunk i] = s  for every r                (no separate gather phase)

Each rank reads and writes about ``n`` elements per bucket (the all-reduce's minimum),
the p ranks work on disjoint chunks at once, and every rank ends with bit-identical
sums (one rank computed each element).  Two synchronisations per bucket, both through
counters in the segments' first cache line (single writer each, monotonically
increasing ``seq``, so nothing is ever reset):

    arrive[me] = seq   then wait until arrive[r] >= seq for all r   (every S_r[k] is final)
    ... reduce chunk me ...
    done[me]   = seq   then wait until done[r]   >= seq for all r   (every chunk is written)

Memory ordering is the MPI-3 shared-memory idiom: the window stays in one
``MPI_Win_lock_all`` epoch and ``MPI_Win_sync`` (a memory barrier) separates the data
writes from the counter store on the writer and the counter load from the data reads
on the reader.  Why counters and not a polled ``MPI_Ibarrier`` at the same two points:
both cost microseconds (bench/bench_shm.py, 2 ranks, one idle node: 6.8 us for a bucket's
two counter synchronisations, 4.5 us for two polled Ibarriers; noise against a 3-7 ms
sum of a 12-25 MiB bucket), but a counter wait can sleep without leaving a collective
to be progressed, makes no MPI call besides ``MPI_Win_sync`` from the communication
thread, and knows which peer is behind and at which reduction (the deadline error
names it).

Waits poll the counters: spin for ~20 us, then sleep with a growing nap (up to 200 us)
so a waiting thread leaves the core to backward; every wait has the deadline of
:func:`mpimp.comm.default_timeout` and raises :class:`DeadlineError` naming the rank,
the bucket, the peers that did not arrive and the fix.

Availability: all ranks of the communicator on one node (``Split_type(COMM_TYPE_SHARED)``
has the communicator's size) and ``MPI_Win_allocate_shared`` working; :func:`shm_available`
tells, :class:`SharedBuckets` builds the window.  DataParallel uses it when asked
(``shm=True``, or ``MPIMP_SHM=1`` with ``shm=None``; see :func:`shm_wanted` for why it is
not the default).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from mpi4py import MPI

from .comm import barrier, default_timeout
from .errors import ConfigError, DeadlineError, env_switch
from .watchdog import guarded

__all__ = ["SharedBuckets", "shm_available", "shm_wanted"]

_PAGE = 4096
_ALIGN = 64  # bytes between buckets: one cache line, so chunks of different buckets never share one
_CTRL = _PAGE  # the first page of each segment: arrive and done counters (int64)


def shm_wanted() -> bool:
    """``MPIMP_SHM`` (default 0): 1 makes ``DataParallel(shm=None)`` take the shared-memory
    path where it can.  Off by default: MPI collectives work everywhere, while the window
    lives in ``/dev/shm``, which containers often keep small (64 MiB in Docker's default);
    on the development machine the two paths train equally fast (docs/benchmarks.md)."""
    return env_switch("MPIMP_SHM", False, "shared-memory all-reduce when the ranks share a node", "the default")


def shm_available(comm: MPI.Comm) -> bool:
    """True when every rank of ``comm`` shares this node (collective over ``comm``; same answer everywhere).

    A communicator spanning nodes gives every rank a shared-memory split smaller than
    ``comm``, so the answer agrees without another message.
    """
    node = guarded("shared-memory check: Split_type(COMM_TYPE_SHARED)",
                   lambda: comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank()))
    try:
        return node.Get_size() == comm.Get_size()
    finally:
        node.Free()


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


class SharedBuckets:
    """Flat fp32 buckets in a shared window, all-reduced in place by :meth:`reduce`.

    Collective over ``comm`` (all ranks on one node, same ``sizes`` in the same order):
    ``SharedBuckets(comm, [n0, n1, ...])`` gives bucket k as ``self.bucket(k)`` (this
    rank's 1-D fp32 tensor of ``sizes[k]`` elements, shared memory).  ``reduce(k)``
    replaces bucket k on every rank by the sum over ranks (times ``scale``); it must be
    called for the same buckets in the same order on every rank, from one thread.
    :meth:`close` frees the window (collective); tensors from :meth:`bucket` must not be
    used afterwards.
    """

    def __init__(self, comm: MPI.Comm, sizes: Sequence[int]) -> None:
        if comm.Get_size() > 1 and not shm_available(comm):
            raise ConfigError(
                f"rank {MPI.COMM_WORLD.Get_rank()}: the {comm.Get_size()} ranks of this communicator do not "
                f"share a node, so they cannot all-reduce through shared memory; use the MPI path "
                f"(MPIMP_SHM=0 or DataParallel(..., shm=False))"
            )
        self.sizes = [int(n) for n in sizes]
        self.offsets: list[int] = []
        pos = _CTRL
        for n in self.sizes:
            self.offsets.append(pos)
            pos = _round_up(pos + 4 * n, _ALIGN)
        self.nbytes = _round_up(pos, _PAGE)
        self.comm = guarded("SharedBuckets: Dup", comm.Dup)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")  # each segment page-aligned (and NUMA-local to its owner)
        try:
            self.win = guarded(f"SharedBuckets: Win_allocate_shared of {self.nbytes} B",
                               lambda: MPI.Win.Allocate_shared(self.nbytes, 1, info, self.comm))
        finally:
            info.Free()
        self.win.Lock_all(MPI.MODE_NOCHECK)  # one passive epoch for the window's life: Win_sync is legal
        self._raw: list[np.ndarray] = []
        for r in range(self.size):
            buf, _ = self.win.Shared_query(r)
            self._raw.append(np.frombuffer(buf, dtype=np.uint8, count=self.nbytes))
        self._ctrl = [raw[:16].view(np.int64) for raw in self._raw]  # [arrive, done] of each rank
        self._mine = self._ctrl[self.rank]
        self._mine[:] = 0
        self._flat = [torch.from_numpy(raw[_CTRL:]).view(torch.float32) for raw in self._raw]
        self._seq = 0
        self.closed = False
        self.win.Sync()
        barrier(self.comm)  # every rank's counters are zero before anyone reduces

    def bucket(self, k: int, rank: int | None = None) -> torch.Tensor:
        """Bucket ``k`` of ``rank`` (default: this rank) as a 1-D fp32 tensor over the shared segment."""
        start = (self.offsets[k] - _CTRL) // 4
        return self._flat[self.rank if rank is None else rank][start:start + self.sizes[k]]

    def chunk(self, k: int, i: int) -> tuple[int, int]:
        """Element range of bucket ``k`` that rank ``i`` reduces."""
        n, p = self.sizes[k], self.size
        return i * n // p, (i + 1) * n // p

    def reduce(self, k: int, scale: float = 1.0, timeout: float | None = None) -> None:
        """Bucket ``k`` <- scale * sum over ranks of bucket ``k``, on every rank (collective)."""
        if self.closed:
            raise ConfigError(f"rank {MPI.COMM_WORLD.Get_rank()}: SharedBuckets.reduce({k}) after close()")
        self._seq += 1
        seq = self._seq
        lo, hi = self.chunk(k, self.rank)
        if self.size == 1:
            if scale != 1.0:
                self.bucket(k).mul_(scale)
            return
        self.win.Sync()  # release: this rank's bucket k is written before the counter says so
        self._mine[0] = seq
        self._wait(0, seq, k, "arrive with its gradients", timeout)
        if hi > lo:
            parts = [self.bucket(k, r)[lo:hi] for r in range(self.size)]
            acc = parts[self.rank]  # summed in place: no temporary
            for r in range(self.size):
                if r != self.rank:
                    acc.add_(parts[r])
            if scale != 1.0:
                acc.mul_(scale)
            for r in range(self.size):
                if r != self.rank:
                    parts[r].copy_(acc)
        self.win.Sync()
        self._mine[1] = seq
        self._wait(1, seq, k, "finish its chunk of the sum", timeout)

    def _wait(self, slot: int, seq: int, k: int, what: str, timeout: float | None) -> None:
        ctrl = self._ctrl
        start = time.monotonic()
        limit = default_timeout() if timeout is None else timeout
        nap = 1e-5
        while True:
            if all(c[slot] >= seq for c in ctrl):
                self.win.Sync()  # acquire: the peers' data is read after their counters
                return
            elapsed = time.monotonic() - start
            if elapsed > 2e-5:
                time.sleep(nap)  # leave the core to backward
                nap = min(2e-4, nap * 1.5)
            if limit is not None and elapsed > limit:
                late = [r for r, c in enumerate(ctrl) if c[slot] < seq]
                raise DeadlineError(
                    f"rank {MPI.COMM_WORLD.Get_rank()}: shared-memory all-reduce of bucket {k} "
                    f"({self.sizes[k]} elements, reduction #{seq}): rank(s) {late} of the {self.size}-rank "
                    f"group did not {what} within {limit:g} s (their last: "
                    f"{[int(ctrl[r][slot]) for r in late]}). A peer failed, or the ranks reduce different "
                    f"buckets (different models, or a backward that failed on some ranks only). Raise "
                    f"MPIMP_TIMEOUT (0 disables the deadline) or set MPIMP_SHM=0 to use MPI collectives"
                )

    def close(self) -> None:
        """Free the window (collective over the group; idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._raw, self._ctrl, self._flat = [], [], []
        self._mine = np.zeros(2, dtype=np.int64)
        barrier(self.comm)  # with a deadline: nobody still reads a peer's segment
        self.win.Unlock_all()
        self.win.Free()
        self.comm.Free()
