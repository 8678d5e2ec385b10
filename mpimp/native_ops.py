"""MPI reduction operators for bfloat16 and float16: native C, CUDA, or a numpy fallback.

Problem: MPI has no 16-bit floating-point types, so ``MPI_SUM`` cannot reduce bf16 or
fp16 gradients.  Converting to fp32 before the all-reduce doubles the bytes on the
wire, which is what 16-bit reduction is meant to save.  This module gives MPI its own
operators (``MPI_Op_create``) for sum, max and min on 2-byte elements (sent as
``MPI_UINT16_T``): each element is widened to fp32, combined, and rounded once back to
16 bits (round to nearest, ties to even; NaN stays NaN; overflow gives inf).  With two
operands this equals the exactly rounded sum; a reduction over p ranks rounds once per
combining step (at most p - 1 times per element), as any MPI tree or ring does.

Three implementations, same results bit for bit:

* ``native/mpimp_reduce16.c``: built at first use with the ``mpicc`` of the MPI library
  this process runs on, into a per-user cache directory (``MPIMP_CACHE_DIR``, default
  ``$XDG_CACHE_HOME/mpimp`` or ``~/.cache/mpimp``) keyed by a hash of the source, the
  MPI library version and the compiler.  ``MPIMP_MPICC`` names the compiler wrapper
  (``none`` disables the build).
* a numpy fallback (``MPI.Op.Create`` over a Python function doing the same fp32
  math), used with one warning per process where no compiler is found or the build fails;
* ``native/mpimp_reduce16.cu``: the same kernels for device buffers, compiled through
  CuPy (``cupy.RawModule``) where a GPU exists, used when CUDA tensors are handed to a
  CUDA-aware MPI.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from .errors import MpimpError

__all__ = [
    "reduction_op",
    "ReductionOps",
    "load_ops",
    "build_native",
    "build_library",
    "find_mpicc",
    "cache_dir",
    "NativeBuildError",
    "apply_reference",
    "SOURCE",
    "CUDA_SOURCE",
]

NATIVE_DIR = Path(__file__).resolve().parent.parent / "native"
SOURCE = NATIVE_DIR / "mpimp_reduce16.c"
CUDA_SOURCE = NATIVE_DIR / "mpimp_reduce16.cu"
_LIBNAME = "libmpimp_reduce16.so"
_VERSION = b"mpimp-reduce16 2"
_KINDS = {torch.bfloat16: 0, torch.float16: 1}
_OPS = {"sum": 0, "max": 1, "min": 2}


class NativeBuildError(MpimpError):
    """The C operators could not be compiled or loaded (the numpy fallback is used instead)."""


def _index(dtype: torch.dtype, op: str) -> int | None:
    if dtype not in _KINDS or op not in _OPS:
        return None
    return _KINDS[dtype] * 3 + _OPS[op]


# ----------------------------------------------------------------------------- the numpy fallback

def _bf16_to_f32(u: np.ndarray) -> np.ndarray:
    return (u.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(f: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32)
    rounded = ((x + (np.uint32(0x7FFF) + ((x >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (x & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((x >> 16) | 0x40).astype(np.uint16), rounded)


def _to_f32(u: np.ndarray, kind: int) -> np.ndarray:
    return _bf16_to_f32(u) if kind == 0 else u.view(np.float16).astype(np.float32)


def _from_f32(f: np.ndarray, kind: int) -> np.ndarray:
    return _f32_to_bf16(f) if kind == 0 else f.astype(np.float16).view(np.uint16)


def apply_reference(index: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a (op) b`` on uint16 bit patterns with numpy's fp32 arithmetic (the fallback's math)."""
    kind, op = divmod(index, 3)
    fa, fb = _to_f32(a, kind), _to_f32(b, kind)
    if op == 0:
        with np.errstate(over="ignore", invalid="ignore"):
            return _from_f32(fa + fb, kind)
    take_a = np.isnan(fa) | (~np.isnan(fb) & ((fa > fb) if op == 1 else (fa < fb)))
    return np.where(take_a, a, b)


def _numpy_op(index: int) -> MPI.Op:
    def combine(inbuf: object, inoutbuf: object, datatype: MPI.Datatype) -> None:
        a = np.frombuffer(inbuf, dtype=np.uint16)  # type: ignore[call-overload]
        b = np.frombuffer(inoutbuf, dtype=np.uint16)  # type: ignore[call-overload]
        b[...] = apply_reference(index, a, b)

    return MPI.Op.Create(combine, commute=True)


# ----------------------------------------------------------------------------- building the C operators

