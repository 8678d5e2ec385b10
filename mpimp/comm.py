"""Tensor transport over MPI: point-to-point and collectives, with deadlines.

Problem: a pipeline stage receives activations whose shape and dtype it may not know in
advance (they can change between micro-batches), and torch's binaries ship no MPI
backend.  Sending a separate "shape" exchange first doubles the latency and invites
mismatched pairs; so every mpimp message is ONE MPI message that the receiver decodes
from itself and its size: it learns the size with a matched probe (``MPI_Improbe``: no
race with other receives on the same source and tag), receives the message into a
buffer of exactly that size, and reads dtypes and shapes from its header, or for a raw
repeat from its channel.  A *framed* message opens with a small header::

    | "MPMP" layout n hdrlen | code ndim pad | dims (int64) ... | pad | payload 0 | pad | ...

(each payload 64-byte aligned).  A tensor of at least 16 KiB whose header repeats the
last one-tensor message of at least 16 KiB on its channel (communicator, peer, tag; a
bare tensor and a 1-tuple differ) travels *raw*: its payload alone, the header elided,
told apart by its size (:mod:`mpimp.channels`).  That is the steady
state of training (the same activation shapes every step) and the fast case: a raw
message is the tensor's own contiguous memory, which MPI moves by single copy (CMA,
XPMEM, RDMA) straight into a fitting ``out=``.

How a framed message travels:

* small payloads (up to ``_PACK_LIMIT`` bytes) are packed into one buffer on the sender
  (a copy of a few KiB costs less than building a datatype);
* larger CPU payloads are described, together with the header, by an MPI struct datatype
  over absolute addresses: the payload leaves from the tensor's own memory (no copy).
  Open MPI 5 moves such a message through its shared-memory fragments (two copies, and
  only while the sender calls MPI: the polling waits keep calling it), not by the
  single-copy CMA of a contiguous buffer: 0.19-0.84x of a contiguous send on some days,
  faster on others (bench/bench_datatype.py, docs/benchmarks.md).  ``isend(pack=True)``
  copies header and payload into one contiguous buffer instead, which the receiver pulls
  by itself; the pipeline sends its stage messages that way.

Every wait has a deadline (``MPIMP_TIMEOUT`` seconds, default 600; 0 disables it):
instead of hanging forever when a peer died or a schedule is mismatched, the wait
raises :class:`DeadlineError` naming the rank, the peer, the tag and the operation.
``MPIMP_DEBUG=1`` prints one line per MPI call (``r1 | Irecv <- 0 tag 7``).
"""

from __future__ import annotations

import collections
import functools
import os
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Union

import numpy as np
import torch
from mpi4py import MPI

from .buffers import (
    CODE_DTYPES,
    HostPool,
    cuda_aware,
    dtype_code,
    from_wire,
    is_16bit_float,
    mpi_datatype,
    to_wire,
)
from .channels import ELIDE_MIN, PAD, ChannelState, Seen, channels, elision_enabled
from .errors import ConfigError, DeadlineError, TransportError, env_switch
from .fastpath import load as _fast
from .watchdog import WATCHDOG

__all__ = [
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
    "Request",
    "wait_all",
    "default_timeout",
    "ProgressThread",
    "progress_thread_wanted",
]

Tensors = Union[torch.Tensor, tuple[torch.Tensor, ...]]

_MAGIC = b"MPMP"
_INLINE = 1  # header layout version: payloads follow the header in the same message
_ALIGN = 64
_PACK_LIMIT = 64 * 1024  # payload bytes; above this CPU payloads are sent from their own memory
_EAGER = 4096  # bytes; messages up to this size travel eagerly in every MPI we know (shared memory, networks)
_QUICK_POLLS = 64  # progress calls a blocking send/recv makes before its deadline-checked wait
_FAST_MAX = 2**31 - 1  # the native fast path (mpimp.fastpath) takes counts that fit an MPI int
_ZEROS = torch.zeros(_ALIGN, dtype=torch.uint8)  # source of padding bytes (read only)
_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}
# dtypes every MPI reduces natively with every op in _OPS (all_reduce's fast path)
_PLAIN_TYPES = {torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE, torch.int32: MPI.INT32_T,
                torch.int64: MPI.INT64_T}
_HEAD = struct.Struct("<4sBBH")
_ENTRY = struct.Struct("<BB6x")


def default_timeout() -> float | None:
    """Seconds a wait may take before raising DeadlineError (``MPIMP_TIMEOUT``; 0 = none)."""
    raw = os.environ.get("MPIMP_TIMEOUT", "600")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"MPIMP_TIMEOUT={raw!r} is not a number of seconds") from None
    return None if value <= 0 else value


# read once at import: an environment lookup per message would cost a microsecond
_DEBUG = os.environ.get("MPIMP_DEBUG", "0") not in ("", "0")
_ELIDE = elision_enabled()  # this rank sends header-elided repeats (mpimp.channels)


def _ranks_on_this_node() -> int:
    """Ranks the launcher started on this node (Open MPI, MPICH/Hydra, SLURM), 1 if unknown."""
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


# More ranks than cores on the node (e.g. 4 ranks on 2 cores): a waiting rank must hand
# its core to a computing one at once (Open MPI's mpi_yield_when_idle does the same when
# it detects oversubscription), and sched_yield is not enough: the scheduler still gives
# a yielding rank its fair share of the core, so such waits sleep between polls.
_OVERSUBSCRIBED = _ranks_on_this_node() > (os.cpu_count() or 1)
_SWEEP_POLLS = 0 if _OVERSUBSCRIBED else 256  # probes per message of a native run in wait_all (mpimp.fastpath)
_SPIN_SECONDS = 0.0 if _OVERSUBSCRIBED else 2e-3  # polling without pause
# tight Test calls (about 1-2 ms) before a wait falls back to the polling loop (few when
# ranks outnumber cores: the core belongs to a computing rank then)
_TIGHT_POLLS = 32 if _OVERSUBSCRIBED else 4000
_YIELD_SECONDS = 0.0 if _OVERSUBSCRIBED else 0.2  # then polling with sched_yield, then with naps


def _trace(comm: MPI.Comm, text: str) -> None:
    if _DEBUG:
        print(f"r{MPI.COMM_WORLD.Get_rank()} | {text} (comm rank {comm.Get_rank()})",
              file=sys.stderr, flush=True)


def _wait_until(done: Callable[[], bool], what: Callable[[], str], timeout: float | None,
                asleep: float | None = None) -> None:
    """Poll ``done`` (which must drive MPI progress) until true or the deadline passes.

    Three phases, by elapsed time: spin for 2 ms (a message in flight completes within
    microseconds, and a large one needs a progress call per fragment); then keep polling
    but ``sched_yield`` between polls for up to 200 ms, so a rank hands its core to a
    computing neighbour while an idle core keeps the transfer moving; then sleep between
    polls, growing from 20 us to 1 ms, for waits that are really long.  When the node runs
    more ranks than it has cores, waits sleep between polls from the start.  ``asleep``:
    sleep that many seconds between all polls instead, for a helper thread that shares
    its core with the rank's compute (the data-parallel reduce thread: spinning, even
    with ``sched_yield``, takes that core away from backward).
    """
    if done():
        return
    start = time.monotonic()
    limit = -1.0 if timeout is None else timeout  # -1: read MPIMP_TIMEOUT at the first check
    spins, nap = 0, 2e-5
    while not done():
        spins += 1
        if asleep is not None:
            time.sleep(asleep)
            elapsed = time.monotonic() - start
        else:
            if spins & 31:
                continue
            elapsed = time.monotonic() - start
            if elapsed > _YIELD_SECONDS:
                time.sleep(nap)
                nap = min(1e-3, nap * 1.5)
            elif elapsed >= _SPIN_SECONDS:
                os.sched_yield()
        if limit == -1.0:
            limit = default_timeout()
        if limit is not None and elapsed > limit:
            if done():
                return
            raise DeadlineError(
                f"rank {MPI.COMM_WORLD.Get_rank()}: {what()} did not complete within {limit:g} s. "
                f"The peer may have failed, or the ranks disagree on the schedule. "
                f"Raise MPIMP_TIMEOUT (0 disables the deadline) or set MPIMP_DEBUG=1 to trace MPI calls."
            )


def _spin(req: MPI.Request, polls: int) -> bool:
    """Test ``req`` up to ``polls`` times in a tight loop; True once complete.

    A large message moves one fragment per progress call on each side (Open MPI's shared
    memory path copies 32 KiB per call), so the time between two calls is time the
    transfer stands still: polling through Python method layers cost 45 us per 1 MiB
    message.  Callers fall back to :func:`_wait_until` (with its deadline) afterwards.
    """
    for _ in range(polls):
        if req.Test():
            return True
    return False


def _complete(req: MPI.Request, what: Callable[[], str], timeout: float | None,
              polls: int = _TIGHT_POLLS, keep: object = None) -> None:
    """Complete one MPI request: :func:`_spin` first (in C on the native fast path, with
    the GIL released; else written out: one Python frame less on the path that follows a
    transfer), then the deadline loop; a wait that raises leaves the request and ``keep``
    (its buffers) to :func:`_abandon`."""
    fast = _fast()
    if fast is not None:
        if fast.test(req, polls):
            return
    else:
        for _ in range(polls):
            if req.Test():
                return
    _wait_or_abandon(req, what, timeout, keep)


def _wait_or_abandon(req: MPI.Request, what: Callable[[], str], timeout: float | None, keep: object) -> None:
    try:
        _wait_until(req.Test, what, timeout)
    except BaseException:
        _abandon(req, keep)
        raise


# Requests whose wait was given up (a deadline) or whose request object was dropped before
# they completed: MPI may still read or write their buffers (a pooled receive buffer would
# otherwise be handed to the next receive while the stale transfer still lands in it), so
# they are kept here with those buffers until MPI completes them (:func:`_reap`, run by the
# next send or receive).
# A deque without a lock: _abandon runs in __del__, which a garbage collection can start
# inside any allocation, _reap's own included (a lock taken there again would hang).
_ABANDONED: collections.deque[tuple[MPI.Request, object]] = collections.deque()


def _abandon(req: MPI.Request, keep: object) -> None:
    _ABANDONED.append((req, keep))  # atomic


def _finished(req: MPI.Request) -> bool:
    try:
        return bool(req.Test())
    except MPI.Exception:  # completed in error: MPI is done with its buffers
        return True


def _reap() -> None:
    """Release the abandoned requests that MPI has completed, and their buffers (each
    entry is taken out and put back if still active: safe against other threads and
    against entries added meanwhile)."""
    for _ in range(len(_ABANDONED)):
        try:
            entry = _ABANDONED.popleft()
        except IndexError:
            return
        if not _finished(entry[0]):
            _ABANDONED.append(entry)


