"""Timelines: bubble fraction, merged Chrome trace with send -> recv arrows, Gantt PNG, calibration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mpi4py import MPI
from torch import nn

import mpimp
from mpimp import trace
from mpimp.schedule import CostModel, build, simulate


def _event(rank: int, kind: str, stage: int, mb: int, start: float, end: float, **extra: object) -> dict[str, object]:
    return {"rank": rank, "world_rank": rank, "action": f"{stage}{kind}{mb}", "stage": stage, "kind": kind,
            "mb": mb, "start": start, "end": end, **extra}


def _as_timelines(rep: Any) -> list[list[dict]]:
    """A simulator report's events as measured timelines (one list of events per rank)."""
    return [[_event(r, a.kind, a.stage, a.mb, t0, t1) for a, t0, t1 in events] for r, events in enumerate(rep.events)]


def _synthetic() -> list[list[dict]]:
    """Two ranks, two micro-batches, unit compute: the simulator's own events as a timeline."""
    return _as_timelines(simulate(build("1f1b", 2, 2), CostModel(f=1, b=1, w=1), 2))


def test_bubble_and_chrome_trace_of_a_known_timeline(tmp_path: Path) -> None:
    tl = _synthetic()
    mean, per = trace.bubble_fraction(tl)
    # step 3 (m + p - 1) = 9, each rank busy 2 x (F + 2B) = 6: bubble 1/3 on both, as the simulator says
    assert per == pytest.approx([1 / 3, 1 / 3])
    assert mean == pytest.approx(simulate(build("1f1b", 2, 2), CostModel(), 2).bubble)
    path = trace.write_chrome_trace(tl, tmp_path / "t.json")
    doc = json.loads(path.read_text())
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert sorted(e["name"] for e in slices) == sorted(e["action"] for t in tl for e in t)
    starts = {e["id"]: e for e in doc["traceEvents"] if e["ph"] == "s"}
    ends = {e["id"]: e for e in doc["traceEvents"] if e["ph"] == "f"}
    assert set(starts) == set(ends) and len(starts) == 4  # 0SEND_F0 -> 1RECV_F0, 1SEND_B0 -> 0RECV_B0, ...
    pairs = sorted((starts[i]["pid"], ends[i]["pid"], starts[i]["name"]) for i in starts)
    assert pairs == [(0, 1, "F mb 0"), (0, 1, "F mb 1"), (1, 0, "B mb 0"), (1, 0, "B mb 1")]
    for i in starts:  # arrows start inside the send slice and end inside the receive slice
        assert starts[i]["ts"] <= ends[i]["ts"]


def test_calibrated_model_reproduces_the_timeline() -> None:
    tl = _synthetic()
    cost = trace.calibrate(tl, 2)
    assert cost.time("F", 0) == 1 and cost.time("B", 1) == 2 and cost.time("W", 0) == 0
    assert cost.recv == 0 and cost.overhead == 0
    assert trace.predict(build("1f1b", 2, 2), cost, 2) == pytest.approx(trace.bubble_fraction(tl)[0])


def test_calibrate_keeps_unsplit_backwards_apart_from_split_halves() -> None:
    """interleaved-zb splits only some backwards: an unsplit one (1.5 here) is not B + W (2)."""
    table = build("interleaved-zb", 2, 4, 2)
    truth = CostModel(f=1, b=1, w=1, full=1.5)
    rep = simulate(table, truth, 4)
    tl = [[{"rank": r, "stage": a.stage, "kind": a.kind, "mb": a.mb, "start": t0, "end": t1}
           for a, t0, t1 in events] for r, events in enumerate(rep.events)]
    cost = trace.calibrate(tl, 4, jitter=False)
    assert cost.full is not None and [cost.full_backward(s) for s in range(4)] == [1.5] * 4
    assert [cost.time("B", s) for s in (1, 3)] == [1, 1]  # rank 1's stages split their last backwards
    assert trace.predict(table, cost, 4) == pytest.approx(trace.bubble_fraction(tl)[0])
    assert simulate(table, CostModel(f=1, b=1, w=1), 4).step_time > rep.step_time  # b + w would over-count


