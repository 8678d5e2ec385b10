"""16-bit MPI reduction operators: C (native), numpy fallback and CUDA source, against fp64 references.

The reference rounds the exact (fp64) result to the 16-bit format with its own code
(frexp / rint, ties to even), independent of the operators under test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpimp
from mpimp import native_ops

# (precision bits incl. the hidden one, exponent of the smallest normal, of the largest binade)
FORMATS = {torch.bfloat16: (8, -126, 127), torch.float16: (11, -14, 15)}
DTYPES = [torch.bfloat16, torch.float16]


def round_to(dtype: torch.dtype, x: np.ndarray) -> np.ndarray:
    """fp64 values rounded to ``dtype`` (nearest, ties to even, overflow to inf), still as fp64."""
    p, emin, emax = FORMATS[dtype]
    x = np.asarray(x, dtype=np.float64)
    out = x.copy()
    finite = np.isfinite(x) & (x != 0)
    _, e = np.frexp(x[finite])                 # x in [2^(e-1), 2^e): ulp 2^(e-p), or the subnormal ulp
    q = np.maximum(e - p, emin - p + 1)
    r = np.ldexp(np.rint(np.ldexp(x[finite], -q)), q)
    biggest = (2.0 - 2.0 ** (1 - p)) * 2.0 ** emax
    out[finite] = np.where(np.abs(r) > biggest, np.copysign(np.inf, r), r)
    return out


def bits(dtype: torch.dtype, values: np.ndarray) -> np.ndarray:
    """uint16 patterns of fp64 values that are exactly representable in ``dtype``."""
    t = torch.from_numpy(np.asarray(values, dtype=np.float64)).to(dtype)
    back = t.double().numpy()
    ok = (back == values) | (np.isnan(back) & np.isnan(values))
    assert ok.all(), "reference values must be representable"
    return t.view(torch.uint16).numpy().copy()


def values(dtype: torch.dtype, u: np.ndarray) -> np.ndarray:
    return torch.from_numpy(u.copy()).view(dtype).double().numpy()


def reference(dtype: torch.dtype, op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    fa, fb = values(dtype, a), values(dtype, b)
    if op == "sum":
        with np.errstate(invalid="ignore"):
            return round_to(dtype, fa + fb)
    pick = np.fmax if op == "max" else np.fmin
    out = pick(fa, fb)
    return np.where(np.isnan(fa) | np.isnan(fb), np.nan, out)


def assert_same(dtype: torch.dtype, got_bits: np.ndarray, expected: np.ndarray) -> None:
    got = values(dtype, got_bits)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan), "NaN positions differ"
    bad = np.flatnonzero(got[~nan] != expected[~nan])
    assert bad.size == 0, f"{bad.size} elements differ, first {got[~nan][bad[0]]!r} != {expected[~nan][bad[0]]!r}"


def pairs(dtype: torch.dtype, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random bit patterns (all exponents, NaN/inf/subnormals included), plus every pattern once."""
    rng = np.random.default_rng(seed)
    a = np.concatenate([np.arange(65536, dtype=np.uint16), rng.integers(0, 65536, n, dtype=np.uint16)])
    # b: mostly values near a (so sums cancel and round), some random patterns
    with np.errstate(invalid="ignore", over="ignore"):
        near = bits(dtype, round_to(dtype, values(dtype, a) * rng.uniform(-1.5, 1.5, a.size)))
    far = rng.integers(0, 65536, a.size, dtype=np.uint16)
    b = np.where(rng.random(a.size) < 0.7, near, far).astype(np.uint16)
    return a, b


@pytest.fixture(scope="module")
def native() -> native_ops.ReductionOps:
    ops = native_ops.load_ops()
    if ops.backend != "native":
        pytest.skip("no MPI compiler wrapper here; the numpy fallback is tested separately")
    return ops


@pytest.fixture(scope="module")
def fallback() -> native_ops.ReductionOps:
    with pytest.warns(RuntimeWarning, match="numpy fallback"):
        return native_ops.load_ops(search=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "max", "min"])
