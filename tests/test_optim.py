"""ShardedOptimizer (ZeRO-1): equal to the unsharded torch optimizer on the global batch, 1/dp of the state."""

from __future__ import annotations

import copy

import pytest
import torch
from mpi4py import MPI
from torch import nn

import mpimp
from mpimp.data_parallel import split_batch
from mpimp.optim import ShardedOptimizer


def make_model() -> nn.Module:
    # odd sizes: the flat vector (197 elements) splits unevenly and parameters straddle shards
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 8))
    model.frozen_scale = nn.Parameter(torch.ones(3))  # never used: no gradient on any rank
    return model


def groups(model: nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [{"params": params[:4], "weight_decay": 0.1}, {"params": params[4:], "lr": 3e-3, "weight_decay": 0.0}]


def data(step: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, 5, generator=g), torch.randn(n, 8, generator=g)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("opt_class", [torch.optim.AdamW, torch.optim.SGD])
def test_equals_the_unsharded_optimizer_over_several_steps(comm: MPI.Comm, opt_class: type) -> None:
    kwargs = {"lr": 1e-2, "betas": (0.8, 0.95)} if opt_class is torch.optim.AdamW else {"lr": 0.05, "momentum": 0.9}
    with mpimp.init(comm=comm) as topo:
        ref = make_model()
        model = copy.deepcopy(ref)
        opt_ref = opt_class(groups(ref), **kwargs)
        opt = ShardedOptimizer(opt_class, groups(model), topo, **kwargs)
        assert opt.total == sum(p.numel() for p in ref.parameters()) == 197
        for step in range(5):
            x, y = data(step)
            opt_ref.zero_grad()
            nn.functional.mse_loss(ref(x), y).backward()
            opt_ref.step()
            opt.zero_grad()
            lx, ly = split_batch((x, y), topo)
            nn.functional.mse_loss(model(lx), ly).backward()  # local gradients: step() averages them
            opt.step()
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        assert torch.equal(model.frozen_scale, torch.ones(3))  # no gradient anywhere: untouched


@pytest.mark.mpi(min_size=1)
def test_state_is_one_dp_th_of_the_total(comm: MPI.Comm) -> None:
    with mpimp.init(comm=comm) as topo:
        big = nn.Sequential(nn.Linear(64, 63), nn.Linear(63, 61))
        ref = copy.deepcopy(big)
        opt = ShardedOptimizer(torch.optim.AdamW, big.parameters(), topo, lr=1e-3)
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
        x = torch.randn(4 * topo.dp, 64)
        big(split_batch(x, topo)).sum().backward()
        opt.step()
        ref(x).sum().div(topo.dp).backward()  # same scale as the mean of the local sums
        opt_ref.step()
        total = sum(t.numel() * t.element_size() for s in opt_ref.state.values() for t in s.values()
                    if t.dim() > 0)
        mine = opt.state_bytes()
        # two fp32 moments of this rank's S = ceil(total/dp) elements (less the padding on the
        # last rank), plus one step counter per piece of a parameter
        owned = sum(view.numel() for *_, view in opt.pieces)
        assert owned == min(opt.shard, opt.total - topo.dp_rank * opt.shard)
        assert mine - 4 * len(opt.pieces) == 2 * 4 * owned
        assert mine <= 1.05 * total / topo.dp + 64
        everyone = comm.allgather(mine - 4 * len(opt.pieces))
        assert sum(everyone) == total  # together the ranks hold all of it, once


@pytest.mark.mpi(min_size=1)
def test_bf16_gradients_on_the_wire(comm: MPI.Comm) -> None:
    with mpimp.init(comm=comm) as topo:
        ref = make_model()
        model = copy.deepcopy(ref)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
        opt = ShardedOptimizer(torch.optim.SGD, model.parameters(), topo, lr=0.1, reduce_dtype="bf16")
        x, y = data(0)
        nn.functional.mse_loss(ref(x), y).backward()
        opt_ref.step()
        lx, ly = split_batch((x, y), topo)
        nn.functional.mse_loss(model(lx), ly).backward()
        opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0.1 * 2 ** -6)  # lr * bf16 rounding of O(1) grads


