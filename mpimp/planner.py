"""``mpimp plan``: predict a pipeline schedule's step time, bubble and memory without ranks.

Problem: choosing p, m and a schedule for thousands of ranks by trial runs is slow and
expensive.  The schedule is data, so the simulator (:func:`mpimp.schedule.simulate`)
replays every rank's table on a cost model in one process (a few seconds for
``--pp 64 --chunks 256``)::

    mpimp plan --pp 64 --chunks 256 --schedule zb-h1
    mpimp plan --table my_schedule.txt --f 1e-3 --b 1e-3 --w 1e-3
    mpimp plan --pp 8 --chunks 32 --schedule interleaved-1f1b --virtual-stages 2 \\
               --f 1.2e-3 --b 1.3e-3 --w 1.1e-3 --latency 5e-6 --bandwidth 2.5e10 \\
               --message-bytes 4194304 --activation-bytes 2.1e8
    mpimp plan --pp 64 --chunks 256 --schedule 1f1b --cv 0.1   # action times varying by 10%

Times are per micro-batch for one rank's share of the layers (a virtual stage gets 1/v
of them, and 1/v of ``--activation-bytes``); ``--b`` is the
input-gradient half of the backward and ``--w`` the weight-gradient half (a schedule
without W charges ``b + w`` for each backward).  ``--cv`` makes every action's time vary
around its mean (a normal spread with that coefficient of variation, :func:`~mpimp.schedule.spread`)
and averages ``--samples`` runs: on thousands of ranks a step waits for the slowest of
many neighbours, so the expected bubble grows with the spread.  Without ``--schedule`` every built-in
schedule is compared.  Runs on one process (under mpirun only rank 0 prints).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

from .errors import ConfigError
from .schedule import BUILDERS, CostModel, build, default_virtual_stages, simulate, spread
from .schedule.actions import Table, parse_table

__all__ = ["COMMANDS", "plan", "format_plan"]


def plan(schedule: str, pp: int, chunks: int, virtual_stages: int = 1,
         cost: CostModel | None = None, table: Table | None = None, bind: bool = False) -> dict[str, object]:
    """Simulate one schedule; returns step time, bubble, ideal time and peak memory.

    ``table``: a user's action table (``schedule`` is then only its label; p, m and v are
    read from the table).  ``bind``: with ``cost.cores``, rank r is bound to core
    r % cores (its own queue; ``CostModel.placement``)."""
    cost = cost or CostModel()
    if table is None:
        table = build(schedule, pp, chunks, virtual_stages)
    else:
        table = parse_table(table)
        pp = len(table)
        stages = 1 + max((a.stage for row in table for a in row), default=0)
        chunks = 1 + max((a.mb for row in table for a in row), default=0)
        if stages % pp:
            raise ConfigError(f"the table has {stages} stages on {pp} ranks; a rank holds the same number of stages")
        virtual_stages = stages // pp
    v = virtual_stages
    # a virtual stage holds 1/v of the rank's layers: 1/v of its time and activation memory
    per_stage = replace(cost, f=cost.f / v, b=cost.b / v, w=cost.w / v, activation_bytes=cost.activation_bytes / v,
                        full=None if cost.full is None else cost.full / v)
    if bind and cost.cores:
        per_stage = replace(per_stage, placement=tuple(r % cost.cores for r in range(pp)))
    report = simulate(table, per_stage, chunks)
    ideal = max(report.busy)  # the busiest rank's compute with no idle time
    return {
        "schedule": schedule, "pp": pp, "chunks": chunks, "virtual_stages": v,
        "step_time": report.step_time, "ideal_time": ideal, "bubble": report.bubble,
        "bubble_per_rank": report.bubble_per_rank,
        "peak_inflight": report.peak_inflight,
        "peak_activation_bytes": report.peak_activation_bytes(per_stage),
    }


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_plan(rows: list[dict[str, object]], cost: CostModel, bind: bool = False) -> str:
    varied = "" if not cost.jitter else (f"; action times varying by {statistics.pstdev(cost.jitter):.0%} "
                                          f"(mean of {cost.samples} runs)")
    if cost.cores and any(int(str(r["pp"])) > cost.cores for r in rows):  # ranks share cores (bound or not)
        varied += (f"; {cost.cores} shared cores (time slice {cost.quantum:g} s"
                   f"{f', rank r bound to core r % {cost.cores}' if bind else ''}"
                   f"{f', waiting ranks poll at {cost.poll:g} of a core' if cost.poll else ''})")
    lines = [f"cost model: F {cost.f:g} s, B {cost.b:g} s, W {cost.w:g} s per micro-batch per rank; "
             f"message {cost.message_time():g} s; activations {_bytes(cost.activation_bytes)} per micro-batch"
             f"{varied}",
             f"{'schedule':<18}{'pp':>5}{'chunks':>7}{'v':>3}{'step time':>12}{'ideal':>12}{'bubble':>9}"
             f"{'peak mb (r0)':>14}{'peak mb (max)':>15}{'peak act mem':>14}"]
    for r in rows:
        peak = r["peak_inflight"]
        mem = r["peak_activation_bytes"]
        assert isinstance(peak, list) and isinstance(mem, list)
        lines.append(f"{r['schedule']!s:<18}{r['pp']!s:>5}{r['chunks']!s:>7}{r['virtual_stages']!s:>3}"
                     f"{r['step_time']:>12.4g}{r['ideal_time']:>12.4g}{r['bubble']:>8.1%}"
                     f"{peak[0]:>14}{max(peak):>15}{_bytes(max(mem)):>14}")
    return "\n".join(lines)


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (ranks per pipeline)")
    p.add_argument("--chunks", type=int, default=None, help="micro-batches per step")
    p.add_argument("--table", default=None, metavar="FILE",
                   help="simulate this action table (text form, one 'rank N: 0F0 0F1 ...' line per "
                        "rank, compute actions only) instead of a built-in schedule")
    p.add_argument("--schedule", choices=sorted(BUILDERS), default=None,
                   help="schedule to simulate (default: compare all)")
    p.add_argument("--virtual-stages", type=int, default=None,
                   help="virtual stages per rank (interleaved-1f1b, interleaved-zb, zb-v; default 2 for them, 1 otherwise)")
    p.add_argument("--f", type=float, default=1.0, help="forward time per micro-batch per stage (s)")
    p.add_argument("--b", type=float, default=1.0, help="input-gradient backward time (s)")
    p.add_argument("--w", type=float, default=1.0, help="weight-gradient backward time (s)")
    p.add_argument("--latency", type=float, default=0.0, help="point-to-point latency (s)")
    p.add_argument("--bandwidth", type=float, default=float("inf"), help="point-to-point bandwidth (B/s)")
    p.add_argument("--message-bytes", type=float, default=0.0, help="activation message size (B)")
    p.add_argument("--activation-bytes", type=float, default=0.0,
                   help="activation memory held per in-flight micro-batch per stage (B)")
    p.add_argument("--cores", type=int, default=None,
                   help="CPU cores the ranks share (default: one per rank); fewer cores than "
                        "ranks are scheduled round-robin, a rank handing its core to a waiting one at "
                        "the end of each action; times are then CPU seconds")
    p.add_argument("--quantum", type=float, default=0.003,
                   help="with --cores: the scheduler's time slice (s); 0 = processor sharing")
    p.add_argument("--bind", action="store_true",
                   help="with --cores: rank r is bound to core r %% cores (each core its own queue) "
                        "instead of any rank running on any core")
    p.add_argument("--poll", type=float, default=0.0,
                   help="with --cores: share of a core a rank takes while it waits for a message "
                        "(its polls; ~0.1 measured for mpimp on an oversubscribed node)")
    p.add_argument("--cv", type=float, default=0.0,
                   help="spread of the action times (standard deviation over mean, e.g. 0.1): the "
                        "prediction is then the mean over --samples runs with times drawn around F, B, W")
    p.add_argument("--samples", type=int, default=16, help="with --cv: simulated runs to average (default 16)")


def _run(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    if args.table is None and (args.pp is None or args.chunks is None):
        raise ConfigError("mpimp plan needs --pp and --chunks (or --table FILE)")
    for name in ("pp", "chunks", "cores", "virtual_stages", "samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("f", "b", "w", "latency", "message_bytes", "activation_bytes", "quantum", "cv", "poll"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 0")
    if args.poll >= 1:
        raise ConfigError(f"--poll {args.poll}: a waiting rank's share of a core must be below 1")
    if (args.bind or args.poll) and args.cores is None:
        raise ConfigError("--bind and --poll describe ranks sharing cores: give --cores C as well")
    if args.bandwidth <= 0:
        raise ConfigError(f"--bandwidth {args.bandwidth} must be > 0 bytes/s (default: infinite)")
    cost = CostModel(f=args.f, b=args.b, w=args.w, latency=args.latency, bandwidth=args.bandwidth,
                     message_bytes=args.message_bytes, activation_bytes=args.activation_bytes,
                     cores=args.cores, quantum=args.quantum, poll=args.poll,
                     jitter=spread(args.cv) if args.cv > 0 else (), samples=args.samples)
    names = [args.schedule] if args.schedule else list(BUILDERS)
    rows, skipped = [], []
    t0 = time.perf_counter()
    if args.table is not None:
        try:
            with open(args.table) as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"--table {args.table}: cannot read it ({exc.strerror})") from None
        rows.append(plan(os.path.basename(args.table), 0, 0, 1, cost, table=text, bind=args.bind))
        names = []
    for name in names:
        v = args.virtual_stages or default_virtual_stages(name)
        try:
            rows.append(plan(name, args.pp, args.chunks, v, cost, bind=args.bind))
        except ConfigError as exc:
            if args.schedule:
                raise
            skipped.append(f"{name}: {exc}")
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(format_plan(rows, cost, args.bind))
        for s in skipped:
            print(f"skipped {s}")
        print(f"(simulated {len(rows)} schedule(s) of {rows[0]['pp'] if rows else args.pp} ranks x "
              f"{rows[0]['chunks'] if rows else args.chunks} micro-batches "
              f"in {time.perf_counter() - t0:.2f} s)")
    return 0


COMMANDS = [("plan", "predict step time, bubble and memory of a pipeline schedule (no ranks needed)",
             _add, _run)]
