"""Pipeline transparency: loss and every local gradient equal a single-process run of the same model.

Each test builds the model with a fixed seed on every rank, runs it unparallelised on the
whole batch (the reference), and runs a deep copy through :class:`mpimp.Pipeline` on a
sub-communicator of p ranks (skipped with the reason when the world is smaller).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from mpi4py import MPI
from torch import nn

import mpimp
from mpimp.schedule import default_virtual_stages, v_owner

TOL = 1e-5
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "interleaved-zb", "zb-v")


def _layers(seed: int = 0, width: int = 12) -> nn.Sequential:
    """9 layers: 5 Linear with Tanh in between (enough for p=4 x v=2 stages)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Linear(8, width)]
    for _ in range(3):
        mods += [nn.Tanh(), nn.Linear(width, width)]
    mods += [nn.Tanh(), nn.Linear(width, 3)]
    return nn.Sequential(*mods)


def _data(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, generator=g), torch.randn(batch, 3, generator=g)


def _check_step(topo: mpimp.Topology, pipe: mpimp.Pipeline, ref: nn.Module, x: torch.Tensor,
                y: torch.Tensor, loss_fn: nn.Module) -> None:
    first, last = pipe.owner[0] == topo.pp_rank, pipe.owner[pipe.num_stages - 1] == topo.pp_rank
    loss = pipe.train_step(x if first else None, y if last else None)
    ref_loss = loss_fn(ref(x), y)
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) <= TOL, (loss, ref_loss.item())
    # the same value on every rank
    assert topo.world.allgather(loss) == [loss] * topo.size
    params = dict(ref.named_parameters(remove_duplicate=False))  # a tied weight under each layer's name
    checked = 0
    for name, q in pipe.named_parameters():
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, params[name].grad, atol=TOL, rtol=0)
        checked += 1
    # each parameter once, also one that two of this rank's layers share
    assert checked == len({id(q) for i in pipe.layer_indices for q in ref[i].parameters()})
    # every layer is owned by exactly one pipeline rank
    everyone = sorted(i for idx in topo.pp_comm.allgather(pipe.layer_indices) for i in idx)
    assert everyone == list(range(len(ref)))


def _cases() -> list[tuple[str, int, int]]:
    out = []
    for name in SCHEDULES:
        for p in (2, 4):
            out += [(name, p, m) for m in (1, p, 2 * p + 1)]
    return out


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule,p,m", _cases())
def test_pipeline_equals_single_process(pp_world: mpimp.Topology | None, schedule: str, p: int, m: int) -> None:
    if pp_world is None:
        return
    v = default_virtual_stages(schedule)
    ref = _layers()
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=m, loss_fn=nn.MSELoss(), schedule=schedule,
                          virtual_stages=v)
    x, y = _data(2 * m)
    _check_step(pp_world, pipe, ref, x, y, nn.MSELoss())
    # measured in-flight micro-batches match the verifier's prediction for this rank
    assert pipe.peak_inflight == pipe.predicted_peak_inflight[pp_world.pp_rank]
    if schedule == "gpipe":
        assert pipe.peak_inflight == m
    if schedule == "1f1b":
        assert pipe.peak_inflight == min(p - pp_world.pp_rank, m)
    # zb-h1 and interleaved-zb really split the backward: every W ran a separate weight-gradient pass
    assert pipe.split_weight_passes == sum(a.kind == "W" for a in pipe.compute_table[pp_world.pp_rank])
    # a second step accumulates like plain torch (no zero_grad in between)
    _check_step(pp_world, pipe, ref, x * 0.5, y, nn.MSELoss())
    out = pipe.forward(x if pipe.owner[0] == pp_world.pp_rank else None)
    if pipe.owner[pipe.num_stages - 1] == pp_world.pp_rank:
        torch.testing.assert_close(out, ref(x), atol=TOL, rtol=0)
    else:
        assert out is None
    pipe.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("checkpoint", ["always", "except_last"])
