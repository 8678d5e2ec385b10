"""Bad pipeline input: a clear error, the same on every rank, and no rank left waiting."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import sub_topology
from mpi4py import MPI
from torch import nn

import mpimp
from mpimp import ConfigError
from mpimp.schedule import ScheduleError, default_virtual_stages


@pytest.fixture
def pp2(comm: MPI.Comm) -> Iterator[mpimp.Topology | None]:
    """pp=2 over the first two ranks (None elsewhere); at one rank, pp=1."""
    p = min(2, comm.Get_size())
    yield from sub_topology(comm, p, pp=p)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _same_error_everywhere(topo: mpimp.Topology, fn: Callable[[], object], exc: type[Exception],
                           match: str) -> str:
    """Run fn on every rank; it must raise exc matching `match`, with the same text on every rank."""
    start = time.monotonic()
    with pytest.raises(exc, match=match) as info:
        fn()
    texts = topo.world.allgather(str(info.value))
    assert texts == [texts[0]] * topo.size, texts
    assert time.monotonic() - start < 30  # failed promptly, not at a deadline
    return texts[0]


@pytest.mark.mpi(min_size=1)
def test_bad_construction_arguments(pp2: mpimp.Topology | None) -> None:
    if pp2 is None:
        return
    topo, p = pp2, pp2.pp
    mse = nn.MSELoss()
    _same_error_everywhere(topo, lambda: mpimp.Pipeline(_model(), topo, chunks=0, loss_fn=mse),
                           ConfigError, r"chunks=0 must be an integer >= 1")
    _same_error_everywhere(topo, lambda: mpimp.Pipeline(_model(), topo, chunks=2, loss_fn=mse, balance=[1] * p),
                           ConfigError, rf"sums to {p} but the model has 3 layers")
    if p == 2:
        _same_error_everywhere(topo, lambda: mpimp.Pipeline(_model(), topo, chunks=2, loss_fn=mse, balance=[3, 0]),
                               ConfigError, r"leaves stage 1 with 0 layers")
        _same_error_everywhere(topo, lambda: mpimp.Pipeline(_model(), topo, chunks=2, loss_fn=mse, balance=[3]),
                               ConfigError, r"has 1 entries but there are 2 stages")
    _same_error_everywhere(topo, lambda: mpimp.Pipeline(_model(), topo, chunks=2, loss_fn=mse,
                                                        schedule="interleaved-1f1b", virtual_stages=4),
                           ConfigError, rf"{4 * p} pipeline stages but the model has only 3 layers")
    _same_error_everywhere(topo, lambda: mpimp.Pipeline(_model(), topo, chunks=2, loss_fn=mse, checkpoint="yes"),
                           ConfigError, "checkpoint='yes'")
    _same_error_everywhere(topo, lambda: mpimp.Pipeline(_model(), topo, chunks=2, loss_fn=mse, schedule="fast"),
                           ConfigError, "unknown schedule 'fast'")
    _same_error_everywhere(topo, lambda: mpimp.Pipeline([], topo, chunks=2, loss_fn=mse),
                           ConfigError, "non-empty list")


@pytest.mark.mpi(min_size=2)
def test_malformed_table_prints_the_grid_on_every_rank(pp2: mpimp.Topology | None) -> None:
    if pp2 is None:
        return
    table = "rank 0: 0F0 0B0 0F1 0B1\nrank 1: 1F0 1F1 1B0 1B1"  # deadlocks (see test_schedule)
    text = _same_error_everywhere(pp2, lambda: mpimp.Pipeline(_model(), pp2, chunks=2, loss_fn=nn.MSELoss(),
                                                              schedule=table), ScheduleError, "deadlock")
    assert ">>0RECV_B0<<" in text and ">>1RECV_F1<<" in text
    text = _same_error_everywhere(pp2, lambda: mpimp.Pipeline(_model(), pp2, chunks=2, loss_fn=nn.MSELoss(),
                                                              schedule=[["0F0", "0Q0"], ["1F0"]]),
                                  ConfigError, "malformed action '0Q0'")
    assert "(rank 0, step 1)" in text and ">>0Q0<<" in text  # the grid of the raw tokens, marked
    # valid tables of the user's own run and equal plain torch: a compute-only one (mpimp
    # inserts the messages) and an already lowered one with its own messages and split
    # backwards, in an order mpimp's lowering never writes (sends and receives bunched,
    # a send after a W): it is kept as given
    own = "rank 0: 0F0 0F1 0B0 0B1\nrank 1: 1F0 1B0 1F1 1B1"
    lowered = ("rank 0: 0F0 0F1 0SEND_F0 0SEND_F1 0RECV_B0 0RECV_B1 0B0 0B1 0W1 0W0\n"
               "rank 1: 1RECV_F0 1RECV_F1 1F0 1B0 1SEND_B0 1F1 1B1 1W0 1SEND_B1 1W1")
    compute_only = [[a for a in row if a.kind in ("F", "B", "W")] for row in mpimp.schedule.parse_table(lowered)]
    assert mpimp.schedule.lower(compute_only) != mpimp.schedule.parse_table(lowered)
    for table in (own, lowered):
        ref = _model()
        pipe = mpimp.Pipeline(copy.deepcopy(ref), pp2, chunks=2, loss_fn=nn.MSELoss(), schedule=table,
                              balance=[1, 2])
        x, y = torch.randn(4, 4), torch.randn(4, 2)
        x, y = pp2.world.bcast((x, y))
        loss = pipe.train_step(x, y)
        ref_loss = nn.MSELoss()(ref(x), y)
        ref_loss.backward()
        assert abs(loss - ref_loss.item()) < 1e-5
        params = dict(ref.named_parameters())
        for name, q in pipe.named_parameters():
            torch.testing.assert_close(q.grad, params[name].grad, atol=1e-5, rtol=0)
        if table is lowered:
            assert pipe.table == mpimp.schedule.parse_table(lowered)  # run as given, not lowered again
            assert pipe.split_weight_passes == 2  # both W's ran as separate weight passes
        pipe.close()


@pytest.mark.mpi(min_size=1)
def test_bad_batches_fail_on_every_rank(pp2: mpimp.Topology | None) -> None:
    if pp2 is None:
        return
    pipe = mpimp.Pipeline(_model(), pp2, chunks=2, loss_fn=nn.MSELoss())
    first, last = pp2.is_first_stage, pp2.is_last_stage
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    _same_error_everywhere(pp2, lambda: pipe.train_step(x if first else None, y if last else None),
                           ConfigError, r"shape \[5, 4\] does not split into chunks=2")
    _same_error_everywhere(pp2, lambda: pipe.train_step(None, torch.randn(4, 2)),
                           ConfigError, "inputs must be a tensor")
    # the pipeline is still usable after input errors (nothing was sent)
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    x, y = pp2.world.bcast((x, y))
    ref = _model()
    loss = pipe.train_step(x, y)
    assert abs(loss - nn.MSELoss()(ref(x), y).item()) < 1e-5
    pipe.close()


def _deeper() -> nn.Sequential:
    """5 layers: enough for 2 stages per rank at pp = 2."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1", "interleaved-1f1b", "interleaved-zb", "zb-v"])
