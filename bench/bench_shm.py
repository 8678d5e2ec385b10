"""Shared-memory all-reduce (mpimp.shm) vs MPI: one bucket's synchronisation and a whole gradient.

    OMP_NUM_THREADS=1 timeout 300 .venv/bin/mpirun --oversubscribe -n 2 \\
        .venv/bin/python bench/bench_shm.py --repeat 20

* ``sync``: the two synchronisation points of a bucket reduction with nothing to sum
  (an empty bucket: counters in the shared window + ``MPI_Win_sync``) against two
  polled ``MPI_Ibarrier`` (what the same points would cost through MPI), median of
  ``--repeat`` x 200 rounds.
* ``reduce``: ``SharedBuckets.reduce`` of ``--elements`` fp32 (default: the 24.7 MiB of
  bench_dp's GPT) against ``mpimp.all_reduce`` of the same buffer, alternating, median.

Not a test: no assertions on timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

import mpimp  # noqa: E402
from mpimp.comm import _MPIRequest  # noqa: E402
from mpimp.shm import SharedBuckets  # noqa: E402

torch.set_num_threads(1)


def timed(fn, comm: MPI.Comm, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        out.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--elements", type=int, default=6_482_432)  # bench_dp's GPT: 24.7 MiB fp32
    args = ap.parse_args()
    comm = MPI.COMM_WORLD.Dup()
    rank, size = comm.Get_rank(), comm.Get_size()
    shm = SharedBuckets(comm, [0, args.elements])
    rounds = 200

    def counters() -> None:
        for _ in range(rounds):
            shm.reduce(0)

    def ibarriers() -> None:
        for _ in range(rounds):
            for _ in range(2):
                _MPIRequest(comm.Ibarrier(), "barrier").wait()

    sync = {"counters": timed(counters, comm, args.repeat) / rounds,
            "ibarrier": timed(ibarriers, comm, args.repeat) / rounds}
    work = torch.randn(args.elements, generator=torch.Generator().manual_seed(rank))
    mine = shm.bucket(1)
    times: dict[str, list[float]] = {"shm": [], "mpi": []}
    for r in range(args.repeat):
        for k in (("shm", "mpi") if r % 2 == 0 else ("mpi", "shm")):
            if k == "shm":
                mine.copy_(work)  # not timed: DataParallel's hooks write gradients there
                times[k].append(timed(lambda: shm.reduce(1, 1.0 / size), comm, 1))
            else:
                buf = work.clone()
                times[k].append(timed(lambda b=buf: mpimp.all_reduce(b, comm), comm, 1))
    if rank == 0:
        print(f"== {size} ranks, one node")
        print(f"sync of one bucket (two points): counters {1e6 * sync['counters']:.1f} us, "
              f"2 x Ibarrier {1e6 * sync['ibarrier']:.1f} us")
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"all-reduce of {args.elements * 4 / 2**20:.1f} MiB fp32: shm {1000 * med['shm']:.2f} ms, "
              f"MPI {1000 * med['mpi']:.2f} ms (MPI / shm {med['mpi'] / med['shm']:.2f}x)")
    shm.close()
    comm.Free()


if __name__ == "__main__":
    main()
