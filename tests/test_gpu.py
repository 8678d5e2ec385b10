"""CUDA tensors over MPI: device buffers (CUDA-aware MPI) and pinned host staging (otherwise).

These run on machines with a CUDA device and skip elsewhere.  Each rank uses device
``local_rank % device_count``.  The staged path (``MPIMP_CUDA_AWARE=0``) works with any
MPI; the device path (``MPIMP_CUDA_AWARE=1``) needs an MPI library built with CUDA.
Results are compared with the same computation on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

import mpimp
from mpimp import buffers

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
MODES = [
    pytest.param("0", id="staged"),
    pytest.param("1", id="cuda-aware"),
]


def _device(comm: MPI.Comm) -> torch.device:
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local = node.Get_rank()
    node.Free()
    return torch.device("cuda", local % torch.cuda.device_count())


def _mode(monkeypatch: pytest.MonkeyPatch, aware: str) -> None:
    if aware == "1" and not buffers._detect_cuda_aware():
        pytest.skip("the MPI library is not CUDA-aware (device buffers would crash it)")
    monkeypatch.setenv("MPIMP_CUDA_AWARE", aware)


def _make(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@NO_CUDA
def test_staging_uses_pinned_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPIMP_CUDA_AWARE", "0")
    t = _make((1000,), 1).cuda()
    buf, staged = buffers.to_wire(t)
    assert staged is not None and staged.device.type == "cpu" and staged.is_pinned()
    assert torch.equal(staged, t.cpu())
    assert MPI.buffer(buf).address == staged.data_ptr()
    buf, staged = buffers.from_wire(t)
    assert staged is not None and staged.is_pinned() and staged.shape == t.shape


@NO_CUDA
def test_cuda_aware_path_hands_over_device_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPIMP_CUDA_AWARE", "1")  # no communication here: any MPI will do
    t = _make((1000,), 2).cuda()
    t.mul_(2)  # a kernel in flight: to_wire must synchronise the stream before MPI reads
    buf, staged = buffers.to_wire(t)
    assert staged is None
    cai = getattr(buf, "__cuda_array_interface__", None)
    ptr = cai["data"][0] if cai is not None else buf.data.ptr  # torch or CuPy
    assert ptr == t.data_ptr()
    assert torch.equal(t.cpu(), _make((1000,), 2) * 2)


@NO_CUDA
@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("aware", MODES)
def test_send_recv_cuda_tensors(comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch, aware: str) -> None:
    _mode(monkeypatch, aware)
    dev = _device(comm)
    p, rank = comm.Get_size(), comm.Get_rank()
    dst, src = (rank + 1) % p, (rank - 1) % p
    for k, (shape, dtype) in enumerate([((5, 7), torch.float32), ((300, 200), torch.bfloat16),
                                        ((), torch.float16), ((0, 3), torch.float32)]):
        mine = _make(shape, 100 * rank + k, dtype).to(dev)
        req = mpimp.isend(mine, dst, comm, tag=k)
        got = mpimp.recv(src, comm, tag=k, device=dev)
        req.wait()
        assert got.device == dev
        assert torch.equal(got.cpu(), _make(shape, 100 * src + k, dtype))
    pair = (_make((3,), rank).to(dev), _make((40000,), rank + 50).to(dev))
    req = mpimp.isend(pair, dst, comm, tag=9)
    got = mpimp.recv(src, comm, tag=9, device=dev)
    req.wait()
    assert isinstance(got, tuple) and all(g.device == dev for g in got)
    assert torch.equal(got[0].cpu(), _make((3,), src)) and torch.equal(got[1].cpu(), _make((40000,), src + 50))
    out = torch.empty((5, 7), device=dev)
    req = mpimp.isend(_make((5, 7), rank).to(dev), dst, comm, tag=10)
    assert mpimp.recv(src, comm, tag=10, out=out) is out
    req.wait()
    assert torch.equal(out.cpu(), _make((5, 7), src))


@NO_CUDA
@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("aware", MODES)
def test_collectives_on_cuda_tensors_match_cpu(comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch,
                                               aware: str) -> None:
    _mode(monkeypatch, aware)
    dev = _device(comm)
    p, rank = comm.Get_size(), comm.Get_rank()
    for dtype in (torch.float32, torch.bfloat16):
        want = sum(_make((2 * p, 33), r, dtype).double() for r in range(p))
        got = mpimp.all_reduce(_make((2 * p, 33), rank, dtype).to(dev), comm)
        assert got.device == dev and got.dtype == dtype
        torch.testing.assert_close(got.cpu().double(), want, rtol=2 ** -7, atol=1e-6)
        rs = mpimp.reduce_scatter(_make((2 * p, 33), rank, dtype).to(dev), comm)
        assert rs.device == dev
        torch.testing.assert_close(rs.cpu().double(), want[2 * rank : 2 * rank + 2], rtol=2 ** -7, atol=1e-6)
    parts = [_make((4, 6), 10 + r) for r in range(p)]
    got = mpimp.all_gather(parts[rank].to(dev), comm, dim=1)
    assert got.device == dev and torch.equal(got.cpu(), torch.cat(parts, dim=1))
    t = _make((64, 64), 20 + rank).to(dev)
    assert torch.equal(mpimp.broadcast(t, comm, root=p - 1).cpu(), _make((64, 64), 20 + p - 1))


@NO_CUDA
@pytest.mark.mpi(min_size=1)
def test_checkpoint_recompute_replays_dropout_on_the_device() -> None:
    """checkpoint="always" recomputes each micro-batch's forward in its backward with the
    random state of the forward, on the GPU too: the same dropout masks, so the loss and
    every gradient equal the run without checkpointing."""
    from torch import nn

    dev = torch.device("cuda", 0)

    def run(checkpoint: str) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(0)
        layers = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 16), nn.Dropout(0.5),
                               nn.Linear(16, 3)).to(dev)
        with mpimp.init(pp=1, comm=MPI.COMM_SELF) as topo:
            pipe = mpimp.Pipeline(layers, topo, chunks=2, loss_fn=nn.MSELoss(), checkpoint=checkpoint)
            torch.manual_seed(1)
            torch.cuda.manual_seed(1)
            x, y = torch.randn(4, 8, device=dev), torch.randn(4, 3, device=dev)
            loss = pipe.train_step(x, y)
            grads = [q.grad.cpu() for q in pipe.parameters()]  # type: ignore[union-attr]
            pipe.close()
        return loss, grads

    loss, grads = run("never")
    loss_ckpt, grads_ckpt = run("always")
    assert loss == loss_ckpt
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ckpt))
