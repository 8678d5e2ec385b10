"""The native point-to-point fast path: raw-repeat messages in one C call each.

Problem: from the second message of a dtype and shape on a channel, a large tensor
travels as its payload alone (:mod:`mpimp.channels`), and then all mpimp adds to MPI's
own calls is Python: the matched probe, the receive and the completion polls each cost
Python frames on caches the transfer has just left cold, about 5 us per message, 6% of
a 1 MiB message over shared memory.  ``native/mpimp_fast.c`` makes the same MPI calls
(``MPI_Improbe`` + ``MPI_Imrecv`` + ``MPI_Test`` polls on the receiving side,
``MPI_Isend`` and ``MPI_Test`` polls on the sending side) in one C call each, with the
GIL released while it polls.  Same messages, same matching order, same bounded polls
(what has not completed returns to Python's deadline loop as an ``MPI.Request``).

It is a CPython extension over mpi4py's C API, built at first use with the ``mpicc`` of
the MPI library in use into the cache of :mod:`mpimp.native_ops` (keyed also by the
Python ABI and the mpi4py version).  Where it cannot be built (no ``mpicc``, no Python
headers) or ``MPIMP_FAST=0``, :mod:`mpimp.comm` keeps to its pure-Python path, which
sends and receives the very same messages; :func:`status` tells which one runs
(``mpimp info`` prints it).
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import platform
import sysconfig
from pathlib import Path
from types import ModuleType

import mpi4py
from mpi4py import MPI

from .native_ops import NATIVE_DIR, NativeBuildError, build_library, find_mpicc

__all__ = ["load", "status", "reset", "SOURCE", "enabled"]

SOURCE = NATIVE_DIR / "mpimp_fast.c"
_VERSION = "mpimp-fast 6"
_MODULE = "_mpimp_fast"  # (its PyInit_ name)


def enabled() -> bool:
    """``MPIMP_FAST`` (default 1): 0 keeps point-to-point messages on the pure-Python path."""
    return os.environ.get("MPIMP_FAST", "1").strip().lower() not in ("0", "no", "false", "off")


def _flags() -> tuple[str, ...]:
    flags = [f"-I{sysconfig.get_paths()['include']}", f"-I{mpi4py.get_include()}",
             "-Werror=implicit-function-declaration"]  # (an API this Python lacks: a build error, not an import error)
    if platform.system() == "Darwin":
        flags += ["-undefined", "dynamic_lookup"]
    return tuple(flags)


def build(mpicc: str, directory: Path | None = None) -> Path:
    """Compile the extension with ``mpicc`` (cached; see :func:`mpimp.native_ops.build_library`)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        raise NativeBuildError(f"no Python headers ({headers} is missing; install the python3-dev package)")
    key = (suffix, mpi4py.__version__, mpi4py.get_include())
    return build_library(mpicc, SOURCE, "fast", _MODULE + suffix, _flags(), key, directory)


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(_MODULE, str(path))
    spec = importlib.util.spec_from_file_location(_MODULE, str(path), loader=loader)
    if spec is None:  # pragma: no cover - only for a path importlib cannot describe
        raise NativeBuildError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    if getattr(module, "VERSION", None) != _VERSION:
        raise NativeBuildError(f"{path} is version {getattr(module, 'VERSION', None)!r}, expected {_VERSION!r}")
    ours, theirs = MPI.Get_library_version().strip(), str(getattr(module, "LIBRARY", "")).strip()
    if ours != theirs:
        raise NativeBuildError(f"{path} was linked against another MPI library ({theirs.splitlines()[0]!r}) "
                               f"than mpi4py runs on ({ours.splitlines()[0]!r}); set MPIMP_MPICC to this MPI's mpicc")
    return module


@functools.lru_cache(maxsize=1)
def _loaded() -> tuple[ModuleType | None, str]:
    if not enabled():
        return None, "off (MPIMP_FAST=0)"
    mpicc = find_mpicc()
    if mpicc is None:
        return None, "off: no MPI compiler wrapper (mpicc) was found; set MPIMP_MPICC to its path"
    try:
        path = build(mpicc)
        return _import(path), f"native ({path})"
    except (NativeBuildError, ImportError, OSError) as exc:
        return None, f"off: it could not be built with {mpicc}: {exc}"


@functools.lru_cache(maxsize=1)  # (cached itself: mpimp.comm calls it once per message)
def load() -> ModuleType | None:
    """The fast-path extension module, built on the first call; None where it is off or
    cannot be built (the pure-Python path then runs; :func:`status` says why)."""
    return _loaded()[0]


def reset() -> None:
    """Forget the loaded state: the next :func:`load` reads ``MPIMP_FAST`` / ``MPIMP_MPICC``
    again (tests)."""
    load.cache_clear()
    _loaded.cache_clear()


def status() -> str:
    """``native (<path>)`` or ``off: <reason>``."""
    return _loaded()[1]