@pytest.mark.parametrize("p,m", [(p, m) for p in (2, 4) for m in (1, p, 2 * p + 1)])
def test_checkpointing_is_transparent(pp_world: mpimp.Topology | None, schedule: str, checkpoint: str,
                                      p: int, m: int) -> None:
    if pp_world is None:
        return
    ref = _layers(3)
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=m, loss_fn=nn.MSELoss(), schedule=schedule,
                          virtual_stages=default_virtual_stages(schedule), checkpoint=checkpoint)
    x, y = _data(2 * m, seed=4)
    calls: dict[int, int] = {}  # forward runs per local stage during one step
    for s, layers in pipe.stages.items():
        layers[0].register_forward_hook(lambda *_, s=s: calls.__setitem__(s, calls.get(s, 0) + 1))
    _check_step(pp_world, pipe, ref, x, y, nn.MSELoss())
    # checkpointing really recomputes: every checkpointed micro-batch runs each stage's
    # forward again in its backward (once, split backward or not); except_last keeps the
    # last micro-batch's activations (its backward follows at once), as torchgpipe does
    recomputed = m if checkpoint == "always" else m - 1
    for s in pipe.stages:
        assert calls[s] == m + recomputed, (s, calls[s], m)
    pipe.close()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("checkpoint", ["never", "always", "except_last"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_checkpoint_recompute_leaves_batchnorm_statistics_alone(pp_world: mpimp.Topology | None, checkpoint: str,
                                                                 p: int, schedule: str) -> None:
    """A recomputed forward must not update running statistics a second time: BatchNorm's
    running mean and variance (and its batch count) after a step equal a single-process
    run of the same micro-batches in order, with or without checkpointing; so do the loss
    and the gradients (each micro-batch normalised over itself)."""
    if pp_world is None:
        return
    m = 3
    torch.manual_seed(7)
    mods: list[nn.Module] = []
    for _ in range(2):
        mods += [nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh()]
    mods += [nn.BatchNorm1d(8, momentum=None), nn.Linear(8, 3)]
    ref = nn.Sequential(*mods)
    v = default_virtual_stages(schedule)
    if p * v > len(ref):
        pytest.skip(f"{p} x {v} stages for {len(ref)} layers")
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=m, loss_fn=nn.MSELoss(), checkpoint=checkpoint,
                          schedule=schedule, virtual_stages=v)
    x, y = _data(4 * m, seed=8)
    first, last = pipe.owner[0] == pp_world.pp_rank, pipe.owner[pipe.num_stages - 1] == pp_world.pp_rank
    loss = pipe.train_step(x if first else None, y if last else None)
    ref_loss = sum(nn.MSELoss()(ref(xi), yi) for xi, yi in zip(x.chunk(m), y.chunk(m))) / m
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) <= TOL
    layers = dict(zip(pipe.layer_indices, (layer for s in sorted(pipe.stages) for layer in pipe.stages[s])))
    compared = 0
    for i, layer in layers.items():
        assert type(layer) is type(ref[i])
        for name, buf in layer.named_buffers():
            torch.testing.assert_close(buf, dict(ref[i].named_buffers())[name], atol=TOL, rtol=0,
                                       msg=lambda text, i=i, name=name: f"layer {i} {name}: {text}")
            compared += 1
        for name, q in layer.named_parameters():
            torch.testing.assert_close(q.grad, dict(ref[i].named_parameters())[name].grad, atol=TOL, rtol=0)
    assert sum(pp_world.pp_comm.allgather(compared)) == 3 * 3  # every BatchNorm's mean, variance and count
    pipe.close()


_UNEVEN = {  # 9 layers; interleaved: p x 2 virtual stages
    (2, 1): [[1, 8], [7, 2]], (4, 1): [[1, 1, 2, 5], [5, 2, 1, 1]],
    (2, 2): [[1, 3, 4, 1], [4, 1, 1, 3]], (4, 2): [[1, 1, 1, 1, 1, 1, 1, 2], [2, 1, 1, 1, 1, 1, 1, 1]],
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p,k", [(p, k) for p in (2, 4) for k in (0, 1)])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("checkpoint", ["never", "except_last"])
def test_uneven_balance(pp_world: mpimp.Topology | None, p: int, k: int, schedule: str, checkpoint: str) -> None:
    if pp_world is None:
        return
    v = default_virtual_stages(schedule)
    balance = _UNEVEN[(p, v)][k]
    ref = _layers(5)
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=p + 1, loss_fn=nn.MSELoss(), schedule=schedule,
                          balance=balance, virtual_stages=v, checkpoint=checkpoint)
    starts = [sum(balance[:s]) for s in range(p * v)]
    home = v_owner(p) if schedule == "zb-v" else [s % p for s in range(p * v)]  # the stage -> rank placement
    mine = [i for s in range(p * v) if home[s] == pp_world.pp_rank for i in range(starts[s], starts[s] + balance[s])]
    assert pipe.layer_indices == mine
    x, y = _data(2 * (p + 1), seed=6)
    _check_step(pp_world, pipe, ref, x, y, nn.MSELoss())
    pipe.close()


