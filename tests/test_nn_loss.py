"""vocab_parallel_cross_entropy equals torch.nn.functional.cross_entropy of the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from tp_helpers import assert_close, tp_topology

from mpimp import ConfigError
from mpimp.nn import vocab_parallel_cross_entropy

V = 37  # not divisible by 2, 3 or 4: the last rank holds padding columns


def _case(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, V, generator=g) * scale
    targets = torch.randint(0, V, (4, 6), generator=g)
    targets[0, :2] = -100  # ignored positions
    targets[1, 0] = V - 1  # the last real column (next to the padding)
    return logits, targets


def _local(logits: torch.Tensor, r: int, p: int) -> torch.Tensor:
    """This rank's columns of the padded logits; padding filled with large junk that must be masked."""
    padded = -(-V // p) * p
    full = torch.cat([logits, torch.full((*logits.shape[:-1], padded - V), 50.0)], dim=-1)
    n = padded // p
    return full[..., r * n:(r + 1) * n].clone()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scale", [1.0, 80.0], ids=["unit", "large-logits"])
def test_equals_torch_cross_entropy(comm: MPI.Comm, tp: int, reduction: str, scale: float) -> None:
    with tp_topology(comm, tp) as topo:
        if topo is None:
            return
        r = topo.tp_rank
        logits, targets = _case(scale)
        ref_logits = logits.clone().requires_grad_()
        ref = F.cross_entropy(ref_logits.reshape(-1, V), targets.reshape(-1), reduction=reduction)
        ref = ref.reshape(targets.shape) if reduction == "none" else ref
        upstream = torch.rand(ref.shape, generator=torch.Generator().manual_seed(9))
        (ref * upstream).sum().backward()

        local = _local(logits, r, tp).requires_grad_()
        loss = vocab_parallel_cross_entropy(local, targets, topo.tp_comm, vocab_size=V, reduction=reduction)
        assert_close(loss.detach(), ref.detach(), "loss", tol=1e-5)
        (loss * upstream).sum().backward()
        want = _local(ref_logits.grad, r, tp)
        n = want.shape[-1]
        real = max(0, min(n, V - r * n))
        want[..., real:] = 0.0  # padding columns get no gradient
        assert_close(local.grad, want, "logit grad")
        values = topo.tp_comm.allgather(loss.detach().sum().item())
        assert max(values) == min(values)  # the same loss on every rank


@pytest.mark.mpi(min_size=2)
def test_bad_targets_and_sizes_raise_on_every_rank(comm: MPI.Comm) -> None:
    with tp_topology(comm, 2) as topo:
        if topo is None:
            return
        logits, targets = _case(1.0)
        local = _local(logits, topo.tp_rank, 2)
        with pytest.raises(ConfigError, match=r"\[0, 37\)"):
            vocab_parallel_cross_entropy(local, torch.full_like(targets, V), topo.tp_comm, vocab_size=V)
        with pytest.raises(ConfigError, match="vocab_size=10"):
            vocab_parallel_cross_entropy(local, targets, topo.tp_comm, vocab_size=10)
        with pytest.raises(ConfigError, match="do not match"):
            vocab_parallel_cross_entropy(local, targets[:2], topo.tp_comm, vocab_size=V)
        # nothing was left half-collective: a valid call still works
        loss = vocab_parallel_cross_entropy(local, targets, topo.tp_comm, vocab_size=V)
        assert torch.isfinite(loss)