# ----------------------------------------------------------------------------- headers

def _round_up(n: int, k: int = _ALIGN) -> int:
    return (n + k - 1) // k * k


@functools.lru_cache(maxsize=1024)
def _frame(specs: tuple[tuple[torch.dtype, tuple[int, ...]], ...], as_tuple: bool,
           layout: int) -> tuple[bytes, tuple[int, ...], int]:
    """Header bytes (padded to 64), inline payload offsets and inline message size.

    ``specs`` holds each tensor's (dtype, shape).  Cached: a pipeline sends the same
    shapes again and again, and building the header costs more than sending 1 KiB.
    The count byte holds the number of tensors (at most 127); its top bit marks a tuple,
    so a 1-tuple arrives as a 1-tuple and a bare tensor as a bare tensor.
    """
    if len(specs) > 127:
        raise ConfigError(f"at most 127 tensors per message, got {len(specs)}")
    parts = []
    for dtype, shape in specs:
        parts.append(_ENTRY.pack(dtype_code(dtype), len(shape)))
        if shape:
            parts.append(struct.pack(f"<{len(shape)}q", *shape))
    body = b"".join(parts)
    hlen = _round_up(8 + len(body))
    if hlen > 0xFFFF - PAD:  # (room for the padding of mpimp.channels)
        raise ConfigError(f"too many dimensions in one message ({len(specs)} tensors)")
    count = len(specs) | (0x80 if as_tuple else 0)
    offsets, pos, end = [], hlen, hlen
    for dtype, shape in specs:
        offsets.append(pos)
        numel = 1
        for n in shape:
            numel *= n
        end = pos + numel * dtype.itemsize
        pos = _round_up(end)
    head = (_HEAD.pack(_MAGIC, layout, count, hlen) + body).ljust(hlen, b"\0")
    return head, tuple(offsets), end


def _parse_header_uncached(buf: bytes) -> tuple[list[tuple[torch.dtype, tuple[int, ...], int]], bool, int]:
    """(dtype, shape, payload offset) of each tensor, the tuple flag and the layout, from the
    header bytes (:func:`_parse_header` caches it)."""
    magic, layout, n, hlen = _HEAD.unpack_from(buf, 0)
    if magic != _MAGIC or layout != _INLINE:
        raise TransportError(
            f"rank {MPI.COMM_WORLD.Get_rank()}: received a message that is not an mpimp tensor "
            f"(magic {magic!r}, layout {layout}); is another library using the same communicator and tag?"
        )
    out, pos, offset = [], 8, hlen
    for _ in range(n & 0x7F):
        try:
            code, ndim = _ENTRY.unpack_from(buf, pos)
            shape = struct.unpack_from(f"<{ndim}q", buf, pos + 8) if ndim else ()
            dtype = CODE_DTYPES[code]
        except (struct.error, KeyError) as exc:
            raise TransportError(
                f"rank {MPI.COMM_WORLD.Get_rank()}: received an mpimp message with a corrupt or foreign "
                f"header ({len(buf)} of {hlen} header bytes; {exc}); do both sides run the same mpimp version?"
            ) from None
        pos += 8 + 8 * ndim
        out.append((dtype, tuple(shape), offset))
        numel = 1
        for s in shape:
            numel *= s
        offset = _round_up(offset + numel * dtype.itemsize)
    return tuple(out), bool(n & 0x80), layout  # type: ignore[return-value]


# Plain dicts in front of the builders: a dict lookup costs a third of an lru_cache call,
# and these run once per message.  Bounded: cleared when they grow past _CACHE_MAX.
_CACHE_MAX = 4096
_FRAMES1: dict[tuple[torch.dtype, tuple[int, ...]], tuple[bytes, tuple[int, ...], int]] = {}
_HEADERS: dict[bytes, tuple[list[tuple[torch.dtype, tuple[int, ...], int]], bool, int]] = {}


def _frame1(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[bytes, tuple[int, ...], int]:
    """:func:`_frame` of one bare tensor, through a dict."""
    key = (dtype, shape)
    fr = _FRAMES1.get(key)
    if fr is None:
        if len(_FRAMES1) >= _CACHE_MAX:
            _FRAMES1.clear()
        fr = _FRAMES1[key] = _frame(((dtype, tuple(shape)),), False, _INLINE)
    return fr


def _header_length(first: bytes | bytearray | np.ndarray, size: int) -> int:
    """The header length that a message of ``size`` bytes declares in its ``first`` bytes;
    a TransportError when they are no mpimp header (too short, another magic, a length
    outside the message)."""
    if size < _HEAD.size:
        raise TransportError(
            f"rank {MPI.COMM_WORLD.Get_rank()}: received a {size}-byte message, too short for an mpimp "
            f"tensor; is another library using the same communicator and tag?"
        )
    magic, layout, _, hlen = _HEAD.unpack_from(first, 0)
    if magic != _MAGIC or not _HEAD.size <= hlen <= size:
        raise TransportError(
            f"rank {MPI.COMM_WORLD.Get_rank()}: received a message that is not an mpimp tensor "
            f"(magic {magic!r}, layout {layout}, header length {hlen} of {size} bytes); is another "
            f"library using the same communicator and tag?"
        )
    return hlen


def _head_of(raw: bytes | bytearray) -> bytes:
    """The header bytes at the start of a received message (its length is in the header)."""
    return bytes(memoryview(raw)[: _header_length(raw, len(raw))])


def _parse_header(buf: bytes) -> tuple[list[tuple[torch.dtype, tuple[int, ...], int]], bool, int]:
    """(dtype, shape, payload offset) of each tensor, the tuple flag and the layout (cached)."""
    meta = _HEADERS.get(buf)
    if meta is None:
        if len(_HEADERS) >= _CACHE_MAX:
            _HEADERS.clear()
        meta = _HEADERS[buf] = _parse_header_uncached(buf)
    return meta


class _TypeCache:
    """Committed struct datatypes by their blocks, so a repeated transfer does not rebuild one.

    Building, committing and freeing a struct datatype costs ~5 us per side, a third of
    the added time of a 1 MiB message.  Training reuses the same buffers (``out=``
    tensors, parameters, bucket and activation memory recycled by the allocator) for the
    same shapes, so the (address, length) blocks repeat.  An entry stays correct even
    after its memory is freed: it only names addresses, and a later tensor at the same
    address and length is described by exactly the same type.  Evicted types are freed
    with ``MPI_Type_free``, which lets pending operations that use them complete.
    """

    def __init__(self, limit: int = 256) -> None:
        self._types: dict[tuple, tuple[MPI.Datatype, object]] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, key: tuple, blocks: Callable[[], tuple[list[tuple[int, int]], object]]) -> tuple[MPI.Datatype, object]:
        """The datatype (and its kept-alive scratch) for ``key``; ``blocks()`` builds a new one."""
        hit = self._types.get(key)
        if hit is not None:
            return hit
        spec, keep = blocks()
        entry = (_struct(spec), keep)
        with self._lock:
            if len(self._types) >= self._limit:
                old = next(iter(self._types))
                self._types.pop(old)[0].Free()
            self._types[key] = entry
        return entry


_SEND_TYPES = _TypeCache()
_RECV_POOL = HostPool()  # large receive buffers, recycled once the received tensors are freed


def _as_list(tensors: Tensors) -> tuple[list[torch.Tensor], bool]:
    if isinstance(tensors, torch.Tensor):
        return [tensors], True
    if isinstance(tensors, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in tensors):
        return list(tensors), False
    raise ConfigError(f"expected a tensor or a tuple of tensors, got {type(tensors).__name__}")


def _ready(t: torch.Tensor) -> torch.Tensor:
    """Detached and contiguous (a non-contiguous tensor is copied, documented behaviour)."""
    if t.requires_grad:
        t = t.detach()
    return t if t.is_contiguous() else t.contiguous()


def _describe(dtype: torch.dtype, shape: Sequence[int]) -> str:
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}"


# ----------------------------------------------------------------------------- point-to-point