@pytest.mark.mpi(min_size=2)
def test_timeline_of_a_real_step(comm: MPI.Comm, tmp_path_factory: pytest.TempPathFactory) -> None:
    sub = comm.Split(0 if comm.Get_rank() < 2 else MPI.UNDEFINED, comm.Get_rank())
    if sub == MPI.COMM_NULL:
        return
    with mpimp.init(pp=2, comm=sub) as topo:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
        m = 4
        pipe = mpimp.Pipeline(model, topo, chunks=m, loss_fn=nn.MSELoss(), schedule="zb-h1")
        x, y = torch.randn(8, 8), torch.randn(8, 2)
        pipe.train_step(x, y)
        mine = pipe.timeline()
        assert [e["action"] for e in mine] == [str(a) for a in pipe.table[topo.pp_rank]]
        assert all(0 <= e["start"] <= e["end"] for e in mine)
        assert all(a["end"] <= b["start"] + 1e-9 for a, b in zip(mine, mine[1:]))  # in order, no overlap
        tls = trace.gather(pipe)
        if topo.rank == 0:
            assert tls is not None and len(tls) == 2
            mean, per = trace.bubble_fraction(tls)
            step = max(e["end"] for t in tls for e in t)
            busy = [sum(e["end"] - e["start"] for e in t if e["kind"] in "FBW") for t in tls]
            assert per == pytest.approx([1 - b / step for b in busy])
            assert 0 < mean < 1
            out = tmp_path_factory.mktemp("trace")
            doc = json.loads(trace.write_chrome_trace(tls, out / "step.json").read_text())
            flows = [e for e in doc["traceEvents"] if e["ph"] in "sf"]
            assert len(flows) == 2 * (2 * m)  # m activations forward, m gradients back
            png = trace.plot_gantt(tls, out / "step.png", title="zb-h1 p=2 m=4")
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            cost = trace.calibrate(tls, pipe.num_stages)
            assert 0 <= trace.predict(pipe.compute_table, cost, m) < 1
        else:
            assert tls is None
        pipe.close()
    sub.Free()


def test_fit_quantum_recovers_the_time_slice_of_a_simulated_machine() -> None:
    """Timelines of 4 ranks on 2 cores simulated with a known time slice: the fit finds it."""
    table = build("1f1b", 4, 8)
    for quantum, placement in ((0.0, ()), (0.05, ()), (0.012, (0, 1, 0, 1))):
        cost = CostModel(f=0.02, b=0.04, w=0.0, cores=2, quantum=quantum, placement=placement)
        rep = simulate(table, cost, 8)
        timelines = []
        for r, events in enumerate(rep.events):
            used, tl = 0.0, []
            for a, start, end in events:
                cpu = cost.time("B", a.stage) + cost.time("W", a.stage) if a.kind == "B" else cost.time(a.kind, a.stage)
                tl.append({"rank": r, "world_rank": r, "action": str(a), "stage": a.stage, "kind": a.kind,
                           "mb": a.mb, "start": start, "end": end, "cpu": cpu, "cpu_start": used,
                           "cpu_end": used + cpu})
                used += cpu
            timelines.append(tl)
        assert trace.bubble_fraction(timelines)[0] == pytest.approx(rep.bubble)
        assert trace.fit_quantum(timelines, table, 4, 8, cores=2, placement=placement) == pytest.approx(quantum)


