"""Pipeline timelines: bubble fraction, a merged Chrome trace, a Gantt chart, predicted vs measured.

Problem: a pipeline that is slower than expected does not say why; the idle time (the
"bubble") and which send a stage was waiting for are invisible in a profile of one
rank.  Every rank's :class:`~mpimp.Pipeline` records the start and end of each action of
the last step (seconds since that rank's step began); :func:`gather` collects them on
one rank (aligned on the shared monotonic clock when all ranks share a host), which can then

* compute the measured bubble fraction (:func:`bubble_fraction`): per rank
  ``1 - busy / step`` where busy is the time in F, B and W and step the longest
  rank's step, averaged over ranks (the simulator's definition);
* write one Chrome trace (:func:`write_chrome_trace`: one process per rank, loads in
  Perfetto or chrome://tracing) with a flow arrow from every send to its receive;
* draw a PNG Gantt chart of the step across all ranks (:func:`plot_gantt`, matplotlib);
* fit a :class:`~mpimp.schedule.CostModel` to the measured action times
  (:func:`calibrate`) and predict the bubble of any table with it (:func:`predict`).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .schedule import Action, CostModel, simulate
from .schedule.verify import cores_shared

__all__ = ["gather", "bubble_fraction", "chrome_trace", "write_chrome_trace", "plot_gantt",
           "calibrate", "predict", "fit_quantum"]

Timeline = list[dict[str, Any]]
_COLORS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868", "SEND_F": "#C9C9C9", "SEND_B": "#C9C9C9",
           "RECV_F": "#EEEEEE", "RECV_B": "#EEEEEE"}


def gather(pipe: Any, root: int = 0) -> list[Timeline] | None:
    """Every rank's timeline of the last step, gathered on ``root`` of ``pipe.topo.world`` (None elsewhere).

    Collective over the world; each event also carries its rank's ``dp_rank``, ``tp_rank``
    and ``host`` (the processor name).
    When every rank runs on the same host, times are shifted onto the common monotonic
    clock (origin: the earliest rank's step start), which removes the few-ms skew with
    which the ranks leave the step's opening collective; across hosts each rank keeps
    its own step start as origin.
    """
    from mpi4py import MPI

    topo = pipe.topo
    host = MPI.Get_processor_name()
    mine = [dict(e, dp_rank=topo.dp_rank, tp_rank=topo.tp_rank, host=host) for e in pipe.timeline()]
    got = topo.world.gather((host, pipe.step_origin, mine), root=root)
    if got is None:
        return None
    if len({host for host, _, _ in got}) == 1:
        first = min(origin for _, origin, _ in got)
        return [[dict(e, start=e["start"] + origin - first, end=e["end"] + origin - first) for e in tl]
                for _, origin, tl in got]
    return [tl for _, _, tl in got]


def _compute(e: dict[str, Any]) -> bool:
    return e["kind"] in ("F", "B", "W")


def bubble_fraction(timelines: Sequence[Timeline]) -> tuple[float, list[float]]:
    """(mean over ranks, per rank) of ``1 - compute time / step time``; step = the longest rank's."""
    step = max((e["end"] for tl in timelines for e in tl), default=0.0)
    if step <= 0:
        return 0.0, [0.0] * len(timelines)
    per = [1.0 - sum(e["end"] - e["start"] for e in tl if _compute(e)) / step for tl in timelines]
    return sum(per) / len(per), per


def chrome_trace(timelines: Sequence[Timeline]) -> dict[str, Any]:
    """Trace Event Format: one process per rank, one slice per action, flow arrows send -> recv."""
    events: list[dict[str, Any]] = []
    sends: dict[tuple[Any, ...], dict[str, Any]] = {}
    recvs: dict[tuple[Any, ...], dict[str, Any]] = {}
    for tl in timelines:
        for e in tl:
            pid = e["world_rank"]
            events.append({"name": e["action"], "cat": e["kind"], "ph": "X", "pid": pid, "tid": 0,
                           "ts": e["start"] * 1e6, "dur": max(e["end"] - e["start"], 1e-7) * 1e6,
                           "args": {"stage": e["stage"], "microbatch": e["mb"], "pp_rank": e["rank"]}})
            column = (e.get("dp_rank", 0), e.get("tp_rank", 0))
            if e["kind"] == "SEND_F":
                sends[(*column, "F", e["stage"] + 1, e["mb"])] = e
            elif e["kind"] == "SEND_B":
                sends[(*column, "B", e["stage"] - 1, e["mb"])] = e
            elif e["kind"] == "RECV_F":
                recvs[(*column, "F", e["stage"], e["mb"])] = e
            elif e["kind"] == "RECV_B":
                recvs[(*column, "B", e["stage"], e["mb"])] = e
    for n, (key, s) in enumerate(sorted(sends.items(), key=lambda kv: kv[1]["start"])):
        r = recvs.get(key)
        if r is None:
            continue
        name = f"{key[2]} mb {key[4]}"
        mid = (s["start"] + s["end"]) / 2
        events.append({"name": name, "cat": "p2p", "ph": "s", "id": n, "pid": s["world_rank"], "tid": 0,
                       "ts": mid * 1e6})
        # the arrow ends where the receive completed (a receive slice includes its wait)
        end = min(r["end"], max(r["end"] - min(1e-6, (r["end"] - r["start"]) / 2), r["start"], mid))
        events.append({"name": name, "cat": "p2p", "ph": "f", "bp": "e", "id": n, "pid": r["world_rank"],
                       "tid": 0, "ts": end * 1e6})
    for tl in timelines:
        if tl:
            events.append({"name": "process_name", "ph": "M", "pid": tl[0]["world_rank"],
                           "args": {"name": f"rank {tl[0]['world_rank']} (pp {tl[0]['rank']})"}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(timelines: Sequence[Timeline], path: str | Path) -> Path:
    """Write :func:`chrome_trace` as JSON (open it in https://ui.perfetto.dev or chrome://tracing)."""
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(timelines)))
    return path


def plot_gantt(timelines: Sequence[Timeline], path: str | Path, title: str = "") -> Path:
    """PNG Gantt chart of one step: one row per rank, F/B/W coloured and labelled by micro-batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    step = max((e["end"] for tl in timelines for e in tl), default=1.0) * 1e3
    fig, ax = plt.subplots(figsize=(min(24, 6 + 0.12 * sum(len(tl) for tl in timelines) / max(1, len(timelines))),
                                    0.6 * len(timelines) + 1.4))
    for row, tl in enumerate(timelines):
        for e in tl:
            if not _compute(e):
                continue
            x0, width = e["start"] * 1e3, (e["end"] - e["start"]) * 1e3
            ax.broken_barh([(x0, width)], (row - 0.4, 0.8), facecolors=_COLORS[e["kind"]], edgecolor="white",
                           linewidth=0.3)
            if width > step / 80:
                ax.text(x0 + width / 2, row, f"{e['kind']}{e['mb']}", ha="center", va="center", fontsize=6,
                        color="white")
    mean, _ = bubble_fraction(timelines)
    ax.set_yticks(range(len(timelines)), [f"rank {tl[0]['world_rank']}" if tl else "" for tl in timelines])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step began")
    ax.set_title(f"{title}  (bubble {mean:.1%})".strip())
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLORS[k]) for k in ("F", "B", "W")]
    ax.legend(handles, ["forward", "backward (input grad, or full)", "weight grad"], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def calibrate(timelines: Sequence[Timeline], num_stages: int, cores: int | None = None,
              jitter: bool = True, placement: Sequence[int] = ()) -> CostModel:
    """A cost model from measured times: mean F, B, W per stage, mean send and receive overheads.

    Backwards with a W of their own are split halves (``b``, ``w``); the others are whole
    backwards (``CostModel.full``).  A stage the step never split gets halves priced from
    the stages it did split, so that the model also prices tables that split it (another
    m, another schedule): B's share of ``b + w`` over every split stage, times what a split
    costs over a whole backward on the stages that ran both (sums over stages; 1 if none
    did), times its own whole backward.  Without any split stage its ``b`` is the whole
    backward and ``w`` 0.

    With ``jitter`` the model also carries the step's relative action times (each F, B, W
    over the mean of its kind and stage), which the simulator draws from: the waits that
    variable times cause at every cross-rank dependency are part of the measured bubble.

    A receive's own cost is the mean duration of the receives that did not wait: those
    that started once their message had arrived (their shortest duration if none did).
    A message's ``latency`` is how much later than its send a waited receive (one that
    started before its send ended) completes, beyond a receive's own cost: the median of
    ``receive end - send end`` minus ``recv``.  A receive that started after its send
    ended but within the latency still waited for part of the transfer and is not a
    receive's own cost; the two estimates are refined together until that set settles.
    Sends and receives are matched within their (dp, tp) column.  The latency is 0 when
    no receive waited, when ``cores`` / ``placement`` say the ranks shared cores (a
    waited receive's lag is then mostly the wait for a core, which the shared-core model
    simulates itself), and when the timelines come from more than one host (their
    clocks are not aligned, :func:`gather`).  The executor's time between actions (the
    mean gap) becomes the ``overhead``.
    ``cores``: the CPU cores the ranks shared while measured.  When fewer than the ranks
    (or ``placement``, the core each rank was bound to, puts two ranks on one), every cost (F, B, W, send, receive and the gaps between actions) is the CPU time the
    executor recorded (wall-clock durations then include the time other ranks held the
    core) and the model shares ``cores`` between the ranks like the operating system did;
    ``poll`` is then the CPU the ranks used per second of waiting for a message (the
    receives that waited: their CPU over their wall time; it includes the receives' own
    small cost).  Without ``cores`` every cost is wall-clock time: with ranks sharing
    cores each action's time then includes its share of waiting for the core.
    """
    shared = cores_shared(cores, placement, len(timelines))
    per: dict[tuple[str, int], list[float]] = defaultdict(list)
    sends: list[float] = []
    recvs: list[float] = []
    pure: list[tuple[float, float]] = []  # receives that started after their send ended: (duration, lead)
    lags: list[float] = []  # receives that started before their send ended: end - the send's end
    polled = [0.0, 0.0]  # CPU and wall seconds of the receives that waited
    gaps: list[float] = []
    sent = {(*_column(e), Action(e["stage"], e["kind"], e["mb"])): e["end"] for tl in timelines for e in tl
            if e["kind"] in ("SEND_F", "SEND_B")}
    one_clock = len({e.get("host") for tl in timelines for e in tl}) <= 1
    split = {(e["stage"], e["mb"]) for tl in timelines for e in tl if e["kind"] == "W"}
    for tl in timelines:
        if shared and all("cpu_start" in e for e in tl):  # the executor's own CPU between actions
            gaps += [max(0.0, b["cpu_start"] - a["cpu_end"]) for a, b in zip(tl, tl[1:])]
        else:
            gaps += [max(0.0, b["start"] - a["end"]) for a, b in zip(tl, tl[1:])]
        for e in tl:
            d = e.get("cpu", e["end"] - e["start"]) if shared else e["end"] - e["start"]
            if _compute(e):  # an unsplit backward apart from a split one's B half
                kind = "full" if e["kind"] == "B" and (e["stage"], e["mb"]) not in split else e["kind"]
                per[(kind, e["stage"])].append(d)
            elif e["kind"].startswith("SEND"):
                sends.append(d)
            else:
                recvs.append(d)
                send_end = sent.get((*_column(e), Action(e["stage"], e["kind"], e["mb"]).matching_send()),
                                    float("inf"))
                if send_end <= e["start"]:
                    pure.append((d, e["start"] - send_end))
                else:
                    if send_end < float("inf"):
                        lags.append(e["end"] - send_end)
                    if shared and "cpu" in e:
                        polled[0] += e["cpu"]
                        polled[1] += e["end"] - e["start"]

    means = {key: sum(xs) / len(xs) for key, xs in per.items()}

    def mean(kind: str, s: int) -> float:
        return means.get((kind, s), 0.0)

    factors = [x / means[key] for key, xs in per.items() if jitter and len(xs) > 1 and means[key] > 0
               for x in xs]
    f = tuple(mean("F", s) for s in range(num_stages))
    w = tuple(mean("W", s) for s in range(num_stages))
    # a stage with only unsplit backwards: b is one backward and w 0 (priced below when
    # other stages were split); with only split ones, b and w are the halves; ``full`` is
    # the unsplit cost (with both kinds, interleaved-zb, not b + w)
    b = tuple(mean("B", s) if ("B", s) in means else mean("full", s) for s in range(num_stages))
    full = tuple(mean("full", s) if ("full", s) in means else b[s] + w[s] for s in range(num_stages))
    # a stage this step never split: halves priced from the stages it did split (what a
    # table that splits it, another m or schedule, needs; this step's own prediction never
    # asks for them): B's share of B + W over every split stage, and what splitting adds to
    # a whole backward over the stages that also ran whole ones (sums, not a mean of
    # ratios, so a near-empty stage cannot dominate)
    split_stages = [s for s in range(num_stages) if ("B", s) in means and ("W", s) in means]
    halves = sum(mean("B", s) + mean("W", s) for s in split_stages)
    if halves > 0:
        share_b = sum(mean("B", s) for s in split_stages) / halves
        mixed = [s for s in split_stages if ("full", s) in means]
        wholes = sum(mean("full", s) for s in mixed)
        dearer = sum(mean("B", s) + mean("W", s) for s in mixed) / wholes if wholes > 0 else 1.0
        b = tuple(b[s] if ("W", s) in means else full[s] * dearer * share_b for s in range(num_stages))
        w = tuple(w[s] if ("W", s) in means else full[s] * dearer * (1 - share_b) for s in range(num_stages))
    recv, latency = _receive_and_latency(pure, lags if one_clock and not shared else [], recvs)
    return CostModel(f=f, b=b, w=w, full=full, send=sum(sends) / len(sends) if sends else 0.0,
                     recv=recv, latency=latency, overhead=sum(gaps) / len(gaps) if gaps else 0.0,
                     cores=cores if shared else None, jitter=tuple(factors),
                     poll=min(0.9, polled[0] / polled[1]) if shared and polled[1] > 0 else 0.0,
                     placement=tuple(placement) if shared else ())


def _column(e: dict[str, Any]) -> tuple[int, int]:
    """The (dp, tp) column of a gathered event: its pipeline's messages stay inside it."""
    return e.get("dp_rank", 0), e.get("tp_rank", 0)