class Request:
    """A pending mpimp operation: ``test()`` polls it, ``wait()`` completes it.

    (A receive's ``test()`` may first wait, up to the deadline, for an earlier framed
    message of its channel to finish arriving: :mod:`mpimp.channels`.)

    ``wait()`` returns the received tensor (or tuple) for receives, the reduced tensor
    for non-blocking reductions, ``None`` for sends.
    """

    __slots__ = ()

    def test(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def result(self) -> Tensors | None:
        return None

    def wait(self, timeout: float | None = None) -> Tensors | None:
        _wait_until(self.test, self.describe, timeout)
        return self.result()


class _MPIRequest(Request):
    """Wraps one MPI request; ``keep`` holds every buffer that must outlive it."""

    __slots__ = ("_req", "_what", "_keep", "_finish", "_done", "_value")

    def __init__(self, req: MPI.Request, what: object, keep: object = None,
                 finish: Callable[[], Tensors | None] | None = None) -> None:
        self._req, self._what, self._keep, self._finish = req, what, keep, finish
        self._done, self._value = False, None

    def test(self) -> bool:
        if self._done:
            return True
        if not self._req.Test():
            return False
        self._done = True
        if self._finish is not None:
            self._value = self._finish()
        self._keep = None
        return True

    def describe(self) -> str:
        what = self._what
        return what() if callable(what) else str(what)  # a callable: formatted only when needed

    def result(self) -> Tensors | None:
        return self._value

    def wait(self, timeout: float | None = None) -> Tensors | None:
        if not self._done:
            _spin(self._req, _TIGHT_POLLS)
        return Request.wait(self, timeout)

    def __del__(self) -> None:
        if not self._done:  # dropped unfinished (its wait raised, or it was never waited on)
            try:
                _abandon(self._req, self._keep)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass


class _SendRequest(_MPIRequest):
    """An isend: its description is formatted only when needed (a deadline or a trace)."""

    __slots__ = ()

    def describe(self) -> str:
        payload, dst, tag = self._what  # type: ignore[misc]
        return f"isend of {payload} B to rank {dst} (tag {tag})"


def _struct(blocks: list[tuple[int, int]]) -> MPI.Datatype:
    """A committed struct datatype of ``(address, nbytes)`` byte blocks (send from MPI.BOTTOM)."""
    return MPI.Datatype.Create_struct([n for _, n in blocks], [a for a, _ in blocks],
                                      [MPI.BYTE] * len(blocks)).Commit()


def _send_type(tensors: Sequence[torch.Tensor], head: bytes, offsets: Sequence[int]) -> MPI.Datatype:
    """The struct datatype [header | each tensor's own memory, zero padding between] of one
    message over absolute addresses (cached by the header and the tensors' addresses)."""

    def blocks() -> tuple[list[tuple[int, int]], object]:
        spec, pos = [(MPI.Get_address(head), len(head))], len(head)
        for t, off in zip(tensors, offsets):
            if off > pos:
                spec.append((_ZEROS.data_ptr(), off - pos))
            if t.nbytes:
                spec.append((t.data_ptr(), t.nbytes))
            pos = off + t.nbytes
        return spec, head  # the entry keeps this very header object (its address) alive

    return _SEND_TYPES.get((head, *[(t.data_ptr(), t.nbytes) for t in tensors]), blocks)[0]


def _specs(tensors: list[torch.Tensor], as_tuple: bool) -> tuple[tuple[bytes, tuple[int, ...], int], int, bool]:
    """The frame (header, payload offsets, size) of one message, its payload bytes, on the host?"""
    if len(tensors) == 1:
        t0 = tensors[0]
        frame = _frame(((t0.dtype, tuple(t0.shape)),), True, _INLINE) if as_tuple else _frame1(t0.dtype, t0.shape)
        return frame, t0.nbytes, t0.is_cpu
    specs = tuple((t.dtype, tuple(t.shape)) for t in tensors)
    return _frame(specs, as_tuple, _INLINE), sum(t.nbytes for t in tensors), all(t.is_cpu for t in tensors)


@functools.lru_cache(maxsize=256)
def _padded(frame: tuple[bytes, tuple[int, ...], int]) -> tuple[bytes, tuple[int, ...], int]:
    """The same frame with ``PAD`` more header bytes (the header records its own length)."""
    head, offsets, total = frame
    magic, layout, count, hlen = _HEAD.unpack_from(head, 0)
    head = _HEAD.pack(magic, layout, count, hlen + PAD) + head[_HEAD.size:] + bytes(PAD)
    return head, tuple(o + PAD for o in offsets), total + PAD


def _framed(tensors: list[torch.Tensor], frame: tuple[bytes, tuple[int, ...], int], on_host: bool,
            pack: bool) -> tuple[list, object]:
    """The MPI buffer spec of one framed message, and the objects to keep alive until it completes.

    Small (or device, or ``pack``) messages: one packed buffer.  Large CPU messages: a struct
    datatype over absolute addresses, the header followed by each tensor's own memory
    (padding comes from a shared zero block): one message, no copy of the payload.
    """
    head, offsets, total = frame
    if on_host and not pack and sum(t.nbytes for t in tensors) > _PACK_LIMIT:
        return [MPI.BOTTOM, 1, _send_type(tensors, head, offsets)], tensors
    if on_host:
        packed = bytearray(total)  # small: one memcpy per tensor into the message
        packed[: len(head)] = head
        for t, off in zip(tensors, offsets):
            n = t.nbytes
            if n:
                packed[off : off + n] = MPI.buffer.fromaddress(t.data_ptr(), n)
        return [packed, total, MPI.BYTE], None
    device = next(t.device for t in tensors if not t.is_cpu)
    dev_packed = torch.zeros(total, dtype=torch.uint8, device=device)
    dev_packed[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    for t, off in zip(tensors, offsets):
        dev_packed[off : off + t.nbytes] = t.reshape(-1).view(torch.uint8)
    buf, staged = to_wire(dev_packed)
    return [buf, total, MPI.BYTE], (dev_packed, staged)


def _messages(tensors: list[torch.Tensor], as_tuple: bool, pack: bool = False) -> tuple[list, object, int]:
    """The MPI buffer spec of one framed mpimp message, the objects to keep alive, the payload bytes."""
    frame, payload, on_host = _specs(tensors, as_tuple)
    spec, keep = _framed(tensors, frame, on_host, pack)
    return spec, keep, payload


def _post_send(tensors: list[torch.Tensor], as_tuple: bool, dst: int, comm: MPI.Comm, tag: int,
               pack: bool, specs: tuple | None = None) -> tuple[MPI.Request, object, int]:
    """``MPI_Isend`` one message, raw (header elided) or framed by the rules of
    :mod:`mpimp.channels`; the request, what it keeps alive, the payload bytes.  ``specs``:
    what :func:`_specs` returns for these tensors, when the caller has it."""
    frame, payload, on_host = _specs(tensors, as_tuple) if specs is None else specs
    total = frame[2]
    if total < ELIDE_MIN:  # neither remembered nor mistakable for a raw repeat: no state
        spec, keep = _framed(tensors, frame, on_host, pack)
        if _DEBUG:
            _trace(comm, f"Isend -> {dst} tag {tag} ({payload} B)")
        return comm.Isend(spec, dst, tag), keep, payload
    chan = channels(comm)
    key = (dst, tag)
    eligible = len(tensors) == 1 and payload >= ELIDE_MIN
    with chan.send_lock:
        last = chan.sent.get(key)
        if eligible and last is not None and last[0] == frame[0] and _ELIDE:
            t = tensors[0]
            if _DEBUG:
                _trace(comm, f"Isend -> {dst} tag {tag} ({payload} B, header elided)")
            if on_host:
                fast = _fast()
                if fast is not None and payload <= _FAST_MAX:
                    return fast.isend(comm, t.data_ptr(), payload, dst, tag), t, payload
                return comm.Isend([MPI.buffer.fromaddress(t.data_ptr(), payload), payload, MPI.BYTE], dst, tag), t, payload
            buf, staged = to_wire(t)  # a device tensor: its memory (CUDA-aware MPI) or a pinned copy
            return comm.Isend([buf, payload, MPI.BYTE], dst, tag), (t, staged), payload
        spec, keep = _framed(tensors, _padded(frame) if last is not None and total == last[1] else frame,
                             on_host, pack)
        if _DEBUG:
            _trace(comm, f"Isend -> {dst} tag {tag} ({payload} B)")
        req = comm.Isend(spec, dst, tag)
        if eligible:
            chan.sent[key] = (frame[0], payload)
        return req, keep, payload


def _isend_repeat(t: torch.Tensor, head: bytes, n: int, dst: int, comm: MPI.Comm, tag: int) -> MPI.Request | None:
    """The native fast path of a host tensor's raw repeat (:mod:`mpimp.fastpath`): its
    ``MPI_Isend`` from the tensor's memory when its header ``head`` repeats the channel's
    last one (the decision of :func:`_post_send`, in one C call); None when the message
    is not a raw repeat or the fast path is off (the caller goes through _post_send)."""
    fast = _fast()
    if fast is None or not _ELIDE or n > _FAST_MAX:
        return None
    chan = channels(comm)
    with chan.send_lock:
        last = chan.sent.get((dst, tag))
        if last is None or last[0] != head:
            return None
        if _DEBUG:
            _trace(comm, f"Isend -> {dst} tag {tag} ({n} B, header elided)")
        return fast.isend(comm, t.data_ptr(), n, dst, tag)


def isend(tensors: Tensors, dst: int, comm: MPI.Comm, tag: int = 0, pack: bool = False) -> Request:
    """Start sending a tensor (or tuple of tensors) to rank ``dst`` of ``comm``: one MPI message.

    The tensors must not be modified until the request completes, and the request must
    be completed (``wait``, ``test`` until true, or :func:`wait_all`): it owns the message
    buffer MPI reads from.  Non-contiguous tensors are sent as a contiguous copy.

    A tensor of at least 16 KiB whose dtype and shape repeat the last one-tensor message
    of at least 16 KiB on the same (communicator, ``dst``, ``tag``) travels as its payload
    alone, straight from its own memory (:mod:`mpimp.channels`); a receiver's MPI pulls
    that contiguous buffer by single copy.  Otherwise the message is framed: the header, then the payloads.
    ``pack=True`` copies a large framed message into one contiguous buffer instead of
    sending it from the tensors' own memory.  Use it when the sender goes on computing
    right after the send (a pipeline stage): MPI libraries let the receiver pull a
    contiguous message by itself (single-copy CMA/XPMEM, RDMA), while a zero-copy
    struct-datatype message moves only when the sender calls MPI again.  Measured in
    bench/bench_pipeline.py: 1F1B at 0.71-0.73x of the speed of light without packing,
    0.87x with it.
    """
    if type(tensors) is torch.Tensor or isinstance(tensors, torch.Tensor):
        t = tensors if not tensors.requires_grad and tensors.is_contiguous() else _ready(tensors)
        if t.is_cpu:  # fast path (the common case): one small tensor, packed
            head, offsets, total = _frame1(t.dtype, t.shape)
            payload = total - offsets[0]
            if total < ELIDE_MIN:
                msg = bytearray(head)  # the header is padded up to the payload's offset
                if payload:
                    msg += MPI.buffer.fromaddress(t.data_ptr(), payload)
                if _DEBUG:
                    _trace(comm, f"Isend -> {dst} tag {tag} ({payload} B)")
                return _SendRequest(comm.Isend([msg, total, MPI.BYTE], dst, tag), (payload, dst, tag), msg)
            req = _isend_repeat(t, head, payload, dst, comm, tag)
            if req is not None:
                return _SendRequest(req, (payload, dst, tag), t)
            req, keep, _ = _post_send([t], False, dst, comm, tag, pack, ((head, offsets, total), payload, True))
            return _SendRequest(req, (payload, dst, tag), keep)
        items, as_tuple = [t], False
    else:
        items, single = _as_list(tensors)
        items, as_tuple = [_ready(t) for t in items], not single
    req, keep, payload = _post_send(items, as_tuple, dst, comm, tag, pack)
    return _SendRequest(req, (payload, dst, tag), keep)


def send(tensors: Tensors, dst: int, comm: MPI.Comm, tag: int = 0, timeout: float | None = None) -> None:
    """Send a tensor (or tuple of tensors) to rank ``dst`` of ``comm``; returns when the buffer is reusable."""
    t = tensors
    # (requires_grad does not matter here: host messages are read through data_ptr)
    if type(t) is torch.Tensor and t.is_cpu and t.is_contiguous():
        fr = _FRAMES1.get((t.dtype, t.shape))  # (_frame1 written out: see below)
        head, offsets, total = _frame1(t.dtype, t.shape) if fr is None else fr
        if total <= _EAGER:  # the common small message, inline: no request object
            msg = bytearray(head)  # the header is padded up to the payload's offset
            n = total - len(head)
            if n:
                msg += MPI.buffer.fromaddress(t.data_ptr(), n)
            if _DEBUG:
                _trace(comm, f"Isend -> {dst} tag {tag} ({n} B)")
            # an eager message completes within a few progress calls
            _complete(comm.Isend([msg, total, MPI.BYTE], dst, tag),
                      lambda: f"send of {n} B to rank {dst} (tag {tag})", timeout, _QUICK_POLLS, msg)
            return
        if total >= ELIDE_MIN:  # large: raw or the cached zero-copy datatype, no request object
            n = total - offsets[0]
            req = _isend_repeat(t, head, n, dst, comm, tag)
            if req is not None:
                _complete(req, lambda: f"send of {n} B to rank {dst} (tag {tag})", timeout, keep=t)
                return
            req, keep, _ = _post_send([t], False, dst, comm, tag, False, ((head, offsets, total), n, True))
            _complete(req, lambda: f"send of {n} B to rank {dst} (tag {tag})", timeout, keep=(t, keep))
            return
    isend(tensors, dst, comm, tag).wait(timeout)


# numpy's name for each torch dtype it has; the others travel as same-width integers
_NP_SAME = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
            torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
            torch.uint8: np.uint8, torch.bool: np.bool_, torch.complex64: np.complex64,
            torch.complex128: np.complex128}
_NP_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64, 16: np.complex128}