@pytest.mark.parametrize("n", [1, 7, 4099])
def test_native_and_fallback_equal_the_fp64_reference(native, fallback, dtype, op, n) -> None:
    a, b = pairs(dtype, n, seed=n)
    expected = reference(dtype, op, a, b)
    out = b.copy()
    native.apply(dtype, op, a, out, generic=True)  # the portable kernels (SIMD ones may be in use)
    assert_same(dtype, out, expected)
    for ops in (native, fallback):
        out = b.copy()
        ops.apply(dtype, op, a, out)
        assert_same(dtype, out, expected)
        # and through MPI's own entry point for a user operator
        out = b.copy()
        ops.op(dtype, op).Reduce_local([a, MPI.UINT16_T], [out, MPI.UINT16_T])
        assert_same(dtype, out, expected)


@pytest.mark.parametrize(("dtype", "a", "b", "expected"), [
    # ties go to the even neighbour; truncation or round-half-up would give another value
    (torch.bfloat16, 1.0, 2.0 ** -8, 1.0),
    (torch.bfloat16, 1.0 + 2.0 ** -7, 2.0 ** -8, 1.0 + 2.0 ** -6),
    (torch.bfloat16, 1.0, 2.0 ** -8 + 2.0 ** -15, 1.0 + 2.0 ** -7),  # just above the tie
    (torch.bfloat16, -1.0, -(2.0 ** -8), -1.0),
    (torch.bfloat16, 3.3895313892515355e38, 3.3895313892515355e38, np.inf),
    (torch.float16, 2048.0, 1.0, 2048.0),
    (torch.float16, 2050.0, 1.0, 2052.0),
    (torch.float16, 65504.0, 16.0, np.inf),   # exactly half-way to 65536: ties to even = inf
    (torch.float16, 65504.0, 8.0, 65504.0),
    (torch.float16, 2.0 ** -24, 2.0 ** -24, 2.0 ** -23),   # subnormals
    (torch.float16, 2.0 ** -14 - 2.0 ** -24, 2.0 ** -24, 2.0 ** -14),   # into the normal range
    (torch.float16, np.inf, -np.inf, np.nan),
    (torch.float16, np.nan, 1.0, np.nan),
    (torch.bfloat16, np.nan, -np.inf, np.nan),
])
def test_values_that_round_differently(native, fallback, dtype, a, b, expected) -> None:
    ua, ub = bits(dtype, np.array([a])), bits(dtype, np.array([b]))
    exp = np.array([expected], dtype=np.float64)
    ref = reference(dtype, "sum", ua, ub)  # the reference itself
    assert np.array_equal(ref, exp, equal_nan=True)
    for ops, generic in ((native, False), (native, True), (fallback, False)):
        out = np.concatenate([ub] * 19)  # 19: the SIMD loop (8 at a time) and its tail
        ops.apply(dtype, "sum", np.concatenate([ua] * 19), out, generic=generic)
        assert_same(dtype, out, np.concatenate([exp] * 19))


def test_reduction_op_contract(native) -> None:
    assert native_ops.reduction_op(torch.bfloat16, "sum") is not None
    assert native_ops.reduction_op(torch.float16, "max") is not None
    assert native_ops.reduction_op(torch.float32, "sum") is None    # MPI's own ops do fp32
    assert native_ops.reduction_op(torch.bfloat16, "prod") is None  # caller reduces an fp32 copy
    assert native_ops.reduction_op(torch.bfloat16, "sum", device="cuda") is None or torch.cuda.is_available()