class _ReadsWeightOf(nn.Module):
    """Applies another layer's weight (weight tying inside a stage), plus a bias of its own
    when ``bias`` (then it owns a parameter, and its output is captured for W)."""

    def __init__(self, other: nn.Linear, bias: int = 0) -> None:
        super().__init__()
        self.other = [other]  # not registered: the weight stays the other layer's
        self.b = nn.Parameter(torch.randn(bias) * 0.1) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.other[0].weight.t(), self.b)


def _shared_weight_model(case: str) -> tuple[nn.Sequential, list[int]]:
    """Stage 0 (the first balance entry) shares a weight between its layers; stage 1 does not."""
    torch.manual_seed(11)
    lin = nn.Linear(8, 6)
    if case == "reader last":
        return nn.Sequential(lin, nn.Tanh(), _ReadsWeightOf(lin), nn.Tanh(), nn.Linear(8, 3)), [3, 2]
    if case == "reader then a linear":  # the reader's share sits below another captured output
        return nn.Sequential(lin, nn.Tanh(), _ReadsWeightOf(lin), nn.Tanh(), nn.Linear(8, 8),
                             nn.Tanh(), nn.Linear(8, 3)), [5, 2]
    if case == "reader owns a bias":  # its own output is captured
        return nn.Sequential(lin, nn.Tanh(), _ReadsWeightOf(lin, bias=8), nn.Tanh(), nn.Linear(8, 3)), [4, 1]
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)  # one Parameter registered in two layers
    b.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), nn.Linear(8, 3)), [3, 2]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("case", ["reader last", "reader then a linear", "reader owns a bias",
                                  "one parameter in two layers"])
@pytest.mark.parametrize("schedule", ["zb-h1", "1f1b"])
def test_weight_used_outside_its_layer_gets_its_full_gradient(pp_world: mpimp.Topology | None, p: int,
                                                              case: str, schedule: str) -> None:
    """zb-h1 splits W per layer; a stage where a weight is also read by another layer, or
    registered in two, must fall back to full backwards instead of losing (or doubling)
    a share of its gradient; a stage without sharing still splits."""
    if pp_world is None:
        return
    ref, balance = _shared_weight_model(case)
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=3, loss_fn=nn.MSELoss(), schedule=schedule,
                          balance=balance if p == 2 else None)
    x, y = _data(6, seed=12)
    _check_step(pp_world, pipe, ref, x, y, nn.MSELoss())
    if schedule == "zb-h1":  # the sharing stage fell back to full backwards, the other one splits
        assert pipe.split_weight_passes == (0 if pp_world.pp_rank == 0 else 3)
    # an optimizer over pipe.parameters() steps a shared parameter once, as over the whole model
    torch.optim.SGD(pipe.parameters(), lr=0.1).step()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    params = dict(ref.named_parameters(remove_duplicate=False))
    for name, q in pipe.named_parameters():
        torch.testing.assert_close(q.detach(), params[name].detach(), atol=TOL, rtol=0)
    pipe.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p", [2])
def test_a_pipeline_leaves_its_layers_when_closed_or_dropped(pp_world: mpimp.Topology | None, p: int) -> None:
    """The executor's forward hooks are on the layers only while a split forward (one with a
    W) runs: a plain forward keeps torch's hook-free fast path, and a pipeline rebuilt on
    the same layers (after a failed step, or for evaluation) neither keeps the old one
    alive nor stacks its hooks."""
    if pp_world is None:
        return
    import gc
    import weakref

    ref = _layers(5)
    layers = copy.deepcopy(ref)
    x, y = _data(4, seed=6)
    seen: list[int] = []  # the hooks on the first Linear while each of its forwards runs

    def hooks() -> int:
        return sum(len(m._forward_hooks) for m in layers.modules())

    probe = layers[0].register_forward_pre_hook(lambda mod, args: seen.append(len(mod._forward_hooks)))
    plain = mpimp.Pipeline(layers, pp_world, chunks=2, loss_fn=nn.MSELoss(), schedule="1f1b")
    _check_step(pp_world, plain, ref, x, y, nn.MSELoss())
    assert hooks() == 0 and seen in ([], [0, 0])  # nothing to capture without a split W
    plain.close()
    for closing in (True, False, True):
        pipe = mpimp.Pipeline(layers, pp_world, chunks=2, loss_fn=nn.MSELoss(), schedule="zb-h1")
        assert hooks() == 0
        ref.zero_grad()
        for q in layers.parameters():
            q.grad = None
        seen.clear()
        _check_step(pp_world, pipe, ref, x, y, nn.MSELoss())
        assert hooks() == 0
        # zb-h1 at p = 2, m = 2 splits every backward: each forward ran with the capture hook
        assert seen == ([1, 1] if pipe.owner[0] == pp_world.pp_rank else []), seen
        assert pipe.split_weight_passes == 2
        gone = weakref.ref(pipe)
        if closing:
            pipe.close()
        del pipe
        gc.collect()
        assert gone() is None, "the pipeline outlived its last reference"
        assert hooks() == 0
    probe.remove()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p", [2])