def _view(raw: bytearray | np.ndarray | torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...],
          off: int) -> torch.Tensor:
    """The tensor at byte ``off`` of a received message buffer (shares its memory)."""
    numel = 1
    for n in shape:
        numel *= n
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device=raw.device if isinstance(raw, torch.Tensor) else "cpu")
    if isinstance(raw, np.ndarray):  # one torch call (each costs ~10 us on caches a transfer evicted)
        same = _NP_SAME.get(dtype)
        if same is not None:
            return torch.from_numpy(raw[off : off + numel * dtype.itemsize].view(same).reshape(shape))
        bits = _NP_BITS.get(dtype.itemsize)
        if bits is not None:
            return torch.from_numpy(raw[off : off + numel * dtype.itemsize].view(bits).reshape(shape)).view(dtype)
    if isinstance(raw, torch.Tensor):
        t = raw[off : off + numel * dtype.itemsize].view(dtype)
    else:
        t = torch.frombuffer(raw, dtype=dtype, count=numel, offset=off)
    return t if len(shape) == 1 else t.view(shape)


def _views(raw: bytearray | np.ndarray | torch.Tensor, meta: list[tuple[torch.dtype, tuple[int, ...], int]],
           as_tuple: bool) -> Tensors:
    """The received tensor (or tuple) as views into the message buffer."""
    views = tuple(_view(raw, dtype, shape, off) for dtype, shape, off in meta)
    return views if as_tuple else views[0]


def _unpack(raw: bytearray) -> Tensors:
    """Header parse and views of a small message received into ``raw``."""
    meta, as_tuple, _ = _parse_header(_head_of(raw))
    if len(meta) == 1 and not as_tuple:  # one tensor (the common case): one frombuffer
        dtype, shape, off = meta[0]
        if len(shape) == 1 and shape[0]:
            return torch.frombuffer(raw, dtype=dtype, count=shape[0], offset=off)
        return _view(raw, dtype, shape, off)
    return _views(raw, meta, as_tuple)


def _check_out(meta: list[tuple[torch.dtype, tuple[int, ...], int]], out: torch.Tensor, src: int,
               tag: int) -> None:
    """Raise TransportError unless the message holds exactly one tensor of ``out``'s dtype and shape."""
    if not (len(meta) == 1 and meta[0][0] == out.dtype and tuple(meta[0][1]) == tuple(out.shape)):
        got = ", ".join(_describe(d, s) for d, s, _ in meta) or "nothing"
        raise TransportError(
            f"rank {MPI.COMM_WORLD.Get_rank()}: recv(out=...) from rank {src} tag {tag}: "
            f"out is {_describe(out.dtype, out.shape)} but the message holds {got}; "
            f"pass an out tensor of that shape and dtype, or out=None"
        )


class _Unmatched:
    """Receives (``irecv``, or a blocking ``recv`` still waiting) that have not matched their
    message yet, per communicator.

    MPI gives a message to the earliest posted receive that matches its (source, tag); an
    mpimp receive can only post its MPI receive after a matched
    probe tells the size, which happens when it is first tested or waited on.  So a
    receive that probes first lets the earlier unmatched receives whose matching can
    decide its own (:meth:`chain`: those that could take a message of its pattern, and
    transitively theirs) probe their own patterns, oldest first, then probes its own; a
    message that a probe finds goes to the earliest receive of the chain still unmatched
    that matches its actual envelope (it arrived in between; :meth:`owner_of`).  One pass,
    each receive probing once per message it finds: the cost of a test() grows with the
    number of unmatched receives, not faster.  An earlier receive whose message has not
    arrived does not hold up a later, broader one (``ANY_TAG`` / ``ANY_SOURCE``) whose
    message has.  One re-entrant lock serialises the matching, for receives on one
    communicator from several threads.
    """

    def __init__(self) -> None:
        # communicator handle -> the unmatched receives, in posting order (weakly: a request
        # its owner dropped matches nothing, unlike a freed MPI request), with their patterns
        self.pending: dict[int, list[tuple[weakref.ref[_RecvRequest], int, int]]] = {}
        # communicator handle -> (source, tag) -> entries of that pattern in ``pending``
        # (dropped ones included until pruned), and under None those with a wildcard: a
        # receive that no other entry could overlap matches alone, without a scan of the list
        self.counts: dict[int, dict[tuple[int, int] | None, int]] = {}
        self.lock = threading.RLock()
        # .empty: the patterns that found nothing in the current sweep (one polling round of
        # wait_all, _test_all): a pattern that found no message is not probed again in the
        # round (a message that arrives meanwhile is found in the next), so a round over n
        # unmatched receives of one pattern probes once, not n (n + 1) / 2 times
        self._sweep = threading.local()

    def swept(self) -> set[tuple[int, int, int]] | None:
        """Inside a sweep: the (communicator handle, source, tag) patterns whose probe
        found nothing so far in it; None outside one."""
        return getattr(self._sweep, "empty", None)

    @staticmethod
    def overlap(src: int, tag: int, other: _RecvRequest) -> bool:
        return ((src == other.src or MPI.ANY_SOURCE in (src, other.src))
                and (tag == other.tag or MPI.ANY_TAG in (tag, other.tag)))

    def _keep(self, handle: int, keep: Callable[[_RecvRequest], bool]) -> list[_RecvRequest]:
        """Keep the entries of ``handle`` whose request is alive and passes ``keep``; the
        kept requests, in order (call with the lock held)."""
        entries = self.pending.get(handle)
        if entries is None:
            return []
        kept, live = [], []
        counts = self.counts[handle]
        for entry in entries:
            r = entry[0]()
            if r is not None and keep(r):
                kept.append(entry)
                live.append(r)
            else:
                _count(counts, entry[1], entry[2], -1)
        if kept:
            entries[:] = kept
        else:
            del self.pending[handle], self.counts[handle]
        return live

    def _live(self, handle: int) -> list[_RecvRequest]:
        # dropped requests, and those of a freed communicator (whose handle a new one may reuse)
        return self._keep(handle, lambda r: r.comm.handle == handle)

    def busy(self, comm: MPI.Comm, src: int, tag: int) -> bool:
        """Whether a receive that could take a message of (src, tag) may be pending: a
        constant-time answer that errs on the safe side (dropped receives still count
        until pruned; any wildcard counts)."""
        counts = self.counts.get(comm.handle)
        return bool(counts) and bool(counts.get((src, tag)) or _wild(counts, src, tag))

    def blocked(self, comm: MPI.Comm, src: int, tag: int) -> bool:
        """Whether an unmatched earlier receive could take the next message of (src, tag)."""
        with self.lock:
            handle = comm.handle
            counts = self.counts.get(handle)
            if not counts:
                return False
            if (src != _ANY_SOURCE and tag != _ANY_TAG and not counts.get((src, tag))
                    and not _wild(counts, src, tag)):
                return False  # none of this very pattern, and no wildcard that covers it
            for ref, _, _ in self.pending.get(handle, ()):  # the first live one that could decides
                other = ref()
                if other is not None and other.comm.handle == handle and self.overlap(src, tag, other):
                    return True
            return False

    def add(self, r: _RecvRequest, handle: int) -> None:
        """Append ``r`` (posted on the communicator whose handle is ``handle``)."""
        src, tag = r.src, r.tag
        key = (src, tag)
        with self.lock:
            entries = self.pending.get(handle)
            if entries is None:
                entries = self.pending[handle] = []
                self.counts[handle] = {}
            entries.append((weakref.ref(r), src, tag))
            counts = self.counts[handle]
            counts[key] = counts.get(key, 0) + 1  # (_count, written out: once per irecv)
            if src == _ANY_SOURCE or tag == _ANY_TAG:
                counts[None] = counts.get(None, 0) + 1
            n = len(entries)
            if n >= 32 and not n & (n - 1):  # at each doubling: drop the receives their owners dropped
                self._live(handle)

    def forget(self, r: _RecvRequest) -> None:
        """``r`` matched its message (or was abandoned by a blocking recv that raised)."""
        self.forget_run([r])

    def forget_run(self, run: list[_RecvRequest]) -> None:
        """Forget receives that matched, oldest first (one, or a :meth:`run`): when they are
        the oldest entries of their communicator (the usual case), in one step; dropped
        receives go too."""
        with self.lock:
            r = run[0]
            handle, k = r.comm.handle, len(run)
            entries = self.pending.get(handle)
            if not entries:
                return
            # a run's receives sit at increasing places in the list: k of them in its first
            # k places, if the first and the k-th are the run's ends
            if len(entries) >= k and entries[0][0]() is r and entries[k - 1][0]() is run[-1]:
                del entries[:k]
                if entries:
                    _count(self.counts[handle], r.src, r.tag, -k)
                else:
                    del self.pending[handle], self.counts[handle]
            else:
                gone = {id(o) for o in run}
                self._keep(handle, lambda o: id(o) not in gone)

    def _earlier(self, r: _RecvRequest) -> list[_RecvRequest]:
        """The unmatched receives posted before ``r`` on its communicator, in order."""
        handle, out = r.comm.handle, []
        for ref, _, _ in list(self.pending.get(handle, ())):  # a copy: matching removes entries
            other = ref()
            if other is r:
                break
            if other is not None and other.comm.handle == handle and other._req is None:
                out.append(other)  # (dropped ones, and those of a freed communicator: _live() cleans up)
        return out

    def chain(self, r: _RecvRequest) -> list[_RecvRequest]:
        """``r`` and the unmatched receives posted before it that could take a message of
        its pattern, or of the pattern of one of those, in posting order, ``r`` last (call
        with the lock held)."""
        if r.src != _ANY_SOURCE and r.tag != _ANY_TAG:  # alone with its pattern, no wildcard covering it?
            counts = self.counts.get(r.comm.handle, {})
            if counts.get((r.src, r.tag), 0) <= 1 and not _wild(counts, r.src, r.tag):
                return [r]
        entries = self.pending.get(r.comm.handle)
        if entries and entries[0][0]() is r:  # the oldest unmatched receive: nothing before it
            return [r]
        keep = [r]
        for other in reversed(self._earlier(r)):
            if any(self.overlap(k.src, k.tag, other) for k in keep):
                keep.append(other)
        keep.reverse()
        return keep

    def run(self, r: _RecvRequest, fits: Callable[[_RecvRequest], bool]) -> list[_RecvRequest]:
        """``r`` and the unmatched receives posted after it with exactly its pattern, in
        posting order, up to the first that fails ``fits``: the receives that the next
        messages of that pattern go to, one each (call with the lock held, for an ``r``
        that no earlier receive could take a message from).  Just ``r`` while a wildcard
        receive is pending on the communicator: it could take one of those messages."""
        comm = r.comm
        handle = comm.handle
        counts = self.counts.get(handle)
        if not counts or counts.get((r.src, r.tag), 0) <= 1 or _wild(counts, r.src, r.tag):
            return [r]
        run, after = [r], False
        for ref, src, tag in self.pending.get(handle, ()):
            if not after:
                after = ref() is r
            elif src == r.src and tag == r.tag:
                other = ref()
                if other is None or (other.comm is not comm and other.comm.handle != handle):
                    continue  # dropped (it matches nothing), or of a freed communicator
                if other._req is not None or other._matched is not None or not fits(other):
                    break
                run.append(other)
        return run

    @staticmethod
    def owner_of(earlier: list[_RecvRequest], src: int, tag: int) -> _RecvRequest | None:
        """The first of ``earlier`` still unmatched that matches a message from ``src`` with ``tag``."""
        for other in earlier:
            if other._req is None and other.src in (src, MPI.ANY_SOURCE) and other.tag in (tag, MPI.ANY_TAG):
                return other
        return None


