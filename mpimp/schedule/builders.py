"""Schedule builders: pure functions ``(p, m[, v]) -> one list of actions per rank``.

Problem: GPipe, 1F1B, interleaved 1F1B and zero-bubble schedules differ only in the
*order* in which each rank runs its forwards and backwards.  Writing each as its own
executor loop (Megatron has 360- and 1,100-line ones) makes them untestable without
ranks; here each is a short pure function whose output the verifier can check offline.

Pictures for p = 4 ranks, m = 8 micro-batches (digits: F of that micro-batch, letters
a..h: B of micro-batch 0..7, w: weight gradient, . idle; one column = one time unit)::

    gpipe   r0  01234567......abcdefgh       peak in-flight activations: m
    1f1b    r0  0123...a4b5c6d7e.f.g.h       peak: p - r on rank r (<= p)

(F = B = 1 here; the simulator prints these rows.)

* ``gpipe``: all forwards, then all backwards (fill-drain; Huang et al., 2019).
* ``1f1b``: ``p - r - 1`` warm-up forwards on rank r, then alternate one forward and one
  backward, then drain (Narayanan et al., 2019: PipeDream-Flush).
* ``interleaved-1f1b``: rank r holds virtual stages r, r + p, r + 2p, ...; forwards go
  in groups of p micro-batches per virtual stage (Megatron-LM, Narayanan et al., 2021);
  any m (m // p groups of >= p).  Bubble shrinks by a factor v.
* ``zb-h1``: backward split into B (input gradient, on the critical path) and W (weight
  gradient, deferrable) as in Qi et al., 2023, "Zero Bubble Pipeline Parallelism":
  1F1B's order with rank r holding back r weight gradients to fill the drain bubble.
* ``interleaved-zb``: interleaved 1F1B's order with a zero-bubble drain: rank r splits
  its last ``2 r v`` backwards and runs each W where it would otherwise wait.
* ``zb-v``: two stages per rank in a V (rank r holds stages r and 2p - 1 - r, so rank 0
  holds the first and the last), after Qi et al., 2024, "Pipeline Parallelism with
  Controllable Memory": the rank holding the loss also starts the step, so no rank
  waits for a fill before it, and the two stages of rank p - 1 hand over locally.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable

from ..errors import ConfigError
from .actions import Action, Table

__all__ = ["gpipe", "one_f_one_b", "interleaved_1f1b", "zb_h1", "interleaved_zb", "zb_v", "v_owner", "build",
           "BUILDERS", "default_virtual_stages"]


def _check(name: str, p: int, m: int, v: int = 1) -> None:
    for label, value in (("pipeline stages p", p), ("micro-batches m (chunks)", m),
                         ("virtual stages v", v)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}: {label} = {value!r} must be an integer >= 1")


def _only_v1(name: str, v: int) -> None:
    if v != 1:
        raise ConfigError(
            f"schedule {name!r} has one stage per rank, got virtual_stages={v}; "
            f"use schedule='interleaved-1f1b', 'interleaved-zb' or 'zb-v' for virtual stages"
        )


def gpipe(p: int, m: int, v: int = 1) -> Table:
    """Fill-drain: every rank runs F0..F(m-1), then B0..B(m-1)."""
    _check("gpipe", p, m, v)
    _only_v1("gpipe", v)
    return [[Action(r, "F", i) for i in range(m)] + [Action(r, "B", i) for i in range(m)]
            for r in range(p)]


def one_f_one_b(p: int, m: int, v: int = 1) -> Table:
    """1F1B: ``min(p - r - 1, m)`` warm-up forwards, then F/B pairs, then the remaining B."""
    _check("1f1b", p, m, v)
    _only_v1("1f1b", v)
    table = []
    for r in range(p):
        warm = min(p - r - 1, m)
        row = [Action(r, "F", i) for i in range(warm)]
        for i in range(m - warm):
            row += [Action(r, "F", warm + i), Action(r, "B", i)]
        row += [Action(r, "B", i) for i in range(m - warm, m)]
        table.append(row)
    return table


def interleaved_1f1b(p: int, m: int, v: int = 2) -> Table:
    """Megatron's interleaved 1F1B over ``v`` virtual stages per rank, for any m.

    Micro-batches go in ``max(1, m // p)`` groups of g >= p (sizes differing by at most
    one; a single group of m when m < p): rank r runs the forwards of one group on its
    virtual stage r, then on r + p, ..., then the next group; backwards in the same
    groups, virtual stages in reverse.  ``(p - r - 1) * 2 + (v - 1) * g`` warm-up forwards
    (Megatron's count with its group size g; all of them when m <= p), then one forward
    and one backward in turn, then the drain.  With m divisible by p this is Megatron's
    schedule.  Unit costs (F = 1, B = 2 per virtual stage): step ``3 m v + 3 (p - 1)``
    for m >= p (1F1B's bubble over v); for m < p the last micro-batch's chain through all
    p v stages, ``3 p v + 3 (m - 1)``.  Peak: ``min(m v, warm-up + 1)`` virtual-stage
    micro-batches.  Memory is not monotone in m: for p < m < 2p the single group holds
    all m micro-batches, so rank 0 keeps all ``m v`` in flight, as GPipe does (p = 8,
    v = 4: 60 at m = 15, 39 at m = 16).  The groups are never smaller than p because
    groups of p with a smaller last group (Megatron-core's layout for any m) fail the
    verifier's deadlock check in 212 of the 840 tables for p in 2..8,
    v in 2..4, m in 1..40 (a review experiment, not kept in the repository).
    """
    _check("interleaved-1f1b", p, m, v)
    if v == 1:
        return one_f_one_b(p, m)
    rounds = max(1, m // p)  # groups of p or more micro-batches, sizes differing by at most 1
    size, extra = divmod(m, rounds)
    starts = [k * size + min(k, extra) for k in range(rounds + 1)]
    groups = [range(a, b) for a, b in zip(starts, starts[1:])]
    forward = [(c, i) for group in groups for c in range(v) for i in group]
    backward = [(c, i) for group in groups for c in reversed(range(v)) for i in group]
    total = m * v
    table = []
    for r in range(p):
        warm = total if m <= p else min((p - r - 1) * 2 + (v - 1) * len(groups[0]), total)
        fwd = [Action(c * p + r, "F", i) for c, i in forward]
        bwd = [Action(c * p + r, "B", i) for c, i in backward]
        row = fwd[:warm]
        for k in range(total - warm):
            row += [fwd[warm + k], bwd[k]]
        row += bwd[total - warm:]
        table.append(row)
    return table


def zb_h1(p: int, m: int, v: int = 1) -> Table:
    """ZB-H1: 1F1B's warm-up, backward split into B (input grad) and W (weight grad).

    Rank r runs ``p - r - 1`` warm-up forwards, then F/B pairs; the W of the oldest
    micro-batch follows each pair from the r-th pair on (so rank r holds r extra W's
    back), each drain B is followed by a W, and the held-back W's fill the tail.  With
    equal F, B, W costs and m >= p the bubble is ``(p - 1)`` units instead of 1F1B's
    ``3 (p - 1)`` (``(p - 1) + (p - m)`` for m < p) and no rank holds more than
    ``min(p, m)`` micro-batches (1F1B's peak, on rank 0).
    """
    _check("zb-h1", p, m, v)
    _only_v1("zb-h1", v)
    table = []
    for r in range(p):
        warm = min(p - r - 1, m)
        row = [Action(r, "F", i) for i in range(warm)]
        w = 0
        for i in range(m - warm):
            row += [Action(r, "F", warm + i), Action(r, "B", i)]
            if i >= r:
                row.append(Action(r, "W", w))
                w += 1
        for i in range(m - warm, m):
            row += [Action(r, "B", i), Action(r, "W", w)]
            w += 1
        row += [Action(r, "W", i) for i in range(w, m)]
        table.append(row)
    return table


def interleaved_zb(p: int, m: int, v: int = 2) -> Table:
    """Interleaved 1F1B with a zero-bubble drain: ``interleaved_1f1b``'s order of F and B,
    with rank r splitting its last ``min(m v, 2 r v)`` backwards into B and W.

    In the drain the later ranks wait: rank r's last backwards need the earlier stages'
    (its input gradients come from the next virtual stage, which rank r + 1 only reaches
    after its own forwards are done), and rank 0 ends last.  A split B sends the input
    gradient after about half the work, so the chain back to rank 0 moves faster, and its
    W (the weight-gradient half, needed by no other rank) fills the wait.  Placement: each
    rank runs its F and B in order, and whenever the next one's input would arrive after
    the rank is free, it runs its oldest held-back W first (on unit costs: F = B = W = 1,
    an unsplit backward 2, messages free); W's still held at the end close the row.
    ``2 r v`` is ZB-H1's ``r`` held-back W's scaled by the 2v virtual-stage halves of a
    rank's drain.  Unit costs, p = 2, m = 8, v = 2: step 49 against interleaved 1F1B's 51
    (ideal 48), rank 1 splitting 4 backwards; p = 4, m = 8: 53 against 57.  Each split
    keeps its micro-batch's activations until its W, so the peak can grow by the number
    of W's held back at once.
    """
    _check("interleaved-zb", p, m, v)
    base = interleaved_1f1b(p, m, v)
    num_stages = p * v
    split: set[tuple[int, int]] = set()
    for r, row in enumerate(base):
        backwards = [a for a in row if a.kind == "B"]
        split |= {(a.stage, a.mb) for a in backwards[len(backwards) - min(len(backwards), 2 * r * v):]}
    end: dict[tuple[int, str, int], int] = {}  # (stage, kind, mb) -> end time on unit costs
    rows: Table = [[] for _ in range(p)]
    pos, clock = [0] * p, [0.0] * p
    held: list[deque[Action]] = [deque() for _ in range(p)]
    moved = True
    while moved:  # advance every rank as far as its inputs' times are known
        moved = False
        for r, row in enumerate(base):
            while pos[r] < len(row):
                a = row[pos[r]]
                if a.kind == "F":
                    dep = (a.stage - 1, "F", a.mb) if a.stage > 0 else None
                else:
                    dep = (a.stage + 1, "B", a.mb) if a.stage < num_stages - 1 else None
                if dep is not None and dep not in end:
                    break
                ready = end[dep] if dep is not None else clock[r]
                if ready > clock[r] and held[r]:  # the input is not there yet: a W first
                    rows[r].append(held[r].popleft())
                    clock[r] += 1.0
                else:
                    cut = a.kind == "B" and (a.stage, a.mb) in split
                    clock[r] = max(clock[r], ready) + (2.0 if a.kind == "B" and not cut else 1.0)
                    end[(a.stage, a.kind, a.mb)] = clock[r]
                    rows[r].append(a)
                    pos[r] += 1
                    if cut:
                        held[r].append(Action(a.stage, "W", a.mb))
                moved = True
    for r in range(p):
        rows[r] += held[r]
    return rows


# zb-v places actions on integer time units (exact ties: a float sum of 1.05's decided
# "ready" by rounding): F = 20, an unsplit backward 40, a split B or W 21 each, 5% over
# half a backward: the benchmark's stages measured B + W at 1.03-1.07x one backward
# (docs/benchmarks.md), so a split is only worth it where it shortens the step.
_F, _FULL, _SPLIT = 20, 40, 21
# zb-v searches which backwards to split when the pipeline has at most this many
# (stage, micro-batch) pairs (the search is quadratic); above it, the best of a few
# fixed choices (every backward split, or those of the first and last micro-batches).
_SEARCH_PAIRS = 128


def v_owner(p: int) -> list[int]:
    """The V placement of ``2p`` stages on ``p`` ranks: stage s on rank s for s < p, else on
    rank 2p - 1 - s (rank r holds stages r and 2p - 1 - r)."""
    return [s if s < p else 2 * p - 1 - s for s in range(2 * p)]


def _v_place(p: int, m: int, split: set[tuple[int, int]], cap: int) -> tuple[Table, int]:
    """List-schedule the V on unit costs; returns every rank's row and the step time.

    Costs (integer units): F = ``_F``, an unsplit backward ``_FULL``, a split B or W
    ``_SPLIT`` each, messages free.  The rank that can start an action earliest goes next (ties: the lower rank), so
    no later decision can make an earlier one wrong.  A rank runs, of what is ready when it
    is free: a B (the lower stage first, then the older micro-batch: the input gradient
    travels back up the V to rank 0), else an F (the older micro-batch first, then the
    later stage), else its oldest held-back W; when nothing is ready it waits for the
    earliest input.  An F on a rank's first stage (s < p) waits while the rank holds
    ``cap`` micro-batches' activations (F done, backward not finished; W included), so
    memory stays bounded; the second stage's F's always run (they lead to the B's that
    free memory, so the cap never blocks the V).  ``split``: the (stage, micro-batch)
    pairs whose backward is split into B and a held-back W.
    """
    stages = 2 * p
    owner = v_owner(p)
    mine = [(r, stages - 1 - r) for r in range(p)]
    end: dict[tuple[int, str, int], int] = {}
    next_f, next_b = [0] * stages, [0] * stages
    held: list[deque[Action]] = [deque() for _ in range(p)]
    live, clock, left = [0] * p, [0] * p, [4 * m] * p
    rows: Table = [[] for _ in range(p)]
    never = 1 << 62

    def options(r: int) -> list[tuple[int, tuple[int, int, int], int, str]]:
        out = []
        for s in mine[r]:
            i = next_b[s]
            if i < m:
                f_end = end.get((s, "F", i))
                g_end = end.get((s + 1, "B", i)) if s < stages - 1 else 0
                if f_end is not None and g_end is not None:
                    out.append((max(f_end, g_end), (0, s, i), s, "B"))
            i = next_f[s]
            if i < m and (s >= p or live[r] < cap):
                x_end = end.get((s - 1, "F", i)) if s > 0 else 0
                if x_end is not None:
                    out.append((x_end, (1, i, -s), s, "F"))
        return out

    def decision(r: int) -> int:
        if not left[r] and not held[r]:
            return never
        ready = [o[0] for o in options(r)]
        if held[r] or any(t <= clock[r] for t in ready):
            return clock[r]
        return min(ready, default=never)

    when = [decision(r) for r in range(p)]
    while True:
        r = min(range(p), key=when.__getitem__)
        now = when[r]
        if now == never:
            if any(left) or any(held):  # cannot happen: the second stages always run
                raise ConfigError(f"zb-v placement stalled for p={p}, m={m}, cap={cap} (a bug in mpimp)")
            break
        ready = [o for o in options(r) if o[0] <= now]
        if ready:
            _, _, s, kind = min(ready, key=lambda o: o[1])
            if kind == "B":
                i = next_b[s]
                next_b[s] += 1
                if (s, i) in split:
                    cost = _SPLIT
                    held[r].append(Action(s, "W", i))
                else:
                    cost = _FULL
                    live[r] -= 1
            else:
                i = next_f[s]
                next_f[s] += 1
                live[r] += 1
                cost = _F
            left[r] -= 1
            a = Action(s, kind, i)
        else:
            a = held[r].popleft()
            cost = _SPLIT
            live[r] -= 1
        clock[r] = now + cost
        end[(a.stage, a.kind, a.mb)] = clock[r]
        rows[r].append(a)
        touched = {r}
        if a.kind == "F" and a.stage + 1 < stages:
            touched.add(owner[a.stage + 1])
        if a.kind == "B" and a.stage > 0:
            touched.add(owner[a.stage - 1])
        for q in touched:
            when[q] = decision(q)
    return rows, max(clock)


@functools.lru_cache(maxsize=64)
def _zb_v_rows(p: int, m: int) -> tuple[tuple[Action, ...], ...]:
    """The V's rows with the chosen backwards split (the shortest step, then the fewest
    splits, then the first in sorted order: the same table on every rank)."""
    cap = 2 * p + 1
    pairs = [(s, i) for i in range(m) for s in range(2 * p)]
    every = set(pairs)
    found: list[tuple[int, set[tuple[int, int]], Table]] = []  # (step, split, rows)

    def placed(split: set[tuple[int, int]]) -> tuple[int, set[tuple[int, int]], Table]:
        rows, step = _v_place(p, m, split, cap)
        return step, split, rows

    if len(pairs) > _SEARCH_PAIRS:
        for k in (0, p, 2 * p, 4 * p):  # the first k and the last k micro-batches' backwards (0: all)
            found.append(placed(every if k == 0 else {(s, i) for s, i in pairs if i < k or i >= m - k}))
    else:
        for start in (every, set()):
            best = placed(set(start))
            for pair in pairs:  # one pass, oldest micro-batch first: keep a change that shortens the step
                trial = placed(best[1] ^ {pair})
                if trial[0] < best[0]:
                    best = trial
            found.append(best)
    _, _, rows = min(found, key=lambda f: (f[0], len(f[1]), sorted(f[1])))
    return tuple(tuple(row) for row in rows)


def zb_v(p: int, m: int, v: int = 2) -> Table:
    """ZB-V: ``2p`` stages in a V, rank r holding stages r and 2p - 1 - r.

    The forward goes down the ranks on the first stages and back up on the second (rank
    p - 1 hands its output from stage p - 1 to stage p locally), the backward the other
    way, and rank 0 holds both the first stage and the last.  So the rank with the loss
    starts the step at once; in interleaved 1F1B it is the last rank, idle until the first
    micro-batch has crossed every other rank.

    The order is list-scheduled on unit costs (:func:`_v_place`: each rank runs what is
    ready, B before F before a held-back W; a rank starts no forward on its first stage
    while it holds ``2p + 1`` micro-batches' activations).  Which backwards are split into
    B and W is searched: starting from none split and from all split, one pass over the
    (stage, micro-batch) pairs keeps each change that shortens the simulated step, a split
    costing 5% more than an unsplit backward's half, so a backward is split only where its
    W fills a wait.  Above ``_SEARCH_PAIRS`` pairs it takes the best of splitting every
    backward or those of the first and last p, 2p or 4p micro-batches.

    On those costs (F = 1, backward 2, a split half 1.05; ``interleaved-zb`` at v = 2 in
    brackets): p = 2, m = 8: 49.2 with 3 splits (49.4; ideal 48); p = 4, m = 8: 52.35
    (53.1); p = 8, m = 17: 112.45 (116.05).  Not everywhere ahead: p = 4, m = 16: 101.85
    (101.1); p = 16, m = 64: 413.5 (413.1); p = 64, m = 256: 1697 (1668) -- ``mpimp plan``
    compares them for a given size.  Peak in flight (stage micro-batches, each half a rank's layers): p = 2, m = 8:
    6 (``interleaved-zb`` 5); p = 4: 12 (11); p = 8, m = 17: 21 (24); p = 64, m = 256:
    151 (191): the cap bounds only the first stages' forwards.
    """
    _check("zb-v", p, m, v)
    if v != 2:
        raise ConfigError(f"schedule 'zb-v' places two stages on each rank, in a V; got virtual_stages={v}: "
                          f"pass virtual_stages=2")
    return [list(row) for row in _zb_v_rows(p, m)]


BUILDERS: dict[str, Callable[[int, int, int], Table]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_1f1b,
    "zb-h1": zb_h1,
    "interleaved-zb": interleaved_zb,
    "zb-v": zb_v,
}


def default_virtual_stages(name: str) -> int:
    """Stages per rank a named schedule takes when none is given: 2 for the interleaved
    schedules and ``zb-v`` (which needs exactly 2), 1 for the others."""
    return 2 if name.startswith("interleaved") or name == "zb-v" else 1


def build(name: str, p: int, m: int, v: int = 1) -> Table:
    """The compute-only table of schedule ``name`` for p ranks, m micro-batches, v virtual stages."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ConfigError(f"unknown schedule {name!r}; use one of {sorted(BUILDERS)} or an action table") from None
    return builder(p, m, v)
