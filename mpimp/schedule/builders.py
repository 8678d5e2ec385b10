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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..errors import ConfigError
from .actions import Action, Table

__all__ = ["gpipe", "one_f_one_b", "interleaved_1f1b", "zb_h1", "interleaved_zb", "build", "BUILDERS"]


def _check(name: str, p: int, m: int, v: int = 1) -> None:
    for label, value in (("pipeline stages p", p), ("micro-batches m (chunks)", m),
                         ("virtual stages v", v)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}: {label} = {value!r} must be an integer >= 1")


def _only_v1(name: str, v: int) -> None:
    if v != 1:
        raise ConfigError(
            f"schedule {name!r} has one stage per rank, got virtual_stages={v}; "
            f"use schedule='interleaved-1f1b' or 'interleaved-zb' for virtual stages"
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
    end: dict[tuple[int, str, int], float] = {}  # (stage, kind, mb) -> end time on unit costs
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


BUILDERS: dict[str, Callable[[int, int, int], Table]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_1f1b,
    "zb-h1": zb_h1,
    "interleaved-zb": interleaved_zb,
}


def build(name: str, p: int, m: int, v: int = 1) -> Table:
    """The compute-only table of schedule ``name`` for p ranks, m micro-batches, v virtual stages."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ConfigError(f"unknown schedule {name!r}; use one of {sorted(BUILDERS)} or an action table") from None
    return builder(p, m, v)
