"""Buffers: dtype wire codes, MPI datatypes, zero-copy host views and the CUDA-aware switch."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

import mpimp
from mpimp import buffers


def test_wire_codes_are_stable_and_invertible() -> None:
    # appear inside messages: renumbering would break mixed-version jobs and saved traces
    assert buffers.DTYPE_CODES[torch.float32] == 1
    assert buffers.DTYPE_CODES[torch.bfloat16] == 4
    assert buffers.DTYPE_CODES[torch.complex128] == 12
    assert len(set(buffers.DTYPE_CODES.values())) == len(buffers.DTYPE_CODES)
    for dtype, code in buffers.DTYPE_CODES.items():
        assert buffers.CODE_DTYPES[code] == dtype
        assert buffers.dtype_code(dtype) == code


@pytest.mark.parametrize("dtype", list(buffers.DTYPE_CODES), ids=str)
def test_mpi_datatype_has_the_element_size(dtype: torch.dtype) -> None:
    assert buffers.mpi_datatype(dtype).Get_size() == torch.empty((), dtype=dtype).element_size()


def test_unsupported_dtype_is_named() -> None:
    dtype = getattr(torch, "uint16", None) or torch.float8_e4m3fn
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(mpimp.ConfigError, match=f"dtype torch.{name} is not supported"):
        buffers.dtype_code(dtype)
    with pytest.raises(mpimp.ConfigError, match=name):
        buffers.mpi_datatype(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.bool,
                                   torch.complex64, torch.int8])
def test_host_buffer_is_the_tensors_own_memory(dtype: torch.dtype) -> None:
    t = torch.zeros(10, dtype=dtype)
    view = buffers.host_buffer(t)
    assert len(view) == 10 * t.element_size()
    assert MPI.buffer(view).address == t.data_ptr()
    view[: t.element_size()] = b"\x01" * t.element_size()  # a write through the buffer ...
    assert bool(t[0] != 0) and bool((t[1:] == 0).all())  # ... changes the tensor: no copy


def test_host_buffer_refuses_non_contiguous_tensors() -> None:
    with pytest.raises(mpimp.ConfigError, match=r"contiguous tensor \(shape \(4, 2\)"):
        buffers.host_buffer(torch.zeros(2, 4).t())


def test_cpu_tensors_go_to_the_wire_without_staging() -> None:
    t = torch.arange(6, dtype=torch.float32)
    buf, staged = buffers.to_wire(t)
    assert staged is None and MPI.buffer(buf).address == t.data_ptr()
    buf, staged = buffers.from_wire(t)
    assert staged is None and MPI.buffer(buf).address == t.data_ptr()


def test_cuda_aware_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPIMP_CUDA_AWARE", "1")
    assert buffers.cuda_aware() is True
    monkeypatch.setenv("MPIMP_CUDA_AWARE", "0")
    assert buffers.cuda_aware() is False
    monkeypatch.setenv("MPIMP_CUDA_AWARE", "yes")
    with pytest.raises(mpimp.ConfigError, match="MPIMP_CUDA_AWARE='yes': use 0 or 1"):
        buffers.cuda_aware()
    monkeypatch.delenv("MPIMP_CUDA_AWARE")
    # detection: the bundled Open MPI / a CPU-only machine reports what its build info says
    assert buffers.cuda_aware() is buffers._detect_cuda_aware()
    assert isinstance(buffers.cuda_aware(), bool)


def test_16bit_float_predicate() -> None:
    assert buffers.is_16bit_float(torch.bfloat16) and buffers.is_16bit_float(torch.float16)
    assert not buffers.is_16bit_float(torch.float32) and not buffers.is_16bit_float(torch.int16)


def test_host_pool_recycles_large_buffers_only_after_the_last_view_dies() -> None:
    from mpimp.buffers import HostPool

    pool = HostPool(max_bytes=3 << 20, min_bytes=1 << 20)
    small = pool.take(1000)
    assert small.numel() == 1000 and pool.held_bytes == 0  # below min_bytes: a plain tensor
    a = pool.take(1 << 20)
    ptr = a.data_ptr()
    view = a[8:64].view(torch.float32)
    del a
    assert pool.held_bytes == 0  # a view still uses the memory: not recycled
    del view
    assert pool.held_bytes == 1 << 20
    b = pool.take(1 << 20)
    assert b.data_ptr() == ptr and pool.reused == 1 and pool.held_bytes == 0
    b.fill_(7)  # writable, the right size
    others = [pool.take(2 << 20) for _ in range(2)]
    del others, b  # 1 + 2 + 2 MiB freed, at most 3 MiB kept
    assert pool.held_bytes <= 3 << 20 and pool.owned_bytes <= 3 << 20


def test_host_pool_counts_numpy_and_frombuffer_views_as_users() -> None:
    import numpy as np

    from mpimp.buffers import HostPool

    pool = HostPool(max_bytes=4 << 20, min_bytes=1 << 20)
    arr = pool.take_array(1 << 20)
    first = arr.ctypes.data
    t = torch.from_numpy(arr[64 : 64 + 4096].view(np.float32).reshape(32, 32))  # as comm._view makes them
    u = torch.frombuffer(arr, dtype=torch.int16, count=8, offset=64)
    del arr
    second = pool.take_array(1 << 20)
    assert second.ctypes.data != first  # both tensors use the first buffer
    del t
    third = pool.take_array(1 << 20)
    assert third.ctypes.data not in (first, second.ctypes.data)  # the frombuffer tensor still does
    del u
    assert pool.take_array(1 << 20).ctypes.data == first and pool.reused == 1  # free again
    del second, third
    assert pool.held_bytes == 3 << 20 and pool.owned_bytes == 3 << 20
    big = pool.take_array(3 << 20)  # needs the room: two free 1 MiB buffers are dropped
    assert pool.owned_bytes == 4 << 20 and pool.held_bytes == 1 << 20
    del big
    assert pool.held_bytes == 4 << 20