def test_calibration_measures_the_cpu_of_waiting_ranks() -> None:
    """On shared cores, ``poll`` is the CPU a rank used per second of waiting for a message:
    the receives that waited, their CPU over their wall time; ``placement`` is kept."""
    def ev(rank: int, stage: int, kind: str, start: float, end: float, cpu: float) -> dict:
        return {"rank": rank, "world_rank": rank, "action": f"{stage}{kind}0", "stage": stage, "kind": kind,
                "mb": 0, "start": start, "end": end, "cpu": cpu, "cpu_start": start, "cpu_end": start + cpu}
    timelines = [
        [ev(0, 0, "F", 0.0, 1.0, 1.0), ev(0, 0, "SEND_F", 1.0, 1.0, 0.0),
         ev(0, 0, "RECV_B", 1.0, 3.0, 0.3), ev(0, 0, "B", 3.0, 4.0, 1.0)],
        [ev(1, 1, "RECV_F", 0.0, 1.0, 0.1), ev(1, 1, "F", 1.0, 2.0, 1.0), ev(1, 1, "B", 2.0, 3.0, 1.0),
         ev(1, 1, "SEND_B", 3.0, 3.0, 0.0)],
    ]
    cost = trace.calibrate(timelines, 2, cores=1, placement=(0, 0))
    assert cost.poll == pytest.approx((0.1 + 0.3) / (1.0 + 2.0))
    assert cost.placement == (0, 0) and cost.cores == 1
    assert trace.calibrate(timelines, 2).poll == 0.0  # one core each: waiting costs no one anything


def test_calibration_round_trips_message_and_executor_costs() -> None:
    """A timeline simulated with known send, receive and between-action costs: calibrating on
    it recovers them, and the prediction reproduces its bubble (the executor's time between
    actions is idle, as in a measured timeline, not compute)."""
    table = build("1f1b", 2, 4)  # simulate() lowers it: the events include sends and receives
    for latency in (0.0, 0.3):
        truth = CostModel(f=1.0, b=2.0, w=0.0, send=0.05, recv=0.1, overhead=0.2, latency=latency)
        rep = simulate(table, truth, 4)
        tl = _as_timelines(rep)
        cost = trace.calibrate(tl, 2)
        assert cost.send == pytest.approx(0.05) and cost.recv == pytest.approx(0.1)
        assert cost.latency == pytest.approx(latency) and cost.overhead == pytest.approx(0.2)
        assert trace.bubble_fraction(tl)[0] == pytest.approx(rep.bubble)
        assert trace.predict(table, cost, 4) == pytest.approx(rep.bubble)


def test_a_receive_costs_the_mean_of_the_receives_that_did_not_wait() -> None:
    tl = [[_event(0, "SEND_F", 0, 0, 0.0, 0.1), _event(0, "SEND_F", 0, 1, 0.1, 0.2), _event(0, "SEND_F", 0, 2, 0.8, 0.9)],
          [_event(1, "RECV_F", 1, 2, 0.0, 1.0),    # waited for a send that ended at 0.9: not its own cost
           _event(1, "RECV_F", 1, 0, 1.0, 1.1),    # the message was there: 0.1
           _event(1, "RECV_F", 1, 1, 1.1, 1.4)]]   # the message was there: 0.3
    assert trace.calibrate(tl, 2).recv == pytest.approx(0.2)  # not the fastest one (0.1), not the wait
    # the waited one ended 0.1 after its send, less than a receive's own cost (0.2): no latency
    assert trace.calibrate(tl, 2).latency == 0.0


def test_a_message_costs_the_lag_of_the_waited_receives_beyond_a_receives_own_cost() -> None:
    """Waited receives end 0.4, 0.5, 0.6 and 3.0 after their send: the median lag is 0.55; a
    receive costs 0.1 on its own, so the latency is 0.45 (a mean lag would give 1.025).  The
    receive that started 0.2 after its send still waited for the transfer (0.35 long): it
    is not a receive's own cost.  With shared cores no latency: the shared-core model
    simulates the wait for a core itself; nor across hosts, whose clocks are not aligned."""
    sends = [_event(0, "SEND_F", 0, i, t, t + 0.1) for i, t in enumerate((1.0, 3.0, 5.0, 7.0, 9.0, 11.0))]
    recvs = [_event(1, "RECV_F", 1, 0, 0.0, 1.6),     # waited: 0.5 after its send's end
             _event(1, "RECV_F", 1, 1, 2.0, 3.5),     # waited: 0.4
             _event(1, "RECV_F", 1, 2, 4.0, 5.7),     # waited: 0.6
             _event(1, "RECV_F", 1, 5, 10.0, 14.1),   # waited: 3.0 (an outlier)
             _event(1, "RECV_F", 1, 3, 7.3, 7.65),    # started 0.2 after its send: part of the transfer left
             _event(1, "RECV_F", 1, 4, 14.1, 14.2)]   # the message was there long ago: 0.1
    cost = trace.calibrate([sends, recvs], 2)
    assert cost.recv == pytest.approx(0.1) and cost.latency == pytest.approx(0.45)
    assert cost.message_time() == pytest.approx(0.45)
    shared = trace.calibrate([[dict(e, cpu=0.01) for e in sends], [dict(e, cpu=0.01) for e in recvs]], 2, cores=1)
    assert shared.latency == 0.0 and shared.recv == pytest.approx(0.01)  # CPU times on shared cores
    hosts = trace.calibrate([[dict(e, host="a") for e in sends], [dict(e, host="b") for e in recvs]], 2)
    assert hosts.latency == 0.0


