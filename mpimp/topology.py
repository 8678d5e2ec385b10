"""The dp x pp x tp grid of ranks and its named sub-communicators.

Problem: model-parallel code needs several communicators at once (the tensor-parallel
peers of a layer, the pipeline neighbours, the data-parallel replicas) and must never
mix its messages with the user's own MPI traffic.  Module-level globals (Megatron's
``parallel_state``) make that implicit and untestable; here one :class:`Topology`
object holds every communicator and is passed explicitly to whatever needs it.

Layout: world rank ``r`` (of a private duplicate of the given communicator) has::

    tp_rank = r % tp                 # fastest: tensor-parallel peers are neighbours (same node)
    pp_rank = (r // tp) % pp
    dp_rank = r // (tp * pp)         # slowest

so ``r = (dp_rank * pp + pp_rank) * tp + tp_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mpi4py import MPI

from . import fastpath, hostmem
from .errors import ConfigError
from .watchdog import abort_on_uncaught_exception, guarded

__all__ = ["Topology", "init", "suggest_layouts"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest_layouts(size: int, pp: int = 1, tp: int = 1, limit: int = 3) -> list[tuple[int, int, int]]:
    """Layouts ``(dp, pp, tp)`` with ``dp * pp * tp == size``, closest to the requested pp and tp first."""
    options = []
    for t in _divisors(size):
        for p in _divisors(size // t):
            options.append((abs(p - pp) + abs(t - tp), size // (p * t), p, t))
    options.sort()
    return [(d, p, t) for _, d, p, t in options[:limit]]


def _check_shape(size: int, dp: int | None, pp: int, tp: int) -> int:
    """Validate a layout against the world size; return dp.  Pure: same answer on every rank."""
    for name, value in (("pp", pp), ("tp", tp)) + ((("dp", dp),) if dp is not None else ()):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an integer >= 1 (world size {size})")
    if dp is None:
        if size % (pp * tp) != 0:
            hints = ", ".join(f"dp={d} pp={p} tp={t}" for d, p, t in suggest_layouts(size, pp, tp))
            raise ConfigError(
                f"world size {size} is not divisible by pp*tp = {pp}*{tp} = {pp * tp}; "
                f"try {hints}, or launch with a multiple of {pp * tp} ranks"
            )
        dp = size // (pp * tp)
    if dp * pp * tp != size:
        hints = ", ".join(f"dp={d} pp={p} tp={t}" for d, p, t in suggest_layouts(size, pp, tp))
        raise ConfigError(
            f"dp*pp*tp = {dp}*{pp}*{tp} = {dp * pp * tp} does not equal the world size {size}; "
            f"try {hints}, or launch with {dp * pp * tp} ranks"
        )
    return dp


@dataclass(eq=False)
class Topology:
    """One rank's place in the dp x pp x tp grid, with a communicator per axis.

    ``world`` is a private duplicate of the communicator given to :func:`init`.
    ``tp_comm`` holds the tp ranks of one (dp, pp) cell, ``pp_comm`` the pp stages of
    one (dp, tp) column (its rank equals ``pp_rank``), ``dp_comm`` the dp replicas of
    one (pp, tp) shard, ``model_comm`` the pp*tp ranks of one model replica (used for
    norms over all shards), ``node_comm`` the ranks sharing this node's memory.
    """

    world: MPI.Comm
    dp: int
    pp: int
    tp: int
    dp_comm: MPI.Comm
    pp_comm: MPI.Comm
    tp_comm: MPI.Comm
    model_comm: MPI.Comm
    node_comm: MPI.Comm
    _freed: bool = field(default=False, repr=False)

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def size(self) -> int:
        return self.world.Get_size()

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return (self.rank // self.tp) % self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.pp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    @property
    def local_rank(self) -> int:
        return self.node_comm.Get_rank()

    @property
    def local_size(self) -> int:
        return self.node_comm.Get_size()

    @property
    def prev_stage(self) -> int | None:
        """Rank in ``pp_comm`` of the previous pipeline stage, or None on the first."""
        return None if self.is_first_stage else self.pp_rank - 1

    @property
    def next_stage(self) -> int | None:
        """Rank in ``pp_comm`` of the next pipeline stage, or None on the last."""
        return None if self.is_last_stage else self.pp_rank + 1

    def world_rank_of(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        """World rank of grid cell (dp_rank, pp_rank, tp_rank)."""
        return (dp_rank * self.pp + pp_rank) * self.tp + tp_rank

    def coords(self) -> dict[str, int]:
        return {"rank": self.rank, "dp_rank": self.dp_rank, "pp_rank": self.pp_rank,
                "tp_rank": self.tp_rank, "local_rank": self.local_rank}

    def __repr__(self) -> str:
        return (
            f"Topology(rank {self.rank}/{self.size}: dp {self.dp_rank}/{self.dp}, "
            f"pp {self.pp_rank}/{self.pp}, tp {self.tp_rank}/{self.tp}, "
            f"local {self.local_rank}/{self.local_size})"
        )

    def free(self) -> None:
        """Free every communicator this topology created (collective over ``world``)."""
        if self._freed:
            return
        for c in (self.dp_comm, self.pp_comm, self.tp_comm, self.model_comm, self.node_comm, self.world):
            if c != MPI.COMM_NULL:
                c.Free()
        self._freed = True

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()


def init(dp: int | None = None, pp: int = 1, tp: int = 1, comm: MPI.Comm | None = None, *,
         abort_on_error: bool | None = None, keep_heap: bool | None = None) -> Topology:
    """Build the dp x pp x tp grid over a private duplicate of ``comm`` (default COMM_WORLD).

    Collective over ``comm``.  Every rank must call it; a layout that does not fit the
    world raises :class:`ConfigError` on every rank (the check is a pure function of
    the arguments and the world size, and the arguments are compared across ranks
    first), so nothing hangs.  ``abort_on_error`` (None: ``MPIMP_ABORT_ON_ERROR``, on by
    default): an uncaught exception on any rank aborts the job after its traceback
    instead of leaving the others waiting (:func:`mpimp.watchdog.abort_on_uncaught_exception`).
    ``keep_heap`` (None: ``MPIMP_KEEP_HEAP``, on by default): glibc keeps the pages a
    step has touched for the next step instead of trimming and faulting them in again
    (:func:`mpimp.hostmem.keep_heap`; process-wide).
    """
    abort_on_uncaught_exception(abort_on_error)
    hostmem.keep_heap(keep_heap)
    fastpath.load()  # build the native p2p fast path now, not inside the first timed transfer
    base = MPI.COMM_WORLD if comm is None else comm
    size, rank = base.Get_size(), base.Get_rank()
    requested = guarded("mpimp.init: allgather of every rank's (dp, pp, tp)", lambda: base.allgather((dp, pp, tp)))
    if any(r != requested[0] for r in requested):
        diff = [i for i, r in enumerate(requested) if r != requested[0]]
        raise ConfigError(
            f"ranks disagree on the layout: rank 0 asked for (dp, pp, tp) = {requested[0]}, "
            f"rank {diff[0]} for {requested[diff[0]]}; pass the same arguments on every rank"
        )
    dp = _check_shape(size, dp, pp, tp)
    world = base.Dup()
    tp_rank = rank % tp
    pp_rank = (rank // tp) % pp
    dp_rank = rank // (tp * pp)
    tp_comm = world.Split(color=dp_rank * pp + pp_rank, key=rank)
    pp_comm = world.Split(color=dp_rank * tp + tp_rank, key=rank)
    dp_comm = world.Split(color=pp_rank * tp + tp_rank, key=rank)
    model_comm = world.Split(color=dp_rank, key=rank)
    node_comm = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    return Topology(world=world, dp=dp, pp=pp, tp=tp, dp_comm=dp_comm, pp_comm=pp_comm,
                    tp_comm=tp_comm, model_comm=model_comm, node_comm=node_comm)