@pytest.mark.mpi(min_size=1)
def test_state_dict_round_trip_and_layout_check(comm: MPI.Comm) -> None:
    with mpimp.init(comm=comm) as topo:
        model = make_model()
        twin = copy.deepcopy(model)
        opt = ShardedOptimizer(torch.optim.AdamW, model.parameters(), topo, lr=1e-2)
        for step in range(2):
            x, y = data(step)
            opt.zero_grad()
            nn.functional.mse_loss(model(split_batch(x, topo)), split_batch(y, topo)).backward()
            opt.step()
        saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors, as torch's does
        twin.load_state_dict(model.state_dict())
        opt2 = ShardedOptimizer(torch.optim.AdamW, twin.parameters(), topo, lr=1e-2)
        opt2.load_state_dict(saved)
        for o, m in ((opt, model), (opt2, twin)):
            x, y = data(7)
            o.zero_grad()
            nn.functional.mse_loss(m(split_batch(x, topo)), split_batch(y, topo)).backward()
            o.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
        other = nn.Linear(3, 3)
        opt3 = ShardedOptimizer(torch.optim.AdamW, other.parameters(), topo, lr=1e-2)
        with pytest.raises(mpimp.ConfigError, match="saved with total = 197"):
            opt3.load_state_dict(saved)
        with pytest.raises(mpimp.ConfigError, match="not a ShardedOptimizer state"):
            opt3.load_state_dict(opt_ref_state := torch.optim.AdamW(other.parameters()).state_dict())
        assert "state" in opt_ref_state


@pytest.mark.mpi(min_size=1)
def test_bad_parameters(comm: MPI.Comm) -> None:
    with mpimp.init(comm=comm) as topo:
        with pytest.raises(mpimp.ConfigError, match="empty parameter list"):
            ShardedOptimizer(torch.optim.AdamW, [], topo)
        a = nn.Parameter(torch.zeros(3))
        with pytest.raises(mpimp.ConfigError, match="appears twice"):
            ShardedOptimizer(torch.optim.AdamW, [{"params": [a]}, {"params": [a]}], topo)
        with pytest.raises(mpimp.ConfigError, match="one dtype and device"):
            ShardedOptimizer(torch.optim.AdamW, [a, nn.Parameter(torch.zeros(2, dtype=torch.float64))], topo)
        mpimp.barrier(comm)


@pytest.mark.mpi(min_size=1)
def test_consolidated_state_equals_the_unsharded_optimizer_and_reshards(comm: MPI.Comm) -> None:
    with mpimp.init(comm=comm) as topo:
        ref = make_model()
        model = copy.deepcopy(ref)
        opt_ref = torch.optim.AdamW(groups(ref), lr=1e-2)
        opt = ShardedOptimizer(torch.optim.AdamW, groups(model), topo, lr=1e-2)
        for step in range(3):
            x, y = data(step)
            opt_ref.zero_grad()
            nn.functional.mse_loss(ref(x), y).backward()
            opt_ref.step()
            opt.zero_grad()
            nn.functional.mse_loss(model(split_batch(x, topo)), split_batch(y, topo)).backward()
            opt.step()
        full = opt.consolidated_state_dict()
        want = opt_ref.state_dict()
        assert sorted(full["state"]) == sorted(want["state"])  # frozen_scale (no grad): no state
        for i, entry in want["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(full["state"][i][key], value, rtol=0, atol=1e-6)
        assert [g["params"] for g in full["param_groups"]] == [g["params"] for g in want["param_groups"]]
        assert [g["lr"] for g in full["param_groups"]] == [g["lr"] for g in want["param_groups"]]
        # reshard: load the unsharded state into a dp=1 ShardedOptimizer on every rank, step both
        with mpimp.init(comm=MPI.COMM_SELF) as one:
            twin = copy.deepcopy(ref)
            opt1 = ShardedOptimizer(torch.optim.AdamW, groups(twin), one, lr=1e-2)
            opt1.load_consolidated_state_dict(copy.deepcopy(want))
            x, y = data(9)
            for o, m in ((opt_ref, ref), (opt1, twin)):
                o.zero_grad()
                nn.functional.mse_loss(m(x), y).backward()
                o.step()
            for p, q in zip(twin.parameters(), ref.parameters()):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        with pytest.raises(mpimp.ConfigError, match="holds 1 parameters"):
            opt.load_consolidated_state_dict({"state": {}, "param_groups": [{"params": [0]}, {"params": []}]})