def test_non_scalar_loss_fails_every_rank_without_hanging(pp2: mpimp.Topology | None, schedule: str) -> None:
    """Also where the loss is on pipeline rank 0 (zb-v) and with two stages per rank."""
    if pp2 is None:
        return
    v = default_virtual_stages(schedule)
    model = _model if v == 1 else _deeper
    pipe = mpimp.Pipeline(model(), pp2, chunks=2, loss_fn=lambda out, tgt: (out - tgt) ** 2, schedule=schedule,
                          virtual_stages=v)
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    _same_error_everywhere(pp2, lambda: pipe.train_step(x, y), ConfigError,
                           r"loss_fn returned \[2, 2\], not a scalar tensor")
    with pytest.raises(mpimp.MpimpError, match="failed earlier"):
        pipe.train_step(x, y)
    pipe.close()
    # a new pipeline on the same topology is not disturbed by the failed step's messages
    ref = model()
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp2, chunks=2, loss_fn=nn.MSELoss(), schedule=schedule,
                          virtual_stages=v)
    x, y = pp2.world.bcast((x, y))
    loss = pipe.train_step(x, y)
    assert abs(loss - nn.MSELoss()(ref(x), y).item()) < 1e-5
    pipe.close()


class _Fails(nn.Linear):
    """A Linear whose forward raises while ``on``."""

    on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on:
            raise RuntimeError("layer failed in forward")
        return super().forward(x)