def test_compiled_layers_keep_their_capture_hooks_and_torch_gradients(pp_world: mpimp.Topology | None,
                                                                       p: int) -> None:
    """A layer under torch.compile does not see forward hooks added after its first compiled
    call (torch skips the guards on module hooks), so a stage with a W that holds one keeps
    its capture hooks for the pipeline's life instead of per split forward; whether the
    compiled code then runs them is torch's (where it does not, the split falls back to a
    full backward).  Either way the gradients are torch's, and close() takes the hooks off."""
    if pp_world is None:
        return

    def model() -> nn.Sequential:  # 8 layers, 6 of them compiled
        torch.manual_seed(3)
        mods = [nn.Linear(8, 12)] + [torch.compile(nn.Sequential(nn.Tanh(), nn.Linear(12, 12)), backend="eager")
                                     for _ in range(6)] + [nn.Linear(12, 3)]
        return nn.Sequential(*mods)

    ref = model()  # the same model in one process (its parameters under the same names)
    layers = model()
    x, y = _data(16, seed=9)
    pipe = mpimp.Pipeline(layers, pp_world, chunks=8, loss_fn=nn.MSELoss(), schedule="interleaved-zb",
                          virtual_stages=2)
    split_stages = {s for s, _ in pipe._has_w}
    assert split_stages == ({1, 3} if pp_world.pp_rank == 1 else set())  # rank 1 splits its last 4 backwards
    for s in split_stages:  # hooked before any compiled call: one capture hook per parameter owner
        owners = [m for m in pipe.stages[s].modules() if any(True for _ in m.parameters(recurse=False))]
        assert [len(m._forward_hooks) for m in owners] == [1] * len(owners)
    for _ in range(2):  # the second step runs on the layers compiled by the first
        ref.zero_grad()
        layers.zero_grad(set_to_none=True)
        _check_step(pp_world, pipe, ref, x, y, nn.MSELoss())
    pipe.close()
    assert all(not m._forward_hooks for m in layers.modules())


class _Split(nn.Module):
    """float features -> (features, int64 bucket per row): a stage boundary carrying a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), (x[:, :1].abs() * 3).long()


class _Use(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 12)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, k = pair
        return torch.tanh(self.lin(h)) * (1.0 + k.float()), k


class _Merge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 3)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, k = pair
        return self.lin(h) + k.float()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p", [2])
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_tuples_and_shapes_changing_between_steps(pp_world: mpimp.Topology | None, p: int, schedule: str) -> None:
    if pp_world is None:
        return
    torch.manual_seed(7)
    ref = nn.Sequential(_Split(), _Use(), _Use(), _Merge())
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=2, loss_fn=nn.MSELoss(), schedule=schedule,
                          balance=[2, 2])
    for batch in (4, 10, 6):  # micro-batch shapes change from step to step
        x, y = _data(batch, seed=batch)
        ref.zero_grad()
        for q in pipe.parameters():
            q.grad = None
        _check_step(pp_world, pipe, ref, x, y, nn.MSELoss())
    pipe.close()


class _Cast(nn.Module):
    """Stage output in the dtype the step asks for: the activation's dtype changes between steps."""

    def __init__(self) -> None:
        super().__init__()
        self.dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


class _Widen(nn.Module):
    """Pads the features by 0-2 columns, as many as the rows with a positive first feature
    (mod 3): the stage message's shape differs between the micro-batches of one step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int((x[:, 0] > 0).sum().item()) % 3
        return torch.cat([x, x[:, :k]], dim=1)


class _Narrow(nn.Module):
    """Drops the padding and returns to float64: the model's output does not depend on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :8].double()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p", [2])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1", "zb-v"])
