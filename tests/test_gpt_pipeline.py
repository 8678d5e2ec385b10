"""Pipeline x tensor parallelism: the GPT as a layer sequence on pp = 2 x tp = 2 equals the
single-process GPT (loss and every gradient, including the tied embedding, accumulated
over two steps without zero_grad)."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI
from tp_helpers import assert_close, single_topology, tp_topology

import mpimp
from mpimp.models import GPT, GPTConfig
from mpimp.nn import full_grads

TINY = dict(vocab_size=37, seq_len=8, d_model=32, n_heads=4, n_layers=2)


def _prefix(index: int, n_layers: int) -> str:
    """Name prefix in the single-process GPT of pipeline layer ``index``."""
    if index == 0:
        return "embed."
    if index <= n_layers:
        return f"blocks.{index - 1}."
    return "head."


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("tied,sp,schedule,checkpoint", [
    (True, False, "1f1b", "never"),
    (False, True, "gpipe", "except_last"),
    (True, True, "interleaved-1f1b", "never"),
], ids=["tied-1f1b", "untied-sp-gpipe-ckpt", "tied-sp-interleaved"])
def test_pp2_tp2_equals_single_process(comm: MPI.Comm, tied: bool, sp: bool, schedule: str,
                                       checkpoint: str) -> None:
    with tp_topology(comm, tp=2, pp=2) as topo, single_topology() as one:
        if topo is None:
            return
        n_layers = 4 if schedule == "interleaved-1f1b" else TINY["n_layers"]
        cfg = GPTConfig(**{**TINY, "n_layers": n_layers}, tied_embeddings=tied, sequence_parallel=sp)
        torch.manual_seed(21)
        ref = GPT(GPTConfig(**{**cfg.__dict__, "sequence_parallel": False}), one)
        g = torch.Generator().manual_seed(5)
        idx = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), generator=g)
        tgt = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), generator=g)
        ref(idx.flip(0), tgt.flip(0)).backward()  # an earlier step, accumulated (no zero_grad)
        ref_loss = ref(idx, tgt)
        ref_loss.backward()
        ref_grads = dict(ref.named_parameters(remove_duplicate=False))

        torch.manual_seed(21)
        layers, loss_fn, shared = GPT.pipeline_layers(cfg, topo)
        v = 2 if schedule == "interleaved-1f1b" else 1
        pipe = mpimp.Pipeline(layers, topo, chunks=2, loss_fn=loss_fn, schedule=schedule,
                              virtual_stages=v, checkpoint=checkpoint, shared=shared)
        pipe.train_step(idx.flip(0), tgt.flip(0))
        loss = pipe.train_step(idx, tgt)
        assert abs(loss - ref_loss.item()) <= 1e-5, (loss, ref_loss.item())

        mods = [m for s in sorted(pipe.stages) for m in pipe.stages[s]]
        checked = 0
        for index, module in zip(pipe.layer_indices, mods):
            prefix = _prefix(index, cfg.n_layers)
            for name, grad in full_grads(module, topo.tp_comm).items():
                full_name = prefix + name
                if tied and full_name == "head.weight":  # the tied copy: its grad is the total
                    full_name = "embed.tok.weight"
                assert_close(grad, ref_grads[full_name].grad, f"grad {full_name} (layer {index})")
                checked += 1
        assert checked > 0
        # every parameter of the single-process model is checked on some rank
        names = topo.pp_comm.allgather([_prefix(i, cfg.n_layers) for i in pipe.layer_indices])
        covered = {p for row in names for p in row}
        assert covered == {_prefix(i, cfg.n_layers) for i in range(cfg.n_layers + 2)}


@pytest.mark.mpi(min_size=2)
def test_tied_head_on_one_stage_sums_both_copies(comm: MPI.Comm) -> None:
    """pp = 1: embedding and head are separate copies on one rank; shared= sums them."""
    with tp_topology(comm, tp=2) as topo, single_topology() as one:
        if topo is None:
            return
        cfg = GPTConfig(**TINY)
        torch.manual_seed(2)
        ref = GPT(cfg, one)
        idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1))
        ref(idx.flip(1), idx).backward()  # two steps, accumulated
        ref(idx, idx).backward()
        torch.manual_seed(2)
        layers, loss_fn, shared = GPT.pipeline_layers(cfg, topo)
        pipe = mpimp.Pipeline(layers, topo, chunks=1, loss_fn=loss_fn, shared=shared)
        pipe.train_step(idx.flip(1), idx)
        loss = pipe.train_step(idx, idx)
        with torch.no_grad():
            assert abs(loss - ref(idx, idx).item()) <= 1e-5
        mods = dict(zip(pipe.layer_indices, [m for s in sorted(pipe.stages) for m in pipe.stages[s]]))
        want = ref.embed.tok.weight.grad
        assert_close(full_grads(mods[0], topo.tp_comm)["tok.weight"], want, "embedding copy")
        assert_close(full_grads(mods[cfg.n_layers + 1], topo.tp_comm)["weight"], want, "head copy")