@pytest.mark.mpi(min_size=1)
def test_a_layer_failing_in_a_split_forward_leaves_no_hooks(pp2: mpimp.Topology | None) -> None:
    """zb-h1 captures the layers' outputs with forward hooks during its split forwards; a
    layer raising there fails every rank and takes those hooks off every layer."""
    if pp2 is None:
        return
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), _Fails(6, 6), nn.Linear(6, 2))
    pipe = mpimp.Pipeline(model, pp2, chunks=2, loss_fn=nn.MSELoss(), schedule="zb-h1")
    model[2].on = True
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    with pytest.raises(Exception, match="layer failed in forward") as info:
        pipe.train_step(x, y)
    owns_it = 2 in pipe.layer_indices
    assert isinstance(info.value, RuntimeError if owns_it else ConfigError), repr(info.value)
    assert all(not m._forward_hooks for m in model.modules())
    pipe.close()
    # a pipeline built next is not fed the failed step's messages (its first micro-batch
    # of stage 1 was sent and never received): two steps on different batches, each torch's
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    pipe = mpimp.Pipeline(copy.deepcopy(ref), pp2, chunks=2, loss_fn=nn.MSELoss(), schedule="1f1b",
                          balance=[2, 2] if pp2.pp == 2 else None)
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g)
        loss = pipe.train_step(x, y)
        assert abs(loss - nn.MSELoss()(ref(x), y).item()) < 1e-5, (seed, loss)
    pipe.close()


class _Spare(nn.Module):
    """A Linear layer that also owns a Linear it never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.spare = nn.Linear(6, 6), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.mpi(min_size=1)
def test_a_split_that_cannot_capture_every_module_warns_once_and_stays_exact(pp2: mpimp.Topology | None) -> None:
    """A stage owning a module that does not run in forward cannot split its backward (W
    would have nothing to differentiate for it): its micro-batches take full backwards, the
    loss and gradients stay torch's, and the rank that owns it is told once."""
    if pp2 is None:
        return
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 6), _Spare(), nn.Tanh(), nn.Linear(6, 2))
    model = copy.deepcopy(ref)
    pipe = mpimp.Pipeline(model, pp2, chunks=2, loss_fn=nn.MSELoss(), schedule="zb-h1",
                          balance=[2, 2] if pp2.pp == 2 else None)
    x, y = pp2.world.bcast((torch.randn(4, 4), torch.randn(4, 2)))
    owns_spare = 1 in pipe.layer_indices
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        losses = [pipe.train_step(x, y) for _ in range(2)]
    said = [w for w in seen if issubclass(w.category, RuntimeWarning) and "parameter-owning modules run" in str(w.message)]
    assert len(said) == (1 if owns_spare else 0), [str(w.message) for w in seen]
    if owns_spare:  # the stage's owners: its Linears and the spare one, which never ran
        owners = 4 if pp2.pp == 1 else 3
        assert f"saw {owners - 1} of the stage's {owners} parameter-owning modules run" in str(said[0].message)
    ref_loss = nn.MSELoss()(ref(x), y)
    ref_loss.backward()
    assert all(abs(v - ref_loss.item()) < 1e-5 for v in losses), (losses, ref_loss.item())
    for name, q in pipe.named_parameters():
        want = dict(ref.named_parameters())[name].grad
        if want is None:
            assert q.grad is None, name
        else:  # two steps accumulated
            torch.testing.assert_close(q.grad, 2 * want, atol=1e-5, rtol=0)
    pipe.close()


class _Stall(nn.Module):
    """Identity that sleeps ``delay`` seconds in forward while ``on`` (a stage that stops answering)."""

    def __init__(self) -> None:
        super().__init__()
        self.on, self.delay = False, 3.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on:
            time.sleep(self.delay)
        return x


