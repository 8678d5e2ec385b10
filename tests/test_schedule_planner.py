"""``mpimp plan``: the simulator on the command line, checked against closed-form step times."""

from __future__ import annotations

from pathlib import Path

import pytest
from mpi4py import MPI

from mpimp.cli import main
from mpimp.planner import plan
from mpimp.schedule import CostModel


def test_plan_matches_the_closed_forms() -> None:
    cost = CostModel(f=1.0, b=1.0, w=1.0)
    assert plan("1f1b", 8, 32, 1, cost)["step_time"] == 3 * (32 + 7)
    assert plan("gpipe", 8, 32, 1, cost)["step_time"] == 3 * (32 + 7)
    assert plan("zb-h1", 8, 32, 1, cost)["step_time"] == 3 * 32 + 7
    # v=2: each virtual stage holds half the layers, so the bubble halves
    assert plan("interleaved-1f1b", 8, 32, 2, cost)["step_time"] == pytest.approx(3 * 32 + 3 * 7 / 2)
    gp, one = plan("gpipe", 8, 32, 1, cost), plan("1f1b", 8, 32, 1, cost)
    assert max(gp["peak_inflight"]) == 32 and max(one["peak_inflight"]) == 8
    assert one["ideal_time"] == 3 * 32 and plan("interleaved-1f1b", 8, 32, 2, cost)["ideal_time"] == 3 * 32


def test_plan_scales_an_unsplit_backward_with_the_virtual_stages() -> None:
    """``CostModel.full`` is a rank's cost like f, b, w: split over v virtual stages too."""
    same = CostModel(f=1.0, b=1.0, w=1.0, full=2.0)
    for name in ("interleaved-1f1b", "interleaved-zb"):
        got, want = plan(name, 2, 8, 2, same), plan(name, 2, 8, 2, CostModel(f=1.0, b=1.0, w=1.0))
        assert got["step_time"] == want["step_time"] and got["ideal_time"] == want["ideal_time"] == 24
    # a split costing 10% more than one backward: interleaved-zb's rank 1 pays it on 4 backwards
    dear = plan("interleaved-zb", 2, 8, 2, CostModel(f=1.0, b=1.1, w=1.1, full=2.0))
    assert dear["ideal_time"] == pytest.approx(24 + 4 * 0.2 / 2)


@pytest.mark.mpi(min_size=1)
def test_plan_command_prints_the_prediction(capsys: pytest.CaptureFixture[str]) -> None:
    from mpi4py import MPI

    assert main(["plan", "--pp", "64", "--chunks", "256", "--schedule", "zb-h1",
                 "--activation-bytes", "1048576"]) == 0
    out = capsys.readouterr().out
    if MPI.COMM_WORLD.Get_rank() == 0:
        row = next(line for line in out.splitlines() if line.startswith("zb-h1"))
        # 3 x 256 + 63 time units; ideal 768; bubble 1 - 768/831 = 7.6%; rank 0 holds 64 micro-batches
        assert row.split()[:8] == ["zb-h1", "64", "256", "1", "831", "768", "7.6%", "64"]
        assert "64.0 MiB" in row
    else:
        assert out == ""


def test_plan_rejects_bad_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--pp", "4", "--chunks", "0"]) == 2
    assert "--chunks 0 must be >= 1" in capsys.readouterr().err
    for flag, value, says in (("--virtual-stages", "0", "--virtual-stages 0 must be >= 1"),
                              ("--f", "-1", "--f -1.0 must be >= 0"),
                              ("--bandwidth", "0", "--bandwidth 0.0 must be > 0"),
                              ("--latency", "-1e-6", "--latency -1e-06 must be >= 0")):
        assert main(["plan", "--pp", "4", "--chunks", "6", f"{flag}={value}"]) == 2
        assert says in capsys.readouterr().err
    assert main(["plan", "--pp", "4"]) == 2
    assert "needs --pp and --chunks (or --table FILE)" in capsys.readouterr().err