_ANY_SOURCE, _ANY_TAG = MPI.ANY_SOURCE, MPI.ANY_TAG


def _wild(counts: dict[tuple[int, int] | None, int], src: int, tag: int) -> bool:
    """Whether a pending wildcard receive could take a message of (src, tag) (counts
    per pattern: (ANY_SOURCE, tag), (src, ANY_TAG), (ANY_SOURCE, ANY_TAG)).  A wildcard of
    another tag does not: the pipeline's ANY_SOURCE error receive leaves its stage
    messages' matching alone."""
    return bool(counts.get(None)) and bool(
        counts.get((_ANY_SOURCE, tag)) or counts.get((src, _ANY_TAG)) or counts.get((_ANY_SOURCE, _ANY_TAG)))


def _fits_native(seen: object, out: torch.Tensor) -> bool:
    """Whether the native fast path can receive the channel's raw repeat ``seen`` (a
    :class:`Seen`, or another channel state) straight into ``out``."""
    return type(seen) is Seen and seen.nbytes <= _FAST_MAX and seen.fits(out)


def _posted_run(run: list[_RecvRequest], got: list, meta: tuple) -> list[MPI.Request]:
    """The receives of ``run`` that a native call matched and posted get their requests:
    ``got`` holds them in order, then MPI.REQUEST_NULL for those not posted (and after
    ``run``'s length anything: recv_run's message of another size).  Gives each its
    request, then forgets them (nothing can raise in between); their requests."""
    reqs = []
    for r, req in zip(run, got):
        if not req:
            break
        r._meta, r._direct, r._req = meta, True, req  # (_posted_raw, written out: once per message)
        reqs.append(req)
    if reqs:
        _UNMATCHED.forget_run(run[: len(reqs)])
    return reqs


def _count(counts: dict[tuple[int, int] | None, int], src: int, tag: int, delta: int) -> None:
    """Add ``delta`` entries of pattern (src, tag) to ``counts`` (and to its wildcard total)."""
    key = (src, tag)
    counts[key] = counts.get(key, 0) + delta
    if src == _ANY_SOURCE or tag == _ANY_TAG:
        counts[None] = counts.get(None, 0) + delta


_UNMATCHED = _Unmatched()  # mirrors MPI's own per-process queue of posted receives
_UNCLASSIFIED = object()  # a receive whose message has not been classified yet


class _ChannelLost(TransportError):
    """A channel's state was lost (an earlier message on it could not be received)."""

_BROKEN = object()  # a channel whose state was lost (ChannelState.seen): its receives raise