def test_dtype_between_steps_and_shape_within_a_step_change(pp_world: mpimp.Topology | None, p: int,
                                                            schedule: str) -> None:
    """The stage message's dtype changes from step to step (float32, float64, float32) and its
    shape from micro-batch to micro-batch inside one step (8 to 10 features, by the data):
    loss and gradients still match one process, and the shapes really varied."""
    if pp_world is None:
        return
    torch.manual_seed(11)
    ref = nn.Sequential(nn.Linear(8, 8), _Cast(), _Widen(), _Narrow(), nn.Tanh(), nn.Linear(8, 3)).double()
    ref[1].dtype = torch.float64
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=3, loss_fn=nn.MSELoss(), schedule=schedule,
                          virtual_stages=default_virtual_stages(schedule),
                          balance=[3, 3] if schedule != "zb-v" else [3, 1, 1, 1])  # a cross-rank boundary after _Widen
    local = [m for layers in pipe.stages.values() for m in layers]
    sent: list[tuple[int, torch.dtype]] = []  # the widened stage output of each micro-batch
    for m in local:
        if isinstance(m, _Widen):
            m.register_forward_hook(lambda _m, _i, out: sent.append((out.shape[1], out.dtype)))
    for step, dtype in enumerate((torch.float32, torch.float64, torch.float32)):
        for layer in [*ref, *local]:
            if isinstance(layer, _Cast):
                layer.dtype = dtype
        x, y = _data(12, seed=step)
        ref.zero_grad()
        for q in pipe.parameters():
            q.grad = None
        sent.clear()
        _check_step(pp_world, pipe, ref, x.double(), y.double(), nn.MSELoss())
        if pipe.is_first_stage:  # the rank that widened: several shapes within this step, its dtype
            assert len({w for w, _ in sent}) >= 2 and {d for _, d in sent} == {dtype}, sent
    pipe.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p", [2])
def test_factories_are_called_only_on_the_owner(pp_world: mpimp.Topology | None, p: int) -> None:
    if pp_world is None:
        return
    ref = _layers(9)
    calls: list[tuple[int, str]] = []

    def factory(i: int) -> object:
        def make() -> nn.Module:
            calls.append((i, torch.empty(0).device.type))
            return copy.deepcopy(ref[i]) if torch.empty(0).device.type != "meta" else type(ref[i])(
                *((ref[i].in_features, ref[i].out_features) if isinstance(ref[i], nn.Linear) else ()))
        return make

    pipe = mpimp.Pipeline([factory(i) for i in range(len(ref))], pp_world, chunks=2, loss_fn=nn.MSELoss(),
                          balance=[4, 5])
    assert [i for i, dev in calls] == pipe.layer_indices
    assert all(dev == "cpu" for _, dev in calls)
    _check_step(pp_world, pipe, ref, *_data(4), nn.MSELoss())
    pipe.close()
    # balance=None counts parameters by building every layer on the meta device (no memory)
    calls.clear()
    pipe = mpimp.Pipeline([factory(i) for i in range(len(ref))], pp_world, chunks=2, loss_fn=nn.MSELoss())
    real = [i for i, dev in calls if dev != "meta"]
    assert [i for i, dev in calls if dev == "meta"] == list(range(len(ref)))
    assert real == pipe.layer_indices
    pipe.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p", [2])
def test_balance_by_time_agrees_on_every_rank(pp_world: mpimp.Topology | None, p: int) -> None:
    if pp_world is None:
        return
    ref = _layers(2)
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=2, loss_fn=nn.MSELoss(), balance="time",
                          sample=_data(2)[0])
    assert len(set(map(tuple, pp_world.pp_comm.allgather(pipe.balance)))) == 1
    assert sum(pipe.balance) == len(ref) and min(pipe.balance) >= 1
    _check_step(pp_world, pipe, ref, *_data(4), nn.MSELoss())
    pipe.close()