def test_build_is_cached_by_source_and_a_broken_compiler_falls_back(tmp_path: Path) -> None:
    mpicc = native_ops.find_mpicc()
    if mpicc is None:
        pytest.skip("no mpicc found next to the MPI library or on PATH")
    first = native_ops.build_native(mpicc, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native_ops.build_native(mpicc, tmp_path) == first and first.stat().st_mtime_ns == stamp
    edited = tmp_path / "edited.c"
    edited.write_text(native_ops.SOURCE.read_text() + "\n/* edited */\n")
    second = native_ops.build_native(mpicc, tmp_path, source=edited)
    assert second.parent != first.parent  # a different source gets its own cache entry
    with pytest.raises(native_ops.NativeBuildError, match="failed"):
        native_ops.build_native("false", tmp_path / "broken")
    with pytest.warns(RuntimeWarning, match="could not be built with false"):
        ops = native_ops.load_ops(mpicc="false", directory=tmp_path / "broken")
    assert ops.backend == "numpy"


_WARN_ONCE = """
import warnings
warnings.simplefilter("always")
import torch
from mpi4py import MPI
import mpimp
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        t = torch.tensor([1.0, 2.5, -3.0], dtype=torch.bfloat16)
        mpimp.all_reduce(t, MPI.COMM_SELF)
        assert t.tolist() == [1.0, 2.5, -3.0], t
fallback = [w for w in caught if "numpy fallback" in str(w.message)]
print(len(fallback))
"""


def test_without_a_compiler_the_fallback_is_used_and_warned_about_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_"))}
    env.update(MPIMP_MPICC="none", MPIMP_CACHE_DIR=str(tmp_path), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    done = subprocess.run([sys.executable, "-c", _WARN_ONCE], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "1"
    assert not any(tmp_path.iterdir())  # nothing was built


def test_cuda_source_compiles_with_nvcc(tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed on this machine")
    out = tmp_path / "mpimp_reduce16.ptx"
    done = subprocess.run([nvcc, "--ptx", "-o", str(out), str(native_ops.CUDA_SOURCE)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ptx = out.read_text()
    for kind in ("bf16", "f16"):
        for op in ("sum", "max", "min"):
            assert f".entry mpimp_{kind}_{op}(" in ptx


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_equal_the_reference(dtype) -> None:
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (the CUDA kernels need it)")
    if native_ops._cuda_module() is None:
        pytest.skip("no CUDA device for CuPy")
    a, b = pairs(dtype, 1001, seed=3)
    for op in ("sum", "max", "min"):
        da, db = cupy.asarray(a), cupy.asarray(b)
        native_ops.cuda_apply(dtype, op, da, db)
        assert_same(dtype, cupy.asnumpy(db), reference(dtype, op, a, b))


# ----------------------------------------------------------------------------- through MPI, several ranks

@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_reduce_16bit_against_fp64(comm: MPI.Comm, dtype: torch.dtype) -> None:
    p, rank = comm.Get_size(), comm.Get_rank()
    gen = torch.Generator().manual_seed(5)
    everyone = torch.randn(p, 1001, generator=gen).to(dtype)       # odd length; same on every rank
    exact = everyone.double().sum(0)
    t = everyone[rank].clone()
    mpimp.all_reduce(t, comm)
    assert t.dtype == dtype
    # one rounding per combining step: |error| <= (p - 1 + 1) half-ulps of the running sums
    bound = p * 2.0 ** -FORMATS[dtype][0] * everyone.double().abs().sum(0)
    assert ((t.double() - exact).abs() <= bound).all()
    if p <= 2:  # a single combination is exactly rounded
        assert_same(dtype, t.view(torch.uint16).numpy(), round_to(dtype, exact.numpy()))
    # small integers add exactly in any order: bit-exact at any p
    ints = torch.randint(-8, 9, (p, 513), generator=gen).to(dtype)
    t = ints[rank].clone()
    mpimp.all_reduce(t, comm)
    assert torch.equal(t.double(), ints.double().sum(0))
    for op, ref in (("max", ints.double().amax(0)), ("min", everyone.double().amin(0))):
        src = ints if op == "max" else everyone
        t = src[rank].clone()
        mpimp.all_reduce(t, comm, op=op)
        assert torch.equal(t.double(), ref)


@pytest.mark.mpi(min_size=1)
def test_reduce_scatter_16bit_and_native_equals_fallback(comm: MPI.Comm) -> None:
    p, rank = comm.Get_size(), comm.Get_rank()
    gen = torch.Generator().manual_seed(9)
    ints = torch.randint(-4, 5, (p, 3 * p), generator=gen).to(torch.bfloat16)
    out = mpimp.reduce_scatter(ints[rank].clone(), comm)
    assert torch.equal(out.double(), ints.double().sum(0)[rank * 3:(rank + 1) * 3])
    # the same MPI reduction with the C operator and with the numpy fallback: same bits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fallback = native_ops.load_ops(search=False)
    native = native_ops.load_ops()
    data = torch.randn(p, 999, generator=gen).to(torch.float16).view(torch.uint16).numpy()
    results = []
    for ops in (native, fallback):
        buf = data[rank].copy()
        comm.Allreduce(MPI.IN_PLACE, [buf, MPI.UINT16_T], ops.op(torch.float16, "sum"))
        results.append(buf)
    assert np.array_equal(results[0], results[1])
    exact = torch.from_numpy(data.copy()).view(torch.float16).double().sum(0)
    got = torch.from_numpy(results[0]).view(torch.float16).double()
    assert ((got - exact).abs() <= p * 2.0 ** -11 * torch.from_numpy(data.copy()).view(torch.float16).double().abs().sum(0)).all()