def test_latency_and_receive_cost_settle_together() -> None:
    """Receives that started 0.0, 0.1, ..., 0.9 after their send all waited out the rest of
    a 1.0 latency; one started 2.0 after: 0.1.  Each refinement drops only the receives
    inside the current latency estimate, so it takes several rounds to reach (0.1, 1.0);
    with none clean, the shortest receive is the cost."""
    sends = [_event(0, "SEND_F", 0, i, 10.0 * i, 10.0 * i + 0.1) for i in range(13)]
    recvs = [_event(1, "RECV_F", 1, i, 10.0 * i + 0.1 + lead, 10.0 * i + 0.1 + 1.1)
             for i, lead in enumerate(k / 10 for k in range(10))]
    recvs.append(_event(1, "RECV_F", 1, 10, 102.1, 102.2))                  # clean: 0.1
    recvs += [_event(1, "RECV_F", 1, i, 10.0 * i - 1.0, 10.0 * i + 0.1 + 1.1) for i in (11, 12)]  # waited: 1.1
    cost = trace.calibrate([sends, recvs], 2)
    assert cost.recv == pytest.approx(0.1) and cost.latency == pytest.approx(1.0)
    dirty = [e for e in recvs if e["mb"] != 10]  # every receive that did not wait started inside the latency
    cost = trace.calibrate([sends, dirty], 2)
    assert cost.recv == pytest.approx(0.2) and cost.latency == pytest.approx(0.9)  # the shortest: lead 0.9


def test_a_stage_never_split_gets_halves_in_the_proportions_of_the_split_ones() -> None:
    """Stage 0 split its backward (B 3, W 1, against an unsplit 5); stage 1 never split
    (backward 10): its halves are 10 x 3/5 and 10 x 1/5, the prices a table that splits
    it needs; its unsplit cost stays 10.  Without any split stage: b is the backward, w 0."""
    tl = [[_event(0, "F", 0, 0, 0.0, 1.0), _event(0, "F", 0, 1, 1.0, 2.0), _event(0, "B", 0, 0, 2.0, 5.0),
           _event(0, "B", 0, 1, 5.0, 10.0), _event(0, "W", 0, 0, 10.0, 11.0)],
          [_event(1, "F", 1, 0, 0.0, 2.0), _event(1, "B", 1, 0, 2.0, 12.0)]]
    cost = trace.calibrate(tl, 2, jitter=False)
    assert cost.time("B", 0) == pytest.approx(3.0) and cost.time("W", 0) == pytest.approx(1.0)
    assert cost.full_backward(0) == pytest.approx(5.0)
    assert cost.time("B", 1) == pytest.approx(6.0) and cost.time("W", 1) == pytest.approx(2.0)
    assert cost.full_backward(1) == pytest.approx(10.0)
    # a near-empty stage whose split costs 4x its whole backward hardly moves the price
    # (sums over stages, not a mean of the stages' ratios)
    tiny = [_event(2, "F", 2, 0, 0.0, 1.0), _event(2, "F", 2, 1, 1.0, 2.0), _event(2, "B", 2, 0, 2.0, 2.003),
            _event(2, "B", 2, 1, 2.003, 2.004), _event(2, "W", 2, 0, 2.004, 2.005)]
    cost = trace.calibrate([*tl, tiny], 3, jitter=False)
    assert cost.time("B", 1) == pytest.approx(6.0, rel=2e-3) and cost.time("W", 1) == pytest.approx(2.0, rel=2e-3)
    unsplit = trace.calibrate([tl[1]], 2, jitter=False)
    assert unsplit.time("B", 1) == pytest.approx(10.0) and unsplit.time("W", 1) == 0.0


