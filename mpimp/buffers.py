"""Torch tensors as MPI buffers: zero-copy host views, CUDA device buffers, pinned staging.

Problem: mpi4py speaks the buffer protocol (and DLPack / CUDA array interface), torch
speaks tensors.  ``tensor.numpy()`` rejects bfloat16 and CUDA tensors, and a careless
``bytes(...)`` copies every message.  This module is the one seam between the two:

* contiguous CPU tensors become a buffer over their own memory (no copy, any dtype,
  bfloat16 and float16 included, as raw bytes);
* CUDA tensors are handed to MPI as device buffers when the MPI library is CUDA-aware,
  after synchronising the current stream (MPI does not know about CUDA streams: a kernel
  still writing the buffer would race with the send); otherwise they are staged through
  pinned host memory;
* :func:`mpi_datatype` maps torch dtypes to MPI datatypes for reductions;
* :class:`HostPool` recycles large host receive buffers: a fresh 64 MiB buffer costs
  16,384 page faults (the kernel zeroes every page on first touch), which made receiving
  into new memory 3.5x slower than receiving into memory that was used before.

CUDA-awareness is detected (Open MPI's build info, Cray MPICH's
``MPICH_GPU_SUPPORT_ENABLED``, MVAPICH2's ``MV2_USE_CUDA``) and can be forced with
``MPIMP_CUDA_AWARE=0|1``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import torch
from mpi4py import MPI

from .errors import ConfigError

__all__ = [
    "DTYPE_CODES",
    "CODE_DTYPES",
    "host_buffer",
    "mpi_datatype",
    "is_16bit_float",
    "cuda_aware",
    "to_wire",
    "from_wire",
    "HostPool",
]

# Stable wire codes: never renumber, only append (they appear inside messages).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.int64: 5,
    torch.int32: 6,
    torch.int16: 7,
    torch.int8: 8,
    torch.uint8: 9,
    torch.bool: 10,
    torch.complex64: 11,
    torch.complex128: 12,
}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}

_MPI_TYPES: dict[torch.dtype, MPI.Datatype] = {
    torch.float32: MPI.FLOAT,
    torch.float64: MPI.DOUBLE,
    torch.int64: MPI.INT64_T,
    torch.int32: MPI.INT32_T,
    torch.int16: MPI.INT16_T,
    torch.int8: MPI.INT8_T,
    torch.uint8: MPI.UINT8_T,
    torch.bool: MPI.C_BOOL,
    torch.complex64: MPI.C_FLOAT_COMPLEX,
    torch.complex128: MPI.C_DOUBLE_COMPLEX,
    # 16-bit floats travel as 2-byte integers; reductions on them need mpimp's own ops.
    torch.float16: MPI.UINT16_T,
    torch.bfloat16: MPI.UINT16_T,
}


def dtype_code(dtype: torch.dtype) -> int:
    """The wire code of ``dtype``; raises for dtypes mpimp does not carry."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_CODES)
        raise ConfigError(
            f"dtype {dtype} is not supported by mpimp's transport; supported: {supported}. "
            f"Convert with tensor.to(torch.float32) (or view it as bytes) before sending"
        ) from None