class _RecvRequest(Request):
    """Receive of one mpimp message: matched probe, then one receive of the whole message.

    The probe gives the byte count, and with it (:mod:`mpimp.channels`) whether the
    message is a raw repeat of its channel's last large header or framed.  A raw payload
    whose dtype and shape fit a contiguous CPU ``out`` lands in ``out`` directly (one
    contiguous receive: the sender's MPI moves it by single copy); otherwise the message
    lands in one new buffer (a bytearray up to ~68 KiB, a pooled array when larger, a
    device tensor for a device result without ``out``) and the result is views into it
    (or a copy into ``out``).
    Receive buffers are sized from the probe, so nothing is ever truncated.
    """

    __slots__ = ("src", "comm", "tag", "out", "device", "_status", "_req", "_raw", "_staged",
                 "_direct", "_value", "_done", "_channel", "_key", "_prev", "_meta", "_matched", "_deferred",
                 "_classified", "__weakref__")

    def __init__(self, src: int, comm: MPI.Comm, tag: int, out: torch.Tensor | None,
                 device: torch.device | None, msg: MPI.Message | None = None,
                 status: MPI.Status | None = None, posted: tuple[MPI.Request, Seen] | None = None) -> None:
        self.src, self.comm, self.tag, self.out = src, comm, tag, out
        self.device = device  # (None with out: out's device, looked up when a framed message needs it)
        self._status = status  # (made at the first probe: most receives of a native run never need one)
        self._req: MPI.Request | None = None
        self._raw: bytearray | np.ndarray | torch.Tensor | None = None
        self._staged: torch.Tensor | None = None
        self._direct = False  # True when receiving straight into out
        self._value: Tensors | None = None
        self._done = False
        self._channel: ChannelState | None = None  # (looked up when first needed: _chan)
        self._key: tuple[int, int] | None = None  # the channel whose L this framed message decides
        self._prev: object = None  # that channel's L before it
        self._meta: tuple[tuple[tuple[torch.dtype, tuple[int, ...], int], ...], bool] | None = None
        self._matched: MPI.Message | None = None  # matched, receive not posted yet (posting it raised)
        self._deferred: BaseException | None = None  # what posting ``msg`` raised, for test()/wait()
        self._classified: object = _UNCLASSIFIED  # raw (its Seen) or framed (None), decided once
        if _DEBUG:
            _trace(comm, f"Irecv <- {src} tag {tag}")
        if posted is not None:  # a raw repeat into out, matched and posted by the caller (irecv)
            self._posted_raw(posted[0], (posted[1].meta, posted[1].as_tuple))
        elif msg is not None:  # matched by the caller's probe, under the channel lock (status holds its size)
            try:
                self._post(msg)
            except Exception as exc:  # keep the message: a later wait() resumes with it
                self._deferred = exc
        else:
            if not comm:  # a freed communicator fails here, as MPI_Irecv would (nothing else touches it yet)
                raise MPI.Exception(MPI.ERR_COMM)
            _UNMATCHED.add(self, comm.handle)

    @property
    def _chan(self) -> ChannelState:
        """The channel state of this receive's communicator (:mod:`mpimp.channels`)."""
        chan = self._channel
        if chan is None:
            chan = self._channel = channels(self.comm)
        return chan

    def describe(self) -> str:
        return f"recv from rank {self.src} (tag {self.tag})"

    def __del__(self) -> None:
        if self._req is not None and not self._done:  # its bytes may still be landing
            try:
                _abandon(self._req, (self._raw, self._staged, self.out))
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    def wait(self, timeout: float | None = None) -> Tensors | None:
        if not self._done:
            self._raise_deferred()
            if self._req is None:  # first the message's envelope (matched probe), then its bytes
                limit = default_timeout() if timeout is None else timeout
                start = time.monotonic()
                _wait_until(self._probe, self.describe, timeout)
                if limit is not None:  # one deadline for both waits
                    timeout = max(1e-6, limit - (time.monotonic() - start))
            assert self._req is not None
            _spin(self._req, _TIGHT_POLLS)  # then test() below finishes it
        return Request.wait(self, timeout)

    def _drain_if_lost(self) -> None:
        """A message matched for this receive, never posted, on a channel whose state was
        lost (:meth:`_classify`): :meth:`_drain` it."""
        if self._matched is not None and self._chan.seen.get(
                (self._status.Get_source(), self._status.Get_tag())) is _BROKEN:
            self._drain()

    def _drain(self) -> None:
        """Take the matched, unposted message off the wire (its sender completes) and drop it."""
        count = self._status.Get_count(MPI.BYTE)
        self._matched.Recv([bytearray(count), count, MPI.BYTE])  # type: ignore[union-attr]
        self._matched = None

    def _raise_deferred(self) -> None:
        exc = self._deferred
        if exc is not None:
            if not isinstance(exc, _ChannelLost):  # (that one is final: its message is gone)
                self._deferred = None
            raise exc

    def _probe(self) -> bool:
        """Match the message and post its receive; False while it has not arrived.  A
        message goes to the earliest posted receive it matches, as in MPI (:class:`_Unmatched`).
        A message matched earlier whose posting raised is posted now instead."""
        with _UNMATCHED.lock:  # (another thread's probe may be handing this receive its message)
            if self._req is None and self._matched is not None:
                with self._chan.recv_lock:
                    self._post(self._matched)
                return True
            if self._req is None:
                empty = _UNMATCHED.swept()
                if empty is not None and (self.comm.handle, self.src, self.tag) in empty:
                    return False  # this pattern found nothing earlier in this sweep
                chain = _UNMATCHED.chain(self)
                for i, r in enumerate(chain):  # oldest first: each has had its turn before the next
                    r._probe_own(chain[:i], empty)
            return self._req is not None

    def _probe_own(self, earlier: list[_RecvRequest], empty: set[tuple[int, int, int]] | None) -> None:
        """Probe this receive's pattern until it has its message or none is there; a message
        that an ``earlier`` receive (still unmatched) matches goes to that one.  ``empty``:
        the patterns that found nothing in the current sweep (skipped; None outside one)."""
        while self._req is None:
            pattern = (self.comm.handle, self.src, self.tag)
            if empty is not None and pattern in empty:
                return
            with self._chan.recv_lock:  # probe and classify in MPI's matching order
                msg = self._probe_raw() if not earlier else False  # (earlier ones: the message may be theirs)
                if msg is True:
                    return
                if msg is False:
                    if self._status is None:
                        self._status = MPI.Status()
                    msg = self.comm.Improbe(self.src, self.tag, self._status)
                if msg is None:
                    if empty is not None:
                        empty.add(pattern)
                    return
                other = _UNMATCHED.owner_of(earlier, self._status.Get_source(), self._status.Get_tag())
                if other is None:
                    _UNMATCHED.forget(self)
                    self._post(msg)
                else:  # it arrived after ``other``, posted earlier, last looked: it is other's
                    other._status, self._status = self._status, MPI.Status()
                    _UNMATCHED.forget(other)
                    other._post(msg)

    def _probe_raw(self) -> bool | MPI.Message | None:
        """The native fast path (:mod:`mpimp.fastpath`) for a receive into ``out`` that the
        channel's raw repeat fits: probe, and post the receive of a raw repeat, in one C
        call (call with the channel's recv_lock held, with no earlier receive that could take
        the message).  True: posted; None: nothing arrived; a Message: another size,
        matched (``_status`` has its envelope); False: the fast path does not apply."""
        out, fast = self.out, _fast()
        if out is None or fast is None:
            return False
        seen = self._chan.seen.get((self.src, self.tag))
        if not _fits_native(seen, out):
            return False
        meta = (seen.meta, seen.as_tuple)  # type: ignore[union-attr]
        dtype, shape, _ = seen.meta[0]  # type: ignore[union-attr]
        if self._status is None:
            self._status = MPI.Status()
        run = _UNMATCHED.run(self, lambda r: (o := r.out) is out or (
            o is not None and o.dtype == dtype and o.shape == shape and o.is_cpu and o.is_contiguous()))
        # inside wait_all (a sweep) the probe may spin a little in C: the caller waits anyway,
        # and a Python round over its requests before the next probe takes far longer
        polls = _SWEEP_POLLS if _UNMATCHED.swept() is not None else 0
        if len(run) == 1:
            got = fast.recv_raw(self.comm, self.src, self.tag, out.data_ptr(), seen.nbytes, polls, self._status)
            if got is True:  # received already: a null request tests complete
                got = MPI.Request()
            elif type(got) is not MPI.Request:
                return got
            self._posted_raw(got, meta)
            _UNMATCHED.forget(self)
            return True
        # the later receives of this pattern too: what arrived goes to them in order, the
        # copies back to back in one C call
        try:
            got_all = fast.recv_run(self.comm, self.src, self.tag, [r.out.data_ptr() for r in run],  # type: ignore[union-attr]
                                    seen.nbytes, polls, self._status)
        except MPI.Exception as exc:  # the receives posted before the failure are in flight
            _posted_run(run, getattr(exc, "mpimp_posted", []), meta)
            raise
        reqs = _posted_run(run, got_all, meta)  # (each has its request before anything can raise)
        other = got_all[-1]  # the matched message of another size (MPI.MESSAGE_NULL: none)
        if reqs:
            try:
                done = fast.testall(reqs, 1)  # (the usual case: the copies are done) complete them here
            except MPI.Exception:
                done = False  # each test() reports its own receive's error
            if done:
                for r in run[: len(reqs)]:
                    r._value, r._done = r.out, True
        if other:  # another size, after the raw repeats: matched, read as usual
            r, msg = run[len(reqs)], other
            if r is self:
                return msg
            r._status, self._status = self._status, MPI.Status()  # (its envelope is in this one's status)
            _UNMATCHED.forget(r)
            r._post(msg)
        return True if reqs else None  # (self is the run's first)

    def _posted_raw(self, req: MPI.Request, meta: tuple) -> None:
        """This receive's raw repeat is matched (and forgotten by the caller) and its
        receive into ``out`` posted."""
        self._meta, self._direct, self._req = meta, True, req

    def test(self) -> bool:
        """Poll; may wait (up to the deadline) for an earlier framed message on this
        receive's channel to finish arriving when this one is matched (its header decides
        how to read this one; :meth:`_classify`)."""
        if self._done:
            return True
        if self._deferred is not None:
            self._raise_deferred()
        if self._req is None:
            if not self._probe():
                return False
            if self._done:  # (a native run completed it with its probe)
                return True
        assert self._req is not None
        if not self._req.Test():
            return False
        self._finish()
        self._done = True
        return True

    def _classify(self, count: int) -> Seen | None:
        """The channel's :class:`Seen` when this matched message is a raw repeat of it, else
        None (framed: this receive then decides the channel's L; call with its recv_lock held)."""
        chan = self._chan
        key = (self._status.Get_source(), self._status.Get_tag())
        seen = chan.seen.get(key)
        if seen is _BROKEN:
            raise _ChannelLost(
                f"rank {MPI.COMM_WORLD.Get_rank()}: the channel from rank {key[0]} (tag {key[1]}) lost its "
                f"state: an earlier message on it could not be received (its receive buffer failed twice), "
                f"so the messages after it cannot be read; receive on a new communicator (mpimp.init or Dup)")
        if type(seen) is _RecvRequest:  # the previous message is framed and still arriving:
            try:
                seen._settle()  # its header decides how to read this one
            except TransportError:
                pass  # it is foreign or corrupt: its own receive reports that; L is as before it
            except BaseException:
                # it could not be posted again (its buffer failed once more): this message
                # cannot be classified before it, and none after it may be (they would be
                # read by the wrong header): every later receive on the channel raises
                chan.seen[key] = _BROKEN
                raise
            seen = chan.seen.get(key)
        if seen is not None and count == seen.nbytes:
            return seen
        self._key, self._prev = key, seen
        chan.seen[key] = self
        return None

    def _settle(self) -> None:
        """Complete this framed message's transfer and learn its header (the next message on
        its channel is read by it).  A message whose posting failed earlier is posted now."""
        if self._req is None and self._matched is not None:
            self._post(self._matched)
        req = self._req
        assert req is not None
        _wait_until(req.Test, self.describe, None)
        self._learn()

    def _learn(self) -> None:
        """Parse a received framed message's header into ``_meta``; then its channel's L is
        that header if eligible, else what it was before (a foreign message restores it)."""
        try:
            if self._meta is None:
                meta, as_tuple, _ = _parse_header(self._header_bytes())
                self._meta = (meta, as_tuple)
        finally:
            if self._key is not None:
                new = self._prev
                if self._meta is not None and len(self._meta[0]) == 1:
                    dtype, shape, _ = self._meta[0][0]
                    seen = Seen(dtype, shape, self._meta[1])
                    if seen.nbytes >= ELIDE_MIN:
                        new = seen
                self._decide(new)  # type: ignore[arg-type]

    def _post(self, msg: MPI.Message) -> None:
        """Classify the matched message and post its receive.  Settling an earlier message,
        or allocating the buffer (MemoryError, a device out of memory), may raise: until the
        receive is posted the message stays in ``_matched`` (a later test()/wait() resumes
        with it), and a framed one goes on deciding its channel's L (the channel's next
        message posts it first, :meth:`_settle`: read by the L before it, a raw repeat of
        this message's header of the same byte count would get the old shape)."""
        self._matched = msg
        self._post_matched(msg)
        self._matched = None

    def _decide(self, new: Seen | None) -> None:
        """This framed message no longer decides its channel's L: the channel's L is ``new``
        (None: no L), unless a later message has taken its place meanwhile."""
        key, chan = self._key, self._chan
        with chan.recv_lock:
            if chan.seen.get(key) is self:
                if new is None:
                    del chan.seen[key]
                else:
                    chan.seen[key] = new
        self._key = self._prev = None

    def _post_matched(self, msg: MPI.Message) -> None:
        count = self._status.Get_count(MPI.BYTE)
        out = self.out
        if count >= ELIDE_MIN:
            # classified once, in matching order: posting again after a failure must not read
            # the message by whatever the channel has learned since
            try:
                seen = self._classify(count) if self._classified is _UNCLASSIFIED else self._classified
            except _ChannelLost as exc:  # the message is drained (its sender completes) and lost
                self._deferred = exc  # (sticky: every wait() raises it)
                self._drain()
                raise
            self._classified = seen
            if seen is not None:  # raw: the payload alone; dtype and shape from the channel
                self._meta = (seen.meta, seen.as_tuple)
                if out is not None and seen.fits(out):
                    self._direct = True  # straight into out: one contiguous receive
                    self._req = msg.Irecv([MPI.buffer.fromaddress(out.data_ptr(), count), count, MPI.BYTE])
                    return
        device = self.device if self.device is not None or out is None else out.device
        if count <= _PACK_LIMIT + 4096 and (device is None or device.type == "cpu"):
            self._raw = bytearray(count)  # small: one buffer, views (or a copy into out)
            self._req = msg.Irecv([self._raw, count, MPI.BYTE])
            return
        device = self.device if out is None else None
        if device is not None and device.type != "cpu":
            raw_t = torch.empty(count, dtype=torch.uint8, device=device)
            spec, self._staged = from_wire(raw_t)
            self._raw = raw_t
            self._req = msg.Irecv([spec, count, MPI.BYTE])
        else:
            # one contiguous buffer: a sender's contiguous message (raw, or packed) is then
            # pulled by this side alone (single-copy CMA); a two-block receive datatype
            # mirroring the sender's was measured to double the pipeline's bubble (the copy
            # then waits for the computing sender's MPI calls)
            arr = _RECV_POOL.take_array(count)  # results: one from_numpy each (_view)
            self._raw = arr
            self._req = msg.Irecv([arr, count, MPI.BYTE])

    def _header_bytes(self) -> bytes:
        raw = self._raw
        if type(raw) is bytearray:
            return _head_of(raw)
        if isinstance(raw, torch.Tensor):
            src = self._staged if self._staged is not None else raw
            hlen = _header_length(bytes(src[:_HEAD.size].cpu().numpy()), src.numel())
            return bytes(src[:hlen].cpu().numpy())
        assert raw is not None
        return _head_of(raw)  # type: ignore[arg-type]

    def _finish(self) -> None:
        self._learn()
        assert self._meta is not None
        meta, as_tuple = self._meta
        out, raw = self.out, self._raw
        if self._direct:
            self._value = out
            return
        if isinstance(raw, torch.Tensor) and self._staged is not None:
            raw.copy_(self._staged)
        assert raw is not None
        if out is not None:
            self._check_out(meta)
            off, n = meta[0][2], out.nbytes
            if not isinstance(raw, torch.Tensor) and out.is_cpu and out.is_contiguous():
                if n:
                    memoryview(MPI.buffer.fromaddress(out.data_ptr(), n))[:] = memoryview(raw)[off : off + n]
            else:
                out.copy_(_view(raw, *meta[0][:2], off))
            self._value = out
        else:
            self._value = _views(raw, meta, as_tuple)
        self._raw = self._staged = None

    def _check_out(self, meta: list[tuple[torch.dtype, tuple[int, ...], int]]) -> None:
        assert self.out is not None
        _check_out(meta, self.out, self.src, self.tag)

    def result(self) -> Tensors | None:
        return self._value


