"""Tensor transport: point-to-point and collectives, checked against single-process references.

Every multi-rank test builds each rank's tensors deterministically from the rank (a seeded
generator), so any rank can compute what every other rank holds and therefore the exact
expected result of a message or a reduction.  Point-to-point tests use the ring
``r -> r+1 (mod p)``; at one rank that is a send to oneself, which MPI supports.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import child_env
from mpi4py import MPI

import mpimp
from mpimp import comm as transport

DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
    torch.bool, torch.complex64, torch.complex128,
]
# 0-dim, empty, small (packed path) and large (> 32 KiB: zero-copy struct datatype path)
SHAPES = [(), (0,), (3, 0, 2), (5, 7), (200, 201)]


def make(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The tensor with this seed: identical on every rank that asks for it."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, shape, generator=g).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def ring(comm: MPI.Comm) -> tuple[int, int]:
    """(destination, source) of this rank on the ring r -> r+1."""
    p, r = comm.Get_size(), comm.Get_rank()
    return (r + 1) % p, (r - 1) % p


def exchange(obj: object, comm: MPI.Comm, tag: int = 0, **recv_kwargs: object) -> object:
    dst, src = ring(comm)
    req = mpimp.isend(obj, dst, comm, tag=tag)
    try:
        return mpimp.recv(src, comm, tag=tag, **recv_kwargs)
    finally:  # even when recv raises: the send must complete before its buffer may be freed
        req.wait()


# ----------------------------------------------------------------------------- point-to-point

@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_send_recv_every_dtype_and_shape(comm: MPI.Comm, dtype: torch.dtype) -> None:
    _, src = ring(comm)
    for k, shape in enumerate(SHAPES):
        mine = make(dtype, shape, seed=1000 * comm.Get_rank() + k)
        got = exchange(mine, comm, tag=k)
        assert isinstance(got, torch.Tensor)
        assert same(got, make(dtype, shape, seed=1000 * src + k)), (dtype, shape)
        assert got.is_contiguous()
        # blocking send on the other side of the ring
        if comm.Get_size() > 1:
            if comm.Get_rank() % 2 == 0:
                mpimp.send(mine, ring(comm)[0], comm, tag=50 + k)
                got = mpimp.recv(src, comm, tag=50 + k)
            else:
                got = mpimp.recv(src, comm, tag=50 + k)
                mpimp.send(mine, ring(comm)[0], comm, tag=50 + k)
            assert same(got, make(dtype, shape, seed=1000 * src + k))


def _blocks(spec: list) -> list[tuple[int, int]]:
    """(address, nbytes) of each block of a struct-datatype message spec."""
    assert spec[0] is MPI.BOTTOM and spec[1] == 1
    integers, addresses, _, _ = spec[2].Get_contents()  # struct: [count, *blocklengths], displacements
    return list(zip(addresses, integers[1:]))


@pytest.mark.mpi(min_size=1)
def test_both_wire_paths_are_one_message() -> None:
    small = make(torch.float32, (5, 7), 0)
    large = make(torch.float32, (200, 201), 0)
    spec, _, _ = transport._messages([small], False)
    assert isinstance(spec[0], bytearray) and spec[1] == len(spec[0])  # packed: header + payload
    spec, _, payload = transport._messages([large, small], True)
    assert payload == large.nbytes + small.nbytes
    blocks = _blocks(spec)  # one message: header, the tensors' own memory, padding between
    assert (large.data_ptr(), large.nbytes) in blocks and (small.data_ptr(), small.nbytes) in blocks


@pytest.mark.mpi(min_size=1)
def test_tuples_round_trip_and_stay_tuples(comm: MPI.Comm) -> None:
    _, src = ring(comm)

    def parts(rank: int) -> tuple[torch.Tensor, ...]:
        return (
            make(torch.bfloat16, (100, 300), 10 * rank),  # large: struct path with padding
            make(torch.int64, (), 10 * rank + 1),
            make(torch.bool, (0, 4), 10 * rank + 2),
            make(torch.complex64, (3,), 10 * rank + 3),
            make(torch.float16, (7, 1, 3), 10 * rank + 4),
        )

    for tag, build in enumerate([
        parts,  # large + small mixed
        lambda r: parts(r)[1:],  # all small: packed path
        lambda r: (make(torch.float32, (4,), r),),  # a 1-tuple stays a 1-tuple
        lambda r: (make(torch.float64, (9000,), r),),  # large 1-tuple
        lambda r: (),  # the empty tuple
    ]):
        got = exchange(build(comm.Get_rank()), comm, tag=tag)
        want = build(src)
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            assert same(g, w)
    # a list is sent as a tuple; a bare tensor arrives bare
    got = exchange([make(torch.int8, (3,), comm.Get_rank())], comm, tag=9)
    assert isinstance(got, tuple) and same(got[0], make(torch.int8, (3,), src))
    got = exchange(make(torch.int8, (3,), comm.Get_rank()), comm, tag=10)
    assert isinstance(got, torch.Tensor)


@pytest.mark.mpi(min_size=1)
def test_shapes_and_dtypes_change_between_messages_on_one_tag(comm: MPI.Comm) -> None:
    dst, src = ring(comm)
    plan = [(torch.float32, (2, 3)), (torch.bfloat16, (50000,)), (torch.int64, ()),
            (torch.float32, (0,)), (torch.complex128, (4, 4, 4)), (torch.uint8, (33000,)),
            (torch.float32, (2, 3))]
    sends = [mpimp.isend(make(d, s, 100 * comm.Get_rank() + i), dst, comm, tag=3)
             for i, (d, s) in enumerate(plan)]
    for i, (d, s) in enumerate(plan):  # MPI keeps messages of one (source, tag) in order
        assert same(mpimp.recv(src, comm, tag=3), make(d, s, 100 * src + i))
    mpimp.wait_all(sends)


@pytest.mark.mpi(min_size=1)
def test_non_contiguous_tensors_are_sent_correctly(comm: MPI.Comm) -> None:
    _, src = ring(comm)

    def views(rank: int) -> list[torch.Tensor]:
        base = make(torch.float32, (64, 300), rank)
        return [base.t(), base[:, ::3], base[::2, 5:], make(torch.int16, (3,), rank).expand(4, 3),
                make(torch.bfloat16, (4, 5), rank).t()]

    for tag, (mine, want) in enumerate(zip(views(comm.Get_rank()), views(src))):
        assert not mine.is_contiguous()
        got = exchange(mine, comm, tag=tag)
        assert same(got, want.contiguous())


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("shape", [(4, 4), (40, 50), (300, 100)], ids=["small", "inline", "split"])
def test_recv_into_out(comm: MPI.Comm, shape: tuple[int, int]) -> None:
    _, src = ring(comm)
    mine = make(torch.float32, shape, comm.Get_rank())
    out = torch.full(shape, -1.0)
    got = exchange(mine, comm, tag=1, out=out)
    assert got is out and same(out, make(torch.float32, shape, src))
    # wrong size: the error names what out is and what the message holds
    wrong = torch.empty(shape[0] + 1)
    with pytest.raises(mpimp.TransportError) as err:
        exchange(mine, comm, tag=2, out=wrong)
    assert f"float32[{shape[0] + 1}]" in str(err.value) and f"float32[{shape[0]}, {shape[1]}]" in str(err.value)
    # wrong dtype, same number of bytes
    with pytest.raises(mpimp.TransportError) as err:
        exchange(mine, comm, tag=3, out=torch.empty(shape, dtype=torch.int32))
    assert f"int32[{shape[0]}, {shape[1]}]" in str(err.value) and f"float32[{shape[0]}, {shape[1]}]" in str(err.value)
    # a larger message than out (the receive is sized from the probe: nothing truncates it)
    smaller = torch.empty(shape[0] - 1, shape[1])
    with pytest.raises(mpimp.TransportError) as err:
        exchange(mine, comm, tag=5, out=smaller)
    assert f"out is float32[{shape[0] - 1}, {shape[1]}] but the message holds float32[{shape[0]}, {shape[1]}]" \
        in str(err.value)
    # the failed receives consumed their messages: the next one arrives intact
    got = exchange(mine * 2, comm, tag=4, out=torch.empty(shape))
    assert same(got, make(torch.float32, shape, src) * 2)


def test_unsupported_dtype_raises_config_error_naming_it() -> None:
    bad = [d for d in (getattr(torch, "uint16", None), getattr(torch, "uint32", None),
                       getattr(torch, "float8_e4m3fn", None)) if d is not None]
    assert bad, "this torch has none of uint16, uint32, float8_e4m3fn"
    comm = MPI.COMM_SELF
    for dtype in bad:
        t = torch.zeros(4, dtype=dtype)
        name = str(dtype).removeprefix("torch.")
        for call, arg in ((mpimp.isend, t), (mpimp.isend, (torch.ones(2), t)),
                          (mpimp.all_reduce, t), (mpimp.broadcast, t), (mpimp.all_gather, t)):
            with pytest.raises(mpimp.ConfigError, match=name):
                call(arg, 0, comm) if call is mpimp.isend else call(arg, comm)
    assert comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG) is False  # nothing was sent


@pytest.mark.mpi(min_size=1)
def test_many_outstanding_requests_completed_in_reverse_order(comm: MPI.Comm) -> None:
    dst, src = ring(comm)
    n = 24
    sizes = [(i * 997) % 20000 for i in range(n)]  # mixes packed and struct paths
    recvs = [mpimp.irecv(src, comm, tag=100 + i) for i in range(n)]
    sends = [mpimp.isend(make(torch.float32, (sizes[i],), 1000 * comm.Get_rank() + i), dst, comm,
                         tag=100 + i) for i in range(n)]
    results = mpimp.wait_all(list(reversed(recvs + sends)))
    got = list(reversed(results))[:n]
    for i in range(n):
        assert same(got[i], make(torch.float32, (sizes[i],), 1000 * src + i))
    assert all(r is None for r in results[:n])  # sends complete with None
    assert all(r.test() for r in recvs + sends)


@pytest.mark.mpi(min_size=1)
def test_test_polls_without_blocking(comm: MPI.Comm) -> None:
    dst, src = ring(comm)
    req = mpimp.irecv(src, comm, tag=21)
    assert req.test() is False  # nobody has sent yet: every send comes after the barrier
    comm.Barrier()
    send = mpimp.isend(make(torch.int32, (40000,), comm.Get_rank()), dst, comm, tag=21)
    start = time.monotonic()
    while not req.test():
        send.test()
        assert time.monotonic() - start < 60
    assert req.test() is True
    assert same(req.wait(), make(torch.int32, (40000,), src))
    send.wait()


@pytest.mark.mpi(min_size=1)
def test_recv_without_sender_raises_deadline_error(comm: MPI.Comm) -> None:
    _, src = ring(comm)
    rank = MPI.COMM_WORLD.Get_rank()
    start = time.monotonic()
    with pytest.raises(mpimp.DeadlineError) as err:
        mpimp.recv(src, comm, tag=777, timeout=0.5)
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 30
    text = str(err.value)
    assert f"rank {rank}:" in text and f"from rank {src}" in text and "tag 777" in text
    with pytest.raises(mpimp.DeadlineError, match="tag 778"):
        mpimp.irecv(src, comm, tag=778).wait(timeout=0.2)
    comm.Barrier()


# ----------------------------------------------------------------------------- collectives

def _reference(values: list[torch.Tensor], op: str) -> torch.Tensor:
    stack = torch.stack([v.to(torch.float64 if v.is_floating_point() else v.dtype) for v in values])
    if op == "sum":
        return stack.sum(0)
    if op == "avg":
        return stack.sum(0) / len(values)
    if op == "prod":
        return stack.prod(0)
    if op == "max":
        return stack.max(0).values
    return stack.min(0).values


def _operand(dtype: torch.dtype, shape: tuple[int, ...], rank: int, op: str) -> torch.Tensor:
    t = make(dtype, shape, seed=7000 + rank)
    if op == "prod":  # keep products of up to 4 ranks in range
        t = (t.remainder(5) - 2) if not t.is_floating_point() else 1 + 0.25 * t
    elif not t.is_floating_point():
        # no overflow: signed overflow is undefined in MPI (Open MPI's vectorised int8 sum
        # saturates some elements and wraps others)
        t = t.remainder(61) - 30
    return t


def _assert_reduced(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> None:
    """Floats: within a few roundings of the magnitude summed (order of summation differs)."""
    if got.dtype.is_floating_point:
        eps = torch.finfo(got.dtype).eps
        err = (got.double() - want.double()).abs()
        assert bool((err <= 4 * eps * scale + 1e-300).all()), float((err / scale).max())
    else:
        assert torch.equal(got, want.to(got.dtype))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("op", ["sum", "max", "min", "prod", "avg"])
def test_all_reduce_matches_the_reference(comm: MPI.Comm, op: str) -> None:
    p, rank = comm.Get_size(), comm.Get_rank()
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    if op != "avg":
        dtypes += [torch.int64, torch.int32, torch.int8]
    for dtype in dtypes:
        for shape in [(), (0,), (17,), (64, 300), (256, 300)]:  # the last: blocking path
            mine = _operand(dtype, shape, rank, op)
            want = _reference([_operand(dtype, shape, r, op) for r in range(p)], op)
            scale = _reference([_operand(dtype, shape, r, op).abs() for r in range(p)],
                               "sum" if op in ("sum", "avg") else "max")
            got = mpimp.all_reduce(mine, comm, op=op)
            assert got is mine and got.dtype == dtype and got.shape == want.shape
            _assert_reduced(got, want, scale.abs() if op != "prod" else want.abs())


@pytest.mark.mpi(min_size=1)
def test_all_reduce_non_contiguous_and_non_blocking(comm: MPI.Comm) -> None:
    p, rank = comm.Get_size(), comm.Get_rank()
    base = make(torch.float64, (8, 10), rank)
    view = base[:, ::2]
    req = mpimp.iall_reduce(view, comm, op="sum")
    got = req.wait()
    want = sum(make(torch.float64, (8, 10), r) for r in range(p))
    assert got is view
    torch.testing.assert_close(base[:, ::2], want[:, ::2], rtol=1e-12, atol=0)
    assert torch.equal(base[:, 1::2], make(torch.float64, (8, 10), rank)[:, 1::2])  # untouched


def _half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of ``dtype`` at the magnitude of ``x`` (fp64 tensor)."""
    bits = {torch.bfloat16: 8, torch.float16: 11}[dtype]
    tiny = {torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}[dtype]
    _, e = torch.frexp(x)
    return torch.clamp(torch.pow(2.0, (e - bits).double()), min=tiny) / 2


