"""Tensor transport over MPI: point-to-point and collectives, with deadlines.

Problem: a pipeline stage receives activations whose shape and dtype it may not know in
advance (they can change between micro-batches), and torch's binaries ship no MPI
backend.  Sending a separate "shape" message doubles the latency and invites
mismatched pairs; so every mpimp message is self-describing: one MPI message holding a
small header (dtypes, shapes) followed by the payload(s), each 64-byte aligned::

    | "MPMP" v n hdrlen | code ndim pad | dims (int64) ... | pad | payload 0 | pad | payload 1 ...

The receiver learns the size with a matched probe (``MPI_Improbe``; no race with other
receives on the same tag), allocates one buffer, receives into it, and returns views
into that buffer (no copy).  Large contiguous CPU tensors are sent without copying: the
header and the tensors' own memory are described by one MPI struct datatype over
absolute addresses.  Small messages are packed into one buffer instead (a copy of a few
KiB costs less than creating a datatype).

Every wait has a deadline (``MPIMP_TIMEOUT`` seconds, default 600; 0 disables it):
instead of hanging forever when a peer died or a schedule is mismatched, the wait
raises :class:`DeadlineError` naming the rank, the peer, the tag and the operation.
``MPIMP_DEBUG=1`` prints one line per MPI call (``r1 | Irecv <- 0 tag 7``).
"""

from __future__ import annotations

import os
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Union

import torch
from mpi4py import MPI

from .buffers import (
    CODE_DTYPES,
    cuda_aware,
    dtype_code,
    from_wire,
    host_buffer,
    is_16bit_float,
    mpi_datatype,
    to_wire,
)
from .errors import ConfigError, DeadlineError, TransportError

__all__ = [
    "send",
    "recv",
    "isend",
    "irecv",
    "all_reduce",
    "iall_reduce",
    "reduce_scatter",
    "all_gather",
    "broadcast",
    "barrier",
    "Request",
    "wait_all",
    "default_timeout",
]

Tensors = Union[torch.Tensor, tuple[torch.Tensor, ...]]

_MAGIC = b"MPMP"
_VERSION = 1
_ALIGN = 64
_PACK_LIMIT = 32 * 1024  # bytes; below this the message is packed into one buffer
_ZEROS = torch.zeros(_ALIGN, dtype=torch.uint8)  # source of padding bytes
_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}


def default_timeout() -> float | None:
    """Seconds a wait may take before raising DeadlineError (``MPIMP_TIMEOUT``; 0 = none)."""
    raw = os.environ.get("MPIMP_TIMEOUT", "600")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"MPIMP_TIMEOUT={raw!r} is not a number of seconds") from None
    return None if value <= 0 else value


def _trace(comm: MPI.Comm, text: str) -> None:
    if os.environ.get("MPIMP_DEBUG", "0") not in ("", "0"):
        print(f"r{MPI.COMM_WORLD.Get_rank()} | {text} (comm rank {comm.Get_rank()})",
              file=sys.stderr, flush=True)


def _wait_until(done: Callable[[], bool], what: Callable[[], str], timeout: float | None) -> None:
    """Poll ``done`` (which must drive MPI progress) until true or the deadline passes."""
    if done():
        return
    start = time.monotonic()
    limit = default_timeout() if timeout is None else timeout
    spins = 0
    while not done():
        spins += 1
        if spins > 2000:  # after ~ms of spinning, yield the core (2 ranks may share one)
            time.sleep(min(1e-3, 2e-6 * (spins - 2000)))
        if limit is not None and time.monotonic() - start > limit:
            raise DeadlineError(
                f"rank {MPI.COMM_WORLD.Get_rank()}: {what()} did not complete within {limit:g} s. "
                f"The peer may have failed, or the ranks disagree on the schedule. "
                f"Raise MPIMP_TIMEOUT (0 disables the deadline) or set MPIMP_DEBUG=1 to trace MPI calls."
            )


# ----------------------------------------------------------------------------- headers

def _round_up(n: int, k: int = _ALIGN) -> int:
    return (n + k - 1) // k * k