@pytest.mark.mpi(min_size=2)
def test_a_stalled_stage_gives_a_stall_report_naming_the_schedule_position(
        pp2: mpimp.Topology | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if pp2 is None:
        return
    torch.manual_seed(0)
    stall = _Stall()
    layers = [nn.Linear(4, 6), nn.Tanh(), stall, nn.Linear(6, 2)]
    pipe = mpimp.Pipeline(layers, pp2, chunks=2, loss_fn=nn.MSELoss(), schedule="1f1b", balance=[2, 2])
    x, y = pp2.world.bcast((torch.randn(4, 4), torch.randn(4, 2)))
    pipe.train_step(x, y)  # a healthy step first
    monkeypatch.setenv("MPIMP_TIMEOUT", "1")
    stall.on = pp2.pp_rank == 1  # the last stage now takes 3 s per forward
    start = time.monotonic()
    if pp2.pp_rank == 0:  # 1F1B at p = 2, m = 2: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 ...
        with pytest.raises(mpimp.DeadlineError) as info:
            pipe.train_step(x, y)
    else:  # told by stage 0 after its first forward, instead of waiting out a deadline of its own
        with pytest.raises(ConfigError) as info:
            pipe.train_step(x, y)
    took = time.monotonic() - start
    report = str(info.value)
    assert "pipeline position of rank 0 (pp rank 0): action 5 of" in report, report
    assert "0RECV_B0: waits for rank 1's 1SEND_B0" in report, report
    assert "done before it: 0SEND_F0 0F1 0SEND_F1; next: 0B0" in report, report
    assert "did not complete within 1 s" in report, report
    assert took < 15, f"rank {pp2.rank} took {took:.1f} s to fail"
    texts = pp2.world.allgather(report)
    assert texts[0] == texts[1]  # one report, the same on both stages
    monkeypatch.setenv("MPIMP_TIMEOUT", "120")
    with pytest.raises(mpimp.MpimpError, match="failed earlier"):
        pipe.train_step(x, y)
    pipe.close()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("where", ["last", "first"])
def test_a_failure_after_the_last_backward_reaches_every_stage(pp2: mpimp.Topology | None, where: str) -> None:
    """An after_backward hook that raises on one stage: a stage waiting for the step's loss
    raises with its message at once (it waited for its deadline); a stage whose step had
    ended well (the last stage, root of the loss broadcast, when another one failed) learns
    of it at the next step, which every rank refuses promptly."""
    if pp2 is None:
        return
    failing = pp2.pp_rank == (pp2.pp - 1 if where == "last" else 0)

    def hook(pipe: mpimp.Pipeline) -> None:
        if failing:
            raise RuntimeError("after_backward failed here")

    pipe = mpimp.Pipeline(_model(), pp2, chunks=2, loss_fn=nn.MSELoss(), after_backward=hook)
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    start = time.monotonic()
    try:
        pipe.train_step(x, y)
        raised: Exception | None = None
    except Exception as exc:  # noqa: BLE001 (which one is checked below)
        raised = exc
    if failing:
        assert isinstance(raised, RuntimeError) and "after_backward failed here" in str(raised), repr(raised)
    elif raised is not None:  # it was still waiting for the failed stage
        assert isinstance(raised, ConfigError) and "after_backward failed here" in str(raised), repr(raised)
    with pytest.raises(mpimp.MpimpError, match="failed earlier"):
        pipe.train_step(x, y)
    assert time.monotonic() - start < 30
    pipe.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("differ", ["chunks", "schedule", "balance"])
def test_ranks_that_disagree_on_the_pipeline_fail_together(pp2: mpimp.Topology | None, differ: str) -> None:
    """Each rank's table verifies on its own, so a rank-dependent argument used to leave the
    ranks waiting for messages that never come, until the deadline: the constructor now
    compares every rank's schedule, chunks, balance and table and raises on all of them."""
    if pp2 is None or pp2.pp < 2:
        return
    odd = pp2.pp_rank == 1
    kw: dict = {"chunks": 2, "schedule": "1f1b", "balance": [2, 1]}
    if differ == "chunks":
        kw["chunks"] = 4 if odd else 2
    elif differ == "schedule":
        kw["schedule"] = "gpipe" if odd else "1f1b"
    else:
        kw["balance"] = [1, 2] if odd else [2, 1]
    text = _same_error_everywhere(pp2, lambda: mpimp.Pipeline(_model(), pp2, loss_fn=nn.MSELoss(), **kw),
                                  ConfigError, "the ranks disagree on the pipeline")
    assert "world rank 1 has" in text and "must pass the same schedule, chunks and balance" in text
