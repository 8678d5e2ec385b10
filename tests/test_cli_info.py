"""`mpimp info` and the CLI frame: the report under mpirun, one usage error from rank 0, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mpirun
from mpi4py import MPI

import mpimp
from mpimp import hostmem
from mpimp.info import environment, format_info

BIN = Path(sys.executable).parent


def _mpimp() -> list[str]:
    script = BIN / "mpimp"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mpimp.cli"]


def _run(n: int, *args: str) -> subprocess.CompletedProcess[str]:
    return mpirun(n, *_mpimp(), *args)


def test_info_under_mpirun_reports_the_environment_and_every_rank() -> None:
    res = mpirun(2, *_mpimp(), "info", MPIMP_KEEP_HEAP="1")  # (the default, whatever this shell exports)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    env = environment()  # the single-process reference: the same facts, computed here
    for key in ("mpi library", "thread level", "cuda-aware mpi", "torch", "mpi4py", "cupy", "numpy",
                "p2p fast path"):
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(key + " ")), None)
        assert line is not None, f"no {key!r} line in:\n{out}"
        if key != "thread level":  # the thread level depends on how MPI was initialised
            assert line.split(None, len(key.split()))[-1].strip() == env[key]
    assert "thread level" in out and env["mpi library"].split(",")[0] in out
    assert "topology: 2 ranks = dp 2 x pp 1 x tp 1" in out
    rows = [ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert [r[:4] for r in rows] == [["0", "0", "0", "0"], ["1", "1", "0", "0"]]
    assert out.count("mpimp environment") == 1  # printed by rank 0 only
    heap = next(ln for ln in out.splitlines() if ln.strip().startswith("host heap"))
    assert ("kept (glibc mallopt" in heap) == (hostmem._glibc() is not None), heap  # init kept it


def test_info_with_a_layout_that_does_not_fit_exits_2_with_one_message() -> None:
    res = _run(2, "info", "--pp", "3")
    assert res.returncode == 2, (res.stdout, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, res.stderr
    assert "mpimp info: error:" in errors[0] and "world size 2" in errors[0]
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_bad_flag_exits_2() -> None:
    res = _run(2, "info", "--pp", "two")
    assert res.returncode == 2
    assert res.stderr.count("invalid int value") == 1


@pytest.mark.mpi(min_size=1)
def test_format_info_lists_every_rank_of_the_grid(comm: MPI.Comm) -> None:
    p, rank = comm.Get_size(), comm.Get_rank()
    tp = 2 if p % 2 == 0 else 1
    text = format_info(comm, tp=tp)
    if rank != 0:
        assert text is None
        return
    assert text is not None
    assert f"topology: {p} ranks = dp {p // tp} x pp 1 x tp {tp}" in text
    rows = [ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit()]
    # reference: the documented grid formula r = (dp_rank * pp + pp_rank) * tp + tp_rank
    assert [[int(x) for x in r[:4]] for r in rows] == [[r, r // tp, 0, r % tp] for r in range(p)]
    assert "mpimp environment" in text and mpimp.__version__ in text