def irecv(src: int, comm: MPI.Comm, tag: int = 0, out: torch.Tensor | None = None,
          device: torch.device | str | None = None) -> Request:
    """Start receiving a tensor (or tuple) from rank ``src`` of ``comm``; ``wait()`` returns it.

    Shape and dtype come from the message (its header, or for a raw repeat the channel's
    last header: :mod:`mpimp.channels`).  With ``out`` the data is written into it (its
    shape and dtype must match the message's; a mismatch raises TransportError naming
    both, and the message is consumed).  ``device`` places the result (default:
    ``out``'s, else CPU).
    """
    dev = torch.device(device) if isinstance(device, str) else device
    if _ABANDONED:
        _reap()
    if out is None or dev is not None or src < 0 or tag < 0:
        return _RecvRequest(src, comm, tag, out, dev)
    if _UNMATCHED.pending and _UNMATCHED.busy(comm, src, tag):  # (a receive of a window: the usual case)
        return _RecvRequest(src, comm, tag, out, None)
    if (fast := _fast()) is not None:
        # the native fast path: a raw repeat that has arrived is matched and its receive
        # posted now, as MPI_Irecv does with a message already there (nothing earlier can take it)
        chan = channels(comm)
        with chan.recv_lock:
            seen = chan.seen.get((src, tag))
            if _fits_native(seen, out):
                got = fast.recv_raw(comm, src, tag, out.data_ptr(), seen.nbytes, 0, chan.status)
                if type(got) is MPI.Request:
                    return _RecvRequest(src, comm, tag, out, dev, posted=(got, seen))
                if got is not None:  # another size, matched: this request receives it
                    return _RecvRequest(src, comm, tag, out, dev, got, MPI.Status(chan.status))
    return _RecvRequest(src, comm, tag, out, dev)


def _recv_small(msg: MPI.Message, count: int, out: torch.Tensor | None, src: int, tag: int,
                timeout: float | None) -> Tensors:
    """Receive a matched framed message of ``count`` < ELIDE_MIN bytes into a bytearray,
    without a request object (such a message touches no channel state)."""
    buf = bytearray(count)
    if count <= _EAGER:  # matched and eager: its bytes have arrived, Mrecv only copies
        msg.Recv([buf, count, MPI.BYTE])
    else:
        _complete(msg.Irecv([buf, count, MPI.BYTE]),
                  lambda: f"recv of {count} B from rank {src} (tag {tag})", timeout, keep=buf)
    if out is None:
        return _unpack(buf)
    meta, _, _ = _parse_header(_head_of(buf))
    _check_out(meta, out, src, tag)
    n = out.nbytes
    if n:
        off = meta[0][2]
        memoryview(MPI.buffer.fromaddress(out.data_ptr(), n))[:] = memoryview(buf)[off : off + n]
    return out


def _raw_result(target: np.ndarray, seen: Seen) -> Tensors:
    """What ``recv()`` without ``out`` returns for a raw repeat received into ``target``."""
    got = _view(target, *seen.meta[0])
    return (got,) if seen.as_tuple else got


def recv(src: int, comm: MPI.Comm, tag: int = 0, out: torch.Tensor | None = None,
         device: torch.device | str | None = None, timeout: float | None = None) -> Tensors:
    """Receive a tensor (or tuple of tensors) from rank ``src`` of ``comm``."""
    dev = torch.device(device) if isinstance(device, str) else device
    if _DEBUG:
        _trace(comm, f"Recv <- {src} tag {tag}")
    if _ABANDONED:
        _reap()
    rreq: _RecvRequest | None = None
    if not (_UNMATCHED.pending and _UNMATCHED.blocked(comm, src, tag)):  # else: after the earlier irecvs
        chan = channels(comm)
        with chan.recv_lock:  # probe and classify in MPI's matching order
            status = chan.status  # (the channel's own: used under its lock only)
            # what a raw repeat on this channel would be, worked out before the message arrives
            # (holding the lock, nothing can change the channel's state meanwhile)
            seen = chan.seen.get((src, tag)) if src >= 0 and tag >= 0 and dev is None else None
            target = spec = None
            fast = _fast()
            if type(seen) is Seen:
                if out is None:
                    target = _RECV_POOL.take_array(seen.nbytes)
                elif seen.fits(out):  # (an address for the native call, a buffer for mpi4py)
                    target = (out.data_ptr() if fast is not None and seen.nbytes <= _FAST_MAX
                              else MPI.buffer.fromaddress(out.data_ptr(), seen.nbytes))
                if target is not None:
                    spec = [target, seen.nbytes, MPI.BYTE]
            if spec is not None and fast is not None and seen.nbytes <= _FAST_MAX:  # type: ignore[union-attr]
                # native: probe, the raw repeat's receive and its first polls in one C call
                got = fast.recv_raw(comm, src, tag, target, seen.nbytes, _TIGHT_POLLS, status)  # type: ignore[union-attr]
                if got is True:
                    return out if out is not None else _raw_result(target, seen)  # type: ignore[arg-type]
                msg = got if type(got) is MPI.Message else None  # None: not arrived; else another size
                raw_hit = type(got) is MPI.Request
                req = got
                count = seen.nbytes if raw_hit else (-1 if msg is None else status.Get_count(MPI.BYTE))  # type: ignore[union-attr]
            else:
                msg = comm.Improbe(src, tag, status)
                for _ in range(_TIGHT_POLLS):  # wait for the envelope in a tight loop (1-2 ms) first
                    if msg is not None:
                        break
                    msg = comm.Improbe(src, tag, status)
                count = -1 if msg is None else status.Get_count(MPI.BYTE)
                raw_hit = spec is not None and count == seen.nbytes  # type: ignore[union-attr]
                if raw_hit:
                    req = msg.Irecv(spec)  # the raw repeat: one contiguous receive
            small = False
            if not raw_hit and msg is not None:
                small = count < ELIDE_MIN and (dev is None or dev.type == "cpu") and (
                    out is None or (out.is_cpu and out.is_contiguous()))
                if not small:  # (a request keeps the channel's state right whatever its wait raises)
                    rreq = _RecvRequest(src, comm, tag, out, dev, msg, MPI.Status(status))
        if small:  # the common small message: no request object, no channel state
            return _recv_small(msg, count, out, src, tag, timeout)  # type: ignore[arg-type]
        if raw_hit:  # (target alone does not keep out's memory alive: keep out too)
            _complete(req, lambda: f"recv of {count} B from rank {src} (tag {tag})", timeout, keep=(target, out))
            return out if out is not None else _raw_result(target, seen)  # type: ignore[arg-type]
    if rreq is None:  # not arrived yet (or behind earlier irecvs): a request that probes in order
        rreq = _RecvRequest(src, comm, tag, out, dev)
        try:
            value = rreq.wait(timeout)
        except BaseException:
            if rreq._req is None and rreq._matched is None:  # abandoned unmatched: it must not match later
                _UNMATCHED.forget(rreq)
            raise
    else:
        try:
            value = rreq._value if rreq.test() else rreq.wait(timeout)
        except BaseException:
            rreq._drain_if_lost()  # (no one can ask for its message again)
            raise
    assert value is not None
    return value


def wait_all(requests: Sequence[Request], timeout: float | None = None) -> list[Tensors | None]:
    """Complete every request (driving all of them, so no ordering deadlock); return their results."""
    pending = list(requests)
    posted: list[MPI.Request] | None = []
    for r in pending:
        if not isinstance(r, (_MPIRequest, _RecvRequest)) or r._req is None or r._done:
            posted = None  # (an unmatched receive, or another kind: the loop below drives them)
            break
        posted.append(r._req)  # type: ignore[union-attr]
    if posted and len({id(q) for q in posted}) == len(posted):  # (MPI forbids a request twice in Testall)  # every request posted: drive them together in C
        try:
            fast = _fast()
            if fast is not None:
                done = fast.testall(posted, _TIGHT_POLLS)
            else:
                for _ in range(_TIGHT_POLLS):
                    if done := MPI.Request.Testall(posted):
                        break
            if done:  # each test() finishes its request (the MPI requests are complete)
                results: list[Tensors | None] = []
                for r in pending:
                    if type(r) is _SendRequest:  # (its test() written out: nothing to finish)
                        r._done, r._keep = True, None
                        results.append(None)
                    else:
                        results.append(r.result() if r.test() else r.wait(timeout))
                return results
        except MPI.Exception:
            pass  # test() below reports it, naming the request
    _wait_until(lambda: _test_all(pending),
                lambda: "; ".join(r.describe() for r in pending if not r.test()), timeout)
    return [r.result() for r in pending]


def _test_all(requests: Sequence[Request]) -> bool:
    """Test every request once (one sweep of the unmatched receives); True when all are done."""
    sweep = _UNMATCHED._sweep
    outer = getattr(sweep, "empty", None)
    sweep.empty = set()
    try:
        return all([r.test() for r in requests])
    finally:
        sweep.empty = outer


# ----------------------------------------------------------------------------- collectives

def _op(op: str, dtype: torch.dtype | None = None) -> MPI.Op:
    """The MPI operator for ``op`` ("avg" -> SUM), refusing combinations MPI cannot reduce.

    Checked locally and identically on every rank, before any communication.
    """
    try:
        mpi_op = _OPS["sum" if op == "avg" else op]
    except KeyError:
        raise ConfigError(f"op={op!r} is not supported; use one of {sorted(_OPS)} or 'avg'") from None
    if dtype is None:
        return mpi_op
    mpi_datatype(dtype)  # unsupported dtypes raise, naming the dtype
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.bool:
        raise ConfigError(f"cannot {op}-reduce a bool tensor; reduce tensor.to(torch.uint8) "
                          f"(max/min act as or/and) and convert back")
    if op == "avg" and not (dtype.is_floating_point or dtype.is_complex):
        raise ConfigError(f"op='avg' needs a floating-point tensor, got {name}; "
                          f"reduce with op='sum' and divide, or convert to float first")
    if op in ("max", "min") and dtype.is_complex:
        raise ConfigError(f"op={op!r} is undefined for complex tensors ({name}); reduce the real "
                          f"and imaginary parts (torch.view_as_real) or the magnitudes instead")
    return mpi_op


def _reduce16_op(t: torch.Tensor, op: str) -> MPI.Op | None:
    """Native 16-bit reduction operator for ``t``'s buffer, or None to fall back to fp32 accumulation."""
    try:
        from .native_ops import reduction_op
    except ImportError:  # pragma: no cover - native ops module absent
        return None
    on_device = t.device.type == "cuda" and cuda_aware()  # else MPI sees a host (staged) buffer
    return reduction_op(t.dtype, op, device="cuda" if on_device else "cpu")


