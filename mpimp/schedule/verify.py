"""Offline verifier and cost-model simulator for action tables (one process, no MPI).

Problem: a wrong schedule on real ranks shows up as a hang after the deadline, on one of
hundreds of ranks, with no clue which action was wrong.  Here every rank's table is
dry-run in one process with the executor's semantics:

* sends are non-blocking (the executor uses ``isend`` and completes them at the end of
  the step), receives block until the matching send has been issued;
* ``F(s, i)`` needs its input (stage 0, an earlier ``RECV_F(s, i)``, or ``F(s-1, i)`` on
  the same rank); ``B(s, i)`` needs ``F(s, i)`` and its output gradient (last stage,
  ``RECV_B(s, i)`` or ``B(s+1, i)`` on the same rank); ``W(s, i)`` needs ``B(s, i)``;
* every (stage, micro-batch) has exactly one F and one B, at most one W, and every send
  is matched by exactly one receive.

A violation raises :class:`ScheduleError` whose message is the rank x step grid with
the offending action(s) marked ``>>1F0<<``.  The same dry run, given a
:class:`CostModel`, advances a clock per rank and becomes the simulator: predicted step
time, bubble fraction and peak activation memory (micro-batches held between F and the
end of their backward, W included) per rank.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

from ..errors import ConfigError
from .actions import COMPUTE, Action, Table, format_grid, lower, parse_table, stage_owners

__all__ = ["ScheduleError", "CostModel", "Report", "verify", "simulate", "format_grid", "spread"]


class ScheduleError(ConfigError):
    """An action table that cannot run; the message holds the marked rank x step grid."""


Seconds = Union[float, Sequence[float]]


@dataclass(frozen=True)
class CostModel:
    """Seconds per action and per message: ``B`` is the input-gradient half when W is split.

    ``f``, ``b``, ``w`` are one number for every stage or one per (virtual) stage.  A B
    without a matching W costs ``full`` (an unsplit backward; None: ``b + w``, which is
    more than one backward when splitting costs extra, as measured for a schedule that
    splits only some backwards, ``interleaved-zb``).  A message costs
    ``latency + message_bytes / bandwidth`` between the send and the earliest matching
    receive; ``send`` and ``recv`` are the sender's and receiver's own time per message
    (packing, posting); ``overhead`` is the executor's own time after every action (idle
    time in the bubble, as in a measured timeline; on shared cores it takes CPU).  ``activation_bytes`` (per micro-batch per stage) turns peak
    in-flight micro-batches into bytes.

    ``jitter``: relative durations (each a measured action's time over the mean of its
    kind and stage, so their mean is about 1; empty: every action takes its mean).  Then
    the simulator runs the table ``samples`` times, each compute action's time multiplied
    by a factor drawn from ``jitter`` (seeded by ``seed``: the same prediction every
    time), and reports the mean step time and busy time: with variable action times a
    rank waits on whichever neighbour is late, so the expected bubble is larger than the
    bubble of the mean times (a mean-time model under-predicted every p = 2 point on a
    noisy machine, docs/benchmarks.md).

    ``cores``: CPU cores the ranks share (None: one each).  With fewer cores than ranks
    (or a ``placement`` that binds two ranks to one core) the simulator schedules them
    like the operating system does: ranks ready to run queue for a core and hold it for
    up to ``quantum`` seconds (the scheduler's time slice; 0 = processor sharing, every
    ready rank at ``min(1, cores / k)`` of its speed), so the times above are then CPU
    seconds, not wall-clock seconds.  A rank waiting for a message holds no core, but its
    polls take ``poll`` of a core (CPU seconds per second of waiting; measured ~0.1 for
    mpimp's napping waits): beyond the free cores that CPU slows the running ranks (each
    keeps at least 5% of its speed).  ``placement``: the core of each rank (ranks bound
    to cores, ``os.sched_setaffinity``; ints in ``range(cores)``), then each core has its
    own queue; empty: any rank runs on any core.  With ``yields`` a rank also gives its
    core to a waiting rank at the end of every action: between actions the executor
    polls MPI, and an idle poll yields the core on an oversubscribed node (Open MPI's
    yield-when-idle; mpimp's waits nap).  Measured with 4 ranks on 2 cores, the wall
    time between two actions of a rank was ~2 ms against ~0.1 ms of CPU: the ranks
    change places there, not in the middle of an action (docs/benchmarks.md).
    """

    f: Seconds = 1.0
    b: Seconds = 1.0
    w: Seconds = 1.0
    full: Seconds | None = None
    latency: float = 0.0
    bandwidth: float = float("inf")
    message_bytes: float = 0.0
    activation_bytes: float = 0.0
    send: float = 0.0
    recv: float = 0.0
    overhead: float = 0.0
    cores: int | None = None
    quantum: float = 0.003
    yields: bool = True
    poll: float = 0.0
    placement: tuple[int, ...] = ()
    jitter: tuple[float, ...] = ()
    samples: int = 64
    seed: int = 0

    def message_time(self) -> float:
        return self.latency + (self.message_bytes / self.bandwidth if self.bandwidth else 0.0)

    def time(self, kind: str, stage: int) -> float:
        """Seconds of one F, B or W of ``stage`` (SEND/RECV: the per-message overheads)."""
        if kind == "SEND_F" or kind == "SEND_B":
            return self.send
        if kind == "RECV_F" or kind == "RECV_B":
            return self.recv
        value = {"F": self.f, "B": self.b, "W": self.w}[kind]
        return float(value) if isinstance(value, (int, float)) else float(value[stage])

    def full_backward(self, stage: int) -> float:
        """Seconds of one unsplit backward of ``stage``."""
        if self.full is None:
            return self.time("B", stage) + self.time("W", stage)
        return float(self.full) if isinstance(self.full, (int, float)) else float(self.full[stage])


@dataclass
class Report:
    """Result of a dry run: per-rank peak in-flight micro-batches and, with a cost model, times."""

    num_ranks: int
    num_stages: int
    num_microbatches: int
    peak_inflight: list[int]
    step_time: float = 0.0
    busy: list[float] = field(default_factory=list)
    events: list[list[tuple[Action, float, float]]] = field(default_factory=list)

    @property
    def bubble_per_rank(self) -> list[float]:
        if not self.step_time:
            return [0.0] * self.num_ranks
        return [1.0 - b / self.step_time for b in self.busy]

    @property
    def bubble(self) -> float:
        """Mean over ranks of the idle fraction of the step."""
        per = self.bubble_per_rank
        return sum(per) / len(per) if per else 0.0

    def peak_activation_bytes(self, cost: CostModel) -> list[float]:
        return [n * cost.activation_bytes for n in self.peak_inflight]


def _fail(table: Table, marks: dict[int, int], why: str) -> ScheduleError:
    return ScheduleError(f"invalid pipeline schedule: {why}\n{format_grid(table, marks)}")


def _check_counts(table: Table, owner: dict[int, int], num_stages: int, m: int) -> None:
    seen: dict[tuple[int, str, int], tuple[int, int]] = {}
    for r, row in enumerate(table):
        for c, a in enumerate(row):
            if a.stage < 0 or a.stage >= num_stages or a.mb < 0 or a.mb >= m:
                raise _fail(table, {r: c}, f"rank {r} step {c}: {a} is outside stages 0..{num_stages - 1}, "
                                           f"micro-batches 0..{m - 1}")
            if owner.get(a.stage) != r and a.kind in COMPUTE:
                raise _fail(table, {r: c}, f"{a} on rank {r} but stage {a.stage} lives on rank {owner.get(a.stage)}")
            if owner.get(a.stage, r) != r:
                raise _fail(table, {r: c}, f"{a} on rank {r} but stage {a.stage} lives on rank {owner[a.stage]}")
            key = (a.stage, a.kind, a.mb)
            if key in seen:
                r0, c0 = seen[key]
                marks = {r: c} if r0 == r else {r0: c0, r: c}
                raise _fail(table, marks, f"{a} appears twice (rank {r0} step {c0} and rank {r} step {c})")
            seen[key] = (r, c)
    for s in range(num_stages):
        for i in range(m):
            for kind in ("F", "B"):
                if (s, kind, i) not in seen:
                    r = owner.get(s, 0)
                    raise _fail(table, {r: len(table[r]) - 1 if table[r] else 0},
                                f"stage {s} never runs {s}{kind}{i} (every stage needs one F and one B "
                                f"per micro-batch; expected on rank {r})")


def verify(table: str | Sequence[Sequence[object]], num_microbatches: int | None = None,
           cost: CostModel | None = None) -> Report:
    """Dry-run a table (lowering it first when it has no communication actions).

    Returns a :class:`Report` (peak in-flight micro-batches per rank; with ``cost``, the
    simulated clock); raises :class:`ScheduleError` with the marked grid on any error.
    """
    compute = parse_table(table)  # type: ignore[arg-type]
    if not compute or not any(compute):
        raise ScheduleError("invalid pipeline schedule: the table is empty (one list of actions per rank)")
    try:
        owner = stage_owners(compute)
    except ConfigError as exc:
        raise ScheduleError(f"invalid pipeline schedule: {exc}\n{format_grid(compute, {})}") from None
    lowered = compute if any(a.kind not in COMPUTE for row in compute for a in row) else lower(compute)
    num_stages = max(owner) + 1
    missing = sorted(set(range(num_stages)) - set(owner))
    if missing:
        raise ScheduleError(f"invalid pipeline schedule: stages {missing} have no actions (stages must be "
                            f"numbered 0..{num_stages - 1})\n{format_grid(lowered, {})}")
    m = num_microbatches if num_microbatches is not None else 1 + max(a.mb for row in lowered for a in row)
    _check_counts(lowered, owner, num_stages, m)
    if cost is not None and cost.cores is not None and cost.cores < 1:
        raise ConfigError(f"CostModel.cores={cost.cores} must be >= 1 (or None: one core per rank)")
    if cost is not None and cost.placement and (
            cost.cores is None or len(cost.placement) != len(lowered)
            or not all(isinstance(c, int) and 0 <= c < cost.cores for c in cost.placement)):
        raise ConfigError(f"CostModel.placement={cost.placement}: give one core per rank ({len(lowered)} ranks), "
                          f"each in range(cores) with cores={cost.cores}")
    if cost is not None and not 0 <= cost.poll < 1:
        raise ConfigError(f"CostModel.poll={cost.poll}: a waiting rank's share of a core must be in [0, 1)")
    shared = cost is not None and cores_shared(cost.cores, cost.placement, len(lowered))
    if cost is None or not (shared or cost.jitter):
        return _run(lowered, owner, num_stages, m, cost)
    checked = _run(lowered, owner, num_stages, m, None)  # validity and peak memory

    def once(scale: dict[Action, float] | None) -> Report:
        assert cost is not None
        if shared:
            return _run_shared(lowered, owner, num_stages, m, cost, checked.peak_inflight, scale)
        return _run(lowered, owner, num_stages, m, cost, scale)

    if not cost.jitter:
        return once(None)
    if cost.samples < 1 or min(cost.jitter) < 0:
        raise ConfigError(f"CostModel: samples={cost.samples} must be >= 1 and the jitter factors >= 0")
    rng = random.Random(cost.seed)
    compute_actions = [a for row in lowered for a in row if a.kind in COMPUTE]
    runs = [once({a: rng.choice(cost.jitter) for a in compute_actions}) for _ in range(cost.samples)]
    n = len(runs)
    return Report(num_ranks=len(lowered), num_stages=num_stages, num_microbatches=m,
                  peak_inflight=checked.peak_inflight, step_time=sum(r.step_time for r in runs) / n,
                  busy=[sum(r.busy[k] for r in runs) / n for k in range(len(lowered))], events=runs[0].events)


def cores_shared(cores: int | None, placement: Sequence[int], ranks: int) -> bool:
    """Whether ranks share cores: fewer cores than ranks, or a placement that binds two
    ranks to one core (None cores: one each)."""
    if cores is None:
        return False
    return len(set(placement)) < len(placement) if placement else cores < ranks


def simulate(table: str | Sequence[Sequence[object]], cost: CostModel,
             num_microbatches: int | None = None) -> Report:
    """Predicted step time, bubble and peak activations of a table on a cost model."""
    return verify(table, num_microbatches, cost)


def spread(cv: float, points: int = 32) -> tuple[float, ...]:
    """Jitter factors for a :class:`CostModel` when no measured step is at hand: ``points``
    quantiles of a normal distribution with mean 1 and standard deviation ``cv`` (the
    coefficient of variation of the action times), clipped at 0.05 and rescaled to mean 1.
    Deterministic: the same factors every time."""
    if cv < 0 or points < 1:
        raise ConfigError(f"spread(cv={cv}, points={points}): cv must be >= 0 and points >= 1")
    normal = statistics.NormalDist(1.0, cv) if cv > 0 else None
    raw = [1.0] * points if normal is None else [max(0.05, normal.inv_cdf((k + 0.5) / points)) for k in range(points)]
    mean = sum(raw) / points
    return tuple(x / mean for x in raw)


def _duration(cost: CostModel, a: Action, has_w: set[tuple[int, int]],
              scale: dict[Action, float] | None = None) -> float:
    """Seconds of one action on ``cost``, without the executor's ``overhead`` between
    actions (idle time, as in a measured timeline): a B without its own W is a full
    backward; ``scale``: this sample's factor per compute action (jitter)."""
    if a.kind == "B" and (a.stage, a.mb) not in has_w:
        t = cost.full_backward(a.stage)
    else:
        t = cost.time(a.kind, a.stage)
    return t * scale.get(a, 1.0) if scale is not None else t


def _run_shared(table: Table, owner: dict[int, int], num_stages: int, m: int, cost: CostModel,
                peak: list[int], scale: dict[Action, float] | None = None) -> Report:
    """Times of a verified table when ``cost.cores`` cores are shared by more ranks.

    Event-driven, like an operating system's round-robin scheduler: every rank runs its
    row in order; a rank whose next action is a receive of a message that has not arrived
    blocks (on no core) until it arrives (the matching send's end + message time), then
    joins the run queue; a free core takes the first rank of the queue and runs it for up
    to ``cost.quantum`` seconds (then, if others wait, the rank goes to the back of the
    queue).  With ``cost.yields`` a rank that ends an action while others wait goes to the
    back of the queue too.  ``quantum = 0`` is processor sharing: the k ranks ready to run
    all advance at ``min(1, cores / k)``.  With ``cost.placement`` every core has its own
    queue of the ranks bound to it.  Waiting ranks' polls (``cost.poll`` of a core each)
    first fill their group's free cores, then slow its running ranks.  As in the
    executor's timeline, an action starts when its rank first gets a core for it, and a
    receive lasts from the end of the previous action.
    """
    p, cores = len(table), int(cost.cores or len(table))
    if cost.placement:  # rank r runs only on core placement[r]: one queue per core
        core_of = list(cost.placement)
        capacity = dict.fromkeys(core_of, 1)
    else:  # any rank on any of the cores: one queue
        core_of, capacity = [0] * p, {0: cores}
    has_w = {(a.stage, a.mb) for row in table for a in row if a.kind == "W"}
    msg, quantum = cost.message_time(), cost.quantum
    arrival: dict[tuple[int, str, int], float] = {}  # (stage, SEND_F|SEND_B, mb) -> arrival time
    pos, left = [0] * p, [-1.0] * p  # next action; its remaining CPU seconds (-1: not started)
    began, reached = [0.0] * p, [0.0] * p  # when the action first ran; when the rank got to it
    busy = [0.0] * p
    events: list[list[tuple[Action, float, float]]] = [[] for _ in range(p)]
    queues: dict[int, list[int]] = {c: [] for c in capacity}  # ranks ready to run, in arrival order
    on_core: dict[int, float] = {}  # running rank -> end of its time slice
    blocked: set[int] = set()
    yielded: set[int] = set()  # ranks that ended an action in the current interval
    yields = cost.yields and quantum > 0
    now = 0.0

    def can_run(r: int) -> bool:
        """Whether rank r has work it can do now (blocks it on a missing message otherwise)."""
        if pos[r] >= len(table[r]):
            return False
        a = table[r][pos[r]]
        if left[r] < 0 and a.kind in ("RECV_F", "RECV_B") and arrival.get(a.matching_send(), float("inf")) > now:
            blocked.add(r)
            return False
        return True

    def advance(r: int, dt: float, share: float) -> None:
        """Rank r got dt CPU seconds (at ``share`` of a core) ending now: finish every action
        that completes (zero-cost ones at once)."""
        while pos[r] < len(table[r]):
            a = table[r][pos[r]]
            if left[r] < 0:
                if not can_run(r):
                    return
                left[r], began[r] = _duration(cost, a, has_w, scale) + cost.overhead, now - dt / share
            used = min(dt, left[r])
            left[r] -= used
            dt -= used
            if left[r] > 1e-12:
                return
            end = now - dt / share
            start = reached[r] if a.kind in ("RECV_F", "RECV_B") else began[r]
            events[r].append((a, start, end))
            if a.kind in COMPUTE:  # the executor's overhead, run on the same core, is not compute
                d = _duration(cost, a, has_w, scale)
                busy[r] += (end - began[r]) * (d / (d + cost.overhead) if d + cost.overhead > 0 else 1.0)
            elif a.kind in ("SEND_F", "SEND_B"):
                arrival[(a.stage, a.kind, a.mb)] = end + msg
            pos[r] += 1
            left[r] = -1.0
            reached[r] = end
            if yields:
                yielded.add(r)

    def shares() -> dict[int, float]:
        """Each running rank's share of a core: processor sharing divides a group's cores
        among its ready ranks; waiting ranks' polls take CPU beyond their group's free cores."""
        out = {}
        for c, cap in capacity.items():
            running = [r for r in on_core if core_of[r] == c]
            if not running:
                continue
            share = min(1.0, cap / len(running)) if quantum <= 0 else 1.0
            excess = cost.poll * sum(core_of[r] == c for r in blocked) - max(0, cap - len(running))
            if excess > 0:
                share *= max(0.05, 1.0 - excess / min(cap, len(running)))
            out.update(dict.fromkeys(running, share))
        return out

    for r in range(p):
        if can_run(r):
            queues[core_of[r]].append(r)
    while any(queues.values()) or on_core or blocked:
        # hand free cores to waiting ranks; processor sharing: every ready rank runs, at cores / k
        for c, queue in queues.items():
            while queue and (quantum <= 0 or sum(core_of[r] == c for r in on_core) < capacity[c]):
                r = queue.pop(0)
                on_core[r] = now + quantum if quantum > 0 else float("inf")
        wakes = [arrival[table[r][pos[r]].matching_send()] for r in blocked if table[r][pos[r]].matching_send() in arrival]
        share = shares()
        if not on_core:
            if not wakes:  # pragma: no cover - verified tables finish
                raise _fail(table, {r: pos[r] for r in range(p) if pos[r] < len(table[r])}, "stuck")
            now = max(now, min(wakes))
        else:
            ends = []
            for r in on_core:
                a = table[r][pos[r]]
                need = left[r] if left[r] >= 0 else _duration(cost, a, has_w, scale) + cost.overhead
                ends.append(now + need / share[r])
            nxt = min([*ends, *on_core.values(), *[t for t in wakes if t > now]])
            dt, now = nxt - now, nxt
            yielded.clear()
            for r in list(on_core):
                advance(r, dt * share[r], share[r])
                queue = queues[core_of[r]]
                if pos[r] >= len(table[r]) or r in blocked:
                    del on_core[r]
                elif on_core[r] <= now + 1e-12 and queue:  # time slice over, others wait
                    del on_core[r]
                    queue.append(r)
                elif on_core[r] <= now + 1e-12:
                    on_core[r] = now + quantum
        for r in sorted(blocked):  # messages that have arrived wake their ranks
            if arrival.get(table[r][pos[r]].matching_send(), float("inf")) <= now + 1e-12:
                blocked.discard(r)
                queues[core_of[r]].append(r)
        for r in [r for r in on_core if r in yielded]:  # an action ended, others wait: they get the core
            if queues[core_of[r]]:
                del on_core[r]
                queues[core_of[r]].append(r)
    return Report(num_ranks=p, num_stages=num_stages, num_microbatches=m, peak_inflight=peak,
                  step_time=now, busy=busy, events=events)


def _run(table: Table, owner: dict[int, int], num_stages: int, m: int, cost: CostModel | None,
         scale: dict[Action, float] | None = None) -> Report:
    p = len(table)
    has_w = {(a.stage, a.mb) for row in table for a in row if a.kind == "W"}
    done: set[tuple[int, str, int]] = set()
    sent: dict[tuple[int, str, int], float] = {}  # (stage, SEND_F|SEND_B, mb) -> arrival time
    received: set[tuple[int, str, int]] = set()
    pos = [0] * p
    clock = [0.0] * p
    busy = [0.0] * p
    inflight = [0] * p
    peak = [0] * p
    events: list[list[tuple[Action, float, float]]] = [[] for _ in range(p)]
    msg = cost.message_time() if cost else 0.0
    gap = cost.overhead if cost else 0.0

    def error(r: int, why: str) -> ScheduleError:
        return _fail(table, {r: pos[r]}, f"rank {r} step {pos[r]}: {table[r][pos[r]]}: {why}")

    def ready(r: int, a: Action) -> float | None:
        """Earliest start time if the action can run now, None if it must wait."""
        s, k, i = a
        if k == "F":
            if s == 0:
                return clock[r]
            if owner[s - 1] == r:
                if (s - 1, "F", i) in done:
                    return clock[r]
                raise error(r, f"needs the output of {s - 1}F{i} on this rank first")
            if (s, "RECV_F", i) in done:
                return clock[r]
            raise error(r, f"its input comes from rank {owner[s - 1]}: {s}RECV_F{i} must come before it")
        if k == "B":
            if (s, "F", i) not in done:
                raise error(r, f"backward before its forward {s}F{i}")
            if s == num_stages - 1:
                return clock[r]
            if owner[s + 1] == r:
                if (s + 1, "B", i) in done:
                    return clock[r]
                raise error(r, f"needs the input gradient of {s + 1}B{i} on this rank first")
            if (s, "RECV_B", i) in done:
                return clock[r]
            raise error(r, f"its output gradient comes from rank {owner[s + 1]}: {s}RECV_B{i} must come before it")
        if k == "W":
            if (s, "B", i) not in done:
                raise error(r, f"weight gradient before its backward {s}B{i}")
            return clock[r]
        if k == "SEND_F":
            if s == num_stages - 1 or owner[s + 1] == r:
                raise error(r, "no remote next stage to send to")
            if (s, "F", i) not in done:
                raise error(r, f"sends the output of {s}F{i} before computing it")
            return clock[r]
        if k == "SEND_B":
            if s == 0 or owner[s - 1] == r:
                raise error(r, "no remote previous stage to send to")
            if (s, "B", i) not in done:
                raise error(r, f"sends the input gradient of {s}B{i} before computing it")
            return clock[r]
        # receives: RECV_F(s, i) matches SEND_F(s-1, i); RECV_B(s, i) matches SEND_B(s+1, i)
        src = a.matching_send()
        if not 0 <= src.stage < num_stages or owner[src.stage] == r:
            raise error(r, "no remote stage to receive from")
        if src in sent:
            return max(clock[r], sent[src])
        return None

    def duration(a: Action) -> float:
        return 0.0 if cost is None else _duration(cost, a, has_w, scale)

    remaining = sum(len(row) for row in table)
    while remaining:
        progressed = False
        for r in range(p):
            while pos[r] < len(table[r]):
                a = table[r][pos[r]]
                start = ready(r, a)
                if start is None:
                    break
                clock_before, end = clock[r], start + duration(a)
                clock[r] = end + gap  # the executor's own time before the next action: idle, not busy
                if a.kind in COMPUTE:
                    busy[r] += end - start
                events[r].append((a, clock_before, end))  # a receive includes its wait, as measured
                key = (a.stage, a.kind, a.mb)
                done.add(key)
                if a.kind in ("SEND_F", "SEND_B"):
                    sent[key] = end + msg
                elif a.kind in ("RECV_F", "RECV_B"):
                    received.add(key)
                if a.kind == "F":
                    inflight[r] += 1
                    peak[r] = max(peak[r], inflight[r])
                elif (a.kind == "B" and (a.stage, a.mb) not in has_w) or a.kind == "W":
                    inflight[r] -= 1
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            marks = {r: pos[r] for r in range(p) if pos[r] < len(table[r])}
            stuck = ", ".join(f"rank {r} waits in {table[r][c]}" for r, c in marks.items())
            raise _fail(table, marks, f"deadlock: {stuck}")
    unmatched = [k for k in sent if ((k[0] + 1, "RECV_F", k[2]) if k[1] == "SEND_F"
                                     else (k[0] - 1, "RECV_B", k[2])) not in received]
    if unmatched:
        s, kind, i = unmatched[0]
        r = owner[s]
        col = table[r].index(Action(s, kind, i))
        raise _fail(table, {r: col}, f"{s}{kind}{i} is never received")
    step = max((ev[-1][2] for ev in events if ev), default=0.0) if cost else 0.0  # the last action's end
    return Report(num_ranks=p, num_stages=num_stages, num_microbatches=m, peak_inflight=peak,
                  step_time=step, busy=busy if cost else [], events=events if cost else [])
