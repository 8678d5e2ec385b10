"""Host memory: keep the C heap at a training step's high-water mark.

Problem: torch's CPU tensors come from the C library's ``malloc``.  glibc hands freed
memory at the top of its heap back to the kernel once that free space exceeds a trim
threshold (dynamic: twice the mmap threshold, which itself rises to the size of the
largest mmapped block freed so far, up to 32 MiB), and serves blocks above the mmap
threshold from fresh ``mmap`` s.  The next
step then touches those pages again, and every first touch is a page fault with the
kernel zeroing 4 KiB.  A pipeline step frees its memory in the schedule's order
(activations held across micro-batches, input gradients kept until their send
completes) and sits right at those thresholds: rank 1 of the benchmark pipeline
(``bench/bench_pipeline.py``, ``interleaved-zb``) took 2,600-7,000 minor faults per step,
clustered in the forwards and backwards after the held-back W's (a forward 4 ms, a
third, slower than its peers), against none for the same model in one process.

:func:`keep_heap` fixes both thresholds for the process (glibc ``mallopt``): blocks
below 32 MiB (glibc's own ceiling for its dynamic threshold) come from the heap, and
free space at its top is kept up to 1 GiB.  Pages a step has touched in blocks below
32 MiB stay mapped for the next step, as torch's CUDA caching allocator keeps device
memory (larger blocks are still mapped and unmapped each time, as glibc does anyway):
the resident size stays at the step's high-water mark instead of following it down and
up again, which costs up to 1 GiB of free heap kept mapped.  :func:`mpimp.init` calls
it unless ``keep_heap=False`` or ``MPIMP_KEEP_HEAP=0``; it does nothing where the C
library is not glibc (and changes nothing real under an allocator preloaded in glibc's
place, jemalloc or tcmalloc, which keep memory their own way).
"""

from __future__ import annotations

import ctypes
import sys

from .errors import env_switch

__all__ = ["keep_heap", "status", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 32 << 20  # bytes: smaller blocks come from the heap (glibc's DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30  # bytes of free space at the heap's top kept mapped
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_kept: bool | None = None  # this process's outcome, once decided


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it; musl does not)
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def keep_heap(enable: bool | None = None) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (see the module docstring);
    True when they are set.  ``enable`` None: ``MPIMP_KEEP_HEAP`` (1, the default, or 0;
    anything else raises ConfigError).

    Process-wide and once: later calls return the first outcome (``mallopt`` cannot give
    glibc its dynamic thresholds back).  False where the C library is not glibc or the
    call fails.
    """
    global _kept
    if _kept is not None:
        return _kept
    if enable is None:
        enable = env_switch("MPIMP_KEEP_HEAP", True, "glibc keeps the pages a step touched for the next step, "
                            "the default", "glibc's own thresholds")
    if not enable:
        return False  # not decided: a later call may still set them
    libc = _glibc()
    _kept = bool(libc is not None
                 and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _kept


def status() -> str:
    """One line for ``mpimp info``: whether this process keeps its heap."""
    if _kept:
        return (f"kept (glibc mallopt: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
                f"{TRIM_THRESHOLD >> 30} GiB; no effect under a preloaded jemalloc or tcmalloc)")
    if _kept is False:
        return "C library default (not glibc, or mallopt failed)"
    return "C library default (MPIMP_KEEP_HEAP=0, or mpimp.init not called)"
