"""Deadlines for blocking MPI calls: a collective that never completes ends the job, it does not hang.

Problem: mpimp's own waits poll non-blocking requests and raise :class:`DeadlineError`
when a peer does not show up.  The library's *blocking* collectives (``MPI_Allreduce``
with its tuned algorithms) cannot be polled, and guarding each one with a polled
barrier first costs a synchronisation round per call (5-10% of a 1 MiB all-reduce,
measured in bench/bench_comm.py).  Yet a rank that died or took another branch would
leave every other rank blocked in the collective forever.

So a blocking call runs under :meth:`Watchdog.guard`: it records (deadline, description)
in a table that one daemon thread per process scans every ``period`` seconds.  A call that
returns removes its entry (a dict store and a delete, under the GIL: well under a
microsecond).  A call still running past its deadline cannot be interrupted from Python,
so the watchdog prints a stall report (the rank, the call, how long it has been running,
the fix, then the Python stack of every thread of the process) to stderr and aborts the job (``MPI_Abort`` on ``COMM_WORLD``: the launcher
then stops every rank) instead of leaving the others hanging.

The deadline is the transport's (``MPIMP_TIMEOUT`` seconds, 0 disables it).  The thread
is started on first use; it holds no communicator and makes no MPI call except the abort.

The other way a rank leaves its peers waiting is to die of an uncaught exception:
:func:`abort_on_uncaught_exception` (installed by :func:`mpimp.init` on a world of more
than one rank) makes that print its traceback and abort the job at once, as
``python -m mpi4py`` does, instead of the others waiting out their deadlines.
"""

from __future__ import annotations

import faulthandler
import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from mpi4py import MPI

from .errors import env_switch

__all__ = ["Watchdog", "WATCHDOG", "guarded", "abort_on_uncaught_exception"]


class Watchdog:
    """Aborts the job when a guarded blocking call outlives its deadline (see the module doc)."""

    def __init__(self, period: float = 0.25, abort: Callable[[str], None] | None = None) -> None:
        self.period = period
        self._abort = abort or self._abort_job
        self._pending: dict[int, tuple[float | None, float, Callable[[], str]]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.fired: list[str] = []  # reports issued (the default abort never returns)

    @contextmanager
    def guard(self, what: Callable[[], str], timeout: float | None) -> Iterator[None]:
        """Run the body under a deadline of ``timeout`` seconds (None: ``MPIMP_TIMEOUT``;
        <= 0: no deadline)."""
        key = self.arm(what, timeout)
        try:
            yield
        finally:
            self.disarm(key)

    def arm(self, what: Callable[[], str], timeout: float | None) -> int:
        """Start a deadline of ``timeout`` seconds (None: ``MPIMP_TIMEOUT``, read by the
        watchdog thread, not on the hot path; <= 0: none); pass the returned key to
        :meth:`disarm` when the call returns (the cheaper form of :meth:`guard`)."""
        if timeout is not None and timeout <= 0:
            return -1
        if self._thread is None:
            self._start()
        key = next(self._ids)
        self._pending[key] = (timeout, time.monotonic(), what)
        return key

    def disarm(self, key: int) -> None:
        self._pending.pop(key, None)  # gone already if the watchdog fired

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mpimp-watchdog", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        from .comm import default_timeout

        while True:
            time.sleep(self.period)
            now = time.monotonic()
            fallback = default_timeout()
            for key, (timeout, started, what) in list(self._pending.items()):
                limit = fallback if timeout is None else timeout
                if limit is None:
                    continue
                deadline = started + limit
                if now > deadline and key in self._pending:
                    self._pending.pop(key, None)
                    report = (
                        f"mpimp watchdog: rank {MPI.COMM_WORLD.Get_rank()}: {what()} has been blocked for "
                        f"{now - started:.1f} s, past its deadline of {deadline - started:g} s. A peer "
                        f"failed or never entered this collective (ranks disagree on the schedule). "
                        f"Aborting the job so no rank hangs; raise MPIMP_TIMEOUT (0 disables the "
                        f"deadline) or set MPIMP_DEBUG=1 to trace MPI calls."
                    )
                    self.fired.append(report)
                    self._abort(report)

    @staticmethod
    def _abort_job(report: str) -> None:
        print(report, file=sys.stderr, flush=True)
        print(f"mpimp watchdog: rank {MPI.COMM_WORLD.Get_rank()}: where every thread is:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(70)


WATCHDOG = Watchdog()  # one per process: it guards every blocking call of the transport


_T = TypeVar("_T")


def guarded(what: str, call: Callable[[], _T], timeout: float | None = None) -> _T:
    """``call()`` (a blocking collective: mpi4py's lowercase pickle-based ones, a small
    ``Allreduce``) under :data:`WATCHDOG`: past the deadline a stall report naming ``what``
    and the job is aborted.  The form for the one-off and per-step collectives of setup,
    coordination and metrics; the transport's own waits poll with their deadline."""
    with WATCHDOG.guard(lambda: what, timeout):
        return call()


def abort_on_uncaught_exception(enabled: bool | None = None) -> bool:
    """Make an uncaught exception on this rank abort the whole job after its traceback.

    Without it, a rank that dies of an exception leaves the other ranks blocked in their
    next message or collective until its deadline (``MPIMP_TIMEOUT``, 600 s by default).
    The hook prints the usual traceback, then one line naming the rank, then calls
    ``MPI_Abort`` on ``COMM_WORLD`` (the launcher stops every rank).  ``enabled=None``
    reads ``MPIMP_ABORT_ON_ERROR`` (1, the default, or 0).  Never installed in an
    interactive interpreter (an error at the prompt must not end the job) or on a
    one-rank world; idempotent, and a later call with ``enabled`` false removes it again.
    Returns whether the hook is in place.  Not covered: ``sys.exit(n)`` on one rank (no
    exception reaches the hook; the others wait for their deadlines) and exceptions in
    other threads.
    """
    if enabled is None:
        enabled = env_switch("MPIMP_ABORT_ON_ERROR", True, "an uncaught exception on one rank aborts the job",
                             "the other ranks wait for their deadlines")
    previous = sys.excepthook
    installed = getattr(previous, "mpimp_abort", False)
    world = MPI.COMM_WORLD
    if not enabled or world.Get_size() == 1 or hasattr(sys, "ps1") or sys.flags.interactive:
        if installed:  # an earlier init installed it: opting out now takes it away again
            sys.excepthook = previous.mpimp_previous  # type: ignore[attr-defined]
        return False
    if installed:
        return True

    def hook(kind: type[BaseException], value: BaseException, tb: object) -> None:
        previous(kind, value, tb)  # type: ignore[arg-type]
        print(f"mpimp: rank {world.Get_rank()} of {world.Get_size()} stopped on an uncaught "
              f"{kind.__name__}; aborting the job so the other ranks do not wait for it "
              f"(MPIMP_ABORT_ON_ERROR=0 turns this off)", file=sys.stderr, flush=True)
        world.Abort(1)

    hook.mpimp_abort = True  # type: ignore[attr-defined]
    hook.mpimp_previous = previous  # type: ignore[attr-defined]
    sys.excepthook = hook
    return True
