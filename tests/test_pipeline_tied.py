"""Weights shared by layers on different pipeline ranks equal a single-process run.

A GPT-style model whose head reuses the embedding's table, and a model that uses one
module at two places, run through :class:`mpimp.Pipeline` at p = 1, 2 and 4 against the
unparallelised model on the same batch: the loss, every local gradient (a shared
weight's holds the sum over its uses, on every rank that holds a copy), the gradients
accumulated over two steps without ``zero_grad``, and the weights after an optimizer step.
Layer factories (each layer built alone, so the head's copy is its own Parameter) tie
their copies by name with ``shared=``.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from mpi4py import MPI
from torch import nn

import mpimp
from mpimp.errors import ConfigError
from mpimp.schedule import default_virtual_stages, v_owner

TOL = 1e-5
VOCAB, WIDTH, SEQ = 11, 6, 5


def _model(case: str, seed: int = 0) -> nn.Sequential:
    """9 layers (enough for p = 4 x v = 2 stages): an embedding, Linear/Tanh pairs, a head."""
    torch.manual_seed(seed)
    emb = nn.Embedding(VOCAB, WIDTH)
    mid = [nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH),
           nn.Tanh(), nn.LayerNorm(WIDTH)]
    head = nn.Linear(WIDTH, VOCAB, bias=False)
    if case == "tied head":  # GPT-2: the head multiplies by the token table
        head.weight = emb.weight
    else:  # one module at two places of the sequence (layers 1 and 5)
        mid[4] = mid[0]
    return nn.Sequential(emb, *mid, head)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))


def _data(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=g), torch.randint(0, VOCAB, (batch, SEQ), generator=g)


def _step(topo: mpimp.Topology, pipe: mpimp.Pipeline, ref: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    first, last = pipe.owner[0] == topo.pp_rank, pipe.owner[pipe.num_stages - 1] == topo.pp_rank
    loss = pipe.train_step(x if first else None, y if last else None)
    ref_loss = _loss(ref(x), y)
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) <= TOL, (loss, ref_loss.item())


def _compare(pipe: mpimp.Pipeline, ref: nn.Module, grads: bool) -> int:
    """Every local parameter (and its gradient) against the reference's under the same
    name; returns how many were compared."""
    params = dict(ref.named_parameters(remove_duplicate=False))  # a shared weight under each layer's name
    n = 0
    for name, q in pipe.named_parameters():
        want = params[name]
        if grads:
            assert q.grad is not None, name
            torch.testing.assert_close(q.grad, want.grad, atol=TOL, rtol=0)
        else:
            torch.testing.assert_close(q.detach(), want.detach(), atol=TOL, rtol=0)
        n += 1
    return n


# balances that put the shared layers (0 and 8, or 1 and 5) on different ranks
BALANCE = {(2, 1): [3, 6], (4, 1): [2, 2, 2, 3], (2, 2): [2, 4, 1, 2], (4, 2): [1, 2, 1, 1, 1, 1, 1, 1]}


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("case", ["tied head", "one module twice"])
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "zb-h1", "interleaved-zb", "zb-v"])
@pytest.mark.parametrize("checkpoint", ["never", "always"])
def test_a_weight_shared_across_ranks_gets_its_whole_gradient(pp_world: mpimp.Topology | None, p: int,
                                                             case: str, schedule: str, checkpoint: str) -> None:
    if pp_world is None:
        return
    ref = _model(case)
    v = default_virtual_stages(schedule)
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=3, loss_fn=_loss, schedule=schedule,
                          virtual_stages=v, balance=BALANCE.get((p, v)), checkpoint=checkpoint)
    shared_layers = (0, 8) if case == "tied head" else (1, 5)
    holds = any(i in pipe.layer_indices for i in shared_layers)
    holders = [r for r, h in enumerate(pp_world.pp_comm.allgather(holds)) if h]
    # the balance splits the shared layers over two ranks; zb-v's V puts the first and the
    # last stage on rank 0, so there a tied head is one weight on one rank, with no tie
    home = v_owner(p) if schedule == "zb-v" else [s % p for s in range(p * v)]
    stage_of = [s for s, n in enumerate(pipe.balance) for _ in range(n)]
    expected = len({home[stage_of[i]] for i in shared_layers})
    assert expected == (1 if p == 1 or (schedule, case) == ("zb-v", "tied head") else 2)
    assert len(holders) == expected
    assert bool(pipe._tied) == (expected > 1 and holds)  # tied exactly on the ranks holding a copy
    x, y = _data(6, seed=3)
    _step(pp_world, pipe, ref, x, y)
    assert _compare(pipe, ref, grads=True) > 0
    _step(pp_world, pipe, ref, x.flip(0), y)  # accumulates without zero_grad, as plain torch
    _compare(pipe, ref, grads=True)
    torch.optim.SGD(pipe.parameters(), lr=0.5).step()
    torch.optim.SGD(ref.parameters(), lr=0.5).step()
    _compare(pipe, ref, grads=False)  # the copies moved together, as the one weight did
    subs = list(pipe._tie_comms)
    pipe.close()
    assert pipe._tied == [] and all(c == MPI.COMM_NULL for c in subs)  # freed with the pipeline


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p", [2])
def test_a_shared_weight_frozen_and_unfrozen_follows_torch(pp_world: mpimp.Topology | None, p: int) -> None:
    """Frozen at construction, unfrozen, frozen again (staged fine-tuning), with AdamW's
    weight decay: a frozen shared weight gets no gradient and does not move, a trained
    one moves as the one weight of the single process."""
    if pp_world is None:
        return
    ref = _model("tied head")
    ref[0].weight.requires_grad_(False)
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=2, loss_fn=_loss, schedule="zb-h1",
                          balance=BALANCE[(2, 1)])
    assert pipe._tied
    shared = [q for name, q in pipe.named_parameters() if name in ("0.weight", "8.weight")]
    assert len(shared) == 1
    opt = torch.optim.AdamW(pipe.parameters(), lr=0.1, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.1)
    for k, trained in enumerate((False, True, True, False)):
        shared[0].requires_grad_(trained)
        ref[0].weight.requires_grad_(trained)
        opt.zero_grad()
        ref_opt.zero_grad()
        x, y = _data(4, seed=20 + k)
        _step(pp_world, pipe, ref, x, y)
        assert (shared[0].grad is None) == (not trained)
        if trained:
            _compare(pipe, ref, grads=True)
        opt.step()
        ref_opt.step()
        _compare(pipe, ref, grads=False)
    pipe.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p", [2])
def test_a_shared_weight_frozen_on_one_rank_only_is_an_error(pp_world: mpimp.Topology | None, p: int) -> None:
    if pp_world is None:
        return
    pipe = mpimp.Pipeline(_model("tied head"), pp_world, chunks=2, loss_fn=_loss, schedule="1f1b",
                          balance=BALANCE[(2, 1)])
    if pp_world.pp_rank == 0:
        pipe._tied[0][0][0].requires_grad_(False)
    x, y = _data(4, seed=7)
    with pytest.raises(ConfigError, match="layer 0 weight = layer 8 weight, shared by 2 pipeline ranks, is frozen on 1"):
        pipe.train_step(x if pp_world.pp_rank == 0 else None, y if pp_world.pp_rank == 1 else None)
    pipe.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p", [2, 4])
def test_the_copies_of_a_shared_weight_start_from_the_first_owners(pp_world: mpimp.Topology | None,
                                                                   p: int) -> None:
    """A rank whose copy differs (another seed, a stray in-place edit) is overwritten by the
    first owner's values at construction, so the copies are one weight from the start."""
    if pp_world is None:
        return
    ref = _model("tied head")
    model = copy.deepcopy(ref)
    if pp_world.pp_rank > 0:
        with torch.no_grad():
            model[0].weight.add_(float(pp_world.pp_rank))
    pipe = mpimp.Pipeline(model, pp_world, chunks=2, loss_fn=_loss, schedule="1f1b")
    _compare(pipe, ref, grads=False)
    x, y = _data(4, seed=5)
    _step(pp_world, pipe, ref, x, y)
    _compare(pipe, ref, grads=True)
    pipe.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p", [2])