def iall_reduce(tensor: torch.Tensor, comm: MPI.Comm, op: str = "sum") -> Request:
    """Start an in-place all-reduce of ``tensor`` over ``comm``; ``wait()`` returns the tensor.

    ``op`` is sum, max, min, prod or avg (sum divided by the communicator size).
    16-bit floats are reduced with mpimp's native operator (fp32 accumulation, one
    rounding per step) when built, otherwise through an fp32 copy (exact sum, one rounding).
    """
    return _all_reduce(tensor, comm, op, None)


def _all_reduce(tensor: torch.Tensor, comm: MPI.Comm, op: str, timeout: float | None,
                blocking: bool = False) -> Request:
    """The all-reduce behind both APIs; ``blocking`` runs it now (see :func:`all_reduce`)."""
    avg = op == "avg"
    mpi_op = _op(op, tensor.dtype)
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    dtype = mpi_datatype(work.dtype)
    if is_16bit_float(work.dtype):
        native = _reduce16_op(work, "sum" if avg else op)
        if native is None:
            work = work.float()
            dtype = MPI.FLOAT
        else:
            mpi_op = native
    buf, staged = to_wire(work)
    n = work.numel()
    what = lambda: f"all_reduce of {n} elements over {comm.Get_size()} ranks"  # noqa: E731
    if blocking:  # the library's tuned blocking collective, under the watchdog's deadline
        if _DEBUG:
            _trace(comm, f"Allreduce {n} x {work.dtype} op {op}")
        with WATCHDOG.guard(what, timeout):
            comm.Allreduce(MPI.IN_PLACE, [buf, n, dtype], mpi_op)
        req = MPI.REQUEST_NULL  # already complete
    else:
        if _DEBUG:
            _trace(comm, f"Iallreduce {n} x {work.dtype} op {op}")
        req = comm.Iallreduce(MPI.IN_PLACE, [buf, n, dtype], mpi_op)

    def finish() -> torch.Tensor:
        result = work
        if staged is not None:
            result.copy_(staged)
        if avg:
            result.div_(comm.Get_size())
        if result is not tensor:
            tensor.copy_(result)
        return tensor

    return _MPIRequest(req, what, (work, staged), finish)


_SPECS: dict[tuple[int, int, torch.dtype], list] = {}


def _plain_spec(tensor: torch.Tensor) -> list | None:
    """``[buffer, count, datatype]`` of a contiguous host tensor of a plain dtype (cached)."""
    mpi_type = _PLAIN_TYPES.get(tensor.dtype)
    if mpi_type is None:
        return None
    n = tensor.numel()
    spec = [MPI.buffer.fromaddress(tensor.data_ptr(), tensor.nbytes) if n else None, n, mpi_type]
    if len(_SPECS) >= _CACHE_MAX:
        _SPECS.clear()
    _SPECS[(tensor.data_ptr(), tensor.nbytes, tensor.dtype)] = spec
    return spec


def all_reduce(tensor: torch.Tensor, comm: MPI.Comm, op: str = "sum",
               timeout: float | None = None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over ``comm``; returns ``tensor``.

    The library's blocking all-reduce (its tuned algorithms beat the non-blocking
    schedule at every size, measured in docs/benchmarks.md), guarded by the
    :mod:`mpimp.watchdog`: if it has not returned by the deadline (``timeout``, default
    ``MPIMP_TIMEOUT``) because a rank failed or never called it, the job is aborted with
    a stall report naming the rank and the call, instead of hanging.  For a catchable
    :class:`DeadlineError` use ``iall_reduce(...).wait(timeout)``.
    """
    mpi_op = _OPS.get(op)
    if mpi_op is not None and tensor.is_cpu and tensor.is_contiguous():
        # the common case (fp32/fp64/int host tensors): no staging, no request objects, the
        # buffer spec cached by (address, bytes, dtype): each Python step after a large
        # transfer runs on caches the transfer has evicted
        spec = _SPECS.get((tensor.data_ptr(), tensor.nbytes, tensor.dtype))
        if spec is None:
            spec = _plain_spec(tensor)
        if spec is not None:
            if _DEBUG:
                _trace(comm, f"Allreduce {tensor.numel()} x {tensor.dtype} op {op}")
            key = WATCHDOG.arm(lambda: f"all_reduce of {tensor.numel()} x {tensor.dtype} over "
                               f"{comm.Get_size()} ranks", timeout)
            try:
                comm.Allreduce(MPI.IN_PLACE, spec, mpi_op)
            finally:
                WATCHDOG.disarm(key)
            return tensor
    elif op == "avg" and tensor.dtype in (torch.float32, torch.float64):  # 16-bit: below, in fp32
        all_reduce(tensor, comm, "sum", timeout)
        return tensor.div_(comm.Get_size())
    value = _all_reduce(tensor, comm, op, timeout, blocking=True).wait(timeout)
    assert isinstance(value, torch.Tensor)
    return value


def reduce_scatter(tensor: torch.Tensor, comm: MPI.Comm, op: str = "sum",
                   timeout: float | None = None) -> torch.Tensor:
    """Reduce ``tensor`` over ``comm`` and return this rank's block of dim 0.

    ``tensor.shape[0]`` must be divisible by the communicator size p; rank i gets rows
    ``[i * n/p, (i+1) * n/p)`` of the reduced tensor.
    """
    p = comm.Get_size()
    if tensor.dim() == 0 or tensor.shape[0] % p:
        raise ConfigError(
            f"rank {MPI.COMM_WORLD.Get_rank()}: reduce_scatter needs dim 0 divisible by {p} ranks, "
            f"got shape {list(tensor.shape)}; pad dim 0 to a multiple of {p}"
        )
    avg = op == "avg"
    mpi_op = _op(op, tensor.dtype)
    src = tensor.detach().contiguous()
    out_dtype = src.dtype
    if is_16bit_float(src.dtype):
        native = _reduce16_op(src, "sum" if avg else op)
        if native is None:
            src = src.float()
        else:
            mpi_op = native
    out = torch.empty((src.shape[0] // p, *src.shape[1:]), dtype=src.dtype, device=src.device)
    dtype = mpi_datatype(src.dtype) if src.dtype != torch.float32 else MPI.FLOAT
    sbuf, sstaged = to_wire(src)  # the staging copy must outlive the operation
    rbuf, staged = from_wire(out)
    _trace(comm, f"Ireduce_scatter_block {out.numel()} x {src.dtype} op {op}")
    req = comm.Ireduce_scatter_block([sbuf, out.numel(), dtype], [rbuf, out.numel(), dtype], mpi_op)
    _MPIRequest(req, f"reduce_scatter of {src.numel()} elements over {p} ranks", (src, sstaged, out, staged)).wait(timeout)
    if staged is not None:
        out.copy_(staged)
    if avg:
        out.div_(p)
    return out.to(out_dtype)


def all_gather(tensor: torch.Tensor, comm: MPI.Comm, dim: int = 0,
               timeout: float | None = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (same shape everywhere) along ``dim``, in rank order."""
    p = comm.Get_size()
    src = tensor.detach().contiguous()
    dtype_code(src.dtype)
    out = torch.empty((p, *src.shape), dtype=src.dtype, device=src.device)
    sbuf, sstaged = to_wire(src)  # the staging copy must outlive the operation
    rbuf, staged = from_wire(out)
    nbytes = src.numel() * src.element_size()
    _trace(comm, f"Iallgather {nbytes} B")
    req = comm.Iallgather([sbuf, nbytes, MPI.BYTE], [rbuf, nbytes, MPI.BYTE])
    _MPIRequest(req, f"all_gather of {nbytes} B over {p} ranks", (src, sstaged, out, staged)).wait(timeout)
    if staged is not None:
        out.copy_(staged)
    if src.dim() == 0:
        return out
    d = dim % src.dim()
    if d == 0:
        return out.reshape(p * src.shape[0], *src.shape[1:])
    return torch.cat(out.unbind(0), dim=d)


def broadcast(tensor: torch.Tensor, comm: MPI.Comm, root: int = 0,
              timeout: float | None = None) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with root's (same shape and dtype everywhere)."""
    out = ibroadcast(tensor, comm, root).wait(timeout)
    assert out is tensor
    return tensor


def ibroadcast(tensor: torch.Tensor, comm: MPI.Comm, root: int = 0) -> Request:
    """Start :func:`broadcast`; ``wait()`` returns ``tensor`` holding root's values."""
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    dtype_code(work.dtype)
    buf, staged = to_wire(work) if comm.Get_rank() == root else from_wire(work)
    nbytes = work.numel() * work.element_size()
    _trace(comm, f"Ibcast {nbytes} B root {root}")
    receiver = comm.Get_rank() != root

    def finish() -> torch.Tensor:
        if staged is not None and receiver:
            work.copy_(staged)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    return _MPIRequest(comm.Ibcast([buf, nbytes, MPI.BYTE], root), f"broadcast of {nbytes} B from rank {root}",
                       (work, staged), finish)


def barrier(comm: MPI.Comm, timeout: float | None = None) -> None:
    """A barrier with a deadline (non-blocking barrier polled until done)."""
    _trace(comm, "Ibarrier")
    _MPIRequest(comm.Ibarrier(), f"barrier over {comm.Get_size()} ranks").wait(timeout)


# ----------------------------------------------------------------------------- progress

def progress_thread_wanted() -> bool:
    """``MPIMP_PROGRESS_THREAD=1`` (default 0) and an MPI initialised with MPI_THREAD_MULTIPLE."""
    wanted = env_switch("MPIMP_PROGRESS_THREAD", False, "a thread drives MPI progress during pipeline steps",
                        "the default")
    return wanted and MPI.Query_thread() == MPI.THREAD_MULTIPLE


class ProgressThread:
    """A thread that enters MPI every ~200 us while compute runs, so transfers make progress.

    Why: MPI libraries on CPUs progress only inside MPI calls.  A large message (or a
    non-blocking collective) started before a long computation does not move while the
    rank computes: the receiver of a rendezvous send waits for the sender's next MPI call
    (Open MPI's shared-memory path packs a derived datatype fragment by fragment), and an
    ``Iallreduce`` started during backward would only run at the next hook.  The thread
    calls ``Iprobe`` (which never receives anything, so the tag does not matter) and
    thereby the library's progress engine.  Needs MPI_THREAD_MULTIPLE (mpi4py's default).
    """

    _TAG = 32767

    def __init__(self, comm: MPI.Comm, interval: float = 2e-4) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(comm, interval),
                                        name="mpimp-progress", daemon=True)
        self._thread.start()

    def _loop(self, comm: MPI.Comm, interval: float) -> None:
        while not self._stop.wait(interval):
            comm.Iprobe(MPI.ANY_SOURCE, self._TAG)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
