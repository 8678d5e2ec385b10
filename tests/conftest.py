"""Shared test set-up: one suite for plain ``pytest`` and ``mpirun -n N pytest --with-mpi``.

* Multi-rank tests are marked ``@pytest.mark.mpi(min_size=k)`` (pytest-mpi) and compare
  the parallel result with a single-process reference computed inside the same test.
* A test that fails on one rank aborts the whole MPI job (after printing the failure with
  the rank), so the other ranks never wait forever in a collective; each test also has a
  timeout (pytest-timeout) and the Makefile bounds each mpirun with ``timeout``.
* Every wait inside mpimp has a deadline (MPIMP_TIMEOUT, 120 s in tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MPIMP_TIMEOUT", "120")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

torch.set_num_threads(1)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"MPI: {MPI.Get_library_version().splitlines()[0].strip()}",
        f"MPI rank {MPI.COMM_WORLD.Get_rank()} of {MPI.COMM_WORLD.Get_size()}, "
        f"torch {torch.__version__}",
    ]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    world = MPI.COMM_WORLD
    if report.failed and world.Get_size() > 1:
        sys.stderr.write(
            f"\n=== rank {world.Get_rank()} of {world.Get_size()}: {item.nodeid} FAILED "
            f"({report.when}); aborting the MPI job so no rank hangs ===\n{report.longreprtext}\n"
        )
        sys.stderr.flush()
        world.Abort(1)


@pytest.fixture
def comm() -> MPI.Comm:
    """A private duplicate of COMM_WORLD for one test (freed afterwards)."""
    c = MPI.COMM_WORLD.Dup()
    yield c
    c.Free()


def require_size(comm: MPI.Comm, divisible_by: int) -> None:
    """Skip (with the reason) when the world size does not fit the layout a test needs."""
    if comm.Get_size() % divisible_by:
        pytest.skip(f"needs a world size divisible by {divisible_by}, have {comm.Get_size()}")


def sub_topology(comm: MPI.Comm, ranks: int, **layout: int) -> Iterator[object]:
    """Yield ``mpimp.init(comm=<first `ranks` ranks>, **layout)`` there and None on the others.

    For fixtures of tests that need an exact world size: collective over ``comm``.
    """
    import mpimp

    sub = comm.Split(0 if comm.Get_rank() < ranks else MPI.UNDEFINED, comm.Get_rank())
    if sub == MPI.COMM_NULL:
        yield None
        return
    topo = mpimp.init(comm=sub, **layout)
    yield topo
    topo.free()
    sub.Free()


@pytest.fixture
def pp_world(comm: MPI.Comm, request: pytest.FixtureRequest) -> Iterator[object]:
    """A pp=p topology over the first p ranks (None on the others); p from the test's 'p'
    parameter (default 2); skipped with the reason when the world is smaller."""
    p = request.node.callspec.params.get("p", 2) if hasattr(request.node, "callspec") else 2
    if comm.Get_size() < p:
        pytest.skip(f"needs at least {p} ranks for pp={p}, have {comm.Get_size()}")
    yield from sub_topology(comm, p, pp=p)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child MPI job: without this process's own MPI launch variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMIX_", "PRTE_", "OMPI_COMM_", "OMPI_MCA_orte", "OMPI_MCA_ess"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def mpirun(n: int, *args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    """``mpirun --oversubscribe -n n args...`` as a child job (the interpreter's own mpirun, else
    the one on PATH; the test is skipped without one), bounded by ``timeout`` seconds."""
    found = Path(sys.executable).parent / "mpirun"
    launcher = str(found) if found.exists() else shutil.which("mpirun")
    if launcher is None:
        pytest.skip("no mpirun found next to the interpreter or on PATH")
    return subprocess.run([launcher, "--oversubscribe", "-n", str(n), *args], env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)