def test_plan_simulates_a_users_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mpimp.schedule import build, format_table

    path = tmp_path / "mine.txt"
    path.write_text(format_table(build("1f1b", 4, 8)))
    assert main(["plan", "--table", str(path)]) == 0
    out = capsys.readouterr().out
    if MPI.COMM_WORLD.Get_rank() == 0:  # the same figures as the built-in 1f1b: 3 x (8 + 3) units
        row = next(line for line in out.splitlines() if line.startswith("mine.txt"))
        assert row.split()[1:7] == ["4", "8", "1", "33", "24", "27.3%"]
    path.write_text("rank 0: 0F0 0B0\nrank 2: 1F0 1B0\n")
    assert main(["plan", "--table", str(path)]) == 2
    assert "rows must be 'rank 0:', 'rank 1:', ... in order (this is row 1)" in capsys.readouterr().err
    assert main(["plan", "--table", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read it" in capsys.readouterr().err


@pytest.mark.mpi(min_size=1)
def test_plan_with_ranks_sharing_cores(capsys: pytest.CaptureFixture[str]) -> None:
    """4 stages on 1 core: the step is all the work, whatever the schedule."""
    from mpi4py import MPI

    assert main(["plan", "--pp", "4", "--chunks", "8", "--schedule", "1f1b", "--cores", "1",
                 "--quantum", "0"]) == 0
    out = capsys.readouterr().out
    if MPI.COMM_WORLD.Get_rank() == 0:
        row = next(line for line in out.splitlines() if line.startswith("1f1b"))
        # f = b = w = 1: per stage 8 x (F + B + W) = 24 s of CPU, 4 stages on one core: 96 s
        assert row.split()[4] == "96"
    assert main(["plan", "--pp", "4", "--chunks", "8", "--cores", "0"]) == 2
    err = capsys.readouterr().err
    assert ("--cores 0 must be >= 1" in err) == (MPI.COMM_WORLD.Get_rank() == 0)  # rank 0 reports


def test_plan_with_ranks_bound_to_cores(capsys: pytest.CaptureFixture[str]) -> None:
    """--bind: rank r on core r % cores, each core its own queue (as ``CostModel.placement``);
    --poll: waiting ranks take that share of a core."""
    from mpi4py import MPI

    from mpimp.planner import plan
    from mpimp.schedule import CostModel, build, simulate

    cost = CostModel(f=1.0, b=1.0, w=1.0, cores=2, quantum=0.5, poll=0.1)
    bound = plan("gpipe", 4, 8, 1, cost, bind=True)
    direct = simulate(build("gpipe", 4, 8), CostModel(f=1.0, b=1.0, w=1.0, cores=2, quantum=0.5, poll=0.1,
                                                      placement=(0, 1, 0, 1)), 8)
    assert bound["step_time"] == pytest.approx(direct.step_time)
    assert bound["step_time"] != pytest.approx(plan("gpipe", 4, 8, 1, cost)["step_time"])
    assert main(["plan", "--pp", "4", "--chunks", "8", "--schedule", "gpipe", "--cores", "2", "--quantum", "0.5",
                 "--poll", "0.1", "--bind"]) == 0
    out = capsys.readouterr().out
    if MPI.COMM_WORLD.Get_rank() == 0:
        assert "rank r bound to core r % 2" in out and "poll at 0.1 of a core" in out
        row = next(line for line in out.splitlines() if line.startswith("gpipe"))
        assert float(row.split()[4]) == pytest.approx(direct.step_time, rel=1e-3)
    for bad, why in ((["--cores", "2", "--poll", "1.5"], "--poll 1.5"), (["--bind"], "give --cores C")):
        assert main(["plan", "--pp", "4", "--chunks", "8", *bad]) == 2
        err = capsys.readouterr().err
        assert (why in err) == (MPI.COMM_WORLD.Get_rank() == 0), err


def test_spread_and_plan_with_varying_action_times(capsys: pytest.CaptureFixture[str]) -> None:
    """--cv: action times drawn around F, B, W; the expected bubble grows with the spread
    (a step waits for the slowest neighbour), deterministically."""
    import statistics

    from mpimp.schedule import spread

    factors = spread(0.1)
    assert statistics.fmean(factors) == pytest.approx(1.0) and statistics.pstdev(factors) == pytest.approx(0.1, rel=0.1)
    assert spread(0.0) == (1.0,) * 32
    with pytest.raises(Exception, match="cv must be >= 0"):
        spread(-0.1)
    bubbles = [plan("1f1b", 8, 32, 1, CostModel(jitter=spread(cv) if cv else (), samples=8))["bubble"]
               for cv in (0.0, 0.1, 0.3)]
    assert bubbles[0] < bubbles[1] < bubbles[2]
    assert main(["plan", "--pp", "8", "--chunks", "32", "--schedule", "1f1b", "--cv", "0.1", "--samples", "8"]) == 0
    out = capsys.readouterr().out
    if MPI.COMM_WORLD.Get_rank() == 0:
        assert "action times varying by 10% (mean of 8 runs)" in out
        row = next(line for line in out.splitlines() if line.startswith("1f1b"))
        assert float(row.split()[6].rstrip("%")) / 100 == pytest.approx(bubbles[1], abs=0.01)
    assert main(["plan", "--pp", "8", "--chunks", "32", "--cv=-1"]) == 2
    assert "--cv -1.0 must be >= 0" in capsys.readouterr().err
