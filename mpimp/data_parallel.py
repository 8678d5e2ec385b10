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
its bucket, divided by dp on the way when the wire dtype is the gradients' own; when a
bucket is complete it is handed to a communication thread that all-reduces the buckets
in order with the blocking collective (buckets start strictly in index order on every
rank, so the collectives match) while backward goes on in the main thread (see
:class:`_ReduceWorker` for why not ``MPI_Iallreduce``).  A callback queued on the
autograd engine waits for all of them (with the deadline) before ``backward()``
returns and copies the means back into ``.grad`` (a 16-bit wire for fp32 gradients is
summed as it is, widened back and divided then).  It is queued from a hook on the
module's outputs, so it runs at the end of the outermost backward: with reentrant
activation checkpointing the parameters' hooks fire inside nested backwards, one per
checkpointed segment, and queuing from them reduced every bucket once per segment.  A
backward in which no parameter received a gradient (``torch.autograd.grad`` of the
inputs) communicates nothing.

``.grad`` stays the tensor autograd made, as in DDP's default: making it a view into
the bucket instead (``gradient_as_bucket_view=True``, which saves that copy back and a
second copy of the gradients in memory) made the step *slower* on the development
machine, on both transports (0.96-1.00x against 1.01-1.04x of DDP's speed, forward and
backward both 4-8 ms longer per step; bench/bench_dp.py): the hook drops each freshly
allocated gradient at once, and the allocator's churn costs more than the copy saves.
With views, a gradient that already is its view (``zero_grad(set_to_none=False)``,
accumulation under :meth:`DataParallel.no_sync` after a synchronised step) was
accumulated in place by backward and is divided in place.

Each bucket carries, after the gradients, one counter per parameter: 1 if this rank
has a gradient for it.  After the sum the counter says whether any rank had one, so
parameters unused on some ranks are still reduced correctly (missing gradients count
as zeros) and parameters unused everywhere keep ``grad = None`` on every rank, with no
extra message.  Shared and tied parameters appear once in ``named_parameters()`` and
their hook fires once per backward, after autograd has summed all their uses: they are
reduced once.

Shared memory (opt-in: ``shm=True``, or ``MPIMP_SHM=1``, when every dp rank is on one
node and gradients are CPU fp32; see :mod:`mpimp.shm`): the buckets live in a
``MPI_Win_allocate_shared`` window instead of private memory (the same copy in and
out, or views).  The communication thread reduces each complete bucket where it lies:
rank i sums chunk i over the dp segments and writes the sum into every segment: one
read plus one write of each element per rank, against the library's transfers and sum
on the MPI path.  bf16/fp16 wire types,
fp16/bf16 or GPU parameters use the MPI path (simpler: the 16-bit sums run in mpimp's
native operators there).

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

from .comm import Request, _wait_until, all_reduce, broadcast, default_timeout
from .errors import ConfigError, DeadlineError, MpimpError
from .shm import SharedBuckets, shm_available, shm_wanted
from .topology import Topology
from .watchdog import guarded

__all__ = ["DataParallel", "reduce_gradients", "split_batch", "check_replicas"]