@pytest.mark.mpi(min_size=4)
def test_pipeline_with_tensor_and_data_parallel_peers(comm: MPI.Comm) -> None:
    """pp=2 with tp=2 (replicated layers; each tp rank uses its own pp_comm), then dp=2 x pp=2."""
    size = comm.Get_size()
    sub = comm.Split(0 if comm.Get_rank() < 4 else MPI.UNDEFINED, comm.Get_rank())
    if sub == MPI.COMM_NULL:
        return
    x, y = _data(8, seed=11)
    with mpimp.init(pp=2, tp=2, comm=sub) as topo:
        ref = _layers(12)
        pipe = mpimp.Pipeline(copy.deepcopy(ref), topo, chunks=4, loss_fn=nn.MSELoss(), schedule="zb-h1")
        _check_step(topo, pipe, ref, x, y, nn.MSELoss())
        pipe.close()
    with mpimp.init(dp=2, pp=2, comm=sub) as topo:
        ref = _layers(13)
        hooked: list[int] = []
        pipe = mpimp.Pipeline(copy.deepcopy(ref), topo, chunks=2, loss_fn=nn.MSELoss(), schedule="1f1b",
                              after_backward=lambda pp: hooked.append(pp.topo.rank))
        half = slice(4 * topo.dp_rank, 4 * topo.dp_rank + 4)
        loss = pipe.train_step(x[half] if topo.is_first_stage else None, y[half] if topo.is_last_stage else None)
        assert hooked == [topo.rank]
        ref_loss = nn.MSELoss()(ref(x[half]), y[half])  # this replica's loss
        assert abs(loss - ref_loss.item()) <= TOL
        nn.MSELoss()(ref(x), y).backward()  # averaged over replicas == gradient of the whole batch
        params = dict(ref.named_parameters())
        for name, q in pipe.named_parameters():
            torch.testing.assert_close(q.grad, params[name].grad, atol=TOL, rtol=0)
        pipe.close()
    sub.Free()
    assert size >= 4


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("gpipe", 1), ("zb-h1", 1), ("interleaved-1f1b", 3)])
@pytest.mark.parametrize("checkpoint", ["never", "always"])
def test_one_rank_pipeline_and_local_stage_hand_off(schedule: str, v: int, checkpoint: str) -> None:
    """pp=1 over COMM_SELF: with v=3 the three stages pass activations and gradients locally."""
    with mpimp.init(pp=1, comm=MPI.COMM_SELF) as topo:
        ref = _layers(21)
        pipe = mpimp.Pipeline(copy.deepcopy(ref), topo, chunks=3, loss_fn=nn.MSELoss(), schedule=schedule,
                              virtual_stages=v, checkpoint=checkpoint)
        assert pipe.local_stages == list(range(v)) and pipe.layer_indices == list(range(len(ref)))
        x, y = _data(6, seed=22)
        _check_step(topo, pipe, ref, x, y, nn.MSELoss())
        assert all(a.kind in ("F", "B", "W") for a in pipe.table[0])  # nothing to send
        pipe.close()


