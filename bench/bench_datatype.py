"""What the MPI library itself charges for mpimp's one-message layout: raw mpi4py only.

Run (2 ranks):

    timeout 600 .venv/bin/mpirun --oversubscribe -n 2 .venv/bin/python bench/bench_datatype.py

An mpimp message is ONE MPI message: a 64-byte header (dtype, shape) followed by the
payload, which leaves from the tensor's own memory.  The two regions are not adjacent,
so the message is described by a struct datatype.  This benchmark isolates the price the
library puts on that, without any mpimp code: a ping-pong of n bytes, alternating in one
invocation, between

* ``raw``         ``Send``/``Recv`` of one contiguous n-byte buffer (the baseline);
* ``struct``      ``Send``/``Recv`` of the struct datatype {64-byte header, n-byte payload}
                  over two separate allocations, on both sides (mpimp's zero-copy layout);
* ``contig+64``   one contiguous (n + 64)-byte buffer (what a header adjacent to the
                  payload would cost; mpimp cannot have it without copying the payload).

Open MPI 5 moves a contiguous message of this size by single-copy CMA (the receiver
reads the sender's pages) and a non-contiguous one through its shared-memory fragments
(two copies, pipelined), so ``struct / raw`` is the ceiling of mpimp's point-to-point
bandwidth ratio in bench_comm.py on a given day.  Bandwidth in GB/s (10^9 B/s), median
of the repetitions; no assertions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from mpi4py import MPI

TAG = 7


def _pingpong(comm: MPI.Comm, send: list, recv: list, reps: int) -> float:
    """Seconds per one-way message over ``reps`` round trips (rank 0 starts)."""
    peer = 1 - comm.Get_rank()
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(reps):
        if comm.Get_rank() == 0:
            comm.Send(send, peer, TAG)
            comm.Recv(recv, peer, TAG)
        else:
            comm.Recv(recv, peer, TAG)
            comm.Send(send, peer, TAG)
    return (time.perf_counter() - start) / (2 * reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions per layout and size")
    ap.add_argument("--trips", type=int, default=10, help="round trips per repetition")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        raise SystemExit("run on exactly 2 ranks")
    if comm.Get_rank() == 0:
        print(f"# {MPI.Get_library_version().splitlines()[0].strip()}; {args.reps} reps x {args.trips} round trips")
        print("|     size | raw GB/s | struct GB/s | contig+64 GB/s | struct / raw | contig+64 / raw |")
        print("|---:|---:|---:|---:|---:|---:|")
    for mib in (1, 4, 16, 64):
        n = mib << 20
        payload = [np.ones(n, np.uint8), np.ones(n, np.uint8)]  # send, receive
        header = [np.zeros(64, np.uint8), np.zeros(64, np.uint8)]
        types = [MPI.Datatype.Create_struct([64, n], [0, MPI.Get_address(p) - MPI.Get_address(h)],
                                            [MPI.BYTE, MPI.BYTE]).Commit() for h, p in zip(header, payload)]
        whole = [np.ones(n + 64, np.uint8), np.ones(n + 64, np.uint8)]
        layouts = {
            "raw": ([payload[0], MPI.BYTE], [payload[1], MPI.BYTE]),
            "struct": ([header[0], 1, types[0]], [header[1], 1, types[1]]),
            "contig+64": ([whole[0], MPI.BYTE], [whole[1], MPI.BYTE]),
        }
        times: dict[str, list[float]] = {k: [] for k in layouts}
        for s, r in layouts.values():  # warm-up: every page touched, connections set up
            _pingpong(comm, s, r, 2)
        for rep in range(args.reps):
            order = list(layouts) if rep % 2 == 0 else list(reversed(layouts))
            for k in order:
                s, r = layouts[k]
                times[k].append(_pingpong(comm, s, r, args.trips))
        for t in types:
            t.Free()
        if comm.Get_rank() == 0:
            bw = {k: n / statistics.median(v) / 1e9 for k, v in times.items()}
            print(f"| {mib:4d} MiB | {bw['raw']:8.2f} | {bw['struct']:11.2f} | {bw['contig+64']:14.2f} | "
                  f"{bw['struct'] / bw['raw']:12.2f} | {bw['contig+64'] / bw['raw']:15.2f} |", flush=True)


if __name__ == "__main__":
    main()
