"""mpimp's tensor transport against raw mpi4py on the same bytes: ping-pong and all-reduce.

Run (2 ranks; the figures in docs/benchmarks.md came from this line):

    timeout 1800 .venv/bin/mpirun --oversubscribe -n 2 .venv/bin/python bench/bench_comm.py

For each message size (1 KiB to 64 MiB, powers of 4) and each repetition, the peers run
one after the other in a rotating order (so neither always goes first):

* ``raw``       ``comm.Send`` / ``comm.Recv`` of a numpy byte buffer (receiver preallocated);
* ``mpimp``     ``mpimp.send`` / ``mpimp.recv`` of a float32 tensor (the receiver learns the
                shape from the message and gets a new tensor);
* ``mpimp-out`` the same with ``recv(out=...)`` into a preallocated tensor;
* ``framed``    ``mpimp.send`` / ``mpimp.recv`` with the tensor's shape alternating between
                ``[n]`` and ``[n/2, 2]`` on every message, so no header is ever elided
                (mpimp.channels): what a message costs whose shape just changed.

From the second message of a shape on a channel, ``mpimp`` and ``mpimp-out`` travel raw
(the header elided: the tensor's own contiguous memory); the first message of each size
is in the warm-up.
* ``allreduce raw`` ``comm.Allreduce(IN_PLACE)`` on a float32 numpy array vs
  ``allreduce mpimp`` ``mpimp.all_reduce`` on a float32 tensor over the same kind of
  memory (``torch.from_numpy`` of an array made the same way).

* ``stream``    the OSU ``osu_bw`` method for bandwidth: the sender keeps a window of
                messages in flight (``Isend`` x w, then ``Waitall``; the receiver ``Irecv``
                x w), then a 1-byte acknowledgement; raw vs ``mpimp.isend`` /
                ``mpimp.irecv`` (+ ``out=``) / ``wait_all``.  Per-message software overhead
                overlaps with the transfers in flight, as in a pipeline.

A ping-pong trial times n round trips; one-way time = trial / (2 n).  The report gives the
median over repetitions, raw's latency and bandwidth, and mpimp's as ratios to raw
(bandwidth ratio = raw time / mpimp time: 1.0 = as fast as raw, higher = faster) plus the
latency added per one-way message in microseconds; "paired" is the median over
repetitions of the ratio within one repetition (the peers run back to back in it, so
the machine's slow drifts cancel).  No assertions: a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

import mpimp  # noqa: E402

torch.set_num_threads(1)
KIB = 1024
TAG = 11


def _iterations(nbytes: int, budget: int) -> int:
    """Round trips per trial: about ``budget`` bytes moved, between 3 and 2000."""
    return int(max(3, min(2000, budget // nbytes)))


def _buffers(nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Send and receive buffers, written once so every page is real memory.

    (``np.zeros`` pages that were never written all map to the kernel's one zero page:
    sending from them reads 4 KiB of cache-hot memory, whatever the size.)  Both peers
    use these same buffers: mpimp sees them as float32 tensors over the same memory.
    """
    sbuf = np.full(nbytes, 1, dtype=np.uint8)
    rbuf = np.full(nbytes, 2, dtype=np.uint8)
    return sbuf, rbuf


def _pingpong_raw(comm: MPI.Comm, nbytes: int, n: int) -> float:
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    sbuf, rbuf = _buffers(nbytes)
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(n):
        if rank == 0:
            comm.Send([sbuf, MPI.BYTE], peer, TAG)
            comm.Recv([rbuf, MPI.BYTE], peer, TAG)
        else:
            comm.Recv([rbuf, MPI.BYTE], peer, TAG)
            comm.Send([sbuf, MPI.BYTE], peer, TAG)
    return (time.perf_counter() - start) / (2 * n)


def _pingpong_mpimp(comm: MPI.Comm, nbytes: int, n: int, use_out: bool) -> float:
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    sbuf, rbuf = _buffers(nbytes)
    t = torch.from_numpy(sbuf).view(torch.float32)
    out = torch.from_numpy(rbuf).view(torch.float32) if use_out else None
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(n):
        if rank == 0:
            mpimp.send(t, peer, comm, TAG)
            mpimp.recv(peer, comm, TAG, out=out)
        else:
            mpimp.recv(peer, comm, TAG, out=out)
            mpimp.send(t, peer, comm, TAG)
    return (time.perf_counter() - start) / (2 * n)