def _header(tensors: Sequence[torch.Tensor], as_tuple: bool = False) -> tuple[bytes, list[int]]:
    """Header bytes (padded to 64) and the payload offsets within the message.

    The count byte holds the number of tensors (at most 127); its top bit marks a tuple,
    so a 1-tuple arrives as a 1-tuple and a bare tensor as a bare tensor.
    """
    if len(tensors) > 127:
        raise ConfigError(f"at most 127 tensors per message, got {len(tensors)}")
    parts = [b""]
    for t in tensors:
        parts.append(struct.pack(f"<BB6x{t.dim()}q", dtype_code(t.dtype), t.dim(), *t.shape))
    body = b"".join(parts)
    hlen = _round_up(8 + len(body))
    if hlen > 0xFFFF:
        raise ConfigError(f"too many dimensions in one message ({len(tensors)} tensors)")
    count = len(tensors) | (0x80 if as_tuple else 0)
    head = struct.pack("<4sBBH", _MAGIC, _VERSION, count, hlen) + body
    offsets, pos = [], hlen
    for t in tensors:
        offsets.append(pos)
        pos = _round_up(pos + t.numel() * t.element_size())
    return head.ljust(hlen, b"\0"), offsets


def _parse(buf: torch.Tensor) -> tuple[list[tuple[torch.dtype, tuple[int, ...], int]], bool]:
    """(dtype, shape, offset) of each tensor in a received message buffer, and the tuple flag."""
    raw = bytes(buf[:8].numpy())
    magic, version, n, hlen = struct.unpack("<4sBBH", raw)
    if magic != _MAGIC or version != _VERSION:
        raise TransportError(
            f"rank {MPI.COMM_WORLD.Get_rank()}: received a message that is not an mpimp tensor "
            f"(magic {magic!r}, version {version}); is another library using the same communicator and tag?"
        )
    head = bytes(buf[:hlen].numpy())
    out, pos, offset = [], 8, hlen
    for _ in range(n & 0x7F):
        code, ndim = struct.unpack_from("<BB", head, pos)
        shape = struct.unpack_from(f"<{ndim}q", head, pos + 8)
        pos += 8 + 8 * ndim
        dtype = CODE_DTYPES[code]
        out.append((dtype, tuple(shape), offset))
        numel = 1
        for s in shape:
            numel *= s
        offset = _round_up(offset + numel * dtype.itemsize)
    return out, bool(n & 0x80)


def _as_list(tensors: Tensors) -> tuple[list[torch.Tensor], bool]:
    if isinstance(tensors, torch.Tensor):
        return [tensors], True
    if isinstance(tensors, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in tensors):
        return list(tensors), False
    raise ConfigError(f"expected a tensor or a tuple of tensors, got {type(tensors).__name__}")


