"""keep_heap: pages a step touched stay mapped for the next step (glibc), and the opt-outs.

Each case runs in a fresh interpreter: the setting is process-wide and decided once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mpimp import hostmem

# A step-like pattern: eight rounds of 24 tensors of 4 MiB, touched, then freed.  Whether
# glibc's dynamic thresholds hand such memory back depends on what the process freed
# before (they only rise, from 128 KiB, as large blocks are freed), so the comparison
# fixes them at glibc's starting values ("start"): the blocks are then mmapped and
# unmapped, and every round faults all 24,576 pages in again.  Reported: minor faults per
# round after the first two.
_STEPS = r"""
import ctypes, json, resource, sys
import torch
from mpimp import hostmem
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: faults in 4 KiB pages, as counted below
arg = sys.argv[1]
if arg == "start":  # M_MMAP_THRESHOLD and M_TRIM_THRESHOLD at glibc's initial 128 KiB
    libc = ctypes.CDLL(None)
    assert libc.mallopt(-3, 128 << 10) == 1 and libc.mallopt(-1, 128 << 10) == 1
    kept = False
else:
    kept = hostmem.keep_heap(None if arg == "env" else arg == "on")
per_round = []
for r in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(1 << 20) for _ in range(24)]
    del blocks
    per_round.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "status": hostmem.status(), "faults": per_round[2:]}))
"""


def _env(**extra: str) -> dict[str, str]:
    """This environment without the caller's MPIMP_KEEP_HEAP (the tests set it themselves)."""
    env = {k: v for k, v in os.environ.items() if k != "MPIMP_KEEP_HEAP"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _run(arg: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _STEPS, arg], capture_output=True, text=True, timeout=120,
                          env=_env(**env))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


needs_glibc = pytest.mark.skipif(hostmem._glibc() is None, reason="keep_heap sets glibc's mallopt thresholds; "
                                 "this C library is not glibc")


@needs_glibc
def test_a_kept_heap_serves_each_round_from_pages_already_mapped() -> None:
    kept = _run("on")
    assert kept["kept"] is True and kept["status"].startswith("kept (glibc mallopt"), kept
    # 96 MiB touched per round (24,576 pages): kept, the later rounds fault a block's
    # pages here and there while the heap settles, not the rounds' memory
    assert sum(kept["faults"]) < 5_000, kept
    start = _run("start")  # the same rounds with glibc's thresholds where they start
    assert min(start["faults"]) > 20_000, start  # handed back and faulted in again every round
    off = _run("off")
    assert off["kept"] is False and "MPIMP_KEEP_HEAP=0" in off["status"], off


@needs_glibc
def test_the_environment_decides_when_the_caller_does_not() -> None:
    assert _run("env")["kept"] is True
    assert _run("env", MPIMP_KEEP_HEAP="1")["kept"] is True
    off = _run("env", MPIMP_KEEP_HEAP="0")
    assert off["kept"] is False and "MPIMP_KEEP_HEAP=0" in off["status"], off
    done = subprocess.run([sys.executable, "-c", _STEPS, "env"], capture_output=True, text=True, timeout=120,
                          env=_env(MPIMP_KEEP_HEAP="off"))
    assert done.returncode != 0 and "MPIMP_KEEP_HEAP='off': use 1" in done.stderr, done.stderr


def test_init_keeps_the_heap_unless_told_not_to() -> None:
    code = ("import mpimp, json; from mpimp import hostmem; from mpi4py import MPI\n"
            "t = mpimp.init(comm=MPI.COMM_SELF, keep_heap={}); print(json.dumps(hostmem.status())); t.free()")
    for arg, want in (("None", "kept (glibc" if hostmem._glibc() is not None else "C library default"),
                      ("False", "C library default (MPIMP_KEEP_HEAP=0")):
        done = subprocess.run([sys.executable, "-c", code.format(arg)], capture_output=True, text=True, timeout=120,
                              env=_env())
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1]).startswith(want), done.stdout
