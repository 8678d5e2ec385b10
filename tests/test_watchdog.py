"""The watchdog: a blocking collective past its deadline ends the job with a stall report."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import mpirun

from mpimp.watchdog import Watchdog


def test_guard_fires_only_for_calls_past_their_deadline() -> None:
    reports: list[str] = []
    dog = Watchdog(period=0.05, abort=reports.append)
    with dog.guard(lambda: "quick call", timeout=5.0):
        pass
    with dog.guard(lambda: "no deadline", timeout=0):  # 0 / None: never fires
        time.sleep(0.2)
    with dog.guard(lambda: "all_reduce of 7 x torch.float32 over 2 ranks", timeout=0.1):
        time.sleep(0.5)  # a blocked call the thread cannot interrupt
    assert len(reports) == 1, reports
    assert "all_reduce of 7 x torch.float32 over 2 ranks" in reports[0]
    assert "past its deadline of 0.1 s" in reports[0] and "MPIMP_TIMEOUT" in reports[0]
    assert dog.fired == reports
    with dog.guard(lambda: "again quick", timeout=0.1):
        pass
    time.sleep(0.2)
    assert len(reports) == 1  # finished calls are forgotten


_ALL_REDUCE = (
    "import time, torch, mpimp\n"
    "from mpi4py import MPI\n"
    "c = MPI.COMM_WORLD\n"
    "if c.Get_rank() == 0:\n"
    "    mpimp.all_reduce(torch.ones(1 << 18), c)  # rank 1 never joins\n"
    "else:\n"
    "    time.sleep(60)\n"
)
_INIT = (
    "import time, mpimp\n"
    "from mpi4py import MPI\n"
    "if MPI.COMM_WORLD.Get_rank() == 0:\n"
    "    mpimp.init(pp=2)  # rank 1 never calls init: its setup allgather is guarded\n"
    "else:\n"
    "    time.sleep(60)\n"
)


@pytest.mark.parametrize("script, report, line", [
    (_ALL_REDUCE, "mpimp watchdog: rank 0: all_reduce of 262144 x torch.float32 over 2 ranks", 5),
    (_INIT, "mpimp watchdog: rank 0: mpimp.init: allgather of every rank's (dp, pp, tp)", 4),
], ids=["all_reduce", "init"])
def test_a_rank_missing_from_a_collective_aborts_the_job_instead_of_hanging(script: str, report: str,
                                                                            line: int) -> None:
    start = time.monotonic()
    done = mpirun(2, sys.executable, "-c", script, timeout=120, MPIMP_TIMEOUT="2")
    took = time.monotonic() - start
    assert done.returncode != 0
    assert report in done.stderr, done.stderr
    # then the stack of every thread of the blocked rank: the main thread in the script's call
    assert "mpimp watchdog: rank 0: where every thread is:" in done.stderr, done.stderr
    assert f'File "<string>", line {line} in <module>' in done.stderr, done.stderr
    assert took < 45, f"the job took {took:.0f} s to end (rank 1 sleeps 60 s)"


_RAISES = (
    "import mpimp\n"
    "topo = mpimp.init()\n"
    "if topo.rank == 1:\n"
    "    raise ValueError('boom on rank 1')\n"
    "mpimp.recv(1, topo.world)  # rank 1 never sends\n"
)


def test_an_uncaught_exception_on_one_rank_aborts_the_job() -> None:
    """mpimp.init makes a rank's uncaught exception abort the job at once (traceback first),
    instead of rank 0 waiting for its deadline; MPIMP_ABORT_ON_ERROR=0 restores the wait."""
    start = time.monotonic()
    done = mpirun(2, sys.executable, "-c", _RAISES, timeout=120, MPIMP_TIMEOUT="60")
    took = time.monotonic() - start
    assert done.returncode != 0
    assert "ValueError: boom on rank 1" in done.stderr, done.stderr
    assert "mpimp: rank 1 of 2 stopped on an uncaught ValueError; aborting the job" in done.stderr, done.stderr
    assert took < 40, f"the job took {took:.0f} s to end (rank 0's deadline is 60 s)"
    done = mpirun(2, sys.executable, "-c", _RAISES, timeout=120, MPIMP_TIMEOUT="3", MPIMP_ABORT_ON_ERROR="0")
    assert done.returncode != 0
    assert "ValueError: boom on rank 1" in done.stderr and "stopped on an uncaught" not in done.stderr
    assert "DeadlineError: rank 0: recv" in done.stderr, done.stderr  # rank 0 waited out its deadline


def test_abort_hook_only_where_it_can_help(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpi4py import MPI

    from mpimp.errors import ConfigError
    from mpimp.watchdog import abort_on_uncaught_exception

    monkeypatch.setenv("MPIMP_ABORT_ON_ERROR", "yes")
    with pytest.raises(ConfigError, match="MPIMP_ABORT_ON_ERROR='yes'"):
        abort_on_uncaught_exception()
    before = sys.excepthook
    assert abort_on_uncaught_exception(False) is False and sys.excepthook is before
    if MPI.COMM_WORLD.Get_size() == 1:  # a one-rank world has nobody to release
        assert abort_on_uncaught_exception(True) is False and sys.excepthook is before


@pytest.mark.mpi(min_size=2)
def test_abort_hook_is_idempotent_and_can_be_taken_back() -> None:
    """On a multi-rank world the hook goes in once; a later opt-out (init(abort_on_error=False)
    after an init that installed it) restores the previous excepthook."""
    from mpimp.watchdog import abort_on_uncaught_exception

    original = sys.excepthook
    try:
        assert abort_on_uncaught_exception(True) is True
        hook = sys.excepthook
        assert getattr(hook, "mpimp_abort", False)
        assert abort_on_uncaught_exception(True) is True and sys.excepthook is hook
        assert abort_on_uncaught_exception(False) is False
        assert not getattr(sys.excepthook, "mpimp_abort", False)
    finally:
        sys.excepthook = original
