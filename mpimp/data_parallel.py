"""Data parallelism: replicas of a model shard averaging their gradients over ``topo.dp_comm``.

Problem: dp replicas each see 1/dp of the global batch; after backward every replica
must hold the gradient of the global-batch loss, i.e. the mean of the dp local
gradients (each local loss is a mean over its local batch, so
``grad(global mean) = (1/dp) * sum_r grad(local mean on r)``).  All-reducing after
backward leaves the network idle during backward and the CPU idle during the
all-reduce; one all-reduce per parameter pays the latency hundreds of times.

So, like torch DDP, gradients are packed into buckets of ``bucket_mb`` MiB (the first
one 1 MiB, so communication starts early), in reverse parameter order (roughly the
order backward produces them).  A post-accumulate-grad hook copies each gradient into
its bucket; when a bucket is complete it is handed to a communication thread that
all-reduces the buckets in order with the blocking collective (buckets start strictly in
index order on every rank, so the collectives match) while backward goes on in the
main thread (see :class:`_ReduceWorker` for why not ``MPI_Iallreduce``).  A callback
queued on the autograd engine waits for all of them (with the deadline) before
``backward()`` returns and writes the means back into ``.grad``.

Each bucket carries, after the gradients, one counter per parameter: 1 if this rank
has a gradient for it.  After the sum the counter says whether any rank had one, so
parameters unused on some ranks are still reduced correctly (missing gradients count
as zeros) and parameters unused everywhere keep ``grad = None`` on every rank, with no
extra message.  Shared and tied parameters appear once in ``named_parameters()`` and
their hook fires once per backward, after autograd has summed all their uses: they are
reduced once.

``reduce_dtype`` (fp32, bf16, fp16) is the type on the wire; 16-bit sums use the
native operators of :mod:`mpimp.native_ops` (fp32 arithmetic, rounded once per step),
and the division by dp happens after widening back to the gradient's dtype.

At construction the replicas compare a digest of their parameter names, shapes and
dtypes over the dp group; a rank that built a different model gets a ConfigError
naming the first mismatch (on every rank, so nothing hangs), then dp rank 0's values
are broadcast so every replica starts from the same weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from mpi4py import MPI
from torch import nn

from .comm import Request, all_reduce, broadcast, default_timeout
from .errors import ConfigError, DeadlineError
from .topology import Topology

__all__ = ["DataParallel", "reduce_gradients", "split_batch", "check_replicas"]

_REDUCE_DTYPES = {None: None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                  "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_FIRST_BUCKET_BYTES = 1 << 20


def _world_rank() -> int:
    return MPI.COMM_WORLD.Get_rank()


def _reduce_dtype(value: object) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        if value in (torch.float32, torch.bfloat16, torch.float16):
            return value
    elif value in _REDUCE_DTYPES:
        return _REDUCE_DTYPES[value]  # type: ignore[index]
    raise ConfigError(
        f"rank {_world_rank()}: reduce_dtype={value!r} is not supported; use None (the gradients' "
        f"own dtype), torch.float32 / 'fp32', torch.bfloat16 / 'bf16' or torch.float16 / 'fp16'"
    )


def _bucket_bytes(bucket_mb: float) -> int:
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
        raise ConfigError(f"rank {_world_rank()}: bucket_mb={bucket_mb!r} must be a number > 0 (MiB per bucket)")
    return max(1, int(bucket_mb * (1 << 20)))


# ----------------------------------------------------------------------------- buckets

class _Bucket:
    """Flat wire buffer for a group of parameters: ``[grad 0 | grad 1 | ... | has-grad counters]``."""

    def __init__(self, params: list[nn.Parameter], wire: torch.dtype) -> None:
        self.params = params
        self.offsets: list[int] = []
        pos = 0
        for p in params:
            self.offsets.append(pos)
            pos += p.numel()
        self.numel = pos
        self.buffer = torch.zeros(pos + len(params), dtype=wire, device=params[0].device)
        self.ready = [False] * len(params)
        self.pending = len(params)
        self.request: Request | None = None

    def reset(self) -> None:
        self.ready = [False] * len(self.params)
        self.pending = len(self.params)
        self.request = None

    def put(self, j: int) -> None:
        """Copy parameter j's current gradient (or zeros) into the buffer; mark it ready."""
        p, off, n = self.params[j], self.offsets[j], self.params[j].numel()
        if p.grad is None:
            self.buffer[off:off + n].zero_()
            self.buffer[self.numel + j] = 0
        else:
            self.buffer[off:off + n].copy_(p.grad.detach().reshape(-1))
            self.buffer[self.numel + j] = 1
        if not self.ready[j]:
            self.ready[j] = True
            self.pending -= 1

    def fill_missing(self) -> None:
        for j, done in enumerate(self.ready):
            if not done:
                self.put(j)

    def launch(self, worker: _ReduceWorker) -> None:
        self.request = worker.submit(self.buffer)

    def write_back(self, size: int) -> None:
        """Mean over ``size`` ranks into ``.grad`` (None where no rank had a gradient)."""
        counts = self.buffer[self.numel:].tolist()
        for j, p in enumerate(self.params):
            if counts[j] == 0:
                continue
            off, n = self.offsets[j], p.numel()
            mean = self.buffer[off:off + n].view(p.shape)
            if p.grad is None:
                p.grad = mean.to(p.dtype, copy=True).div_(size)
            else:
                p.grad.copy_(mean).div_(size)