def is_16bit_float(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def mpi_datatype(dtype: torch.dtype) -> MPI.Datatype:
    """MPI datatype whose elements have the size of ``dtype``'s (16-bit floats -> UINT16_T)."""
    dtype_code(dtype)
    return _MPI_TYPES[dtype]


def host_buffer(t: torch.Tensor) -> memoryview:
    """A writable buffer over the bytes of a contiguous CPU tensor (no copy)."""
    if t.device.type != "cpu":
        raise ConfigError(f"host_buffer needs a CPU tensor, got one on {t.device}")
    if not t.is_contiguous():
        raise ConfigError(f"host_buffer needs a contiguous tensor (shape {tuple(t.shape)}, stride {t.stride()})")
    return MPI.buffer.fromaddress(t.data_ptr(), t.numel() * t.element_size())


@functools.lru_cache(maxsize=1)
def _detect_cuda_aware() -> bool:
    version = MPI.Get_library_version()
    if os.environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1" or os.environ.get("MV2_USE_CUDA") == "1":
        return True
    if "Open MPI" in version:
        ompi_info = shutil.which("ompi_info")
        if ompi_info:
            try:
                out = subprocess.run([ompi_info, "--parsable", "--all"], capture_output=True,
                                     text=True, timeout=20).stdout
            except (OSError, subprocess.TimeoutExpired):
                return False
            return "mpi_built_with_cuda_support:value:true" in out
    return False


def cuda_aware() -> bool:
    """Whether device buffers may be handed to MPI directly.

    ``MPIMP_CUDA_AWARE=1`` / ``0`` overrides the detection (set it on every rank).
    """
    override = os.environ.get("MPIMP_CUDA_AWARE")
    if override in ("0", "1"):
        return override == "1"
    if override:
        raise ConfigError(f"MPIMP_CUDA_AWARE={override!r}: use 0 or 1")
    return _detect_cuda_aware()


def _device_buffer(t: torch.Tensor) -> object:
    """A DLPack-capable device buffer over ``t`` (CuPy if installed, else torch's own CAI)."""
    torch.cuda.current_stream(t.device).synchronize()  # MPI is stream-unaware
    try:
        import cupy  # type: ignore[import-not-found]

        return cupy.from_dlpack(t.view(torch.uint8).reshape(-1))
    except ImportError:
        return t.view(torch.uint8).reshape(-1)  # torch exposes __cuda_array_interface__


def to_wire(t: torch.Tensor) -> tuple[object, torch.Tensor | None]:
    """Buffer for sending ``t`` and the staging tensor that must live until completion.

    CPU: the tensor's own memory.  CUDA + CUDA-aware MPI: the device memory after a
    stream sync.  CUDA otherwise: a pinned host copy.
    """
    if t.device.type == "cpu":
        return host_buffer(t), None
    if t.device.type == "cuda":
        if cuda_aware():
            return _device_buffer(t), None
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staged.copy_(t)  # synchronous device -> pinned host copy
        return host_buffer(staged), staged
    raise ConfigError(f"tensors on device {t.device} are not supported; use cpu or cuda")


def from_wire(t: torch.Tensor) -> tuple[object, torch.Tensor | None]:
    """Buffer to receive into ``t`` and, if staged, the host tensor to copy back from."""
    if t.device.type == "cpu" or (t.device.type == "cuda" and cuda_aware()):
        return to_wire(t)[0], None
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host_buffer(staged), staged


class HostPool:
    """Large host buffers that are reused once nothing refers to them any more.

    :meth:`take_array` returns a uint8 numpy array of ``nbytes`` (contents undefined),
    :meth:`take` the same as a tensor (below ``min_bytes`` a plain new tensor).  The pool
    owns every buffer it hands out, up to ``max_bytes`` in total, and a buffer is free
    again when no object outside the pool refers to it: every numpy view of it, every
    tensor made over it (``torch.from_numpy``, ``torch.frombuffer``) and every torch view
    of those holds a reference to the array, so its reference count says whether a
    received activation is still in use.  A received activation that the model has
    consumed thus serves the next message of the same size without new page faults, and
    no finalizer runs per message (one costs ~15 us right after a transfer has evicted
    the caches, on the critical path of every receive).  Free buffers of other sizes are
    dropped when a new size needs the room; past ``max_bytes`` a buffer is not pooled.
    Thread-safe.
    """

    def __init__(self, max_bytes: int = 512 << 20, min_bytes: int = 256 << 10) -> None:
        self.max_bytes, self.min_bytes = max_bytes, min_bytes
        self._bufs: dict[int, list[np.ndarray]] = {}
        self._owned = 0
        self._lock = threading.Lock()
        self.reused = 0  # buffers served again (for tests and diagnostics)
        probe = [np.empty(1, dtype=np.uint8)]
        self._free_refs = self._refs(probe, 0)  # the count of a buffer only the pool holds

    @staticmethod
    def _refs(bufs: list[np.ndarray], i: int) -> int:
        return sys.getrefcount(bufs[i])

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes < self.min_bytes:
            return torch.empty(nbytes, dtype=torch.uint8)
        return torch.from_numpy(self.take_array(nbytes))

    def take_array(self, nbytes: int) -> np.ndarray:
        """A free pooled buffer of ``nbytes`` as a uint8 numpy array, or a new one.

        The cheaper form for a receive: MPI takes the array directly, and a tensor over
        it is one ``torch.from_numpy`` of a numpy view.  It stays out of the pool as long
        as any object made from it lives.
        """
        free_refs = self._free_refs
        with self._lock:
            bufs = self._bufs.get(nbytes)
            if bufs:
                for i in range(len(bufs)):
                    if self._refs(bufs, i) == free_refs:
                        self.reused += 1
                        return bufs[i]
            if self._owned + nbytes > self.max_bytes:
                self._drop_free(self._owned + nbytes - self.max_bytes)
            buf = np.empty(nbytes, dtype=np.uint8)
            if self._owned + nbytes <= self.max_bytes:
                self._bufs.setdefault(nbytes, []).append(buf)
                self._owned += nbytes
            return buf

    def _drop_free(self, need: int) -> None:
        """Release free buffers (largest first) until ``need`` bytes are released."""
        for size in sorted(self._bufs, reverse=True):
            bufs = self._bufs[size]
            i = 0
            while i < len(bufs) and need > 0:
                if self._refs(bufs, i) == self._free_refs:
                    bufs.pop(i)
                    self._owned -= size
                    need -= size
                else:
                    i += 1
            if not bufs:
                del self._bufs[size]
            if need <= 0:
                return

    @property
    def held_bytes(self) -> int:
        """Bytes of pooled buffers that are free (nothing outside the pool refers to them)."""
        with self._lock:
            return sum(size for size, bufs in self._bufs.items()
                       for i in range(len(bufs)) if self._refs(bufs, i) == self._free_refs)

    @property
    def owned_bytes(self) -> int:
        """Bytes of all pooled buffers, free or in use (at most ``max_bytes``)."""
        return self._owned
