"""GPT under tensor parallelism equals the single-process GPT: init, loss, gradients, export."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI
from tp_helpers import assert_close, single_topology, tp_topology

import mpimp
from mpimp.models import GPT, GPTConfig

# vocabulary 37 is not divisible by 2 or 4: exercises padding and its masking
TINY = dict(vocab_size=37, seq_len=8, d_model=32, n_heads=4, n_layers=2)


def _batch(cfg: GPTConfig, batch: int = 3, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
    return idx, tgt


def _reference(cfg: GPTConfig, seed: int, one: mpimp.Topology) -> GPT:
    """The single-process model (tp = 1) built with the same seed."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**cfg.__dict__, "sequence_parallel": False}), one)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)],
                         ids=["tp2", "tp2-sp", "tp4", "tp4-sp"])
def test_loss_and_every_gradient_equal_tp1(comm: MPI.Comm, tp: int, sp: bool, tied: bool) -> None:
    with tp_topology(comm, tp) as topo, single_topology() as one:
        if topo is None:
            return
        cfg = GPTConfig(**TINY, tied_embeddings=tied, sequence_parallel=sp)
        ref = _reference(cfg, 11, one)
        torch.manual_seed(11)
        model = GPT(cfg, topo)
        # initialization: the shards are exact slices of the tp = 1 model
        full = model.export_state_dict()
        expected = ref.state_dict()
        assert full.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(full[name], value), name

        idx, tgt = _batch(cfg)
        ref_loss = ref(idx, tgt)
        ref_loss.backward()
        loss = model(idx, tgt)
        loss.backward()
        assert_close(loss.detach(), ref_loss.detach(), "loss")
        # the same scalar on every tp rank
        losses = topo.tp_comm.allgather(loss.item())
        assert max(losses) - min(losses) <= 1e-6, losses
        grads = model.export_grads()
        for name, p in ref.named_parameters(remove_duplicate=False):
            assert_close(grads[name], p.grad, f"grad {name}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("sp", [False, True], ids=["plain", "sp"])
def test_dropout_masks_equal_tp1_and_runs_reproduce(comm: MPI.Comm, sp: bool) -> None:
    with tp_topology(comm, 2) as topo, single_topology() as one:
        if topo is None:
            return
        cfg = GPTConfig(**TINY, dropout=0.25, sequence_parallel=sp)
        ref = _reference(cfg, 3, one)
        torch.manual_seed(3)
        model = GPT(cfg, topo)
        idx, tgt = _batch(cfg)
        torch.manual_seed(100)
        ref_loss = ref(idx, tgt)
        ref_loss.backward()
        losses = []
        for _ in range(2):  # same seed -> same masks -> same loss (reproducible)
            model.zero_grad()
            torch.manual_seed(100)
            loss = model(idx, tgt)
            loss.backward()
            losses.append(loss.item())
        assert losses[0] == losses[1]
        assert_close(loss.detach(), ref_loss.detach(), "loss with dropout")
        ref.eval()
        with torch.no_grad():
            assert not torch.isclose(ref(idx, tgt), ref_loss)  # dropout was really active
        grads = model.export_grads()
        for name, p in ref.named_parameters(remove_duplicate=False):
            assert_close(grads[name], p.grad, f"grad {name}")


@pytest.mark.mpi(min_size=2)
def test_logits_vocab_parallel_and_gathered(comm: MPI.Comm) -> None:
    with tp_topology(comm, 2) as topo, single_topology() as one:
        if topo is None:
            return
        cfg = GPTConfig(**TINY)
        ref = _reference(cfg, 5, one)
        torch.manual_seed(5)
        model = GPT(cfg, topo)
        idx, _ = _batch(cfg)
        with torch.no_grad():
            expected = ref(idx)
            local = model(idx)
            full = model(idx, gather=True)
        assert expected.shape == (3, cfg.seq_len, cfg.vocab_size)
        assert local.shape == (3, cfg.seq_len, 19)  # 37 padded to 38, 19 columns per rank
        assert_close(full, expected, "gathered logits")
        start = topo.tp_rank * 19
        real = min(19, cfg.vocab_size - start)
        assert_close(local[..., :real], expected[..., start:start + real], "local logits")


@pytest.mark.mpi(min_size=2)
def test_import_of_a_single_process_state_dict(comm: MPI.Comm) -> None:
    with tp_topology(comm, 2) as topo, single_topology() as one:
        if topo is None:
            return
        cfg = GPTConfig(**TINY, tied_embeddings=False)
        ref = _reference(cfg, 8, one)
        with torch.no_grad():  # move away from the shared initialization
            for p in ref.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        torch.manual_seed(9)
        model = GPT(cfg, topo)
        model.import_state_dict(ref.state_dict())
        exported = model.export_state_dict()
        for name, value in ref.state_dict().items():
            assert torch.equal(exported[name], value), name
        idx, tgt = _batch(cfg)
        with torch.no_grad():
            assert_close(model(idx, tgt), ref(idx, tgt), "loss after import")
        with pytest.raises(mpimp.ConfigError, match="missing"):
            model.import_state_dict({k: v for k, v in ref.state_dict().items() if "blocks.1" not in k})


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_single_rank_shards_match_any_tp_slice(tp: int) -> None:
    """Without MPI peers: the shard rank r would build equals slice r of the tp = 1 weight."""
    with single_topology() as one:
        torch.manual_seed(4)
        ref = GPT(GPTConfig(**TINY), one)
    from mpimp.nn import ShardSpec, shard_tensor

    class FakeComm:  # rank r of tp: only Get_size/Get_rank are used by shard_tensor
        def __init__(self, r: int) -> None:
            self.r = r

        def Get_size(self) -> int:
            return tp

        def Get_rank(self) -> int:
            return self.r

    w = ref.blocks[0].attn.qkv.weight.detach()  # (3d, d), fused q;k;v
    d = TINY["d_model"]
    pieces = [shard_tensor(w, FakeComm(r), ShardSpec(dim=0, full=3 * d, stride=3)) for r in range(tp)]
    for r, piece in enumerate(pieces):
        n = d // tp
        expected = torch.cat([w[b * d + r * n: b * d + (r + 1) * n] for b in range(3)])
        assert torch.equal(piece, expected)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tp", [2, 4])
def test_bad_shapes_raise_config_error_on_every_rank_without_hanging(comm: MPI.Comm, tp: int) -> None:
    with tp_topology(comm, tp) as topo:
        if topo is None:
            return
        bad_heads = GPTConfig(**{**TINY, "n_heads": 6, "d_model": 36})  # 6 heads over 4 ranks / fine at 2
        if 6 % tp:
            with pytest.raises(mpimp.ConfigError, match=rf"n_heads=6 is not divisible by tp={tp}.*n_heads=8"):
                GPT(bad_heads, topo)
        with pytest.raises(mpimp.ConfigError, match=r"d_model=30 is not divisible by n_heads=4.*d_model=32"):
            GPT(GPTConfig(**{**TINY, "d_model": 30}), topo)
        with pytest.raises(mpimp.ConfigError, match=rf"seq_len={tp + 1} divisible by tp={tp}; use seq_len={2 * tp}"):
            GPT(GPTConfig(**{**TINY, "seq_len": tp + 1, "sequence_parallel": True}), topo)
        # every rank raised before any communication: the communicator still works
        torch.manual_seed(0)
        model = GPT(GPTConfig(**TINY), topo)  # vocabulary 37: padded, not an error
        idx, tgt = _batch(GPTConfig(**TINY))
        assert torch.isfinite(model(idx, tgt))


@pytest.mark.mpi(min_size=2)
def test_dropout_needs_the_same_seed_on_every_tp_rank(comm: MPI.Comm) -> None:
    with tp_topology(comm, 2) as topo:
        if topo is None:
            return
        torch.manual_seed(topo.tp_rank)  # a user error: different seeds per rank
        with pytest.raises(mpimp.ConfigError, match="torch.manual_seed"):
            GPT(GPTConfig(**TINY, dropout=0.1), topo)
        torch.manual_seed(topo.tp_rank)  # without dropout rank 0's seed is used: still consistent
        model = GPT(GPTConfig(**TINY), topo)
        full = model.export_state_dict()
        with single_topology() as one:
            torch.manual_seed(0)
            ref = GPT(GPTConfig(**TINY), one)
        for name, value in ref.state_dict().items():
            assert torch.equal(full[name], value), name
