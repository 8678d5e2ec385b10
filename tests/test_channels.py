"""Header elision (mpimp.channels): repeats travel raw, every sequence still decodes exactly.

Each test sends on the ring ``r -> r+1 (mod p)`` (a send to oneself at one rank) and checks
what arrives against the sender's tensors, rebuilt on the receiving rank from the seed.
Where a test looks at the wire it uses a non-consuming ``MPI_Probe``, so both ends keep
seeing every message through mpimp.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpimp
from mpimp import channels as chan
from mpimp import comm as transport
from mpimp import fastpath


def make(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def ring(comm: MPI.Comm) -> tuple[int, int]:
    p, r = comm.Get_size(), comm.Get_rank()
    return (r + 1) % p, (r - 1) % p


def wire_size(comm: MPI.Comm, src: int, tag: int) -> int:
    """The byte count of the next message from ``src`` with ``tag``, left in place."""
    status = MPI.Status()
    comm.Probe(src, tag, status)
    return status.Get_count(MPI.BYTE)


def same(a: object, b: object) -> bool:
    if isinstance(a, tuple) or isinstance(b, tuple):
        return (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b)))
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


A = (300, 100)  # 120 000 bytes of float32: above ELIDE_MIN

pytestmark = pytest.mark.usefixtures("path")  # every test here on both paths (below)


@pytest.fixture(params=["native", "python"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on the native fast path (mpimp.fastpath) and on the pure-Python one:
    the same messages, the same results."""
    if request.param == "python":
        monkeypatch.setattr(transport, "_fast", lambda: None)
    elif fastpath.load() is None:
        pytest.skip(f"the native fast path is {fastpath.status()}")
    return request.param


@pytest.mark.mpi(min_size=1)
def test_a_repeated_large_header_travels_once(comm: MPI.Comm) -> None:
    dst, src = ring(comm)
    rank = comm.Get_rank()
    framed = transport._frame1(torch.float32, A)[2]
    for k in range(3):
        req = mpimp.isend(make(torch.float32, A, 10 * rank + k), dst, comm, tag=5)
        size = wire_size(comm, src, 5)
        assert size == (framed if k == 0 else 4 * 300 * 100), (k, size)  # the first framed, then payload only
        assert same(mpimp.recv(src, comm, tag=5), make(torch.float32, A, 10 * src + k))
        req.wait()
    # another shape on the channel is framed again; going back to the first is framed once more
    for k, shape in enumerate([(100, 300), A, A]):
        req = mpimp.isend(make(torch.float32, shape, 7 * rank + k), dst, comm, tag=5)
        size = wire_size(comm, src, 5)
        assert size == (4 * 300 * 100 if k == 2 else transport._frame1(torch.float32, shape)[2]), (k, size)
        assert same(mpimp.recv(src, comm, tag=5), make(torch.float32, shape, 7 * src + k))
        req.wait()
    # small messages are always framed and leave the channel's state alone
    assert isinstance(chan.channels(comm).seen[(src, 5)], chan.Seen)
    req = mpimp.isend(torch.arange(4.0), dst, comm, tag=5)
    assert mpimp.recv(src, comm, tag=5).tolist() == [0.0, 1.0, 2.0, 3.0]
    req.wait()
    req = mpimp.isend(make(torch.float32, A, 99), dst, comm, tag=5)
    assert wire_size(comm, src, 5) == 4 * 300 * 100  # still a repeat of A
    assert same(mpimp.recv(src, comm, tag=5), make(torch.float32, A, 99))
    req.wait()


@pytest.mark.mpi(min_size=1)
def test_a_framed_message_that_would_look_like_a_repeat_is_padded(comm: MPI.Comm) -> None:
    """L is float32[20000] (80 000 payload bytes); float32[19984] framed is 64 + 79 936 =
    80 000 bytes too, so it travels with 64 more header bytes and decodes as itself."""
    dst, src = ring(comm)
    rank = comm.Get_rank()
    seq = [(20000,), (19984,), (19984,), (20000,)]
    assert transport._frame1(torch.float32, (19984,))[2] == 4 * 20000
    sizes = []
    for k, shape in enumerate(seq):
        req = mpimp.isend(make(torch.float32, shape, 100 * rank + k), dst, comm, tag=6)
        sizes.append(wire_size(comm, src, 6))
        assert same(mpimp.recv(src, comm, tag=6), make(torch.float32, shape, 100 * src + k)), k
        req.wait()
    assert sizes == [80064, 80000 + chan.PAD, 4 * 19984, 80064]