class _ThreadRequest(Request):
    """Completion of one all-reduce run by a :class:`_ReduceWorker`."""

    def __init__(self, worker: _ReduceWorker, nbytes: int) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None
        self._what = f"data-parallel all-reduce of {nbytes} B over {worker.comm.Get_size()} ranks"

    def test(self) -> bool:
        if self.event.is_set():
            if self.error is not None:
                raise self.error
            return True
        return False

    def describe(self) -> str:
        return self._what

    def wait(self, timeout: float | None = None) -> None:
        limit = default_timeout() if timeout is None else timeout
        if not self.event.wait(limit):  # sleeps: no polling core burnt while backward computes
            raise DeadlineError(f"rank {_world_rank()}: {self._what} did not complete within {limit:g} s")
        self.test()


class _ReduceWorker:
    """A thread that all-reduces submitted buckets in submission order.

    Why a thread and not ``MPI_Iallreduce``: MPI libraries on CPUs progress non-blocking
    collectives only inside MPI calls (Open MPI's libnbc: 1.6x slower than the blocking
    all-reduce for 16 MiB even when polled), while the blocking collective, run by a
    thread that released the GIL, moves the bucket at full speed while backward goes on
    in the main thread.  Every rank submits the same buckets in the same order, so the
    collectives match.  Needs MPI_THREAD_MULTIPLE (mpi4py's default).
    """

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self._queue: queue.SimpleQueue[tuple[torch.Tensor, _ThreadRequest] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mpimp-dp-reduce", daemon=True)
        self._thread.start()

    def submit(self, buffer: torch.Tensor) -> _ThreadRequest:
        req = _ThreadRequest(self, buffer.numel() * buffer.element_size())
        self._queue.put((buffer, req))
        return req

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            buffer, req = item
            try:
                all_reduce(buffer, self.comm, op="sum")
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                req.error = exc
            finally:
                req.event.set()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


def _make_buckets(params: Sequence[nn.Parameter], wire: torch.dtype | None, limit: int,
                  first_limit: int | None = None) -> list[_Bucket]:
    """Consecutive parameters of one (dtype, device) packed up to ``limit`` bytes per bucket."""
    buckets: list[_Bucket] = []
    open_: dict[tuple[torch.dtype, torch.device], tuple[list[nn.Parameter], int]] = {}
    cap = first_limit if first_limit is not None else limit

    def close(key: tuple[torch.dtype, torch.device]) -> None:
        group, _ = open_.pop(key)
        buckets.append(_Bucket(group, wire or key[0]))

    for p in params:
        key = (p.dtype, p.device)
        size = p.numel() * (wire or p.dtype).itemsize
        group, used = open_.get(key, ([], 0))
        if group and used + size > cap:
            close(key)
            cap = limit
            group, used = [], 0
        group.append(p)
        open_[key] = (group, used + size)
    for key in list(open_):
        close(key)
    return buckets


def _unique(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def reduce_gradients(params: Iterable[torch.Tensor], comm: MPI.Comm, *, bucket_mb: float = 25,
                     reduce_dtype: torch.dtype | str | None = None) -> None:
    """Average ``.grad`` of ``params`` over ``comm`` in place (bucketed all-reduces).

    Collective over ``comm``: every rank passes the corresponding parameters in the same
    order.  A parameter whose grad is None on some ranks counts as zero there and gets
    the mean everywhere; one whose grad is None on every rank stays None.
    """
    wire = _reduce_dtype(reduce_dtype)
    limit = _bucket_bytes(bucket_mb)
    unique = _unique(params)
    if comm.Get_size() == 1 or not unique:
        return
    buckets = _make_buckets(unique, wire, limit)  # type: ignore[arg-type]
    for b in buckets:  # at the end of a step nothing is left to overlap: blocking collectives
        b.fill_missing()
        all_reduce(b.buffer, comm, op="sum")
        b.write_back(comm.Get_size())


# ----------------------------------------------------------------------------- replicas and batches

def _describe(module: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(name, tuple(p.shape), str(p.dtype).removeprefix("torch."))
            for name, p in module.named_parameters()]


def check_replicas(module: nn.Module, comm: MPI.Comm) -> None:
    """Raise ConfigError on every rank if the parameters' names, shapes or count differ over ``comm``."""
    mine = _describe(module)
    digest = hashlib.sha256(repr(mine).encode()).hexdigest()
    if all(d == digest for d in comm.allgather(digest)):
        return
    everyone = comm.allgather(mine)  # only on a mismatch, which every rank saw
    ref = everyone[0]
    for r, desc in enumerate(everyone):
        if desc == ref:
            continue
        for i in range(max(len(ref), len(desc))):
            a = ref[i] if i < len(ref) else None
            b = desc[i] if i < len(desc) else None
            if a != b:
                def show(x: tuple[str, tuple[int, ...], str] | None) -> str:
                    return "nothing" if x is None else f"{x[0]!r} {list(x[1])} {x[2]}"
                raise ConfigError(
                    f"rank {_world_rank()}: data-parallel replicas differ: dp rank 0 has "
                    f"{len(ref)} parameters, dp rank {r} has {len(desc)}; first mismatch at "
                    f"parameter #{i}: dp rank 0 has {show(a)}, dp rank {r} has {show(b)}. "
                    f"Build the same model (same code and config) on every data-parallel rank"
                )


def split_batch(batch: torch.Tensor | Sequence[torch.Tensor], topo: Topology) -> Any:
    """This dp rank's 1/dp share (along dim 0) of a global batch (a tensor or a sequence of them)."""
    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch)
    out = []
    for t in tensors:
        n = t.shape[0] if t.dim() else 0
        if t.dim() == 0 or n % topo.dp:
            raise ConfigError(
                f"rank {topo.rank}: the global batch of {n} samples (shape {list(t.shape)}) is not "
                f"divisible by dp = {topo.dp}; use a global batch that is a multiple of {topo.dp} "
                f"(e.g. {max(topo.dp, n - n % topo.dp)}), or change the layout"
            )
        k = n // topo.dp
        out.append(t[topo.dp_rank * k:(topo.dp_rank + 1) * k])
    if isinstance(batch, torch.Tensor):
        return out[0]
    return tuple(out) if isinstance(batch, tuple) else out


# ----------------------------------------------------------------------------- the wrapper

class _BackwardState:
    def __init__(self) -> None:
        self.queued = False
        self.next_launch = 0


class DataParallel(nn.Module):
    """Wrap ``module``; after ``loss.backward()`` every gradient holds the mean over ``topo.dp_comm``.

    Called like the module it wraps.  Feed each replica its own 1/dp of the global batch
    (:meth:`split_batch`).  ``bucket_mb`` bounds a bucket's wire bytes, ``reduce_dtype``
    picks the wire type (None = the gradients' own), ``broadcast=False`` skips copying
    dp rank 0's parameters and buffers at construction.  :meth:`no_sync` accumulates
    gradients locally (the next synchronised backward averages the accumulated sums).
    """

    def __init__(self, module: nn.Module, topo: Topology, bucket_mb: float = 25,
                 reduce_dtype: torch.dtype | str | None = None, broadcast: bool = True) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"rank {topo.rank}: DataParallel wraps an nn.Module, got {type(module).__name__}")
        self.module = module
        self.topo = topo
        self.comm = topo.dp_comm
        self.reduce_dtype = _reduce_dtype(reduce_dtype)
        limit = _bucket_bytes(bucket_mb)
        check_replicas(module, self.comm)
        if broadcast and self.comm.Get_size() > 1:
            self._broadcast_state()
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets = _make_buckets(list(reversed(params)), self.reduce_dtype, limit,
                                     min(limit, _FIRST_BUCKET_BYTES))
        self._state = _BackwardState()
        self._sync = True
        self._worker = _ReduceWorker(self.comm)
        self._handles = []
        for bi, b in enumerate(self.buckets):
            for j, p in enumerate(b.params):
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(bi, j)))

    # -- construction helpers
    @torch.no_grad()
    def _broadcast_state(self) -> None:
        tensors = [t for t in list(self.module.parameters()) + list(self.module.buffers())]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in _unique(tensors):
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype in sorted(by_dtype, key=str):  # same order on every rank
            group = by_dtype[dtype]
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            broadcast(flat, self.comm, root=0)
            pos = 0
            for t in group:
                t.copy_(flat[pos:pos + t.numel()].view_as(t))
                pos += t.numel()

    # -- the module interface
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._state.queued:  # a backward that raised half-way: finish its launched buckets, drop the rest
            self._state = _BackwardState()
            for b in self.buckets:
                if b.request is not None:
                    b.request.wait()
                b.reset()
        return self.module(*args, **kwargs)

    def split_batch(self, *batch: torch.Tensor) -> Any:
        """This replica's share of a global batch: ``x, y = dp_model.split_batch(x, y)``."""
        out = split_batch(batch, self.topo)
        return out[0] if len(batch) == 1 else out

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate local gradients without communicating."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    # -- backward
    def _hook(self, bi: int, j: int) -> Any:
        def hook(param: torch.Tensor) -> None:
            if not self._sync:
                return
            state = self._state
            if not state.queued:
                state.queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            bucket = self.buckets[bi]
            bucket.put(j)
            self._launch_ready(state)
        return hook

    def _launch_ready(self, state: _BackwardState) -> None:
        while state.next_launch < len(self.buckets) and self.buckets[state.next_launch].pending == 0:
            self.buckets[state.next_launch].launch(self._worker)
            state.next_launch += 1

    def _finish(self) -> None:
        state, self._state = self._state, _BackwardState()
        try:
            for b in self.buckets[state.next_launch:]:
                b.fill_missing()  # parameters without a gradient in this backward
                b.launch(self._worker)
            for b in self.buckets:
                if b.request is not None:
                    b.request.wait()
            size = self.comm.Get_size()
            for b in self.buckets:
                b.write_back(size)
        finally:
            for b in self.buckets:
                b.reset()

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{b.buffer.numel() * b.buffer.element_size() / 2**20:.2f}" for b in self.buckets)
        return f"dp={self.comm.Get_size()}, buckets MiB=[{sizes}], reduce_dtype={self.reduce_dtype}"
