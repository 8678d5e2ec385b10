"""Schedules as data: builders, lowering, the offline verifier and the simulator (one process, no MPI)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mpimp import ConfigError
from mpimp.schedule import (
    Action,
    CostModel,
    ScheduleError,
    build,
    default_virtual_stages,
    format_table,
    interleaved_1f1b,
    lower,
    parse_action,
    parse_table,
    simulate,
    stage_owners,
    v_owner,
    verify,
)
from mpimp.schedule.partition import balance_by_cost, check_balance

GOLDEN = Path(__file__).parent / "golden"
PS = (2, 3, 4, 8)


def _ms(p: int) -> list[int]:
    return sorted({1, p - 1, p, 2 * p, 17})


def _cases() -> list[tuple[str, int, int, int]]:
    out = []
    for name in ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "interleaved-zb", "zb-v"):
        for p in PS:
            for m in _ms(p):
                for v in ((1, 2) if name.startswith("interleaved") else (2,) if name == "zb-v" else (1,)):
                    out.append((name, p, m, v))
    return out


@pytest.mark.parametrize("name,p,m,v", _cases())
def test_every_builder_verifies(name: str, p: int, m: int, v: int) -> None:
    table = build(name, p, m, v)
    assert len(table) == p
    report = verify(table, m)
    assert report.num_stages == p * v
    # every (stage, micro-batch) has one F and one B; W only in zb-h1 (one per B) and interleaved-zb
    for kind in ("F", "B"):
        got = sorted((a.stage, a.mb) for row in table for a in row if a.kind == kind)
        assert got == [(s, i) for s in range(p * v) for i in range(m)]
    ws = sorted((a.stage, a.mb) for row in table for a in row if a.kind == "W")
    if name == "interleaved-zb":  # rank r splits its last 2 r v backwards, in interleaved 1F1B's order
        base = build("interleaved-1f1b", p, m, v)
        assert [[a for a in row if a.kind != "W"] for row in table] == base
        held = [min(m * v, 2 * r * v) for r in range(p)]
        assert ws == sorted((a.stage, a.mb) for r, row in enumerate(base)
                            for a in [b for b in row if b.kind == "B"][m * v - held[r]:])
        unit = CostModel(f=1, b=1, w=1)
        # never slower than interleaved 1F1B on unit costs (strictly faster on this grid); the
        # held-back W's keep their micro-batches, at most that many more in flight
        assert simulate(table, unit, m).step_time < simulate(base, unit, m).step_time
        assert all(z <= b + k for z, b, k in zip(report.peak_inflight, verify(base, m).peak_inflight, held))
        return
    if name == "zb-v":  # a V: rank r holds stages r and 2p - 1 - r; W's only where a B was split
        assert stage_owners(table) == dict(enumerate(v_owner(p)))
        base = build("interleaved-1f1b", p, m, 2)
        free, dear = CostModel(f=1, b=1, w=1), CostModel(f=1, b=1.05, w=1.05, full=2)
        # strictly faster than interleaved 1F1B on unit costs, with splits free or 5% dearer
        # (checked for every p <= 8, m <= 24 when written); on this grid also never slower
        # than interleaved-zb with free splits (not everywhere: p = 8, m = 9 is 66 against 65)
        for cost in (free, dear):
            assert simulate(table, cost, m).step_time < simulate(base, cost, m).step_time
        assert simulate(table, free, m).step_time <= simulate(build("interleaved-zb", p, m, 2), free, m).step_time
        # at most two stage micro-batches more in flight than interleaved 1F1B (p <= 8, m <= 24)
        assert max(report.peak_inflight) <= min(max(verify(base, m).peak_inflight) + 2, 2 * m)
        return
    assert ws == ([(s, i) for s in range(p) for i in range(m)] if name == "zb-h1" else [])
    # peak in-flight micro-batches (held from F until the end of their backward)
    if name == "gpipe":
        assert report.peak_inflight == [m] * p
    elif name == "1f1b" or (name == "interleaved-1f1b" and v == 1):
        assert report.peak_inflight == [min(p - r, m) for r in range(p)]
    elif name == "zb-h1":
        assert max(report.peak_inflight) == min(p, m)
    else:  # interleaved, v > 1: Megatron's warm-up (groups of >= p micro-batches) plus the one in its 1F1B pair
        group = m // max(1, m // p) + (1 if m % max(1, m // p) else 0)
        warm = [m * v if m <= p else (p - r - 1) * 2 + (v - 1) * group for r in range(p)]
        assert report.peak_inflight == [min(m * v, w + 1) for w in warm]
    # simulated step time with unit F, B, W (B without W costs 2) against the closed forms
    sim = simulate(table, CostModel(f=1, b=1, w=1), m)
    if name == "zb-h1":
        # Qi et al.: bubble (p-1)(F+B-W) once m >= p; with fewer micro-batches the F/B chain dominates
        assert sim.step_time == 3 * m + (p - 1) + max(0, p - m)
    elif name == "interleaved-1f1b" and v > 1 and m >= p:
        assert sim.step_time == 3 * m * v + 3 * (p - 1)  # per virtual stage: bubble shrinks by v
    elif name == "interleaved-1f1b" and v > 1:  # m < p: the last micro-batch's chain through p*v stages
        assert sim.step_time == 3 * p * v + 3 * (m - 1)
    else:
        assert sim.step_time == 3 * (m + p - 1)
    assert 0 <= sim.bubble < 1


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.txt")), ids=lambda p: p.stem)
def test_golden_tables(path: Path) -> None:
    text = path.read_text()
    name, p, m, v = re.match(r"(.+)_p(\d+)_m(\d+)_v(\d+)", path.stem).groups()  # type: ignore[union-attr]
    table = build(name, int(p), int(m), int(v))
    compute, lowered = text.split("# lowered\n")
    assert parse_table(compute) == table
    assert parse_table(lowered) == lower(table)
    assert format_table(table) in compute
    verify(parse_table(lowered), int(m))


def test_action_text_form_round_trips() -> None:
    for text in ("1F0", "0B3", "1W2", "1SEND_F0", "12RECV_B34", "3SEND_B1", "2RECV_F7"):
        assert str(parse_action(text)) == text
    assert parse_action("1F0") == Action(1, "F", 0)
    for bad in ("F0", "1X0", "1F", "1 F 0", "-1F0", ""):
        with pytest.raises(ConfigError, match="malformed action"):
            parse_action(bad)
    table = build("1f1b", 3, 5)
    assert parse_table(format_table(table)) == table
    assert parse_table([[str(a) for a in row] for row in table]) == table


def test_lowering_only_adds_comm_between_ranks() -> None:
    # p=1 with two virtual stages on one rank: nothing to send
    single = [[Action(0, "F", 0), Action(1, "F", 0), Action(1, "B", 0), Action(0, "B", 0)]]
    assert lower(single) == single
    verify(single, 1)
    lowered = lower(build("1f1b", 2, 2))
    assert [str(a) for a in lowered[0]] == ["0F0", "0SEND_F0", "0F1", "0SEND_F1", "0RECV_B0", "0B0",
                                            "0RECV_B1", "0B1"]
    assert [str(a) for a in lowered[1]] == ["1RECV_F0", "1F0", "1B0", "1SEND_B0", "1RECV_F1", "1F1",
                                            "1B1", "1SEND_B1"]


def _marked(exc: pytest.ExceptionInfo[ScheduleError]) -> list[str]:
    return re.findall(r">>(\S+?)<<", str(exc.value))


def test_verifier_reports_backward_before_forward_with_the_grid() -> None:
    with pytest.raises(ScheduleError, match="backward before its forward") as exc:
        verify("rank 0: 0F0 1B0 1F0 0B0", 1)
    assert _marked(exc) == ["1B0"]
    assert "rank 0 step 1" in str(exc.value)
    # on two ranks the same mistake is a deadlock: both wait for the other's message
    with pytest.raises(ScheduleError, match="deadlock") as exc:
        verify("rank 0: 0B0 0F0\nrank 1: 1F0 1B0", 1)
    assert _marked(exc) == ["0RECV_B0", "1RECV_F0"]


def test_verifier_reports_deadlock_with_every_blocked_action_marked() -> None:
    # rank 0 waits for 0RECV_B0 before sending micro-batch 1, rank 1 needs 1 before it runs B0
    with pytest.raises(ScheduleError, match="deadlock") as exc:
        verify("rank 0: 0F0 0B0 0F1 0B1\nrank 1: 1F0 1F1 1B0 1B1", 2)
    assert _marked(exc) == ["0RECV_B0", "1RECV_F1"]


def test_verifier_reports_missing_duplicate_and_misplaced_actions() -> None:
    with pytest.raises(ScheduleError, match="never runs 1B1"):
        verify("rank 0: 0F0 0F1 0B0 0B1\nrank 1: 1F0 1F1 1B0", 2)
    with pytest.raises(ScheduleError, match="appears twice") as exc:
        verify("rank 0: 0F0 0F0 0B0\nrank 1: 1F0 1B0", 1)
    assert _marked(exc) == ["0F0"]
    with pytest.raises(ScheduleError, match="exactly one rank"):
        verify("rank 0: 0F0 1F0 0B0\nrank 1: 1F0 1B0", 1)
    with pytest.raises(ScheduleError, match="weight gradient before its backward"):
        verify("rank 0: 0F0 0W0 0B0\nrank 1: 1F0 1B0", 1)
    with pytest.raises(ScheduleError, match="outside stages"):
        verify("rank 0: 0F0 0B0 0F1 0B1\nrank 1: 1F0 1B0 1F1 1B1", 1)
    with pytest.raises(ScheduleError, match="empty"):
        verify("", 1)


def test_verifier_checks_lowered_tables() -> None:
    good = lower(build("gpipe", 2, 2))
    verify(good, 2)
    # a forward whose input never arrives: RECV_F dropped on rank 1
    bad = [list(good[0]), [a for a in good[1] if str(a) != "1RECV_F1"]]
    with pytest.raises(ScheduleError, match="1RECV_F1 must come before it") as exc:
        verify(bad, 2)
    assert _marked(exc) == ["1F1"]
    # a send nobody receives
    bad = [list(good[0]), [a for a in good[1] if str(a) != "1SEND_B0"]]
    bad[1].insert(len(bad[1]), Action(1, "SEND_B", 0))
    bad[0] = [a for a in bad[0] if str(a) != "0RECV_B0"]
    with pytest.raises(ScheduleError, match="0RECV_B0 must come before it"):
        verify(bad, 2)


def test_interleaved_groups_any_number_of_microbatches() -> None:
    # m = 6, p = 4: one group of 6 (rank r: its 6 micro-batches on virtual stage r, then on r + 4)
    row = [str(a) for a in interleaved_1f1b(4, 6, 2)[0]]
    assert row[:12] == [f"0F{i}" for i in range(6)] + [f"4F{i}" for i in range(6)]
    assert [a for a in row if "B" in a][:6] == [f"4B{i}" for i in range(6)]
    # m = 9, p = 4: groups of 5 and 4; m divisible by p: Megatron's groups of p
    fwd = [str(a) for a in interleaved_1f1b(4, 9, 2)[3] if a.kind == "F"]
    assert fwd == ([f"3F{i}" for i in range(5)] + [f"7F{i}" for i in range(5)]
                   + [f"3F{i}" for i in range(5, 9)] + [f"7F{i}" for i in range(5, 9)])
    fwd = [str(a) for a in interleaved_1f1b(2, 4, 2)[1] if a.kind == "F"]
    assert fwd == ["1F0", "1F1", "3F0", "3F1", "1F2", "1F3", "3F2", "3F3"]


def test_builder_option_errors() -> None:
    with pytest.raises(ConfigError, match="use schedule='interleaved-1f1b', 'interleaved-zb' or 'zb-v' for virtual stages"):
        build("1f1b", 2, 4, 2)
    with pytest.raises(ConfigError, match="unknown schedule"):
        build("pipedream", 2, 4)
    with pytest.raises(ConfigError, match="'zb-v' places two stages on each rank.*virtual_stages=1: pass virtual_stages=2"):
        build("zb-v", 2, 4, 1)
    with pytest.raises(ConfigError, match=">= 1"):
        build("gpipe", 2, 0)


def test_simulator_charges_messages_and_reports_memory() -> None:
    # p=2, m=1 1F1B: F, message, F, full B, message, full B
    cost = CostModel(f=1.0, b=2.0, w=0.5, latency=0.25, bandwidth=100.0, message_bytes=25.0,
                     activation_bytes=10.0)
    rep = simulate(build("1f1b", 2, 1), cost, 1)
    msg = 0.25 + 25.0 / 100.0
    assert rep.step_time == pytest.approx(1 + msg + 1 + 2.5 + msg + 2.5)
    assert rep.busy == pytest.approx([3.5, 3.5])
    assert rep.bubble == pytest.approx(1 - 3.5 / rep.step_time)
    assert rep.peak_activation_bytes(cost) == [10.0, 10.0]
    # gpipe holds every micro-batch, 1f1b at most p on rank 0
    assert max(simulate(build("gpipe", 4, 16), cost, 16).peak_inflight) == 16
    assert max(simulate(build("1f1b", 4, 16), cost, 16).peak_inflight) == 4


def test_balance_by_cost_and_checks() -> None:
    assert balance_by_cost([1, 1, 1, 1, 10], 2) == [4, 1]
    assert balance_by_cost([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert balance_by_cost([1] * 8, 4) == [2, 2, 2, 2]
    assert sum(balance_by_cost([3, 1, 4, 1, 5, 9, 2, 6], 3)) == 8
    with pytest.raises(ConfigError, match="4 pipeline stages but the model has only 3 layers"):
        balance_by_cost([1, 1, 1], 4)
    with pytest.raises(ConfigError, match=r"sums to 5 but the model has 6 layers"):
        check_balance([2, 3], 6, 2)
    with pytest.raises(ConfigError, match="leaves stage 1 with 0 layers"):
        check_balance([6, 0], 6, 2)
    with pytest.raises(ConfigError, match="has 3 entries but there are 2 stages"):
        check_balance([2, 2, 2], 6, 2)
    assert check_balance([1, 5], 6, 2) == [1, 5]


def test_simulator_shares_cores_between_ranks() -> None:
    """With fewer cores than ranks, running actions split the cores (processor sharing)."""
    base = CostModel(f=1.0, b=2.0, w=0.5)
    for name, p, m in (("gpipe", 2, 4), ("1f1b", 4, 8), ("zb-h1", 4, 8), ("interleaved-1f1b", 2, 4),
                       ("interleaved-zb", 2, 8)):
        v = default_virtual_stages(name)
        table = build(name, p, m, v)
        alone = simulate(table, base, m)
        same = simulate(table, CostModel(f=1.0, b=2.0, w=0.5, cores=p), m)  # a core each: unchanged
        assert same.step_time == pytest.approx(alone.step_time) and same.busy == pytest.approx(alone.busy)
        one = simulate(table, CostModel(f=1.0, b=2.0, w=0.5, cores=1), m)
        work = m * (1.0 + 2.5) * p * v  # every (virtual) stage's F and full backward of every micro-batch
        # one core: never idle while any rank has work, and never faster than the total work
        assert one.step_time == pytest.approx(work), (name, one.step_time, work)
        assert one.peak_inflight == alone.peak_inflight
        two = simulate(table, CostModel(f=1.0, b=2.0, w=0.5, cores=2), m)
        assert max(alone.step_time, work / 2) - 1e-9 <= two.step_time <= one.step_time + 1e-9
    # two ranks on one core, both computing: each at half speed (processor sharing), or
    # alternating time slices (round robin: within one slice of that)
    for quantum in (0.0, 0.003, 0.25):
        rep = simulate(build("gpipe", 2, 2), CostModel(f=1.0, b=1.0, w=0.0, cores=1, quantum=quantum,
                                                       yields=False), 2)
        f1_on_rank0 = [e for e in rep.events[0] if str(e[0]) == "0F1"][0]
        assert f1_on_rank0[2] - f1_on_rank0[1] == pytest.approx(2.0, abs=quantum + 1e-9)  # shared with 1F0
        assert rep.step_time == pytest.approx(8.0)  # one core, never idle
    # round robin: a woken rank waits for a core; processor sharing gives it one at once
    ps = simulate(build("1f1b", 4, 8), CostModel(f=1.0, b=2.0, w=0.5, cores=2, quantum=0.0), 8)
    rr = simulate(build("1f1b", 4, 8), CostModel(f=1.0, b=2.0, w=0.5, cores=2, quantum=0.5), 8)
    assert rr.bubble > ps.bubble - 1e-9
    with pytest.raises(ConfigError, match="cores=0"):
        simulate(build("gpipe", 2, 2), CostModel(cores=0), 2)


def test_ranks_bound_to_cores_queue_for_their_own_core() -> None:
    """``placement``: two ranks bound to one core of two run like two ranks on one core;
    bound to different cores, like ranks with a core each."""
    table = build("gpipe", 2, 3)
    one_core = simulate(table, CostModel(f=1.0, b=2.0, w=0.0, cores=1, quantum=0.5), 3)
    same = simulate(table, CostModel(f=1.0, b=2.0, w=0.0, cores=2, quantum=0.5, placement=(1, 1)), 3)
    assert same.step_time == pytest.approx(one_core.step_time) and same.events == one_core.events
    assert same.step_time == pytest.approx(3 * 2 * (1.0 + 2.0))  # one core, never idle
    costs = dict(f=1.0, b=2.0, w=0.0, send=0.01, recv=0.02, overhead=0.05)
    apart = simulate(table, CostModel(**costs, cores=2, quantum=0.5, placement=(0, 1)), 3)
    dedicated = simulate(table, CostModel(**costs), 3)
    assert apart.step_time == dedicated.step_time and apart.events == dedicated.events
    assert apart.step_time < same.step_time
    # 4 ranks on 2 cores: the model tells a placement with neighbours on one core from one without
    four = build("gpipe", 4, 8)
    steps = {pl: simulate(four, CostModel(f=1.0, b=2.0, w=0.0, cores=2, quantum=0.5, placement=pl), 8).step_time
             for pl in ((0, 1, 0, 1), (0, 0, 1, 1))}
    assert steps[(0, 1, 0, 1)] < steps[(0, 0, 1, 1)]


def test_waiting_ranks_polls_take_cpu_from_a_shared_core() -> None:
    """``poll``: a rank waiting for a message polls at that share of a core; on a core it
    shares with a computing rank that slows the computing one, a free core absorbs it."""
    table = build("gpipe", 2, 1)  # 0F0, 1F0, 1B0, 0B0, each 1 s; the other rank waits meanwhile
    for poll in (0.0, 0.5):
        rep = simulate(table, CostModel(f=1.0, b=1.0, w=0.0, cores=1, quantum=10.0, poll=poll), 1)
        # with polls, 0F0, 1F0 and 1B0 run at half speed (the other rank waits on the core);
        # 0B0 runs alone (rank 1 has finished)
        assert rep.step_time == pytest.approx(4.0 if poll == 0 else 2.0 + 2.0 + 2.0 + 1.0)
        apart = simulate(table, CostModel(f=1.0, b=1.0, w=0.0, cores=2, quantum=10.0, poll=poll,
                                          placement=(0, 1)), 1)
        assert apart.step_time == pytest.approx(4.0)


def test_a_bad_placement_or_poll_names_the_numbers() -> None:
    table = build("1f1b", 4, 4)
    for bad in ((0, 1), (0, 1, 2, 0), (0, -1, 0, 1), (0.5, 1, 0, 1)):
        with pytest.raises(ConfigError, match=r"placement=.*4 ranks.*cores=2"):
            simulate(table, CostModel(cores=2, placement=bad), 4)
    with pytest.raises(ConfigError, match=r"poll=1.5"):
        simulate(table, CostModel(cores=2, poll=1.5), 4)


def test_simulated_ranks_on_shared_cores_yield_at_the_end_of_an_action() -> None:
    """``yields``: a rank that ends an action while another waits for the core hands it
    over then (the executor's idle MPI polls yield on an oversubscribed node); without it
    the running rank keeps the core for its whole time slice."""
    table = build("gpipe", 2, 2)
    for yields, first in ((True, 1.0), (False, 2.0)):
        rep = simulate(table, CostModel(f=1.0, b=1.0, w=0.0, cores=1, quantum=10.0, yields=yields), 2)
        recv_on_rank1 = [e for e in rep.events[1] if str(e[0]) == "1RECV_F0"][0]
        # rank 1 is woken by 0F0's message at t = 1: it gets the core at once, or after 0F1
        assert recv_on_rank1[2] == pytest.approx(first), (yields, rep.events)
        assert rep.step_time == pytest.approx(8.0)  # one core, never idle either way
    # processor sharing (quantum 0) runs every ready rank at once: nothing to yield
    ps = simulate(table, CostModel(f=1.0, b=1.0, w=0.0, cores=1, quantum=0.0), 2)
    assert ps.step_time == pytest.approx(simulate(table, CostModel(f=1.0, b=1.0, w=0.0, cores=1, quantum=0.0,
                                                                    yields=False), 2).step_time)