def test_sends_and_receives_match_within_their_data_parallel_column() -> None:
    """Two dp columns on one clock, the second 5 s later: each receive is matched with its
    own column's send (keyed by action alone, column 1's sends would stand for column 0's)."""
    tls = []
    for dp, shift in ((0, 0.0), (1, 5.0)):
        sends = [_event(0, "SEND_F", 0, i, shift + t, shift + t + 0.1, dp_rank=dp) for i, t in enumerate((1.0, 3.0, 5.0))]
        recvs = [_event(1, "RECV_F", 1, 0, shift + 0.0, shift + 1.4, dp_rank=dp),   # waited: 0.3
                 _event(1, "RECV_F", 1, 1, shift + 2.0, shift + 3.4, dp_rank=dp),   # waited: 0.3
                 _event(1, "RECV_F", 1, 2, shift + 6.0, shift + 6.1, dp_rank=dp)]   # clean: 0.1
        tls += [sends, recvs]
    cost = trace.calibrate(tls, 2)
    assert cost.recv == pytest.approx(0.1) and cost.latency == pytest.approx(0.2)


def test_jitter_predicts_the_waits_that_variable_times_add() -> None:
    """With variable action times the expected step exceeds the step of the mean times (a
    late neighbour is waited for, an early one is not); factors of 1 change nothing, and
    the prediction is reproducible (seeded)."""
    from mpimp.errors import ConfigError

    table = build("1f1b", 2, 8)
    mean = simulate(table, CostModel(f=1, b=2), 8)
    flat = simulate(table, CostModel(f=1, b=2, jitter=(1.0,)), 8)
    assert flat.step_time == pytest.approx(mean.step_time) and flat.bubble == pytest.approx(mean.bubble)
    noisy = CostModel(f=1, b=2, jitter=(0.6, 1.4))
    a, b = simulate(table, noisy, 8), simulate(table, noisy, 8)
    assert a.step_time == b.step_time and a.busy == b.busy
    assert a.step_time > mean.step_time and a.bubble > mean.bubble
    assert a.peak_inflight == mean.peak_inflight
    assert sum(a.busy) == pytest.approx(sum(mean.busy), rel=0.1)  # the factors average 1
    # one core for both ranks: the step is about all the work in a row, whatever the spread
    shared = simulate(table, CostModel(f=1, b=2, jitter=(0.6, 1.4), cores=1, quantum=0.5), 8)
    alone = simulate(table, CostModel(f=1, b=2, cores=1, quantum=0.5), 8)
    assert shared.step_time == pytest.approx(alone.step_time, rel=0.1) and alone.step_time >= 48 - 1e-9
    with pytest.raises(ConfigError, match="samples=0"):
        simulate(table, CostModel(jitter=(1.0,), samples=0), 8)


def test_calibration_carries_the_steps_relative_action_times() -> None:
    tl = [[_event(0, "F", 0, 0, 0.0, 1.0), _event(0, "F", 0, 1, 1.0, 4.0), _event(0, "B", 0, 0, 4.0, 6.0)]]
    cost = trace.calibrate(tl, 1)
    assert cost.time("F", 0) == pytest.approx(2.0)
    assert sorted(cost.jitter) == pytest.approx([0.5, 1.5])  # F times over their mean; one B: no spread
    assert trace.calibrate(tl, 1, jitter=False).jitter == ()