def _sequence(seed: int) -> list[object]:
    """A sequence of messages for one channel: repeats, changes of shape, dtype and
    arity, small and empty messages in between, a 1-tuple, the collision case."""
    out: list[object] = []
    for k, spec in enumerate([A, A, A, (100, 300), A, "bf16", "bf16", "tuple1", "tuple1", A, "pair",
                              A, (3, 4), A, (0, 5), A, (20000,), (19984,), (19984,), (20000,), A]):
        s = seed * 1000 + k
        if spec == "bf16":
            out.append(make(torch.bfloat16, A, s))
        elif spec == "tuple1":
            out.append((make(torch.float32, A, s),))
        elif spec == "pair":
            out.append((make(torch.float32, A, s), make(torch.float32, (7,), s + 1)))
        else:
            assert isinstance(spec, tuple)
            out.append(make(torch.float32, spec, s))
    return out


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("how", ["blocking", "irecv one at a time", "window of irecvs, reversed",
                                 "into out", "window of irecvs into out", "ANY_SOURCE and ANY_TAG",
                                 "blocking send"])
def test_every_sequence_decodes_as_sent(comm: MPI.Comm, how: str, path: str) -> None:
    dst, src = ring(comm)
    mine, theirs = _sequence(comm.Get_rank()), _sequence(src)
    tag = 20
    if how == "blocking send":  # even ranks send first (a ring of blocking sends would deadlock)
        got = []
        for m in mine:
            if comm.Get_rank() % 2 == 0 and comm.Get_size() > 1:
                mpimp.send(m, dst, comm, tag=tag)
                got.append(mpimp.recv(src, comm, tag=tag))
            elif comm.Get_size() > 1:
                got.append(mpimp.recv(src, comm, tag=tag))
                mpimp.send(m, dst, comm, tag=tag)
            else:
                q = mpimp.isend(m, dst, comm, tag=tag)
                got.append(mpimp.recv(src, comm, tag=tag))
                q.wait()
    else:
        sends = [mpimp.isend(m, dst, comm, tag=tag) for m in mine]
        if how == "blocking":
            got = [mpimp.recv(src, comm, tag=tag) for _ in theirs]
        elif how == "irecv one at a time":
            got = [mpimp.irecv(src, comm, tag=tag).wait() for _ in theirs]
        elif how == "window of irecvs, reversed":
            reqs = [mpimp.irecv(src, comm, tag=tag) for _ in theirs]
            got = list(reversed(mpimp.wait_all(list(reversed(reqs)))))
        elif how == "window of irecvs into out":  # (native: runs of raw repeats in one call)
            outs = [torch.full(t.shape, -1.0, dtype=t.dtype) if isinstance(t, torch.Tensor) else None
                    for t in theirs]
            reqs = [mpimp.irecv(src, comm, tag=tag, out=o) for o in outs]
            got = mpimp.wait_all(reqs)
            assert all(g is o for g, o in zip(got, outs) if o is not None)
        elif how == "into out":
            got = []
            for t in theirs:
                if isinstance(t, torch.Tensor):
                    out = torch.full(t.shape, -1.0, dtype=t.dtype)
                    got.append(mpimp.recv(src, comm, tag=tag, out=out))
                    assert got[-1] is out
                else:
                    got.append(mpimp.recv(src, comm, tag=tag))
        else:
            got = [mpimp.recv(MPI.ANY_SOURCE, comm, tag=MPI.ANY_TAG) for _ in theirs]  # only src sends to us
        mpimp.wait_all(sends)
    for k, (g, w) in enumerate(zip(got, theirs)):
        assert same(g, w), (how, k)