def _assert_rounded_once(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    err = (got.double() - exact).abs()
    bound = _half_ulp(exact, dtype) * 1.001
    assert bool((err <= bound).all()), f"error {float((err / bound).max()):.2f} half-ulps > 1"


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_sums_are_numerically_sound(comm: MPI.Comm, dtype: torch.dtype,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit sums against the exact (fp64) sum of every rank's values.

    * Over 2 ranks (one combining step) any sound implementation rounds once.
    * The fp32 path (no native operator) rounds once over the whole communicator.
    * Whatever operator is active, over p ranks the error stays within p-1 roundings at the
      magnitude of sum |x_r| (one per combining step of a tree or ring).
    Element 0 is adversarial: 2**bits on even ranks, 1 on odd ones.  Accumulating in the
    16-bit type with truncation, or in a narrower type, fails the one-rounding checks.
    """
    p, rank = comm.Get_size(), comm.Get_rank()
    bits = {torch.bfloat16: 8, torch.float16: 11}[dtype]

    def operand(r: int) -> torch.Tensor:
        t = torch.cat([make(torch.float64, (4000,), 50 + r) * 10.0 ** (r % 3),
                       make(torch.float64, (4000,), 60 + r) * 1e-3]).to(dtype)
        t[0] = 2.0 ** bits if r % 2 == 0 else 1.0
        return t

    pair = comm.Split(rank // 2, rank)  # ranks {0,1}, {2,3}, ... (a lone last rank at odd p)
    try:
        first, q = rank - pair.Get_rank(), pair.Get_size()
        exact = sum(operand(r).double() for r in range(first, first + q))  # exact in fp64
        _assert_rounded_once(mpimp.all_reduce(operand(rank), pair), exact, dtype)
        _assert_rounded_once(mpimp.all_reduce(operand(rank), pair, op="avg"), exact / q, dtype)
    finally:
        pair.Free()

    exact = sum(operand(r).double() for r in range(p))
    scale = sum(operand(r).double().abs() for r in range(p))
    got = mpimp.all_reduce(operand(rank), comm)
    err = (got.double() - exact).abs()
    assert bool((err <= (p - 1) * _half_ulp(scale, dtype) * 1.001).all())

    monkeypatch.setattr(transport, "_reduce16_op", lambda *args, **kwargs: None)  # fp32 path
    _assert_rounded_once(mpimp.all_reduce(operand(rank), comm), exact, dtype)
    _assert_rounded_once(mpimp.all_reduce(operand(rank), comm, op="avg"), exact / p, dtype)


@pytest.mark.mpi(min_size=1)
def test_reduce_scatter_matches_the_reference(comm: MPI.Comm) -> None:
    p, rank = comm.Get_size(), comm.Get_rank()
    for dtype, op in [(torch.float32, "sum"), (torch.float64, "avg"), (torch.int64, "max"),
                      (torch.bfloat16, "sum"), (torch.float16, "avg")]:
        for rows in (2 * p, p):
            shape = (rows, 3, 5)
            mine = make(dtype, shape, 300 + rank)
            want = _reference([make(dtype, shape, 300 + r) for r in range(p)], op)
            k = rows // p
            got = mpimp.reduce_scatter(mine, comm, op=op)
            assert got.dtype == dtype and got.shape == (k, 3, 5)
            scale = _reference([make(dtype, shape, 300 + r).abs() for r in range(p)], "sum")
            rows_k = slice(rank * k, (rank + 1) * k)
            _assert_reduced(got, want[rows_k], scale[rows_k])
            assert torch.equal(mine, make(dtype, shape, 300 + rank))  # input untouched


@pytest.mark.mpi(min_size=1)
def test_reduce_scatter_rejects_a_non_divisible_dim_0(comm: MPI.Comm) -> None:
    p = comm.Get_size()
    with pytest.raises(mpimp.ConfigError, match=f"divisible by {p}"):
        mpimp.reduce_scatter(torch.ones(()), comm)
    if p > 1:
        with pytest.raises(mpimp.ConfigError, match=rf"divisible by {p} ranks, got shape \[{p + 1}, 2\]"):
            mpimp.reduce_scatter(torch.ones(p + 1, 2), comm)
    # nothing is left half-collective: a real one still works
    assert torch.equal(mpimp.reduce_scatter(torch.ones(p, 2), comm), torch.full((1, 2), float(p)))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.int64])
def test_all_gather_along_dim_0_and_1(comm: MPI.Comm, dtype: torch.dtype) -> None:
    p, rank = comm.Get_size(), comm.Get_rank()
    parts = [make(dtype, (3, 4, 2), 400 + r) for r in range(p)]
    for dim in (0, 1, -1):
        got = mpimp.all_gather(parts[rank], comm, dim=dim)
        assert same(got, torch.cat(parts, dim=dim))
    scalars = [make(dtype, (), 500 + r) for r in range(p)]
    assert same(mpimp.all_gather(scalars[rank], comm), torch.stack(scalars))
    big = [make(dtype, (20000,), 600 + r) for r in range(p)]
    assert same(mpimp.all_gather(big[rank], comm), torch.cat(big))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64, torch.uint8])
def test_broadcast_from_the_last_rank(comm: MPI.Comm, dtype: torch.dtype) -> None:
    p, rank = comm.Get_size(), comm.Get_rank()
    root = p - 1
    for shape in [(), (6, 5), (300, 70)]:
        mine = make(dtype, shape, 800 + rank)
        got = mpimp.broadcast(mine, comm, root=root)
        assert got is mine and same(got, make(dtype, shape, 800 + root))
    base = make(dtype, (6, 8), 900 + rank)
    view = base[:, 1::2]  # non-contiguous target: written in place
    mpimp.broadcast(view, comm, root=root)
    assert same(base[:, 1::2], make(dtype, (6, 8), 900 + root)[:, 1::2])
    assert same(base[:, ::2], make(dtype, (6, 8), 900 + rank)[:, ::2])


@pytest.mark.mpi(min_size=1)
def test_collective_option_errors_are_raised_before_communicating(comm: MPI.Comm) -> None:
    with pytest.raises(mpimp.ConfigError, match="op='mean'"):
        mpimp.all_reduce(torch.ones(3), comm, op="mean")
    with pytest.raises(mpimp.ConfigError, match="avg"):
        mpimp.all_reduce(torch.ones(3, dtype=torch.int64), comm, op="avg")
    with pytest.raises(mpimp.ConfigError, match="bool"):
        mpimp.all_reduce(torch.ones(3, dtype=torch.bool), comm)
    with pytest.raises(mpimp.ConfigError, match="complex"):
        mpimp.all_reduce(torch.ones(3, dtype=torch.complex64), comm, op="max")
    mpimp.barrier(comm, timeout=60)
    want = torch.full((3,), float(comm.Get_size()))
    assert torch.equal(mpimp.all_reduce(torch.ones(3), comm), want)


# ----------------------------------------------------------------------------- zero copy, tracing

@pytest.mark.mpi(min_size=1)
@pytest.mark.mpi(min_size=1)
def test_packed_large_sends_are_one_contiguous_buffer(comm: MPI.Comm) -> None:
    """pack=True: a large message is copied into one buffer (receivers can pull it alone)."""
    dst, src = ring(comm)
    big = make(torch.float32, (300, 301), comm.Get_rank())
    spec, keep, payload = transport._messages([big], False, pack=True)
    assert isinstance(spec[0], bytearray) and spec[1] == len(spec[0]) > payload == big.nbytes
    req = mpimp.isend((big, big[:3]), dst, comm, tag=77, pack=True)
    got = mpimp.recv(src, comm, tag=77)
    req.wait()
    ref = make(torch.float32, (300, 301), src)
    assert isinstance(got, tuple) and same(got[0], ref) and same(got[1], ref[:3])


def test_large_contiguous_sends_use_the_tensors_own_memory() -> None:
    """Above the pack limit the message's datatype points at each tensor's memory: no payload copy."""
    a = make(torch.float32, (1 << 20,), 1)  # 4 MiB
    b = make(torch.bfloat16, (3, 50000), 2)
    empty = torch.empty(0, 5)
    spec, keep, payload = transport._messages([a, empty, b], True)
    assert payload == a.numel() * 4 + b.numel() * 2
    blocks = _blocks(spec)
    assert blocks[0][1] < 256  # the header block carries no payload
    big = [blk for blk in blocks if blk[1] > 64]
    assert big[1:] == [(a.data_ptr(), a.nbytes), (b.data_ptr(), b.nbytes)]
    assert sum(n for _, n in blocks) < payload + 512  # nothing else of any size travels


def test_struct_datatypes_are_cached_by_address_and_evicted() -> None:
    """A repeated large send reuses its committed datatype; other memory gets its own; the cache is bounded."""
    a = make(torch.float32, (1 << 17,), 1)
    b = make(torch.float32, (1 << 17,), 2)
    first = transport._messages([a], False)[0][2]
    assert transport._messages([a], False)[0][2] is first  # same memory and shape: same type
    other = transport._messages([b], False)[0][2]
    assert other is not first and _blocks([transport.MPI.BOTTOM, 1, other])[-1] == (b.data_ptr(), b.nbytes)
    cache = transport._TypeCache(limit=2)
    built = []

    def blocks(t: torch.Tensor):  # noqa: ANN202 - test helper
        def make_blocks():  # noqa: ANN202
            built.append(t.data_ptr())
            return [(t.data_ptr(), t.nbytes)], None
        return make_blocks

    c = make(torch.float32, (64,), 3)
    t1, _ = cache.get(("a",), blocks(a))
    cache.get(("b",), blocks(b))
    cache.get(("a",), blocks(a))
    cache.get(("c",), blocks(c))  # evicts and frees the oldest entry ("a")
    assert built == [a.data_ptr(), b.data_ptr(), c.data_ptr()]
    assert t1 == transport.MPI.DATATYPE_NULL  # Free() resets the handle
    cache.get(("a",), blocks(a))
    assert built[-1] == a.data_ptr() and len(built) == 4


def test_mpimp_debug_traces_every_call_on_stderr() -> None:
    script = (
        "import torch, mpimp\n"
        "from mpi4py import MPI\n"
        "c = MPI.COMM_WORLD\n"
        "q = mpimp.isend(torch.ones(3), 0, c, tag=5)\n"
        "assert torch.equal(mpimp.recv(0, c, tag=5), torch.ones(3))\n"
        "q.wait()\n"
        "mpimp.all_reduce(torch.ones(2), c)\n"
    )
    quiet = subprocess.run([sys.executable, "-c", script], env=child_env(MPIMP_DEBUG="0"),
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    assert "Isend" not in quiet.stderr
    loud = subprocess.run([sys.executable, "-c", script], env=child_env(MPIMP_DEBUG="1"),
                          capture_output=True, text=True, timeout=120)
    assert loud.returncode == 0, loud.stderr
    lines = loud.stderr.splitlines()
    assert any(line.startswith("r0 | Isend -> 0 tag 5") for line in lines), loud.stderr
    assert any(line.startswith("r0 | Recv <- 0 tag 5") for line in lines), loud.stderr  # blocking recv
    assert not any("Recv <- 0 tag 5" in line and "Irecv" in line for line in lines)  # the fast path: one line
    assert any(line.startswith("r0 | Allreduce 2 x torch.float32 op sum") for line in lines), loud.stderr


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("shape", [(3,), (300, 100)], ids=["small", "large"])
def test_receives_on_one_tag_match_in_posting_order(comm: MPI.Comm, shape: tuple[int, ...]) -> None:
    """Like MPI's posted receives: the first irecv gets the first message, whichever is waited
    on first, with or without out= (a large out= is otherwise posted up front)."""
    dst, src = ring(comm)
    rank = comm.Get_rank()

    def sent(k: int, who: int) -> torch.Tensor:
        return torch.full(shape, 1000.0 * who + k)

    cases = ("wait later first", "later has out=", "wait_all reversed", "blocking recv after irecv")
    for case_no, case in enumerate(cases):
        tag = 61 + case_no
        r1 = mpimp.irecv(src, comm, tag=tag)
        r2 = mpimp.irecv(src, comm, tag=tag, out=torch.empty(shape)) if case == "later has out=" else None
        if case in ("wait later first", "wait_all reversed"):
            r2 = mpimp.irecv(src, comm, tag=tag)
        sends = [mpimp.isend(sent(k, rank), dst, comm, tag=tag) for k in (1, 2)]
        if case == "wait_all reversed":
            assert r2 is not None
            got2, got1 = mpimp.wait_all([r2, r1])
        elif case == "blocking recv after irecv":
            got2 = mpimp.recv(src, comm, tag=tag)
            got1 = r1.wait()
        else:
            assert r2 is not None
            got2 = r2.wait()
            got1 = r1.wait()
        mpimp.wait_all(sends)
        assert torch.equal(got1, sent(1, src)), case  # type: ignore[arg-type]
        assert torch.equal(got2, sent(2, src)), case  # type: ignore[arg-type]
    left = [r for refs in transport._UNMATCHED.pending.values() for r in (e[0]() for e in refs)]
    assert not [r for r in left if r is not None and 61 <= r.tag < 61 + len(cases)]


@pytest.mark.mpi(min_size=1)
def test_out_receive_of_a_message_with_a_longer_header_names_both(comm: MPI.Comm) -> None:
    dst, src = ring(comm)
    out = torch.empty(300, 100)  # large
    for blocking in (True, False):
        tag = 70 + blocking
        mine = (torch.zeros(100, 100), torch.zeros(10), torch.zeros(10), torch.zeros(10, 1, 1, 1, 1, 1, 1))
        req = mpimp.isend(mine, dst, comm, tag=tag)
        with pytest.raises(mpimp.TransportError, match=r"out is float32\[300, 100\] but the message holds float32\[100, 100\], float32\[10\]"):
            if blocking:
                mpimp.recv(src, comm, tag=tag, out=out)
            else:
                mpimp.irecv(src, comm, tag=tag, out=out).wait()
        req.wait()


@pytest.mark.mpi(min_size=1)
def test_large_receives_reuse_freed_buffers_and_keep_live_ones(comm: MPI.Comm) -> None:
    """recv() of large messages takes its buffer from the pool: a freed result's memory
    serves the next one, a result still alive is never overwritten."""
    dst, src = ring(comm)
    rank = comm.Get_rank()
    shape = (300, 1000)  # 1.2 MB: above the pool's minimum
    kept = []
    reused_before = transport._RECV_POOL.reused
    for i in range(4):
        req = mpimp.isend(make(torch.float32, shape, 100 * rank + i), dst, comm, tag=40)
        got = mpimp.recv(src, comm, tag=40)
        req.wait()
        assert torch.equal(got, make(torch.float32, shape, 100 * src + i))  # the sender's tensor
        if i % 2 == 0:
            kept.append((i, got))  # alive: its memory must stay untouched
        del got
    for i, t in kept:
        assert torch.equal(t, make(torch.float32, shape, 100 * src + i))
    assert transport._RECV_POOL.reused > reused_before  # the dropped results were recycled


@pytest.mark.mpi(min_size=1)
def test_large_message_with_a_long_header_round_trips(comm: MPI.Comm) -> None:
    """A large tuple whose header spans more than 64 bytes (five dimensions, four tensors)."""
    dst, src = ring(comm)
    rank = comm.Get_rank()

    def mine(r: int) -> tuple[torch.Tensor, ...]:
        return (make(torch.float32, (200, 150), r), make(torch.bfloat16, (2, 3, 4, 5, 6), r + 1),
                make(torch.int64, (7, 1, 9, 1, 3, 100), r + 2), torch.empty(0, 4))

    req = mpimp.isend(mine(rank), dst, comm, tag=41)
    got = mpimp.recv(src, comm, tag=41)
    req.wait()
    assert isinstance(got, tuple) and len(got) == 4
    for g, w in zip(got, mine(src)):
        assert same(g, w)


@pytest.mark.mpi(min_size=1)
def test_a_broader_later_receive_is_not_held_up_by_an_earlier_one_still_waiting(comm: MPI.Comm) -> None:
    """MPI gives a message to the earliest posted receive that matches it: an earlier irecv of
    another tag that has no message yet must not hold up a later ANY_TAG / ANY_SOURCE receive
    (that deadlocked when the earlier message is sent only after the later one completes),
    and an earlier wildcard irecv still takes its own first message before a later receive."""
    dst, src = ring(comm)
    early = mpimp.irecv(src, comm, tag=81)  # its message comes last
    sent = [mpimp.isend(torch.tensor([82.0]), dst, comm, tag=82)]
    got = mpimp.recv(src, comm, tag=MPI.ANY_TAG, timeout=10)  # the tag-82 message, at once
    assert got.tolist() == [82.0]
    wild = mpimp.irecv(MPI.ANY_SOURCE, comm, tag=MPI.ANY_TAG)
    sent.append(mpimp.isend(torch.tensor([83.0]), dst, comm, tag=83))
    assert wild.wait(timeout=10).tolist() == [83.0]
    # an earlier ANY_TAG irecv takes the first of two messages, though a later receive names their tag
    first = mpimp.irecv(src, comm, tag=MPI.ANY_TAG)
    sent += [mpimp.isend(torch.tensor([float(k)]), dst, comm, tag=84) for k in (1, 2)]
    assert mpimp.recv(src, comm, tag=84, timeout=10).tolist() == [2.0]
    assert first.wait(timeout=10).tolist() == [1.0]
    sent.append(mpimp.isend(torch.tensor([81.0]), dst, comm, tag=81))
    assert early.wait(timeout=10).tolist() == [81.0]
    mpimp.wait_all(sent)
    left = [r for refs in transport._UNMATCHED.pending.values() for r in (e[0]() for e in refs)]
    assert not [r for r in left if r is not None and r.comm.handle == comm.handle]


class _CountingComm(MPI.Intracomm):
    """The same communicator (same handle), counting matched probes; it fails past ``limit``
    (a probe storm would otherwise run for hours before a timeout stops it)."""

    probes = 0
    limit = 10**9

    def Improbe(self, *args: object, **kwargs: object) -> MPI.Message | None:  # noqa: N802 (MPI's name)
        self.probes += 1
        if self.probes > self.limit:
            raise AssertionError(f"more than {self.limit} matched probes")
        return super().Improbe(*args, **kwargs)


@pytest.mark.mpi(min_size=1)
def test_a_test_of_many_unmatched_receives_probes_each_once(comm: MPI.Comm) -> None:
    """test() of the last of n unmatched irecvs lets each earlier one probe once, oldest
    first (matching the earlier receives recursively took 2**n probes: 45 ms at n = 16,
    hours at n = 40); a wait_all round over all of them probes each pattern once; the
    messages still go to the receives in posting order, a wildcard receive among them
    included."""
    dst, src = ring(comm)
    counting = _CountingComm(comm)
    reqs = [mpimp.irecv(src, counting, tag=91) for _ in range(20)]
    reqs.append(mpimp.irecv(src, counting, tag=MPI.ANY_TAG))  # overlaps all of them
    reqs += [mpimp.irecv(src, counting, tag=91) for _ in range(19)]
    counting.limit = 4 * len(reqs)
    assert not reqs[-1].test()  # no message yet (sent after the barrier)
    assert counting.probes == len(reqs)
    counting.probes = 0
    assert not transport._test_all(reqs)  # one polling round of wait_all over all of them
    assert counting.probes == 2  # once per pattern (tag 91, ANY_TAG), not n (n + 1) / 2 times
    counting.limit = 10**9  # wait_all below polls as long as the messages take
    comm.Barrier()
    sends = [mpimp.isend(torch.tensor([float(k)]), dst, comm, tag=91) for k in range(len(reqs))]
    got = mpimp.wait_all(reqs, timeout=30)
    mpimp.wait_all(sends)
    assert [g.item() for g in got] == [float(k) for k in range(len(reqs))]  # type: ignore[union-attr]


@pytest.mark.mpi(min_size=1)
def test_a_receive_alone_with_its_pattern_does_not_scan_the_others(
        comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    """With many unmatched receives of distinct tags (a pipeline posts a step's receives up
    front), a test() of one looks at no other receive (a scan of the list each: 270 ms per
    wait_all round at 1024 receives); with a wildcard receive pending it does scan, and
    every message still reaches its receive."""
    dst, src = ring(comm)
    scans = []
    earlier = transport._UNMATCHED._earlier
    monkeypatch.setattr(transport._UNMATCHED, "_earlier", lambda r: scans.append(r) or earlier(r))
    reqs = [mpimp.irecv(src, comm, tag=200 + k) for k in range(50)]
    assert not any(r.test() for r in reqs) and not scans
    wild = mpimp.irecv(src, comm, tag=MPI.ANY_TAG)
    assert not reqs[10].test() and scans  # a wildcard could take its message: the order matters
    comm.Barrier()
    sends = [mpimp.isend(torch.tensor([float(k)]), dst, comm, tag=200 + k) for k in range(50)]
    sends.append(mpimp.isend(torch.tensor([-1.0]), dst, comm, tag=99))
    # each tagged message goes to the earlier receive of its tag, the wildcard gets the other one
    assert wild.wait(timeout=10).item() == -1.0  # type: ignore[union-attr]
    got = mpimp.wait_all(reqs, timeout=10)
    assert [g.item() for g in got] == [float(k) for k in range(50)]  # type: ignore[union-attr]
    mpimp.wait_all(sends)


@pytest.mark.mpi(min_size=1)
def test_dropped_unmatched_receives_do_not_pile_up(comm: MPI.Comm) -> None:
    """irecvs dropped before they matched leave the list of unmatched receives (which
    every test() of a receive on the communicator scans) instead of growing it forever;
    a fresh receive still gets its message."""
    dst, src = ring(comm)
    for _ in range(3000):
        mpimp.irecv(src, comm, tag=96)  # dropped at once
    assert len(transport._UNMATCHED.pending.get(comm.handle, [])) <= 64
    r = mpimp.irecv(src, comm, tag=96)
    s = mpimp.isend(torch.ones(3), dst, comm, tag=96)
    assert r.wait(timeout=10).tolist() == [1.0, 1.0, 1.0]  # type: ignore[union-attr]
    s.wait()
    assert not transport._UNMATCHED.pending.get(comm.handle)


@pytest.mark.mpi(min_size=1)
def test_foreign_or_corrupt_messages_raise_transport_error(comm: MPI.Comm) -> None:
    """Bytes another library sent on the same communicator and tag: a TransportError that says
    so (no struct.error, no hang), through every receive path; the next message is intact."""
    import struct as _struct

    dst, src = ring(comm)

    def header(magic: bytes, hlen: int, size: int) -> np.ndarray:
        buf = np.zeros(size, dtype=np.uint8)
        buf[:8] = np.frombuffer(_struct.pack("<4sBBH", magic, 1, 1, hlen), dtype=np.uint8)
        return buf

    cases = {"3 bytes": np.arange(3, dtype=np.uint8), "header length 0": header(b"MPMP", 0, 64),
             "header longer than the message": header(b"MPMP", 200, 64),
             "another magic": header(b"ABCD", 24, 64), "large, another magic": header(b"ABCD", 24, 1 << 20)}
    for k, raw in enumerate(cases.values()):  # (the keys say what each one is)
        for how in ("recv", "irecv"):
            tag = 90 + 2 * k + (how == "irecv")
            req = comm.Isend([raw, MPI.BYTE], dst, tag)
            with pytest.raises(mpimp.TransportError, match=r"too short for an mpimp tensor|not an mpimp tensor"):
                if how == "recv":
                    mpimp.recv(src, comm, tag=tag, timeout=10)
                else:
                    mpimp.irecv(src, comm, tag=tag).wait(timeout=10)
            req.Wait()
    # straight into a large out=: a foreign message of exactly its frame's size
    out = torch.empty(300, 100)
    frame = transport._frame1(out.dtype, tuple(out.shape))[2]
    req = comm.Isend([header(b"ABCD", 24, frame), MPI.BYTE], dst, 120)
    with pytest.raises(mpimp.TransportError, match="not an mpimp tensor"):
        mpimp.recv(src, comm, tag=120, out=out, timeout=10)
    req.Wait()
    sent = mpimp.isend(torch.arange(5.0), dst, comm, tag=121)
    assert mpimp.recv(src, comm, tag=121, timeout=10).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # intact
    sent.wait()


@pytest.mark.parametrize("with_out", [False, True])
def test_irecv_on_a_freed_communicator_raises_at_once(with_out: bool) -> None:
    """As MPI_Irecv does: the error comes from irecv, and no pending receive is left behind
    (the receive's channel state is looked up only when it first probes)."""
    from mpimp import comm as transport

    c = MPI.COMM_SELF.Dup()
    c.Free()
    before = {h: len(v) for h, v in transport._UNMATCHED.pending.items()}
    with pytest.raises(MPI.Exception):
        mpimp.irecv(0, c, 3, out=torch.empty(8192) if with_out else None)
    assert {h: len(v) for h, v in transport._UNMATCHED.pending.items()} == before