def _prepare(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Detached, contiguous tensors (non-contiguous ones are copied, documented behaviour)."""
    out = []
    for t in tensors:
        t = t.detach()
        dtype_code(t.dtype)
        out.append(t if t.is_contiguous() else t.contiguous())
    return out


# ----------------------------------------------------------------------------- point-to-point

class Request:
    """A pending mpimp operation: ``test()`` polls it, ``wait()`` completes it.

    ``wait()`` returns the received tensor (or tuple) for receives, the reduced tensor
    for non-blocking reductions, ``None`` for sends.
    """

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

    def __init__(self, req: MPI.Request, what: str, keep: object = None,
                 finish: Callable[[], Tensors | None] | None = None) -> None:
        self._req, self._what, self._keep, self._finish = req, what, keep, finish
        self._done, self._value = False, None

    def test(self) -> bool:
        if not self._done and self._req.Test():
            self._done = True
            if self._finish is not None:
                self._value = self._finish()
            self._keep = None
        return self._done

    def describe(self) -> str:
        return self._what

    def result(self) -> Tensors | None:
        return self._value


def _send_buffer(tensors: list[torch.Tensor], as_tuple: bool) -> tuple[list, object, int]:
    """MPI buffer spec for a message, the objects to keep alive, and its byte size."""
    head, offsets = _header(tensors, as_tuple)
    total = offsets[-1] + tensors[-1].numel() * tensors[-1].element_size() if tensors else len(head)
    on_host = all(t.device.type == "cpu" for t in tensors)
    if not on_host or total <= _PACK_LIMIT:
        device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
        packed = torch.empty(total, dtype=torch.uint8, device=device)
        packed[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        for t, off in zip(tensors, offsets):
            packed[off : off + t.numel() * t.element_size()] = t.reshape(-1).view(torch.uint8)
        buf, staged = to_wire(packed)
        return [buf, total, MPI.BYTE], (packed, staged), total
    head_t = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    lengths, addrs = [len(head)], [head_t.data_ptr()]
    pos = len(head)
    for t, off in zip(tensors, offsets):
        if off > pos:
            lengths.append(off - pos)
            addrs.append(_ZEROS.data_ptr())
        n = t.numel() * t.element_size()
        if n:
            lengths.append(n)
            addrs.append(t.data_ptr())
        pos = off + n
    dtype = MPI.Datatype.Create_struct(lengths, addrs, [MPI.BYTE] * len(lengths)).Commit()
    return [MPI.BOTTOM, 1, dtype], (head_t, tensors, dtype), total


def _free_datatype(keep: object) -> None:
    if isinstance(keep, tuple) and len(keep) == 3 and isinstance(keep[2], MPI.Datatype):
        keep[2].Free()


def isend(tensors: Tensors, dst: int, comm: MPI.Comm, tag: int = 0) -> Request:
    """Start sending a tensor (or tuple of tensors) to rank ``dst`` of ``comm``.

    The tensors must not be modified until the request completes.  Non-contiguous
    tensors are sent as a contiguous copy.
    """
    items, single = _as_list(tensors)
    items = _prepare(items)
    spec, keep, total = _send_buffer(items, not single)
    _trace(comm, f"Isend -> {dst} tag {tag} ({total} B)")
    req = comm.Isend(spec, dst, tag)

    def finish() -> None:
        _free_datatype(keep)
        return None

    return _MPIRequest(req, f"isend of {total} B to rank {dst} (tag {tag})", keep, finish)


def send(tensors: Tensors, dst: int, comm: MPI.Comm, tag: int = 0, timeout: float | None = None) -> None:
    """Send a tensor (or tuple of tensors) to rank ``dst`` of ``comm``; returns when the buffer is reusable."""
    isend(tensors, dst, comm, tag).wait(timeout)


class _RecvRequest(Request):
    """Receive of a self-describing message: matched probe, then receive into one buffer."""

    def __init__(self, src: int, comm: MPI.Comm, tag: int, out: torch.Tensor | None,
                 device: torch.device | None) -> None:
        self.src, self.comm, self.tag, self.out = src, comm, tag, out
        self.device = device if device is not None else (out.device if out is not None else None)
        self._status = MPI.Status()
        self._req: MPI.Request | None = None
        self._buf: torch.Tensor | None = None
        self._staged: torch.Tensor | None = None
        self._value: Tensors | None = None
        self._done = False
        _trace(comm, f"Irecv <- {src} tag {tag}")

    def describe(self) -> str:
        return f"recv from rank {self.src} (tag {self.tag})"

    def _post(self, msg: MPI.Message) -> None:
        count = self._status.Get_count(MPI.BYTE)
        if self.out is not None:
            head, offsets = _header([self.out])
            expected = offsets[0] + self.out.numel() * self.out.element_size()
            if count != expected:
                buf = torch.empty(count, dtype=torch.uint8)
                msg.Recv([host_buffer(buf), count, MPI.BYTE])
                got = ", ".join(f"{str(d).removeprefix('torch.')}{list(s)}" for d, s, _ in _parse(buf)[0])
                raise TransportError(
                    f"rank {MPI.COMM_WORLD.Get_rank()}: recv(out=...) from rank {self.src} tag {self.tag}: "
                    f"out is {str(self.out.dtype).removeprefix('torch.')}{list(self.out.shape)} "
                    f"but the message holds {got}; pass an out tensor of that shape and dtype, or out=None"
                )
        device = self.device or torch.device("cpu")
        self._buf = torch.empty(count, dtype=torch.uint8, device=device)
        spec, self._staged = from_wire(self._buf)
        self._req = msg.Irecv([spec, count, MPI.BYTE])

    def test(self) -> bool:
        if self._done:
            return True
        if self._req is None:
            msg = self.comm.Improbe(self.src, self.tag, self._status)
            if msg is None:
                return False
            self._post(msg)
        assert self._req is not None
        if not self._req.Test():
            return False
        self._finish()
        self._done = True
        return True

    def _finish(self) -> None:
        buf = self._buf
        assert buf is not None
        if self._staged is not None:
            buf.copy_(self._staged)
        meta, as_tuple = _parse(buf[:_ALIGN * 1024].cpu() if buf.device.type != "cpu" else buf)
        views = []
        for dtype, shape, off in meta:
            n = dtype.itemsize
            for s in shape:
                n *= s
            views.append(buf[off : off + n].view(dtype).view(shape))
        if self.out is not None:
            dtype, shape, _ = meta[0]
            if len(meta) != 1 or dtype != self.out.dtype or tuple(shape) != tuple(self.out.shape):
                raise TransportError(
                    f"rank {MPI.COMM_WORLD.Get_rank()}: recv(out=...) from rank {self.src} tag {self.tag}: "
                    f"out is {str(self.out.dtype).removeprefix('torch.')}{list(self.out.shape)} "
                    f"but the message holds {str(dtype).removeprefix('torch.')}{list(shape)}"
                )
            self.out.copy_(views[0])
            self._value = self.out
        else:
            self._value = tuple(views) if as_tuple else views[0]
        self._buf = None
        self._staged = None

    def result(self) -> Tensors | None:
        return self._value


def irecv(src: int, comm: MPI.Comm, tag: int = 0, out: torch.Tensor | None = None,
          device: torch.device | str | None = None) -> Request:
    """Start receiving a tensor (or tuple) from rank ``src`` of ``comm``; ``wait()`` returns it.

    Shape and dtype come from the message.  With ``out`` the data is written into it
    (its shape and dtype must match the message's; a mismatch raises TransportError).
    """
    dev = torch.device(device) if isinstance(device, str) else device
    return _RecvRequest(src, comm, tag, out, dev)


def recv(src: int, comm: MPI.Comm, tag: int = 0, out: torch.Tensor | None = None,
         device: torch.device | str | None = None, timeout: float | None = None) -> Tensors:
    """Receive a tensor (or tuple of tensors) from rank ``src`` of ``comm``."""
    value = irecv(src, comm, tag, out, device).wait(timeout)
    assert value is not None
    return value


def wait_all(requests: Sequence[Request], timeout: float | None = None) -> list[Tensors | None]:
    """Complete every request (driving all of them, so no ordering deadlock); return their results."""
    pending = list(requests)
    _wait_until(lambda: all([r.test() for r in pending]),
                lambda: "; ".join(r.describe() for r in pending if not r.test()), timeout)
    return [r.result() for r in pending]


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

    return _MPIRequest(req, f"all_reduce of {n} elements over {comm.Get_size()} ranks",
                       (work, staged), finish)


def all_reduce(tensor: torch.Tensor, comm: MPI.Comm, op: str = "sum",
               timeout: float | None = None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over ``comm``; returns ``tensor``."""
    value = iall_reduce(tensor, comm, op).wait(timeout)
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
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    dtype_code(work.dtype)
    buf, staged = to_wire(work) if comm.Get_rank() == root else from_wire(work)
    nbytes = work.numel() * work.element_size()
    _trace(comm, f"Ibcast {nbytes} B root {root}")
    req = comm.Ibcast([buf, nbytes, MPI.BYTE], root)
    _MPIRequest(req, f"broadcast of {nbytes} B from rank {root}", (work, staged)).wait(timeout)
    if staged is not None and comm.Get_rank() != root:
        work.copy_(staged)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def barrier(comm: MPI.Comm, timeout: float | None = None) -> None:
    """A barrier with a deadline (non-blocking barrier polled until done)."""
    _trace(comm, "Ibarrier")
    _MPIRequest(comm.Ibarrier(), f"barrier over {comm.Get_size()} ranks").wait(timeout)