_REDUCE_DTYPES = {None: None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                  "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_FIRST_BUCKET_BYTES = 1 << 20
_GRACE = 5.0  # seconds a waiting thread adds to the worker's deadline before giving up itself


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
    """Flat wire buffer for a group of parameters: ``[grad 0 | grad 1 | ... | has-grad counters]``.

    When the wire dtype is the gradients' own (:meth:`configure`), the gradients are
    written into it already divided by dp (``scale``), so the summed bucket is the mean
    and one plain copy takes it back into ``.grad``; with ``views`` (DDP's
    ``gradient_as_bucket_view``) ``.grad`` becomes a view into the bucket instead and
    nothing is copied back.  A 16-bit wire for wider gradients is summed as it is and
    divided after widening.  On the shared-memory path (:meth:`share`) the buffer is this
    rank's bucket in a :class:`SharedBuckets` window.
    """

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
        self.shared: tuple[SharedBuckets, int] | None = None
        self.views = False
        self.scale = 1.0

    def configure(self, size: int, views: bool) -> None:
        """Divide by ``size`` (dp) on the way in when the wire dtype is the gradients' own,
        and with ``views`` make ``.grad`` a view into the buffer (only then possible)."""
        same = all(p.dtype == self.buffer.dtype and p.device == self.buffer.device for p in self.params)
        self.scale = 1.0 / size if same else 1.0
        self.views = views and same

    def share(self, shared: SharedBuckets, k: int) -> None:
        """Move the buffer into bucket ``k`` of ``shared``."""
        self.buffer = shared.bucket(k)
        self.buffer.zero_()
        self.shared = (shared, k)

    def view(self, j: int) -> torch.Tensor:
        p, off = self.params[j], self.offsets[j]
        return self.buffer[off:off + p.numel()].view(p.shape)

    def reset(self) -> None:
        self.ready = [False] * len(self.params)
        self.pending = len(self.params)
        self.request = None

    def put(self, j: int) -> None:
        """Copy parameter j's current gradient (times ``scale``) or zeros into the buffer;
        mark it ready.

        With views ``.grad`` becomes the bucket view; a gradient that already is the view
        (``zero_grad(set_to_none=False)``, or accumulation after a synchronised step) is
        divided in place.
        """
        p, off, n = self.params[j], self.offsets[j], self.params[j].numel()
        if p.grad is None:
            self.buffer[off:off + n].zero_()
            self.buffer[self.numel + j] = 0
        else:
            if self.views:
                view = self.view(j)
                if p.grad.data_ptr() == view.data_ptr():
                    if self.scale != 1.0:
                        view.mul_(self.scale)
                else:
                    torch.mul(p.grad.detach(), self.scale, out=view)
                    p.grad = view
            elif self.scale != 1.0:
                torch.mul(p.grad.detach().reshape(-1), self.scale, out=self.buffer[off:off + n])
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
        self.request = worker.submit(self.buffer, self.shared)

    def write_back(self, size: int) -> None:
        """Mean over ``size`` ranks into ``.grad`` (None where no rank had a gradient)."""
        counts = self.buffer[self.numel:].tolist()
        for j, p in enumerate(self.params):
            if counts[j] == 0:
                continue
            if self.views:  # the bucket already holds the mean: point .grad at it
                view = self.view(j)
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    p.grad = view
                continue
            total = self.view(j)  # the mean when divided on the way in (scale), else the sum
            if p.grad is None:
                p.grad = total.to(p.dtype, copy=True)
            else:
                p.grad.copy_(total)
            if self.scale == 1.0 and size != 1:
                p.grad.div_(size)


class _ThreadRequest(Request):
    """Completion of one all-reduce run by a :class:`_ReduceWorker`."""

    def __init__(self, worker: _ReduceWorker, nbytes: int) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None
        self._worker = worker
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
        # sleeps: no polling core burnt while backward computes.  The worker's own deadline
        # (same length, started later) normally reports first, naming the step it stuck in.
        if not self.event.wait(None if limit is None else limit + _GRACE):
            exc = DeadlineError(f"rank {_world_rank()}: {self._what} did not complete within {limit:g} s")
            self._worker.fail(exc)
            raise exc
        self.test()


class _ReduceWorker:
    """A thread that all-reduces submitted buckets in submission order (inline when dp = 1).

    Why a thread and not ``MPI_Iallreduce``: MPI libraries on CPUs progress non-blocking
    collectives only inside MPI calls (Open MPI's libnbc: 1.6x slower than the blocking
    all-reduce for 16 MiB even when polled), while the blocking collective, run by a
    thread that released the GIL, moves the bucket at full speed while backward goes on
    in the main thread.  Every rank submits the same buckets in the same order, so the
    collectives match.  Needs MPI_THREAD_MULTIPLE (mpi4py's default).  A shared bucket
    (``shared=(SharedBuckets, k)``) is reduced through shared memory instead, by the
    same thread, in the same order.
    """

    def __init__(self, comm: MPI.Comm) -> None:
        # a private duplicate (collective, like the DataParallel constructor that calls this):
        # after a failure the abandoned barrier of a bucket stays posted on it forever (MPI
        # cannot cancel a non-blocking collective), so it must not be a communicator that a
        # new DataParallel, a ShardedOptimizer or the user goes on using
        self.comm = guarded("DataParallel: Dup of dp_comm", comm.Dup) if comm.Get_size() > 1 else comm
        self._own_comm = comm.Get_size() > 1
        self.failed: BaseException | None = None
        self._queue: queue.SimpleQueue[tuple[torch.Tensor, tuple[SharedBuckets, int] | None,
                                             _ThreadRequest] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if comm.Get_size() > 1:
            self._thread = threading.Thread(target=self._run, name="mpimp-dp-reduce", daemon=True)
            self._thread.start()

    def submit(self, buffer: torch.Tensor, shared: tuple[SharedBuckets, int] | None = None) -> _ThreadRequest:
        req = _ThreadRequest(self, buffer.numel() * buffer.element_size())
        if self._thread is None:  # dp = 1: nothing to wait for
            self._reduce(buffer, shared, req)
        else:
            self._queue.put((buffer, shared, req))
        return req

    def fail(self, exc: BaseException) -> None:
        """Latch a failure: every later bucket fails at once instead of entering a
        collective the other ranks are no longer in step with."""
        if self.failed is None:
            self.failed = exc

    def _check(self) -> None:
        if self.failed is not None:
            raise MpimpError(f"rank {_world_rank()}: an earlier data-parallel all-reduce failed ({self.failed}); "
                             f"the ranks are out of step, build a new DataParallel") from self.failed

    def _reduce(self, buffer: torch.Tensor, shared: tuple[SharedBuckets, int] | None,
                req: _ThreadRequest) -> None:
        try:
            self._check()
            if shared is not None:
                shared[0].reduce(shared[1])
            else:
                if self._thread is not None:
                    self._arrive()
                    self._check()  # the waiting thread may have given up meanwhile
                all_reduce(buffer, self.comm, op="sum")
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self.fail(exc)
            req.error = exc
        finally:
            req.event.set()

    def _arrive(self) -> None:
        """Wait, asleep, until every rank has submitted this bucket (a polled ``Ibarrier``).

        A blocking ``MPI_Allreduce`` entered before a slower peer has its bucket spins
        until the peer arrives, on the core this rank's backward runs on: with one core
        per rank it took the step 67 ms of exposed communication against gloo's 17 ms
        (docs/benchmarks.md).  Sleeping between tests of a non-blocking barrier costs at
        most one nap of latency; the all-reduce then starts with every rank present.
        """
        req = self.comm.Ibarrier()
        _wait_until(lambda: self.failed is not None or req.Test(),
                    lambda: f"data-parallel bucket rendezvous over {self.comm.Get_size()} ranks", None, asleep=5e-5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._reduce(*item)

    def close(self, join: bool = True) -> None:
        """Stop the thread after the buckets already submitted, free the private
        communicator unless a failure left an operation posted on it (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            if join:
                thread.join()
        if join and self._own_comm and self.failed is None and (thread is None or not thread.is_alive()):
            self._own_comm = False
            self.comm.Free()


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
        b.configure(comm.Get_size(), views=False)
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
    if all(d == digest for d in guarded("DataParallel: allgather of the parameter digest",
                                        lambda: comm.allgather(digest))):
        return
    everyone = guarded("DataParallel: allgather of the parameter lists",
                       lambda: comm.allgather(mine))  # only on a mismatch, which every rank saw
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

def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a module's output (nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)


class _BackwardState:
    def __init__(self) -> None:
        self.queued = False
        self.hooked = False  # a parameter's gradient arrived in this backward
        self.next_launch = 0


class DataParallel(nn.Module):
    """Wrap ``module``; after ``loss.backward()`` every gradient holds the mean over ``topo.dp_comm``.

    Called like the module it wraps.  Feed each replica its own 1/dp of the global batch
    (:meth:`split_batch`).  ``bucket_mb`` bounds a bucket's wire bytes, ``reduce_dtype``
    picks the wire type (None = the gradients' own), ``broadcast=False`` skips copying
    dp rank 0's parameters and buffers at construction.  :meth:`no_sync` accumulates
    gradients locally (the next synchronised backward averages the accumulated sums).

    ``shm`` picks the transport: None (default) uses MPI collectives unless ``MPIMP_SHM=1``,
    in which case it uses the shared-memory all-reduce of :mod:`mpimp.shm` when dp > 1,
    every dp rank is on one node, every parameter is a CPU fp32 tensor and
    ``reduce_dtype`` is None or fp32 (16-bit wire types always use MPI, with mpimp's
    fp32-accumulating operators); True requires it (ConfigError if impossible), False
    never uses it.  MPI is the default because it works everywhere; the two train equally
    fast on one node here (docs/benchmarks.md), and the shared window needs room in
    ``/dev/shm``.

    ``gradient_as_bucket_view=True`` (as in DDP; only where the wire dtype is the
    gradients' own) makes ``.grad`` of each parameter a view into its bucket after a
    synchronised backward: nothing is copied back and no second copy of the gradients is
    kept, which saves memory but measured slower here (module docstring).  The next
    synchronised backward then overwrites the bucket: keep a ``.clone()`` of a gradient
    you need across steps.

    :meth:`close` (collective over dp; also on leaving a ``with`` block) stops the
    communication thread and frees the window, after giving ``.grad`` private copies;
    the module then no longer averages gradients.
    """

    def __init__(self, module: nn.Module, topo: Topology, bucket_mb: float = 25,
                 reduce_dtype: torch.dtype | str | None = None, broadcast: bool = True,
                 shm: bool | None = None, gradient_as_bucket_view: bool = False) -> None:
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
        self._closed = False
        if not isinstance(gradient_as_bucket_view, bool):
            raise ConfigError(f"rank {topo.rank}: gradient_as_bucket_view={gradient_as_bucket_view!r}: use "
                              f"False (the default) or True")
        for b in self.buckets:
            b.configure(self.comm.Get_size(), gradient_as_bucket_view)
        self._shared = self._share_buckets(params, shm)
        self._worker = _ReduceWorker(self.comm)
        self._handles = []
        for bi, b in enumerate(self.buckets):
            for j, p in enumerate(b.params):
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(bi, j)))

    # -- construction helpers
    def _share_buckets(self, params: list[nn.Parameter], shm: bool | None) -> SharedBuckets | None:
        """Put the buckets in a shared-memory window when the dp group allows it (collective)."""
        size = self.comm.Get_size()
        if shm is not None and not isinstance(shm, bool):
            raise ConfigError(f"rank {self.topo.rank}: shm={shm!r}: use None (automatic), True or False")
        eligible = bool(params) and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params) \
            and self.reduce_dtype in (None, torch.float32)
        if shm is False or not self.buckets:
            return None
        if shm is True:  # every rank must fail if one does: the window is collective
            ok = all_reduce(torch.tensor([1 if eligible else 0], dtype=torch.int32), self.comm, op="min")
            if not eligible:
                raise ConfigError(
                    f"rank {self.topo.rank}: DataParallel(shm=True) reduces CPU fp32 gradients only; this "
                    f"model has parameters of {sorted({f'{p.dtype} on {p.device}' for p in params})} and "
                    f"reduce_dtype={self.reduce_dtype}. Use shm=None (falls back to MPI) or shm=False"
                )
            if int(ok.item()) == 0:
                raise ConfigError(
                    f"rank {self.topo.rank}: DataParallel(shm=True): another data-parallel rank cannot use "
                    f"the shared-memory path (it reports why); use shm=None (falls back to MPI) or shm=False"
                )
        if shm is None:
            # every rank must take the same path: agree on the local conditions (MPIMP_SHM may differ)
            flag = torch.tensor([1 if (size > 1 and eligible and shm_wanted()) else 0], dtype=torch.int32)
            if min(all_reduce(flag, self.comm, op="min").tolist()) == 0 or not shm_available(self.comm):
                return None
        shared = SharedBuckets(self.comm, [b.buffer.numel() for b in self.buckets])
        for k, b in enumerate(self.buckets):
            b.share(shared, k)
        return shared

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
        out = self.module(*args, **kwargs)
        if self._sync and torch.is_grad_enabled():
            # the end of backward is queued from the outputs' gradient: that runs in the
            # outermost backward, while the parameters' hooks may run in nested ones
            # (reentrant activation checkpointing), whose ends are not the end of backward
            for t in _tensors_in(out):
                if t.requires_grad:
                    t.register_hook(self._output_hook)
        return out

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
    def _queue_finish(self) -> None:
        """Run :meth:`_finish` when the backward running now ends (once per backward)."""
        state = self._state
        if not state.queued:
            state.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _output_hook(self, grad: torch.Tensor) -> None:
        if self._sync:
            self._queue_finish()

    def _hook(self, bi: int, j: int) -> Any:
        def hook(param: torch.Tensor) -> None:
            if not self._sync:
                return
            self._queue_finish()  # (when backward did not start from this module's outputs)
            state = self._state
            state.hooked = True
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
        if not state.hooked:  # no parameter gradient in this backward (autograd.grad of inputs)
            return
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

    # -- life cycle
    @property
    def shared_memory(self) -> bool:
        """True when the buckets are all-reduced through shared memory (:mod:`mpimp.shm`)."""
        return self._shared is not None

    def close(self) -> None:
        """Stop the communication thread, free the shared window (collective over dp; idempotent).

        ``.grad`` tensors that were views into the window become private copies first, so
        they stay valid; later backward passes are no longer averaged over dp.
        """
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles = []
        self._worker.close()
        if self._shared is not None:
            for b in self.buckets:
                for j, p in enumerate(b.params):
                    if p.grad is not None and p.grad.data_ptr() == b.view(j).data_ptr():
                        p.grad = p.grad.clone()
                b.buffer = torch.zeros(b.buffer.numel(), dtype=b.buffer.dtype)
                b.shared = None
            shared, self._shared = self._shared, None
            shared.close()

    def __enter__(self) -> DataParallel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # not collective: only the thread stops; an unclosed window lives until MPI_Finalize
        worker = self.__dict__.get("_worker")
        if worker is not None:
            worker.close(join=False)

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{b.buffer.numel() * b.buffer.element_size() / 2**20:.2f}" for b in self.buckets)
        return (f"dp={self.comm.Get_size()}, buckets MiB=[{sizes}], reduce_dtype={self.reduce_dtype}, "
                f"transport={'shared memory' if self._shared is not None else 'MPI'}")