def _receive_and_latency(pure: Sequence[tuple[float, float]], lags: Sequence[float],
                         recvs: Sequence[float]) -> tuple[float, float]:
    """A receive's own cost and a message's latency (see :func:`calibrate`; no ``lags``:
    latency 0).

    ``pure``: (duration, time since the send ended) of the receives that started after
    their send ended.  One that started within ``latency`` of it still waited for part of
    the transfer, so the receive's cost is the mean over those that started at least
    ``latency`` after (their shortest duration if none did), and ``latency`` the median
    lag minus that cost; repeated until the latency stops changing (the set of such
    receives has settled; at most ``len(pure) + 2`` rounds).  Without receives that
    started after their send, the shortest receive is the cost (an upper bound: it
    includes a wait).
    """
    def own_cost(latency: float) -> float:
        clean = [d for d, lead in pure if lead >= latency]
        if clean:
            return sum(clean) / len(clean)
        return min(d for d, _ in pure) if pure else (min(recvs) if recvs else 0.0)

    latency = 0.0
    recv = own_cost(latency)
    if not lags:
        return recv, 0.0
    lag = statistics.median(lags)
    for _ in range(len(pure) + 2):
        settled = max(0.0, lag - recv)
        if settled == latency:
            break
        latency = settled
        recv = own_cost(latency)
    return recv, latency


