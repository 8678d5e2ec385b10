"""Header elision: a tensor header that repeats on a channel travels only once.

Problem: every mpimp message describes itself (a header with dtypes and shapes, then
the payloads; :mod:`mpimp.comm`), so a large message is two memory blocks: the header
and the tensor's own memory.  MPI libraries move such a non-contiguous message by
copying it through fragments (Open MPI 5 over shared memory: 0.19-0.84x of a contiguous
send, ``bench/bench_datatype.py``), while a contiguous buffer goes by single copy (CMA,
XPMEM, RDMA); copying the payload next to its header costs a pass over the memory
instead.  But training sends the same shapes again and again on the same channel
(communicator, peer, tag): a pipeline's activation of micro-batch k into stage s has the
same shape in every step.

So both ends of a channel remember the header of its last *eligible* message (one
tensor, bare or a 1-tuple, of at least :data:`ELIDE_MIN` bytes): ``L``.  A new eligible
message with exactly that header travels as its payload alone, contiguous from the
tensor's own memory: *raw*.  The receiver tells raw from framed by the size its matched
probe reads: a message of exactly ``L``'s payload size is a repeat of ``L``; any other is
framed (header first).  A framed message whose size would equal ``L``'s payload size
gets :data:`PAD` more header bytes (the header records its own length), so the two never
collide.  The rules, for a message with header ``h``:

* sender: raw iff eligible(h) and h == L (a device tensor goes from its own memory or a
  pinned host copy, as :func:`mpimp.buffers.to_wire` decides); otherwise framed,
  padded when its size equals L's payload size; then L := h if eligible(h);
* receiver: raw iff L exists and the size equals L's payload size; otherwise framed,
  and L := its header once received, if eligible.

Both ends apply them in the order MPI matches the channel's messages (non-overtaking:
one source, tag and communicator), so they agree without exchanging anything.  This
needs every message of a channel to be sent and received through mpimp, each received
(a raw ``comm.Recv`` of one, or a message never received, leaves the ends disagreeing),
and one thread at a time on each end of a channel (MPI orders nothing between threads
either).  Only messages of at least :data:`ELIDE_MIN` bytes are looked at, so small
messages pay nothing.

The state lives in an MPI attribute of the communicator: freed with it (a new
communicator that reuses a freed handle starts clean), not copied by ``Dup`` (the
duplicate starts clean on every rank).  ``MPIMP_ELIDE_HEADERS=0`` makes this rank's
sends always framed; receivers decode both either way.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from typing import Any

import torch
from mpi4py import MPI

__all__ = ["ELIDE_MIN", "PAD", "ChannelState", "Seen", "channels", "elision_enabled"]

ELIDE_MIN = 16 * 1024  # bytes of payload: single-tensor messages from this size on are remembered
PAD = 64  # header bytes added to a framed message whose size would look like a raw repeat

_KEYVAL: list[int] = []  # the attribute key, created at first use (after MPI_Init)
_CREATE = threading.Lock()
# id(comm object) -> (weak reference to it, its handle then, its state): the attribute
# lookup costs ~2 us right after a large transfer has evicted the caches, on the critical
# path of every large message; an entry counts only for the very same live object with
# the same handle (a freed communicator's object has another handle; using an object
# after the communicator was freed through another object of it is erroneous in MPI)
_RECENT: dict[int, tuple[weakref.ref, int, ChannelState]] = {}


def elision_enabled() -> bool:
    """Whether this rank sends repeats raw (``MPIMP_ELIDE_HEADERS``, default 1)."""
    return os.environ.get("MPIMP_ELIDE_HEADERS", "1") not in ("", "0")


class Seen:
    """A receiver's ``L`` on one channel: the meta of a raw repeat, and its payload size."""

    __slots__ = ("meta", "as_tuple", "nbytes")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], as_tuple: bool) -> None:
        self.meta = ((dtype, shape, 0),)  # (dtype, shape, offset): a raw payload starts at byte 0
        self.as_tuple = as_tuple
        self.nbytes = dtype.itemsize * math.prod(shape)

    def fits(self, out: torch.Tensor) -> bool:
        """Whether a raw repeat can be received straight into ``out`` (host, contiguous,
        this dtype and shape)."""
        dtype, shape, _ = self.meta[0]
        return out.dtype == dtype and out.shape == shape and out.is_cpu and out.is_contiguous()


class ChannelState:
    """Per communicator: the last eligible header of each channel, on both ends.

    ``sent[(dst, tag)] = (header bytes, payload bytes)``; ``seen[(src, tag)]`` is a
    :class:`Seen`, or the framed receive still arriving whose header will decide (see
    :mod:`mpimp.comm`).  ``send_lock`` covers a send's decision, its ``MPI_Isend`` and the
    update (so the state follows MPI's order); ``recv_lock`` a receive's matched probe and
    its classification, and ``status``, the status object a blocking receive probes into.
    """

    __slots__ = ("sent", "seen", "send_lock", "recv_lock", "status")

    def __init__(self) -> None:
        self.sent: dict[tuple[int, int], tuple[bytes, int]] = {}
        self.seen: dict[tuple[int, int], Any] = {}
        self.send_lock = threading.Lock()
        self.recv_lock = threading.RLock()
        self.status = MPI.Status()  # a blocking receive's probe status, used under recv_lock


def _keyval() -> int:
    if not _KEYVAL:
        with _CREATE:
            if not _KEYVAL:
                _KEYVAL.append(MPI.Comm.Create_keyval())
    return _KEYVAL[0]


def channels(comm: MPI.Comm) -> ChannelState:
    """The channel state of ``comm`` (created at first use, freed with the communicator)."""
    hit = _RECENT.get(id(comm))
    if hit is not None and hit[0]() is comm and hit[1] == comm.handle:
        return hit[2]
    state = _attached(comm)
    if len(_RECENT) >= 256:
        _RECENT.clear()
    _RECENT[id(comm)] = (weakref.ref(comm), comm.handle, state)
    return state


def _attached(comm: MPI.Comm) -> ChannelState:
    """The state in ``comm``'s attribute, attached at first use."""
    key = _KEYVAL[0] if _KEYVAL else _keyval()
    state = comm.Get_attr(key)
    if state is None:
        with _CREATE:
            state = comm.Get_attr(key)
            if state is None:
                state = ChannelState()
                comm.Set_attr(key, state)
    return state
