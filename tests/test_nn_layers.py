"""mpimp.nn layers on a tensor-parallel communicator equal their single-process counterparts:
outputs, input gradients and weight gradients (as slices of the full ones)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from tp_helpers import assert_close, tp_topology

from mpimp import ConfigError
from mpimp.nn import (
    ColumnParallelLinear,
    ParallelLayerNorm,
    ParallelMLP,
    ParallelSelfAttention,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_grads,
    full_state_dict,
)

B, S, IN, OUT = 2, 12, 12, 24  # sequence and features divisible by 2, 3 and 4


def _t(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _blk(x: torch.Tensor, dim: int, r: int, p: int) -> torch.Tensor:
    n = x.shape[dim] // p
    return x.narrow(dim, r * n, n)


def _full_weight(seed: int, *shape: int, std: float = 0.02) -> torch.Tensor:
    return torch.empty(shape).normal_(0.0, std, generator=torch.Generator().manual_seed(seed))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("mode", ["block", "gather", "sp"])
def test_column_parallel_linear(comm: MPI.Comm, tp: int, mode: str) -> None:
    with tp_topology(comm, tp) as topo:
        if topo is None:
            return
        c, r = topo.tp_comm, topo.tp_rank
        layer = ColumnParallelLinear(IN, OUT, c, gather_output=mode == "gather", sequence_parallel=mode == "sp",
                                     generator=torch.Generator().manual_seed(1))
        W = _full_weight(1, OUT, IN)
        assert torch.equal(layer.weight.detach(), _blk(W, 0, r, tp))  # init = slice of the full draw
        with torch.no_grad():
            layer.bias.copy_(_blk(_t(2, OUT), 0, r, tp))
        ref_w = W.clone().requires_grad_()
        ref_b = _t(2, OUT).requires_grad_()
        X, G = _t(3, B, S, IN), _t(4, B, S, OUT)
        ref_x = X.clone().requires_grad_()
        ref_y = F.linear(ref_x, ref_w, ref_b)
        (ref_y * G).sum().backward()

        x = (_blk(X, 1, r, tp) if mode == "sp" else X).clone().requires_grad_()
        y = layer(x)
        if mode == "gather":
            assert_close(y, ref_y.detach(), "output")
            (y * G).sum().backward()  # replicated output: the same loss on every rank
        else:
            assert_close(y, _blk(ref_y.detach(), -1, r, tp), "output block")
            (y * _blk(G, -1, r, tp)).sum().backward()
        assert_close(layer.weight.grad, _blk(ref_w.grad, 0, r, tp), "weight grad")
        assert_close(layer.bias.grad, _blk(ref_b.grad, 0, r, tp), "bias grad")
        want_x = _blk(ref_x.grad, 1, r, tp) if mode == "sp" else ref_x.grad
        assert_close(x.grad, want_x, "input grad")
        assert_close(full_state_dict(layer, c)["weight"], W, "export")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("mode", ["parallel-input", "scatter", "sp"])
def test_row_parallel_linear(comm: MPI.Comm, tp: int, mode: str) -> None:
    with tp_topology(comm, tp) as topo:
        if topo is None:
            return
        c, r = topo.tp_comm, topo.tp_rank
        layer = RowParallelLinear(OUT, IN, c, input_is_parallel=mode != "scatter", sequence_parallel=mode == "sp",
                                  generator=torch.Generator().manual_seed(1))
        W = _full_weight(1, IN, OUT)
        assert torch.equal(layer.weight.detach(), _blk(W, 1, r, tp))
        with torch.no_grad():
            layer.bias.copy_(_t(2, IN))
        ref_w, ref_b = W.clone().requires_grad_(), _t(2, IN).requires_grad_()
        X, G = _t(3, B, S, OUT), _t(4, B, S, IN)
        ref_x = X.clone().requires_grad_()
        ref_y = F.linear(ref_x, ref_w, ref_b)
        (ref_y * G).sum().backward()

        x = (X if mode == "scatter" else _blk(X, -1, r, tp)).clone().requires_grad_()
        y = layer(x)
        if mode == "sp":
            assert_close(y, _blk(ref_y.detach(), 1, r, tp), "output sequence block")
            (y * _blk(G, 1, r, tp)).sum().backward()
        else:
            assert_close(y, ref_y.detach(), "output")
            (y * G).sum().backward()
        assert_close(layer.weight.grad, _blk(ref_w.grad, 1, r, tp), "weight grad")
        assert_close(layer.bias.grad, ref_b.grad, "bias grad")
        want_x = ref_x.grad if mode == "scatter" else _blk(ref_x.grad, -1, r, tp)
        assert_close(x.grad, want_x, "input grad")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["replicated", "sp"])
def test_vocab_parallel_embedding_pads_an_odd_vocabulary(comm: MPI.Comm, tp: int, sp: bool) -> None:
    with tp_topology(comm, tp) as topo:
        if topo is None:
            return
        c, r, V, D = topo.tp_comm, topo.tp_rank, 37, 8
        emb = VocabParallelEmbedding(V, D, c, sequence_parallel=sp, generator=torch.Generator().manual_seed(1))
        padded = -(-V // tp) * tp
        assert emb.weight.shape == (padded // tp, D)
        W = _full_weight(1, V, D)
        ref_w = W.clone().requires_grad_()
        ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
        G = _t(3, B, S, D)
        ref_y = F.embedding(ids, ref_w)
        (ref_y * G).sum().backward()
        y = emb(ids)
        if sp:
            assert_close(y, _blk(ref_y.detach(), 1, r, tp), "sequence block")
            (y * _blk(G, 1, r, tp)).sum().backward()
        else:
            assert_close(y, ref_y.detach(), "embedding")
            (y * G).sum().backward()
        assert_close(full_grads(emb, c)["weight"], ref_w.grad, "weight grad")
        assert_close(full_state_dict(emb, c)["weight"], W, "export drops the padding")
        with pytest.raises(ConfigError, match=r"\[0, 37\)"):
            emb(torch.tensor([[0, 37]]))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["replicated", "sp"])
@pytest.mark.parametrize("kind", ["attention", "mlp", "layernorm"])
def test_attention_mlp_layernorm_equal_one_rank(comm: MPI.Comm, tp: int, sp: bool, kind: str) -> None:
    with tp_topology(comm, tp) as topo:
        if topo is None:
            return
        c, r, D, H = topo.tp_comm, topo.tp_rank, 16, 4

        def build(cm: MPI.Comm, seq_par: bool) -> torch.nn.Module:
            g = torch.Generator().manual_seed(9)
            if kind == "attention":
                return ParallelSelfAttention(D, H, cm, sequence_parallel=seq_par, generator=g)
            if kind == "mlp":
                return ParallelMLP(D, 4 * D, cm, sequence_parallel=seq_par, generator=g)
            ln = ParallelLayerNorm(D, cm, sequence_parallel=seq_par)
            with torch.no_grad():
                ln.weight.copy_(_t(5, D))
                ln.bias.copy_(_t(6, D))
            return ln

        ref, mod = build(MPI.COMM_SELF, False), build(c, sp)
        if kind != "layernorm":  # nonzero biases, so their gradients are exercised
            with torch.no_grad():
                for m in (ref, mod):
                    for name, q in m.named_parameters():
                        if name.endswith("bias"):
                            q.add_(0.1)
        X, G = _t(3, B, S, D), _t(4, B, S, D)
        ref_x = X.clone().requires_grad_()
        ref_y = ref(ref_x)
        (ref_y * G).sum().backward()
        x = (_blk(X, 1, r, tp) if sp else X).clone().requires_grad_()
        y = mod(x)
        if sp:
            assert_close(y, _blk(ref_y.detach(), 1, r, tp), "output block")
            (y * _blk(G, 1, r, tp)).sum().backward()
            assert_close(x.grad, _blk(ref_x.grad, 1, r, tp), "input grad")
        else:
            assert_close(y, ref_y.detach(), "output")
            (y * G).sum().backward()
            assert_close(x.grad, ref_x.grad, "input grad")
        grads = full_grads(mod, c)
        for name, q in ref.named_parameters():
            assert_close(grads[name], q.grad, f"grad {name}")