def predict(table: Sequence[Sequence[Any]], cost: CostModel, num_microbatches: int) -> float:
    """Predicted bubble fraction of ``table`` on ``cost`` (mean over ranks)."""
    return simulate(table, cost, num_microbatches).bubble


QUANTA = tuple(ms / 1000 for ms in (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20, 25, 30, 40, 50, 60, 80,
                                    100, 150, 200))


def fit_quantum(timelines: Sequence[Timeline], table: Sequence[Sequence[Any]], num_stages: int,
                num_microbatches: int, cores: int, placement: Sequence[int] = ()) -> float:
    """The operating system's effective time slice, fitted on one measured step.

    With more ranks than cores the measured bubble depends on how long a running rank
    keeps its core before a rank that became ready gets it (measured here: about one
    pipeline action, tens of milliseconds, far longer than the scheduler's nominal slice).
    Fit it once on a calibration step (the ``quantum`` in :data:`QUANTA` whose simulated
    bubble is closest to the measured one), then predict other schedules and
    micro-batch counts with it: a machine constant, like latency and bandwidth.  Fit it
    on a step whose bubble depends on it (GPipe with m >= 2p: at 1F1B with m = 2p the
    simulated bubble hardly moves between slices of 12 and 200 ms, so the fit there is
    the noise's).  ``placement`` as in :func:`calibrate`.
    """
    cost = calibrate(timelines, num_stages, cores=cores, placement=placement)
    measured = bubble_fraction(timelines)[0]
    return min(QUANTA, key=lambda q: abs(simulate(table, dataclasses.replace(cost, quantum=q),
                                                  num_microbatches).bubble - measured))