def test_ranks_that_disagree_on_the_sharing_all_raise(pp_world: mpimp.Topology | None, p: int) -> None:
    if pp_world is None:
        return
    model = _model("tied head" if pp_world.pp_rank == 0 else "one module twice")
    with pytest.raises(ConfigError, match="disagree on which layers share a weight"):
        mpimp.Pipeline(model, pp_world, chunks=2, loss_fn=_loss, schedule="1f1b")
    # nothing was left half-built: a pipeline of the same ranks works afterwards
    ref = _model("tied head")
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=2, loss_fn=_loss, schedule="1f1b")
    x, y = _data(4, seed=6)
    _step(pp_world, pipe, ref, x, y)
    _compare(pipe, ref, grads=True)
    pipe.close()


@pytest.mark.mpi(min_size=4)
def test_a_shared_weight_with_data_parallel_replicas(comm: MPI.Comm) -> None:
    """dp = 2 x pp = 2: each replica's owners sum the tied gradient, then the replicas
    average it; three AdamW steps equal one process on the whole batch."""
    sub = comm.Split(0 if comm.Get_rank() < 4 else MPI.UNDEFINED, comm.Get_rank())
    if sub == MPI.COMM_NULL:
        return
    topo = mpimp.init(dp=2, pp=2, comm=sub)
    ref = _model("tied head")
    pipe = mpimp.Pipeline(copy.deepcopy(ref), topo, chunks=2, loss_fn=_loss, schedule="1f1b",
                          balance=BALANCE[(2, 1)])
    assert pipe._tied  # both pipeline ranks of each replica hold a copy
    opt = torch.optim.AdamW(pipe.parameters(), lr=0.05)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05)
    for k in range(3):
        x, y = _data(8, seed=30 + k)
        half = slice(4 * topo.dp_rank, 4 * topo.dp_rank + 4)  # this replica's half of the batch
        opt.zero_grad()
        ref_opt.zero_grad()
        first, last = pipe.owner[0] == topo.pp_rank, pipe.owner[pipe.num_stages - 1] == topo.pp_rank
        pipe.train_step(x[half] if first else None, y[half] if last else None)
        _loss(ref(x), y).backward()
        _compare(pipe, ref, grads=True)
        opt.step()
        ref_opt.step()
        _compare(pipe, ref, grads=False)
    pipe.close()
    topo.free()
    sub.Free()


