"""3D composition: dp x pp x tp training of the reference GPT equals single-process training.

Each test trains 10 AdamW steps on the same global batches; the loss of every step
(mean of the dp replicas' losses) must equal the single-process GPT's within 1e-4.
Run the 8-rank case with ``mpirun -n 8 python -m pytest --with-mpi -m mpi tests/test_3d.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from mpi4py import MPI
from tp_helpers import single_topology

import mpimp
from mpimp.data_parallel import split_batch
from mpimp.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=37, seq_len=8, d_model=32, n_heads=4, n_layers=2)
STEPS, GLOBAL_BATCH, SEED, LR = 10, 8, 31, 3e-3


@contextmanager
def grid(comm: MPI.Comm, dp: int, pp: int, tp: int) -> Iterator[mpimp.Topology | None]:
    """A dp x pp x tp topology over the first dp*pp*tp ranks of ``comm``; None on the others."""
    need = dp * pp * tp
    if comm.Get_size() < need:
        pytest.skip(f"needs {need} ranks (dp={dp} x pp={pp} x tp={tp}), have {comm.Get_size()}")
    sub = comm.Split(0 if comm.Get_rank() < need else MPI.UNDEFINED, comm.Get_rank())
    if sub == MPI.COMM_NULL:
        yield None
        return
    topo = mpimp.init(dp=dp, pp=pp, tp=tp, comm=sub)
    try:
        yield topo
    finally:
        topo.free()
        sub.Free()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(STEPS):
        idx = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, CFG.seq_len), generator=g)
        out.append((idx, (idx + 1) % CFG.vocab_size))  # learnable: the next token id
    return out


def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process training: the losses of every step and the final weights."""
    with single_topology() as one:
        torch.manual_seed(SEED)
        model = GPT(CFG, one)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        losses = []
        for idx, tgt in batches():
            opt.zero_grad()
            loss = model(idx, tgt)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, model.export_state_dict()


def dp_mean(value: float, topo: mpimp.Topology) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    mpimp.all_reduce(t, topo.dp_comm, op="avg")
    return float(t.item())


def train_pipeline(topo: mpimp.Topology, zero: bool) -> list[float]:
    torch.manual_seed(SEED)
    parts = GPT.pipeline_layers(CFG, topo)
    # ZeRO-1 averages the gradients itself (reduce-scatter): the pipeline leaves them local
    pipe = mpimp.Pipeline(parts.layers, topo, chunks=2, loss_fn=parts.loss_fn,
                          shared=parts.shared, reduce_grads=not zero)
    params = list(pipe.parameters())
    opt = (mpimp.ShardedOptimizer(torch.optim.AdamW, params, topo, lr=LR) if zero
           else torch.optim.AdamW(params, lr=LR))
    losses = []
    for step, (idx, tgt) in enumerate(batches()):
        opt.zero_grad()
        local = pipe.train_step(*split_batch((idx, tgt), topo))  # averaged over dp inside unless zero
        if step == 0:  # the replicas saw different halves of the batch: local gradients differ
            g = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
            other = g.clone()
            mpimp.broadcast(other, topo.dp_comm, root=0)
            same = torch.tensor([float(torch.equal(g, other))])
            mpimp.all_reduce(same, topo.dp_comm, op="min")  # dp rank 0 compared with itself
            assert bool(same.item()) != zero, "reduce_grads decides whether train_step averages over dp"
        opt.step()
        losses.append(dp_mean(local, topo))
    pipe.close()
    return losses


def assert_losses(losses: list[float], ref: list[float]) -> None:
    assert len(losses) == len(ref) == STEPS
    worst = max(abs(a - b) for a, b in zip(losses, ref))
    assert worst <= 1e-4, f"losses {losses} vs single-process {ref} (max diff {worst:.3g})"
    assert ref[-1] < ref[0]  # it trains


@pytest.mark.mpi(min_size=8)
def test_dp2_pp2_tp2_equals_single_process(comm: MPI.Comm) -> None:
    with grid(comm, dp=2, pp=2, tp=2) as topo:
        if topo is None:
            return
        ref, _ = reference()
        assert_losses(train_pipeline(topo, zero=False), ref)


@pytest.mark.mpi(min_size=4)
def test_dp2_pp2_with_zero1_equals_single_process(comm: MPI.Comm) -> None:
    with grid(comm, dp=2, pp=2, tp=1) as topo:
        if topo is None:
            return
        ref, _ = reference()
        assert_losses(train_pipeline(topo, zero=True), ref)


@pytest.mark.mpi(min_size=4)
def test_dp2_tp2_data_parallel_gpt_equals_single_process(comm: MPI.Comm) -> None:
    with grid(comm, dp=2, pp=1, tp=2) as topo:
        if topo is None:
            return
        ref, ref_state = reference()
        torch.manual_seed(SEED)
        model = mpimp.DataParallel(GPT(CFG, topo), topo, bucket_mb=0.01)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        losses = []
        for idx, tgt in batches():
            opt.zero_grad()
            loss = model(*model.split_batch(idx, tgt))
            loss.backward()
            opt.step()
            losses.append(dp_mean(loss.item(), topo))
        assert_losses(losses, ref)
        state = model.module.export_state_dict()
        for name, value in ref_state.items():
            assert (state[name] - value).abs().max().item() <= 1e-4, name