@pytest.mark.mpi(min_size=1)
def test_zero_bubble_b_leaves_weight_gradients_to_w() -> None:
    """In zb-h1, B computes the input gradient and the parameter gradients of every module
    but the plain Linears (a LayerNorm's come out of the same backward); the Linears'
    weight gradients (g^T x, the deferrable matmul half) appear only at W."""
    with mpimp.init(pp=1, comm=MPI.COMM_SELF) as topo:
        torch.manual_seed(23)
        ref = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.LayerNorm(12), nn.Linear(12, 3))
        table = "rank 0: 0F0 0B0 0W0"
        pipe = mpimp.Pipeline(copy.deepcopy(ref), topo, chunks=1, loss_fn=nn.MSELoss(), schedule=table)
        x, y = _data(2, seed=24)
        pipe._start_step(x, y, True, True, True)
        pipe._loss_sum = torch.zeros((), dtype=torch.float64)
        pipe._forward(0, 0, True)
        pipe._backward(0, 0)
        linear = {n for n, _ in pipe.named_parameters() if not n.startswith("2.")}
        assert linear and all((q.grad is None) == (n in linear) for n, q in pipe.named_parameters())
        pipe._weight(0, 0)
        assert all(q.grad is not None for q in pipe.parameters())
        nn.MSELoss()(ref(x), y).backward()
        for (_, q), (_, r) in zip(pipe.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(q.grad, r.grad, atol=TOL, rtol=0)
        pipe.close()


class _HalvedLinear(nn.Linear):
    """A Linear subclass with its own forward: W must not assume ``out = x W^T + b``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


def _linear_variants() -> tuple[nn.Sequential, list[int]]:
    """Linears W differentiates directly (no bias, frozen weight, 3-D input) next to ones it
    must leave to autograd (a subclass, old-style weight_norm, a LayerNorm); [5, 4] layers."""
    torch.manual_seed(31)
    frozen = nn.Linear(8, 8)
    frozen.weight.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm's deprecation notice
        normed = torch.nn.utils.weight_norm(nn.Linear(8, 8))
    return nn.Sequential(nn.Linear(8, 8, bias=False), nn.Tanh(), frozen, nn.LayerNorm(8), _HalvedLinear(8, 8),
                         nn.Tanh(), normed, nn.Tanh(), nn.Linear(8, 3)), [5, 4]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("p", [1, 2])
def test_weight_pass_direct_linear_and_autograd_fallbacks(pp_world: mpimp.Topology | None, p: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """zb-h1's W computes plain Linear gradients directly (g^T x over the flattened leading
    dims of a 3-D input) and the others with autograd; both equal plain torch, in two steps."""
    if pp_world is None:
        return
    from mpimp.schedule import executor

    direct: list[nn.Module] = []
    real = executor._linear_weight_grad
    monkeypatch.setattr(executor, "_linear_weight_grad", lambda mod, *a: (direct.append(mod), real(mod, *a)))
    ref, balance = _linear_variants()
    model, _ = _linear_variants()  # the same seed; weight_norm's computed weight defeats deepcopy
    pipe = mpimp.Pipeline(model, pp_world, chunks=3, loss_fn=nn.MSELoss(), schedule="zb-h1",
                          balance=balance if p == 2 else None)
    g = torch.Generator().manual_seed(32)
    x, y = torch.randn(6, 4, 8, generator=g), torch.randn(6, 4, 3, generator=g)
    first, last = pipe.owner[0] == pp_world.pp_rank, pipe.owner[pipe.num_stages - 1] == pp_world.pp_rank
    for scale in (1.0, 0.5):  # the second step accumulates into the first step's gradients
        loss = pipe.train_step(x * scale if first else None, y if last else None)
        ref_loss = nn.MSELoss()(ref(x * scale), y)
        ref_loss.backward()
        assert abs(loss - ref_loss.item()) <= TOL
        params = dict(ref.named_parameters())
        for name, q in pipe.named_parameters():
            if not q.requires_grad:
                assert q.grad is None, name
                continue
            torch.testing.assert_close(q.grad, params[name].grad, atol=TOL, rtol=0, msg=name)
    assert pipe.split_weight_passes == 3
    # the plain trainable Linears (no bias, the last one) went the direct way, 3 micro-batches x 2
    # steps; the frozen one's bias went through autograd (nothing kept alive for its weight)
    mine = dict(zip(pipe.layer_indices, [layer for s in pipe.local_stages for layer in pipe.stages[s]]))
    plain = [mine[i] for i in (0, 8) if i in mine]
    assert len(direct) == 6 * len(plain) and {id(m) for m in direct} == {id(m) for m in plain}
    pipe.close()


def test_direct_linear_input_only_for_plain_linears() -> None:
    from mpimp.schedule.executor import _direct_linear_input

    x = torch.randn(2, 8)
    plain, sub = nn.Linear(8, 4), _HalvedLinear(8, 4)
    assert _direct_linear_input(plain, (x,), plain(x)) is x
    assert _direct_linear_input(sub, (x,), sub(x)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        normed = torch.nn.utils.weight_norm(nn.Linear(8, 4))
    assert _direct_linear_input(normed, (x,), normed(x)) is None  # its weight is computed, not a Parameter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = plain(x)
    assert _direct_linear_input(plain, (x,), out) is None  # the matmul ran in bf16


def _after_linear(case: str) -> nn.Sequential:
    """A stage whose first Linear's output or weight gradient is touched after the call."""
    torch.manual_seed(41)
    dtype = torch.complex64 if case == "complex" else torch.float32
    first = nn.Linear(8, 8, dtype=dtype)
    rest: list[nn.Module] = [nn.Linear(8, 3, dtype=dtype)]
    if case == "relu in place":  # the hooked output is then ReLU's: its gradient is masked
        rest.insert(0, nn.ReLU(inplace=True))
    elif case == "hardtanh in place":
        rest.insert(0, nn.Hardtanh(-0.1, 0.1, inplace=True))
    elif case == "user hook doubles the output":
        first.register_forward_hook(lambda mod, args, out: out * 2)
        rest.insert(0, nn.Tanh())
    elif case == "weight gradient hook":
        first.weight.register_hook(lambda g: g * 0.5)
        rest.insert(0, nn.Tanh())
    return nn.Sequential(first, *rest)


@pytest.mark.parametrize("case", ["relu in place", "hardtanh in place", "user hook doubles the output",
                                  "weight gradient hook", "complex"])