def _factories(ref: nn.Sequential) -> list:
    """Each layer built alone, as factories build them: the tied head gets its own Parameter
    (equal values), so only ``shared=`` can say that the two are one weight."""
    return [lambda i=i: copy.deepcopy(ref[i]) for i in range(len(ref))]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-zb"])
def test_layer_factories_share_a_weight_by_name(pp_world: mpimp.Topology | None, p: int, schedule: str) -> None:
    """At p = 1 both copies live on one rank (their gradients are summed there), at p = 2
    and 4 on the first and the last rank; also when the copies start different."""
    if pp_world is None:
        return
    ref = _model("tied head")
    v = default_virtual_stages(schedule)
    layers = _factories(ref)
    if pp_world.pp_rank == pp_world.pp - 1:  # the head's copy starts off: the first owner's values win
        layers[8] = lambda: _perturbed(copy.deepcopy(ref[8]))
    pipe = mpimp.Pipeline(layers, pp_world, chunks=3, loss_fn=_loss, schedule=schedule, virtual_stages=v,
                          balance=BALANCE.get((p, v)), shared=[["0.weight", "8.weight"]])
    assert len(pipe._tied) == (1 if p == 1 or pp_world.pp_rank in (0, p - 1) else 0)
    _compare(pipe, ref, grads=False)
    x, y = _data(6, seed=8)
    _step(pp_world, pipe, ref, x, y)
    _step(pp_world, pipe, ref, x.flip(0), y)  # accumulated without zero_grad
    _compare(pipe, ref, grads=True)
    torch.optim.SGD(pipe.parameters(), lr=0.5).step()
    torch.optim.SGD(ref.parameters(), lr=0.5).step()
    _compare(pipe, ref, grads=False)
    pipe.close()


def _perturbed(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for q in layer.parameters():
            q.add_(1.0)
    return layer


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shared,why", [
    ([["0.weight", "8.nope"]], "layer 8 has no parameter 'nope'"),
    ([["0.weight", "x.weight"]], "not '<layer index>.<parameter name>'"),
    ([["0.weight", "9.weight"]], "layer index in 0..8"),
    ([["0.weight"]], "groups of two or more parameter names"),
    ([["0.weight", "8.weight"], ["8.weight", "1.weight"]], "is in two groups"),
    ([["1.bias", "3.weight"]], "differ in shape or dtype: [6] float32, [6, 6] float32"),
    ([["1.bias", "7.bias"], ["3.bias", "5.bias"]], "layer 1 bias is in two groups"),  # (layers 1 and 5: one module)
])
def test_bad_shared_names_raise_on_every_rank(pp_world: mpimp.Topology | None, p: int, shared: list,
                                              why: str) -> None:
    if pp_world is None:
        return
    modules = "layer 1 bias" in why  # (sharing by identity needs the modules themselves)
    ref = _model("one module twice" if modules else "tied head")
    with pytest.raises(ConfigError, match=re.escape(why)):
        mpimp.Pipeline(copy.deepcopy(ref) if modules else _factories(ref), pp_world, chunks=2, loss_fn=_loss, schedule="1f1b",
                       balance=BALANCE.get((p, 1)), shared=shared)
    ref = _model("tied head")
    pipe = mpimp.Pipeline(_factories(ref), pp_world, chunks=2, loss_fn=_loss, schedule="1f1b",
                          balance=BALANCE.get((p, 1)), shared=[["0.weight", "8.weight"]])
    _step(pp_world, pipe, ref, *_data(4, seed=9))  # the same ranks build a working pipeline afterwards
    pipe.close()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("p", [1, 2])
def test_a_named_group_takes_in_a_modules_other_places(pp_world: mpimp.Topology | None, p: int) -> None:
    """Layers 1 and 5 are one module, layer 3 a separate copy of it named with layer 1 in
    ``shared``: the three are one weight, as in the reference where all three are one
    module (on rank 1 at p = 2, layers 3 and 5 are two copies summed there first)."""
    if pp_world is None:
        return
    ref = _model("one module twice")
    ref[3] = ref[1]
    model = copy.deepcopy(ref)
    model[3] = copy.deepcopy(model[1])
    pipe = mpimp.Pipeline(model, pp_world, chunks=2, loss_fn=_loss, schedule="1f1b", balance=BALANCE.get((p, 1)),
                          shared=[["1.weight", "3.weight"], ["1.bias", "3.bias"]])
    x, y = _data(4, seed=10)
    _step(pp_world, pipe, ref, x, y)
    _compare(pipe, ref, grads=True)
    torch.optim.SGD(pipe.parameters(), lr=0.5).step()
    torch.optim.SGD(ref.parameters(), lr=0.5).step()
    _compare(pipe, ref, grads=False)
    pipe.close()
