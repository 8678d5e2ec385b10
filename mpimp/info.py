"""What this process runs on: MPI library, thread level, CUDA-awareness, versions, topology.

Problem: most "mpimp hangs / crashes" reports come down to the wrong MPI library, an MPI
that is not CUDA-aware, or a torch build without what was expected.  ``mpimp info``
prints all of it, and under mpirun one line per rank of the grid.
"""

from __future__ import annotations

import platform
import socket

import mpi4py
import numpy
import torch
from mpi4py import MPI

from . import fastpath, hostmem
from .buffers import cuda_aware
from .watchdog import guarded

__all__ = ["environment", "format_info"]

_THREAD_LEVELS = {
    MPI.THREAD_SINGLE: "single",
    MPI.THREAD_FUNNELED: "funneled",
    MPI.THREAD_SERIALIZED: "serialized",
    MPI.THREAD_MULTIPLE: "multiple",
}


def environment() -> dict[str, str]:
    """Library and version facts of this process (no communication)."""
    try:
        import cupy  # type: ignore[import-not-found]

        cupy_version = cupy.__version__
    except ImportError:
        cupy_version = "not installed"
    from . import __version__

    return {
        "mpimp": __version__,
        "python": platform.python_version(),
        "mpi library": MPI.Get_library_version().splitlines()[0].strip(),
        "mpi standard": "{}.{}".format(*MPI.Get_version()),
        "thread level": _THREAD_LEVELS.get(MPI.Query_thread(), str(MPI.Query_thread())),
        "cuda-aware mpi": "yes" if cuda_aware() else "no",
        "mpi4py": mpi4py.__version__,
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda or "none (CPU build)",
        "cuda devices": str(torch.cuda.device_count()) if torch.cuda.is_available() else "0",
        "torch distributed mpi backend": (
            "yes" if torch.distributed.is_available() and torch.distributed.is_mpi_available() else "no"
        ),
        "cupy": cupy_version,
        "numpy": numpy.__version__,
        "p2p fast path": fastpath.status(),
        "host heap": hostmem.status(),
    }


def format_info(comm: MPI.Comm, dp: int | None = None, pp: int = 1, tp: int = 1) -> str | None:
    """The report as text on rank 0 of ``comm`` (None elsewhere); collective over ``comm``."""
    from .topology import init

    with init(dp=dp, pp=pp, tp=tp, comm=comm) as topo:
        row = dict(topo.coords(), host=socket.gethostname())
        rows = guarded("mpimp info: gather of every rank's row", lambda: topo.world.gather(row, root=0))
        if not topo.is_coordinator:
            return None
        env = environment()
        width = max(len(k) for k in env)
        lines = ["mpimp environment"] + [f"  {k:<{width}}  {v}" for k, v in env.items()]
        lines.append(f"topology: {topo.size} ranks = dp {topo.dp} x pp {topo.pp} x tp {topo.tp}")
        lines.append("  rank  dp  pp  tp  local  host")
        for r in rows or []:
            lines.append(f"  {r['rank']:>4}  {r['dp_rank']:>2}  {r['pp_rank']:>2}  {r['tp_rank']:>2}  "
                         f"{r['local_rank']:>5}  {r['host']}")
        return "\n".join(lines)
