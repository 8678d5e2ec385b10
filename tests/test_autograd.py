"""Each collective of mpimp.autograd and its adjoint, against the math computed locally.

Every rank can compute every other rank's inputs and upstream gradients (they come from
seeded generators), so the expected forward values and gradients are computed on each
rank without communication and compared with what the autograd functions return.
"""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI
from tp_helpers import assert_close, tp_topology

from mpimp.autograd import (
    copy_to_parallel,
    gather_from_parallel,
    gather_from_sequence,
    reduce_from_parallel,
    reduce_scatter_to_sequence,
    scatter_to_parallel,
)

SHAPE = (2, 12, 12)  # divisible by 2, 3 and 4 along dims 1 and 2


def _t(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _block(x: torch.Tensor, dim: int, r: int, p: int) -> torch.Tensor:
    n = x.shape[dim] // p
    return x.narrow(dim, r * n, n)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_pairs_forward_and_backward(comm: MPI.Comm, tp: int) -> None:
    with tp_topology(comm, tp) as topo:
        if topo is None:
            return
        c, p, r = topo.tp_comm, tp, topo.tp_rank
        X = _t(1)
        G = [_t(100 + j) for j in range(p)]  # upstream gradient of rank j
        Xs = [_t(200 + j) for j in range(p)]  # rank-specific inputs

        # copy: identity forward, sum of every rank's gradient backward
        x = X.clone().requires_grad_()
        y = copy_to_parallel(x, c)
        (y * G[r]).sum().backward()
        assert torch.equal(y.detach(), X)
        assert_close(x.grad, sum(G), "copy_to_parallel grad")

        # reduce: sum forward, identity backward
        x = Xs[r].clone().requires_grad_()
        y = reduce_from_parallel(x, c)
        (y * G[r]).sum().backward()
        assert_close(y.detach(), sum(Xs), "reduce_from_parallel")
        assert torch.equal(x.grad, G[r])
        assert torch.equal(x.detach(), Xs[r])  # the input is not reduced in place

        # scatter (last dim): own block forward, all-gather backward
        x = X.clone().requires_grad_()
        y = scatter_to_parallel(x, c)
        Gb = [_block(g, -1, j, p) for j, g in enumerate(G)]
        (y * Gb[r]).sum().backward()
        assert torch.equal(y.detach(), _block(X, -1, r, p))
        assert torch.equal(x.grad, torch.cat(Gb, dim=-1))

        # gather (last dim): all-gather forward, own block backward
        x = _block(X, -1, r, p).clone().requires_grad_()
        y = gather_from_parallel(x, c)
        (y * G[r]).sum().backward()
        assert torch.equal(y.detach(), X)
        assert torch.equal(x.grad, _block(G[r], -1, r, p))

        for dim in (0, 1):
            if SHAPE[dim] % p:  # dim 0 has size 2: only when it divides
                continue
            # gather_from_sequence: all-gather forward, reduce-scatter backward
            x = _block(X, dim, r, p).clone().requires_grad_()
            y = gather_from_sequence(x, c, dim=dim)
            (y * G[r]).sum().backward()
            assert torch.equal(y.detach(), X)
            assert_close(x.grad, _block(sum(G), dim, r, p), f"gather_from_sequence dim {dim} grad")

            # reduce_scatter_to_sequence: reduce-scatter forward, all-gather backward
            x = Xs[r].clone().requires_grad_()
            y = reduce_scatter_to_sequence(x, c, dim=dim)
            Gs = [_block(g, dim, j, p) for j, g in enumerate(G)]
            (y * Gs[r]).sum().backward()
            assert_close(y.detach(), _block(sum(Xs), dim, r, p), f"reduce_scatter dim {dim}")
            assert torch.equal(x.grad, torch.cat(Gs, dim=dim))


@pytest.mark.mpi(min_size=2)
def test_a_gradient_shared_with_another_branch_is_not_reduced_in_place(comm: MPI.Comm) -> None:
    with tp_topology(comm, 2) as topo:
        if topo is None:
            return
        r = topo.tp_rank
        G = [_t(100 + j) for j in range(2)]
        x = _t(1).requires_grad_()
        z = x * 2.0
        y = z + copy_to_parallel(z, topo.tp_comm)  # the same grad tensor reaches both branches
        (y * G[r]).sum().backward()
        assert_close(x.grad, 2.0 * (G[r] + G[0] + G[1]), "shared gradient")


@pytest.mark.mpi(min_size=1)
def test_size_one_communicator_is_the_identity() -> None:
    x = _t(3).requires_grad_()
    for f in (copy_to_parallel, reduce_from_parallel, scatter_to_parallel, gather_from_parallel,
              gather_from_sequence, reduce_scatter_to_sequence):
        y = f(x, MPI.COMM_SELF)
        assert y is x


@pytest.mark.mpi(min_size=2)
def test_inplace_reduce_of_a_tensor_saved_for_backward_is_refused(comm: MPI.Comm) -> None:
    with tp_topology(comm, 2) as topo:
        if topo is None:
            return
        w = _t(5).requires_grad_()
        h = w.exp()  # exp saves its output for backward
        y = reduce_from_parallel(h, topo.tp_comm, inplace=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
        x = _t(6).requires_grad_()
        z = x * 1.0
        y = reduce_from_parallel(z, topo.tp_comm, inplace=True)
        assert y.data_ptr() == z.data_ptr()  # no copy
        y.sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_linear_with_grad_all_reduce_equals_copy_then_linear(comm: MPI.Comm, x_needs_grad: bool) -> None:
    from mpimp.autograd import linear_with_grad_all_reduce

    with tp_topology(comm, 2) as topo:
        if topo is None:
            return
        c, r = topo.tp_comm, topo.tp_rank
        w = [_t(10 + j, (6, 12)) for j in range(2)]  # rank j's weight shard
        b = [_t(20 + j, (6,)) for j in range(2)]
        G = [_t(30 + j, (2, 12, 6)) for j in range(2)]
        X = _t(1)
        x = X.clone().requires_grad_(x_needs_grad)
        wr, br = w[r].clone().requires_grad_(), b[r].clone().requires_grad_()
        y = linear_with_grad_all_reduce(x, wr, br, c)
        (y * G[r]).sum().backward()
        assert_close(y.detach(), X @ w[r].t() + b[r], "output")
        assert_close(wr.grad, G[r].reshape(-1, 6).t() @ X.reshape(-1, 12), "weight grad")
        assert_close(br.grad, G[r].sum(dim=(0, 1)), "bias grad")
        if x_needs_grad:  # the sum over ranks of each rank's input gradient
            assert_close(x.grad, sum(G[j] @ w[j] for j in range(2)), "input grad")
        else:
            assert x.grad is None