def cache_dir() -> Path:
    """Per-user directory holding built libraries (``MPIMP_CACHE_DIR`` overrides it)."""
    if os.environ.get("MPIMP_CACHE_DIR"):
        return Path(os.environ["MPIMP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mpimp"


def _loaded_mpi_library() -> Path | None:
    """Path of the MPI shared library mapped into this process (Linux), if any."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                name = line.rsplit(" ", 1)[-1].strip()
                base = os.path.basename(name)
                if base.startswith(("libmpi.so", "libmpich.so", "libmpi_")) and os.path.exists(name):
                    return Path(name)
    except OSError:
        pass
    return None


def find_mpicc() -> str | None:
    """The compiler wrapper of the MPI in use: ``MPIMP_MPICC``, next to the loaded MPI
    library (``<lib>/../bin/mpicc``), next to this Python (a venv with the MPI wheel), or on PATH."""
    override = os.environ.get("MPIMP_MPICC")
    if override is not None:
        return None if override.lower() in ("", "0", "none") else override
    candidates = []
    lib = _loaded_mpi_library()
    if lib is not None:
        candidates.append(lib.parent.parent / "bin" / "mpicc")
    candidates.append(Path(sys.prefix) / "bin" / "mpicc")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("mpicc")


def _build_key(mpicc: str, source: bytes, extra: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256()
    for part in (source, MPI.Get_library_version().encode(), mpicc.encode(), platform.machine().encode(),
                 *(e.encode() for e in extra)):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_native(mpicc: str, directory: Path | None = None, source: Path = SOURCE) -> Path:
    """Compile the C operators with ``mpicc`` (once per key; concurrent ranks wait on a lock)."""
    return build_library(mpicc, source, "reduce16", _LIBNAME, directory=directory)


def build_library(mpicc: str, source: Path, name: str, filename: str, flags: tuple[str, ...] = (),
                  key: tuple[str, ...] = (), directory: Path | None = None) -> Path:
    """Compile ``source`` with ``mpicc`` into a shared library ``filename`` under
    ``<cache>/<name>-<hash>/``, once per hash (of the source, the MPI library version, the
    compiler, the machine and ``key``); concurrent ranks of a node wait on a file lock
    while the first one builds.  Raises :class:`NativeBuildError` with the compiler's output."""
    try:
        text = source.read_bytes()
    except OSError as exc:
        raise NativeBuildError(f"cannot read the C source {source}: {exc}") from None
    out_dir = (directory or cache_dir()) / f"{name}-{_build_key(mpicc, text, key)}"
    lib = out_dir / filename
    if lib.exists():
        return lib
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the first rank on the node builds, the others wait
            if lib.exists():
                return lib
            fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so")
            os.close(fd)
            cmd = [mpicc, "-O3", "-fPIC", "-shared", *flags, "-o", tmp, str(source)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as exc:
                os.unlink(tmp)
                raise NativeBuildError(f"{' '.join(cmd)} could not run: {exc}") from None
            if done.returncode != 0:
                os.unlink(tmp)
                raise NativeBuildError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr.strip()}")
            os.chmod(tmp, 0o755)  # (mkstemp makes it private: a shared cache is read by others)
            os.replace(tmp, lib)
    except OSError as exc:
        raise NativeBuildError(f"cannot write to the cache directory {out_dir}: {exc}") from None
    return lib


def _load_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.mpimp_reduce16_version.restype = ctypes.c_char_p
    lib.mpimp_reduce16_op.restype = ctypes.c_ssize_t
    lib.mpimp_reduce16_op.argtypes = [ctypes.c_int]
    lib.mpimp_reduce16_apply.restype = ctypes.c_int
    lib.mpimp_reduce16_apply.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int]
    lib.mpimp_reduce16_init.restype = ctypes.c_int
    if lib.mpimp_reduce16_version() != _VERSION:
        raise NativeBuildError(f"{path} is version {lib.mpimp_reduce16_version()!r}, expected {_VERSION!r}")
    lib.mpimp_reduce16_init()  # AVX2 / F16C sums where the CPU has them
    return lib


# ----------------------------------------------------------------------------- the operator set

@dataclass
class ReductionOps:
    """The six operators (bf16/fp16 x sum/max/min) of one backend: ``native`` or ``numpy``."""

    backend: str
    ops: tuple[MPI.Op, ...]
    library: ctypes.CDLL | None = None
    path: Path | None = None

    def op(self, dtype: torch.dtype, op: str) -> MPI.Op | None:
        index = _index(dtype, op)
        return None if index is None else self.ops[index]

    def apply(self, dtype: torch.dtype, op: str, a: np.ndarray, b: np.ndarray, generic: bool = False) -> None:
        """``b = a (op) b`` in place on uint16 arrays, without MPI (for tests and benchmarks).

        ``generic=True`` runs the portable C kernels even where SIMD ones were picked.
        """
        index = _index(dtype, op)
        if index is None:
            raise MpimpError(f"no 16-bit operator {op!r} for {dtype}")
        if a.dtype != np.uint16 or b.dtype != np.uint16 or a.shape != b.shape:
            raise MpimpError("apply needs two uint16 arrays of the same shape")
        if self.library is None:
            b[...] = apply_reference(index, a, b)
        else:
            a = np.ascontiguousarray(a)
            if not b.flags.c_contiguous:
                raise MpimpError("apply needs a contiguous output array")
            self.library.mpimp_reduce16_apply(index, a.ctypes.data, b.ctypes.data, a.size, int(generic))


def load_ops(mpicc: str | None = None, directory: Path | None = None, search: bool = True) -> ReductionOps:
    """Build (or find in the cache) and load the native operators; fall back to numpy with a warning.

    ``mpicc`` defaults to :func:`find_mpicc` when ``search`` is true.
    """
    compiler = mpicc if mpicc is not None else (find_mpicc() if search else None)
    reason = "no MPI compiler wrapper (mpicc) was found; set MPIMP_MPICC to its path"
    if compiler is not None:
        try:
            path = build_native(compiler, directory)
            lib = _load_library(path)
            ops = tuple(MPI.Op.fromhandle(lib.mpimp_reduce16_op(i)) for i in range(6))
            return ReductionOps("native", ops, lib, path)
        except (NativeBuildError, OSError) as exc:
            reason = f"the C operators could not be built with {compiler}: {exc}"
    warnings.warn(
        f"mpimp: 16-bit reductions use the slow numpy fallback because {reason}",
        RuntimeWarning, stacklevel=2,
    )
    return ReductionOps("numpy", tuple(_numpy_op(i) for i in range(6)))


@functools.lru_cache(maxsize=1)
def _default_ops() -> ReductionOps:
    return load_ops()


# ----------------------------------------------------------------------------- CUDA (device buffers)

@functools.lru_cache(maxsize=1)
def _cuda_module() -> object | None:
    """The CUDA kernels compiled by CuPy, or None where CuPy or a GPU is missing."""
    try:
        import cupy  # type: ignore[import-not-found]

        if cupy.cuda.runtime.getDeviceCount() == 0:
            return None
        return cupy.RawModule(code=CUDA_SOURCE.read_text(), options=("--std=c++11",))
    except Exception:  # ImportError, no driver, no device
        return None


def cuda_apply(dtype: torch.dtype, op: str, a: object, b: object) -> None:
    """``b = a (op) b`` in place on two CuPy uint16 device arrays, with the CUDA kernels."""
    module = _cuda_module()
    index = _index(dtype, op)
    if module is None or index is None:
        raise MpimpError("the CUDA 16-bit operators need CuPy, a GPU and op sum, max or min")
    kind = ("bf16", "f16")[index // 3]
    kernel = module.get_function(f"mpimp_{kind}_{op}")  # type: ignore[attr-defined]
    n = int(a.size)  # type: ignore[attr-defined]
    threads = 256
    blocks = max(1, min(65535, (n + threads - 1) // threads))
    kernel((blocks,), (threads,), (a, b, np.int64(n)))


def _cuda_op(dtype: torch.dtype, op: str) -> MPI.Op:
    """An MPI operator whose buffers are device memory (a CUDA-aware MPI hands it device pointers)."""
    import cupy  # type: ignore[import-not-found]

    def combine(inbuf: object, inoutbuf: object, datatype: MPI.Datatype) -> None:
        views = []
        for buf in (inbuf, inoutbuf):
            nbytes = len(buf)  # type: ignore[arg-type]
            mem = cupy.cuda.UnownedMemory(buf.address, nbytes, None)  # type: ignore[attr-defined]
            views.append(cupy.ndarray((nbytes // 2,), cupy.uint16, cupy.cuda.MemoryPointer(mem, 0)))
        cuda_apply(dtype, op, views[0], views[1])
        cupy.cuda.get_current_stream().synchronize()

    return MPI.Op.Create(combine, commute=True)


@functools.cache
def _cuda_ops(dtype: torch.dtype, op: str) -> MPI.Op | None:
    if _cuda_module() is None or _index(dtype, op) is None:
        return None
    return _cuda_op(dtype, op)


def reduction_op(dtype: torch.dtype, op: str, device: str = "cpu") -> MPI.Op | None:
    """The MPI operator reducing 2-byte ``dtype`` elements with ``op`` (sum, max, min).

    ``device="cuda"`` asks for an operator on device buffers (CUDA-aware MPI).  None
    means there is none (prod, another dtype, or no CuPy for device buffers): the
    caller then reduces an fp32 copy.
    """
    if _index(dtype, op) is None:
        return None
    if device == "cuda":
        return _cuda_ops(dtype, op)
    return _default_ops().op(dtype, op)