def test_weight_pass_equals_autograd_when_the_linear_output_or_gradient_is_touched(case: str) -> None:
    """W's direct Linear path steps aside (or stays exact) when an in-place op rewrites the
    output, a user's forward hook replaces it, a hook edits the weight gradient, or the
    weights are complex (autograd's gradient is g^T conj(x)): zb-h1 equals plain torch."""
    with mpimp.init(pp=1, comm=MPI.COMM_SELF) as topo:
        model, ref = _after_linear(case), _after_linear(case)
        dtype = torch.complex64 if case == "complex" else torch.float32

        def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return (out - target).abs().pow(2).mean()

        pipe = mpimp.Pipeline(model, topo, chunks=2, loss_fn=loss_fn, schedule="zb-h1")
        g = torch.Generator().manual_seed(42)
        x, y = torch.randn(4, 8, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype)
        loss = pipe.train_step(x, y)
        ref_loss = loss_fn(ref(x), y)
        ref_loss.backward()
        assert abs(loss - ref_loss.item()) <= TOL
        assert pipe.split_weight_passes == 2
        for (name, q), (_, r) in zip(pipe.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(q.grad, r.grad, atol=TOL, rtol=0, msg=name)
        pipe.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p", [2])
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b"])
def test_stage_messages_repeat_raw_and_stay_exact(pp_world: mpimp.Topology | None, p: int, schedule: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Activations and gradients of 32 KiB per micro-batch: the first step frames them, the
    next ones send them raw (header elided, mpimp.channels), and every step still equals
    the single process."""
    if pp_world is None:
        return
    from mpimp import comm as transport
    from mpimp.channels import Seen, channels

    kinds: list[str] = []
    post = transport._post_send

    def spy(tensors, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202 - a recording wrapper
        req, keep, payload = post(tensors, *args, **kw)
        kinds.append("raw" if isinstance(keep, torch.Tensor) else "framed")  # raw keeps the tensor itself
        return req, keep, payload

    repeat = transport._isend_repeat

    def spy_repeat(*args):  # noqa: ANN002, ANN202 - the native fast path's raw repeats
        req = repeat(*args)
        if req is not None:
            kinds.append("raw")
        return req

    monkeypatch.setattr(transport, "_post_send", spy)
    monkeypatch.setattr(transport, "_isend_repeat", spy_repeat)
    ref = _layers(seed=3, width=512)
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=2, loss_fn=nn.MSELoss(), schedule=schedule,
                          **({"virtual_stages": 2} if schedule == "interleaved-1f1b" else {}))
    per_step = []
    for step in range(3):
        x, y = _data(32, seed=10 + step)  # micro-batches of 16 rows x 512 floats = 32 KiB
        ref.zero_grad()
        for q in pipe.parameters():
            q.grad = None
        kinds.clear()
        _check_step(pp_world, pipe, ref, x, y, nn.MSELoss())
        per_step.append(list(kinds))
    assert per_step[0] and set(per_step[0]) == {"framed"}, per_step  # every rank sends stage messages
    assert set(per_step[1]) == set(per_step[2]) == {"raw"}, per_step
    assert all(type(v) is Seen for v in channels(pipe.comm).seen.values())  # nothing left half-read
    pipe.close()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_a_module_repeated_in_the_sequential_runs_at_each_place(schedule: str) -> None:
    """``nn.Sequential(a, shared, act, shared, b)`` runs ``shared`` twice, as torch does
    (``children()`` lists a repeated module once: the pipeline had 4 layers and a wrong loss)."""
    with mpimp.init(pp=1, comm=MPI.COMM_SELF) as topo:
        torch.manual_seed(41)
        shared = nn.Linear(12, 12)
        ref = nn.Sequential(nn.Linear(8, 12), shared, nn.Tanh(), shared, nn.Linear(12, 3))
        pipe = mpimp.Pipeline(copy.deepcopy(ref), topo, chunks=2, loss_fn=nn.MSELoss(), schedule=schedule)
        assert pipe.balance == [5]
        x, y = _data(4, seed=42)
        loss = pipe.train_step(x, y)
        ref_loss = nn.MSELoss()(ref(x), y)
        ref_loss.backward()
        assert abs(loss - ref_loss.item()) <= TOL
        for (name, q), (_, r) in zip(pipe.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(q.grad, r.grad, atol=TOL, rtol=0, msg=name)
        pipe.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p", [2, 4])
def test_zb_v_takes_inputs_and_targets_on_pipeline_rank_0(pp_world: mpimp.Topology | None, p: int) -> None:
    """The V holds the first and the last stage on pipeline rank 0: targets given on the
    topology's last pipeline rank (p - 1, the rule for the other schedules) are an error on
    every rank that names the fix, and the pipeline then steps normally with them on rank 0."""
    if pp_world is None:
        return
    ref = _layers(14)
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp_world, chunks=p + 1, loss_fn=nn.MSELoss(), schedule="zb-v",
                          virtual_stages=2)
    assert pipe.is_first_stage == pipe.is_last_stage == (pp_world.pp_rank == 0)
    x, y = _data(2 * (p + 1), seed=15)
    with pytest.raises(mpimp.ConfigError, match=r"holds the last stage \(Pipeline.is_last_stage\): pass the targets"):
        pipe.train_step(x if pipe.is_first_stage else None, y if pp_world.is_last_stage else None)
    _check_step(pp_world, pipe, ref, x, y, nn.MSELoss())
    pipe.close()