@pytest.mark.mpi(min_size=1)
def test_out_of_another_shape_on_a_raw_repeat_names_both_and_the_channel_goes_on(comm: MPI.Comm) -> None:
    dst, src = ring(comm)
    rank = comm.Get_rank()
    for k in range(2):  # the second one is raw
        req = mpimp.isend(make(torch.float32, A, rank + k), dst, comm, tag=30)
        if k == 0:
            mpimp.recv(src, comm, tag=30)
        else:
            with pytest.raises(mpimp.TransportError,
                               match=r"out is float32\[100, 300\] but the message holds float32\[300, 100\]"):
                mpimp.recv(src, comm, tag=30, out=torch.empty(100, 300))
        req.wait()
    req = mpimp.isend(make(torch.float32, A, 77), dst, comm, tag=30)  # raw again: decodes
    with pytest.raises(mpimp.TransportError, match=r"out is bfloat16\[300, 100\]"):
        mpimp.irecv(src, comm, tag=30, out=torch.empty(A, dtype=torch.bfloat16)).wait()
    req.wait()
    req = mpimp.isend(make(torch.float32, A, 78), dst, comm, tag=30)
    assert same(mpimp.recv(src, comm, tag=30, out=torch.empty(A)), make(torch.float32, A, 78))
    req.wait()


@pytest.mark.mpi(min_size=1)
def test_a_foreign_message_on_the_channel_leaves_its_state_intact(comm: MPI.Comm) -> None:
    dst, src = ring(comm)
    for k in range(2):
        req = mpimp.isend(make(torch.float32, A, k), dst, comm, tag=31)
        assert same(mpimp.recv(src, comm, tag=31), make(torch.float32, A, k))
        req.wait()
    foreign = np.full(200_000, 7, dtype=np.uint8)
    req = comm.Isend([foreign, MPI.BYTE], dst, 31)
    with pytest.raises(mpimp.TransportError, match="not an mpimp tensor"):
        mpimp.irecv(src, comm, tag=31).wait(timeout=10)
    req.Wait()
    req = mpimp.isend(make(torch.float32, A, 5), dst, comm, tag=31)  # a raw repeat of A, still read as A
    assert same(mpimp.recv(src, comm, tag=31), make(torch.float32, A, 5))
    req.wait()


@pytest.mark.mpi(min_size=1)
def test_a_new_communicator_starts_clean_even_on_a_reused_handle(comm: MPI.Comm) -> None:
    dst, src = ring(comm)
    framed = transport._frame1(torch.float32, A)[2]
    for round_no in range(3):
        c = comm.Dup()
        assert c.Get_attr(chan._keyval()) is None  # Dup copies no channel state
        for k in range(2):
            req = mpimp.isend(make(torch.float32, A, k), dst, c, tag=32)
            assert wire_size(c, src, 32) == (framed if k == 0 else A[0] * A[1] * 4), (round_no, k)
            assert same(mpimp.recv(src, c, tag=32), make(torch.float32, A, k))
            req.wait()
        c.Free()  # frees the state with it; the next Dup may get the same handle