def _pingpong_framed(comm: MPI.Comm, nbytes: int, n: int) -> float:
    """Ping-pong whose tensor alternates between two shapes: every message carries its header."""
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    sbuf, _ = _buffers(nbytes)
    flat = torch.from_numpy(sbuf).view(torch.float32)
    shapes = (flat, flat.view(-1, 2) if flat.numel() % 2 == 0 else flat.view(1, -1))
    comm.Barrier()
    start = time.perf_counter()
    for i in range(n):
        t = shapes[i % 2]
        if rank == 0:
            mpimp.send(t, peer, comm, TAG + 2)
            mpimp.recv(peer, comm, TAG + 2)
        else:
            mpimp.recv(peer, comm, TAG + 2)
            mpimp.send(t, peer, comm, TAG + 2)
    return (time.perf_counter() - start) / (2 * n)


def _window(nbytes: int) -> int:
    """Messages in flight per round of the streaming test (OSU osu_bw uses 64)."""
    return int(max(1, min(64, (16 << 20) // nbytes)))


def _stream_raw(comm: MPI.Comm, nbytes: int, n: int) -> float:
    """osu_bw-style: rank 0 posts a window of Isends, rank 1 a window of Irecvs, then a 1-byte ack."""
    rank, peer, w = comm.Get_rank(), 1 - comm.Get_rank(), _window(nbytes)
    sbuf, rbuf = _buffers(nbytes)
    ack = np.zeros(1, dtype=np.uint8)
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(n):
        if rank == 0:
            MPI.Request.Waitall([comm.Isend([sbuf, MPI.BYTE], peer, TAG) for _ in range(w)])
            comm.Recv([ack, MPI.BYTE], peer, TAG + 1)
        else:
            MPI.Request.Waitall([comm.Irecv([rbuf, MPI.BYTE], peer, TAG) for _ in range(w)])
            comm.Send([ack, MPI.BYTE], peer, TAG + 1)
    return (time.perf_counter() - start) / (n * w)


def _stream_mpimp(comm: MPI.Comm, nbytes: int, n: int, use_out: bool) -> float:
    """The same with mpimp.isend / mpimp.irecv (learning the shape, or into ``out``) and wait_all."""
    rank, peer, w = comm.Get_rank(), 1 - comm.Get_rank(), _window(nbytes)
    sbuf, rbuf = _buffers(nbytes)
    t = torch.from_numpy(sbuf).view(torch.float32)
    out = torch.from_numpy(rbuf).view(torch.float32) if use_out else None
    ack = np.zeros(1, dtype=np.uint8)
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(n):
        if rank == 0:
            mpimp.wait_all([mpimp.isend(t, peer, comm, TAG) for _ in range(w)])
            comm.Recv([ack, MPI.BYTE], peer, TAG + 1)
        else:
            mpimp.wait_all([mpimp.irecv(peer, comm, TAG, out=out) for _ in range(w)])
            comm.Send([ack, MPI.BYTE], peer, TAG + 1)
    return (time.perf_counter() - start) / (n * w)


def _reduce_buffer(nbytes: int) -> np.ndarray:
    """The all-reduce operand of both peers: one numpy array (mpimp sees it through
    ``torch.from_numpy``), so both reduce the very same memory (numpy asks for huge pages
    on large arrays, torch's allocator does not: separate buffers made raw look 15%
    faster at 64 MiB through TLB misses alone)."""
    return np.ones(nbytes // 4, dtype=np.float32)


def _allreduce_raw(comm: MPI.Comm, nbytes: int, n: int) -> float:
    a = _reduce_buffer(nbytes)
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(n):
        comm.Allreduce(MPI.IN_PLACE, [a, MPI.FLOAT], MPI.SUM)
    return (time.perf_counter() - start) / n


def _allreduce_mpimp(comm: MPI.Comm, nbytes: int, n: int) -> float:
    t = torch.from_numpy(_reduce_buffer(nbytes))
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(n):
        mpimp.all_reduce(t, comm)
    return (time.perf_counter() - start) / n


def _median_times(comm: MPI.Comm, peers: dict[str, Callable[[int], float]], n: int,
                  reps: int) -> dict[str, float]:
    """Median per-operation time of each peer; peers alternate in a rotating order."""
    names = list(peers)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for name in names:  # warm-up: first-touch pages, datatype caches, connection set-up
        peers[name](max(1, n // 10))
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            t = peers[name](n)
            samples[name].append(comm.allreduce(t, op=MPI.MAX))  # the slower rank's view
    med = {k: statistics.median(v) for k, v in samples.items()}
    # paired: the median over repetitions of raw's time / the peer's in the same repetition
    # (a repetition runs the peers back to back: the machine's slow drifts cancel)
    for k in names[1:]:
        med["paired " + k] = statistics.median(r / t for r, t in zip(samples[names[0]], samples[k]))
    return med


def _p2p_peers(comm: MPI.Comm, raw: Callable[[MPI.Comm, int, int], float],
               ours: Callable[[MPI.Comm, int, int, bool], float], nbytes: int, n: int,
               reps: int, framed: Callable[[MPI.Comm, int, int], float] | None = None) -> dict[str, float]:
    """Median times of raw, mpimp (new result), mpimp (out=) and, if given, the framed peer."""
    peers = {
        "raw": lambda k: raw(comm, nbytes, k),
        "mpimp": lambda k: ours(comm, nbytes, k, False),
        "out": lambda k: ours(comm, nbytes, k, True),
    }
    if framed is not None:
        peers["framed"] = lambda k: framed(comm, nbytes, k)
    return _median_times(comm, peers, n, reps)


def _header(rank: int, title: str, columns: list[str]) -> None:
    """A section title and a markdown table header (rank 0 prints)."""
    if rank == 0:
        print(f"\n## {title}")
        print("| " + " | ".join(f"{c:>9}" for c in columns) + " |")
        print("|" + "---:|" * len(columns))


def _fmt_size(nbytes: int) -> str:
    return f"{nbytes // (1 << 20)} MiB" if nbytes >= 1 << 20 else f"{nbytes // KIB} KiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-kib", type=int, default=1)
    parser.add_argument("--max-mib", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7, help="repetitions per peer and size")
    parser.add_argument("--budget-mib", type=float, default=256,
                        help="bytes moved per trial (sets the number of round trips)")
    parser.add_argument("--only", choices=["p2p", "stream", "allreduce"], default=None)
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    if world.Get_size() != 2:
        if world.Get_rank() == 0:
            print("bench_comm.py needs exactly 2 ranks: mpirun -n 2 python bench/bench_comm.py",
                  file=sys.stderr)
        return 2
    comm = world.Dup()
    rank = comm.Get_rank()
    sizes = []
    s = args.min_kib * KIB
    while s <= args.max_mib << 20:
        sizes.append(s)
        s *= 4
    budget = int(args.budget_mib * (1 << 20))
    if rank == 0:
        print(f"# {MPI.Get_library_version().splitlines()[0].strip()}; torch {torch.__version__}; "
              f"mpi4py {__import__('mpi4py').__version__}; {args.reps} reps, median; "
              f"MPIMP_TIMEOUT={os.environ.get('MPIMP_TIMEOUT', '600')}")
    if args.only in (None, "p2p"):
        _header(rank, "ping-pong, one-way time per message",
                ["size", "raw us", "raw MB/s", "mpimp/raw bw", "+us mpimp", "out=/raw bw", "+us out=",
                 "out= paired", "framed/raw bw"])
        for nbytes in sizes:
            n = _iterations(nbytes, budget)
            med = _p2p_peers(comm, _pingpong_raw, _pingpong_mpimp, nbytes, n, args.reps, _pingpong_framed)
            if rank == 0:
                raw = med["raw"]
                print(f"| {_fmt_size(nbytes):>7} | {raw * 1e6:9.1f} | {nbytes / raw / 1e6:9.0f} | "
                      f"{raw / med['mpimp']:12.3f} | {(med['mpimp'] - raw) * 1e6:9.1f} | "
                      f"{raw / med['out']:11.3f} | {(med['out'] - raw) * 1e6:8.1f} | "
                      f"{med['paired out']:11.3f} | {raw / med['framed']:13.3f} |", flush=True)
    if args.only in (None, "stream"):
        _header(rank, "streaming bandwidth (osu_bw style: a window of messages in flight), time per message",
                ["size", "window", "raw MB/s", "mpimp/raw bw", "out=/raw bw", "out= paired"])
        for nbytes in sizes:
            n = max(3, _iterations(nbytes * _window(nbytes), budget) // 2)
            med = _p2p_peers(comm, _stream_raw, _stream_mpimp, nbytes, n, args.reps)
            if rank == 0:
                raw = med["raw"]
                print(f"| {_fmt_size(nbytes):>7} | {_window(nbytes):>6} | {nbytes / raw / 1e6:9.0f} | "
                      f"{raw / med['mpimp']:12.3f} | {raw / med['out']:11.3f} | {med['paired out']:11.3f} |",
                      flush=True)
    if args.only in (None, "allreduce"):
        _header(rank, "all-reduce (sum, float32, in place), time per call",
                ["size", "raw us", "mpimp/raw", "+us mpimp"])
        for nbytes in sizes:
            n = _iterations(nbytes, budget // 2)
            med = _median_times(comm, {
                "raw": lambda k, b=nbytes: _allreduce_raw(comm, b, k),
                "mpimp": lambda k, b=nbytes: _allreduce_mpimp(comm, b, k),
            }, n, args.reps)
            if rank == 0:
                raw = med["raw"]
                print(f"| {_fmt_size(nbytes):>7} | {raw * 1e6:9.1f} | {raw / med['mpimp']:9.3f} | "
                      f"{(med['mpimp'] - raw) * 1e6:9.1f} |", flush=True)
    comm.Free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