@pytest.mark.mpi(min_size=1)
def test_a_sender_with_elision_off_is_decoded(comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    """MPIMP_ELIDE_HEADERS=0 on some ranks only: their repeats are framed, and still decode."""
    dst, src = ring(comm)
    if comm.Get_rank() % 2 == 0:
        monkeypatch.setattr(transport, "_ELIDE", False)
    mine, theirs = _sequence(comm.Get_rank() + 50), _sequence(src + 50)
    sends = [mpimp.isend(m, dst, comm, tag=33) for m in mine]
    got = [mpimp.recv(src, comm, tag=33) for _ in theirs]
    mpimp.wait_all(sends)
    assert all(same(g, w) for g, w in zip(got, theirs))


@pytest.mark.mpi(min_size=1)
def test_a_foreign_message_still_arriving_fails_only_its_own_receive(comm: MPI.Comm) -> None:
    """A later receive that must first settle an earlier, framed message of its channel gets
    its own message even when the earlier one turns out foreign; the earlier receive
    reports the TransportError."""
    dst, src = ring(comm)
    sends = [comm.Isend([np.full(200_000, 7, dtype=np.uint8), MPI.BYTE], dst, 34),
             mpimp.isend(make(torch.float32, A, 3), dst, comm, tag=34)]
    first, second = mpimp.irecv(src, comm, tag=34), mpimp.irecv(src, comm, tag=34)
    assert same(second.wait(timeout=20), make(torch.float32, A, 3))
    with pytest.raises(mpimp.TransportError, match="not an mpimp tensor"):
        first.wait(timeout=20)
    sends[0].Wait()
    sends[1].wait()


_DEADLINE_MIDWAY = """
import time, torch
from mpi4py import MPI
import mpimp
comm = MPI.COMM_WORLD.Dup()
q = torch.arange(15000, dtype=torch.float32).reshape(3, 5000)  # 60 000 B: framed first, then raw
if comm.Get_rank() == 1:
    r = mpimp.isend(q, 0, comm, tag=7)
    time.sleep(3.0)  # no MPI calls: without CMA the transfer stands still, the receiver's deadline passes
    r.wait()
    comm.Barrier()
    for k in range(2):
        mpimp.send(q + k, 0, comm, tag=7)
else:
    comm.Probe(1, 7)
    try:
        mpimp.recv(1, comm, tag=7, timeout=0.5)
        print("no deadline", flush=True)
    except mpimp.DeadlineError:
        print("deadline", flush=True)
    comm.Barrier()
    for k in range(2):
        got = mpimp.recv(1, comm, tag=7, timeout=20)
        print("repeat", k, tuple(got.shape), bool(torch.equal(got, q + k)), flush=True)
"""


def test_a_deadline_in_the_middle_of_a_framed_message_keeps_the_channel_readable() -> None:
    """The receive of a channel's first framed message times out while its bytes are still
    moving (no CMA: they move only while the sleeping sender calls MPI); the sender has
    already remembered its header, and so does the receiver (the abandoned receive is
    completed before the next message is read): the raw repeats that follow decode."""
    from conftest import mpirun

    done = mpirun(2, sys.executable, "-c", _DEADLINE_MIDWAY, timeout=120, MPIMP_TIMEOUT="30",
                  OMPI_MCA_smsc="^cma")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "repeat 0 (3, 5000) True" in lines and "repeat 1 (3, 5000) True" in lines, done.stdout
    assert "deadline" in lines, done.stdout  # the first receive did time out mid-message


_ONE_DEADLINE = """
import time, torch
from mpi4py import MPI
import mpimp
comm = MPI.COMM_WORLD.Dup()
q = torch.arange(15000, dtype=torch.float32)
comm.Barrier()
if comm.Get_rank() == 1:
    time.sleep(0.6)  # the envelope arrives after 0.6 s ...
    r = mpimp.isend(q, 0, comm, tag=8)
    time.sleep(3.0)  # ... and its bytes do not move (no CMA, no MPI calls here)
    r.wait()
else:
    r = mpimp.irecv(1, comm, tag=8)
    start = time.monotonic()
    try:
        r.wait(timeout=1.0)
        print("no deadline", flush=True)
    except mpimp.DeadlineError:
        print(f"deadline after {time.monotonic() - start:.2f}", flush=True)
    print("then", bool(torch.equal(r.wait(timeout=20), q)), flush=True)
"""


def test_an_irecv_wait_has_one_deadline_for_envelope_and_bytes() -> None:
    """wait(timeout=t) of an irecv whose envelope arrives late and whose bytes then stall
    raises after t, not after the envelope's wait plus a second t; the request still
    completes afterwards."""
    from conftest import mpirun

    done = mpirun(2, sys.executable, "-c", _ONE_DEADLINE, timeout=120, MPIMP_TIMEOUT="30",
                  OMPI_MCA_smsc="^cma")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    after = [float(x.split()[-1]) for x in lines if x.startswith("deadline after")]
    assert after and 0.9 <= after[0] < 1.4, done.stdout
    assert "then True" in lines, done.stdout


_STALE_TRANSFER = """
import time, torch
from mpi4py import MPI
import mpimp
from mpimp import comm as transport
comm = MPI.COMM_WORLD.Dup()
n = 1 << 20
q = torch.arange(n // 4, dtype=torch.float32)
if comm.Get_rank() == 1:
    mpimp.send(q, 0, comm, tag=9)  # framed: both ends remember the header
    comm.Barrier()
    r = mpimp.isend(q + 1, 0, comm, tag=9)  # a raw repeat ...
    time.sleep(3.0)  # ... whose bytes stall (no CMA, no MPI calls here)
    r.wait()
    comm.Barrier()
else:
    mpimp.recv(1, comm, tag=9)
    comm.Barrier()
    addrs = []
    take = transport._RECV_POOL.take_array
    def recording(k):
        a = take(k)
        addrs.append(a.ctypes.data)
        return a
    transport._RECV_POOL.take_array = recording
    r = mpimp.irecv(1, comm, tag=9)  # lands in a pooled buffer
    try:
        r.wait(timeout=0.5)
        print("no deadline", flush=True)
    except mpimp.DeadlineError:
        print("deadline", flush=True)
    del r  # given up
    fresh = take(n)
    print("reused" if fresh.ctypes.data == addrs[-1] else "fresh buffer", flush=True)
    del fresh
    comm.Barrier()  # the sender calls MPI again: the stale transfer completes
    buf = transport._ABANDONED[0][1][0]  # (request, (its buffer, staging, out))
    start = time.monotonic()
    while transport._ABANDONED and time.monotonic() - start < 10:
        transport._reap()
    print("landed", bool(torch.equal(torch.from_numpy(buf).view(torch.float32), q + 1)), flush=True)
    print("reaped", not transport._ABANDONED, flush=True)
"""


def test_a_stale_transfer_keeps_its_pooled_buffer_until_it_completes() -> None:
    """An irecv into a pooled buffer that passes its deadline while its bytes still move,
    and is then dropped, keeps that buffer out of the pool until MPI completes the
    transfer (it was handed to the next receive of that size while the stale bytes could
    still land in it), then releases it."""
    from conftest import mpirun

    done = mpirun(2, sys.executable, "-c", _STALE_TRANSFER, timeout=120, MPIMP_TIMEOUT="30",
                  OMPI_MCA_smsc="^cma")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for expected in ("deadline", "fresh buffer", "landed True", "reaped True"):
        assert expected in lines, done.stdout


@pytest.mark.mpi(min_size=1)
def test_a_receive_whose_buffer_fails_keeps_its_message_and_the_channel(
        comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    """A framed message whose receive buffer cannot be allocated (MemoryError, a device out
    of memory) stays matched: the irecv raises, the next wait() receives it, and the
    channel then reads the raw repeat that follows (the message was lost, and every later
    receive of the channel failed on its half-classified state)."""
    dst, src = ring(comm)
    big = torch.arange(40_000, dtype=torch.float32).reshape(200, 200)  # 160 KB: a pooled buffer
    r1 = mpimp.irecv(src, comm, tag=95)
    sends = [mpimp.isend(big, dst, comm, tag=95)]
    failed = _fail_allocations(monkeypatch, 1)
    with pytest.raises(MemoryError):
        r1.wait(timeout=10)
    assert failed
    got = r1.wait(timeout=10)  # the same message, received now
    assert torch.equal(got, big)
    sends.append(mpimp.isend(big + 1, dst, comm, tag=95))  # a raw repeat of its header
    assert torch.equal(mpimp.recv(src, comm, tag=95, timeout=10), big + 1)
    mpimp.wait_all(sends, timeout=10)


def test_a_message_after_one_whose_buffer_failed_is_read_by_that_ones_header(
        comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    """The channel knows shape (400, 100); a framed (200, 200) message (the same byte
    count) fails its buffer; before its receive tries again, a raw repeat of (200, 200)
    arrives and another receive takes it: it must be read as (200, 200), by the failed
    message's header (it was read as (400, 100) when the failed receive handed the
    channel back its old shape)."""
    dst, src = ring(comm)
    rank = comm.Get_rank()
    old = make(torch.float32, (400, 100), 7 * rank)
    first = mpimp.isend(old, dst, comm, tag=96)
    assert same(mpimp.recv(src, comm, tag=96, timeout=10), make(torch.float32, (400, 100), 7 * src))
    first.wait()
    big = make(torch.float32, (200, 200), 7 * rank + 1)
    r1 = mpimp.irecv(src, comm, tag=96)
    sends = [mpimp.isend(big, dst, comm, tag=96)]
    _fail_allocations(monkeypatch, 1)
    with pytest.raises(MemoryError):
        r1.wait(timeout=10)
    sends.append(mpimp.isend(big + 1, dst, comm, tag=96))  # raw: the sender's last was (200, 200)
    assert same(mpimp.recv(src, comm, tag=96, timeout=10), make(torch.float32, (200, 200), 7 * src + 1) + 1)
    assert same(r1.wait(timeout=10), make(torch.float32, (200, 200), 7 * src + 1))
    mpimp.wait_all(sends, timeout=10)


def _fail_allocations(monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """Make the next ``times`` pooled receive buffers fail (MemoryError); the sizes asked."""
    take = transport._RECV_POOL.take_array
    failed: list[int] = []

    def take_or_fail(n: int) -> object:
        if len(failed) < times:
            failed.append(n)
            raise MemoryError(f"no room for {n} bytes")
        return take(n)

    monkeypatch.setattr(transport._RECV_POOL, "take_array", take_or_fail)
    return failed


def test_a_raw_repeat_whose_buffer_failed_keeps_its_shape_when_posted_later(
        comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw repeat of (200, 200) fails its buffer; the next message, framed (400, 100) of
    the same byte count, is received meanwhile; the raw repeat, posted again, is still
    read as (200, 200) (it was classified again and read as (400, 100))."""
    dst, src = ring(comm)
    rank = comm.Get_rank()
    a, b = make(torch.float32, (200, 200), 11 * rank), make(torch.float32, (400, 100), 11 * rank + 1)
    sends = [mpimp.isend(a, dst, comm, tag=97)]
    assert same(mpimp.recv(src, comm, tag=97, timeout=10), make(torch.float32, (200, 200), 11 * src))
    sends += [mpimp.isend(a + 1, dst, comm, tag=97), mpimp.isend(b, dst, comm, tag=97)]
    failed = _fail_allocations(monkeypatch, 1)
    r1 = mpimp.irecv(src, comm, tag=97)
    with pytest.raises(MemoryError):
        r1.wait(timeout=10)
    assert failed == [160000]
    assert same(mpimp.recv(src, comm, tag=97, timeout=10), make(torch.float32, (400, 100), 11 * src + 1))
    assert same(r1.wait(timeout=10), make(torch.float32, (200, 200), 11 * src) + 1)
    mpimp.wait_all(sends, timeout=10)


def test_a_channel_whose_order_is_lost_says_so_instead_of_misreading(
        comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Framed (400, 100), framed (200, 200), then a raw repeat of (200, 200); the first
    message's buffer fails, and again when the second message's receive posts it first.
    The second message can then not be classified before the third: the third's receive
    raises TransportError (it was read as (400, 100), silently), and so does the second's;
    their messages are drained, so the sends complete; the first message is still
    received by its own receive once memory is back."""
    dst, src = ring(comm)
    rank = comm.Get_rank()
    m0, m1 = make(torch.float32, (400, 100), 13 * rank), make(torch.float32, (200, 200), 13 * rank + 1)
    r0, r1 = mpimp.irecv(src, comm, tag=98), mpimp.irecv(src, comm, tag=98)
    sends = [mpimp.isend(m0, dst, comm, tag=98), mpimp.isend(m1, dst, comm, tag=98),
             mpimp.isend(m1 + 1, dst, comm, tag=98)]
    failed = _fail_allocations(monkeypatch, 2)
    with pytest.raises(MemoryError):
        r0.wait(timeout=10)
    with pytest.raises(MemoryError):
        r1.wait(timeout=10)  # its classification posts r0's message first, which fails again
    assert len(failed) == 2
    with pytest.raises(mpimp.TransportError, match="lost its state"):
        mpimp.recv(src, comm, tag=98, timeout=10)
    assert same(r0.wait(timeout=10), make(torch.float32, (400, 100), 13 * src))
    for _ in range(2):  # its message was drained: every wait says so
        with pytest.raises(mpimp.TransportError, match="lost its state"):
            r1.wait(timeout=10)
    mpimp.wait_all(sends, timeout=10)  # (every message was taken off the wire)


def test_a_blocking_recv_that_fails_on_a_lost_channel_takes_its_message_off_the_wire(
        comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, with a blocking recv for the second message: it raises (the first
    message's buffer failed again), and its message must not stay on the wire (its
    sender waited until its deadline); the third receive raises TransportError."""
    dst, src = ring(comm)
    rank = comm.Get_rank()
    m0, m1 = make(torch.float32, (400, 100), 17 * rank), make(torch.float32, (200, 200), 17 * rank + 1)
    r0 = mpimp.irecv(src, comm, tag=99)
    sends = [mpimp.isend(m0, dst, comm, tag=99), mpimp.isend(m1, dst, comm, tag=99),
             mpimp.isend(m1 + 1, dst, comm, tag=99)]
    _fail_allocations(monkeypatch, 2)
    with pytest.raises(MemoryError):
        r0.wait(timeout=10)
    with pytest.raises(MemoryError):
        mpimp.recv(src, comm, tag=99, timeout=10)
    with pytest.raises(mpimp.TransportError, match="lost its state"):
        mpimp.recv(src, comm, tag=99, timeout=10)
    assert same(r0.wait(timeout=10), make(torch.float32, (400, 100), 17 * src))
    mpimp.wait_all(sends, timeout=10)
