# Throughput:  timeout 1800 mpirun --oversubscribe -n 2 .venv/bin/python bench/bench_pipeline.py
# Bubble p=4:  timeout 1800 mpirun --oversubscribe -n 4 .venv/bin/python bench/bench_pipeline.py --bubble-only
# Plot:        .venv/bin/python bench/bench_pipeline.py --plot   (reads bench/results/pipeline_p*.json)
# B/W split:   .venv/bin/python bench/bench_pipeline.py --split-only   (one process)
# Elision A/B: timeout 1800 mpirun --oversubscribe -n 2 .venv/bin/python bench/bench_pipeline.py --throughput-only --framed-peer
"""Pipeline benchmark: mpimp schedules vs torch.distributed.pipelining.Schedule1F1B (gloo).

Model: a plain-torch GPT, 8 transformer blocks, d_model 256, 4 heads, sequence 128,
vocabulary 256, as 10 layers (embedding, 8 blocks, head) split 5/5 over 2 ranks (the
interleaved schedules, ``[3, 2, 2, 3]``, keep those layers per rank; ``zb-v``'s V keeps 4
blocks per rank with the embedding and the head both on rank 0):
    16 sequences x 128 tokens = 2,048 tokens per step, in 8 micro-batches of 2 sequences.
Contenders run side by side in one invocation, in alternating rounds, 1 torch thread
per rank; each step is forward + backward (no optimizer, identical for all).
All contenders share each rank's process, so ``mpimp.init``'s kept heap (``mpimp.hostmem``:
no page faults from memory glibc trimmed and hands out again) holds for the torch peer and
the single process as well (``MPIMP_KEEP_HEAP=0`` runs every contender without it).
Speed of light: 2 x the tokens/s of the whole model on one rank (1 thread) over the same
8 micro-batches.  For ``1f1b``, ``interleaved-zb`` and ``zb-v`` the throughput run also reports what
bounds the step (:func:`ceiling`): each rank's compute from the timeline, the fill before
rank 1's first compute action, and the step with no other idle time, against the speed of
light and the torch peer timed in the same rounds.  Then, for each schedule and m,
the measured bubble of a step (from the executor's timeline) against the simulator's
prediction on a cost model calibrated from that timeline (medians over the traced steps;
since each step's model predicts every step of its configuration alike, the median
prediction does not depend on which step calibrated which), and, out of sample, the
prediction from the costs calibrated at m = 8 for every other m.  With more ranks than the node's cores (p = 4 on 2 cores) the ranks
are bound to cores, rank r to core r % cores (adjacent stages on different cores), and a
second prediction comes from the actions' CPU times alone, the simulator sharing the
cores between the ranks itself (``CostModel.cores`` / ``placement``, the time slice
fitted once on a calibration step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mpi4py import MPI  # noqa: E402
from torch import nn  # noqa: E402

import mpimp  # noqa: E402
from mpimp import trace  # noqa: E402
from mpimp.schedule import COMPUTE, default_virtual_stages, simulate  # noqa: E402

torch.set_num_threads(1)
RESULTS = Path(__file__).parent / "results"
BUBBLE_SCHEDULES = ("gpipe", "1f1b", "zb-h1", "interleaved-1f1b", "interleaved-zb", "zb-v")
VOCAB, SEQ, D, HEADS, BLOCKS = 256, 128, 256, 4, 8
TRANSFER_FROM = 8  # the m whose calibrated costs also predict the other m's bubbles


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(SEQ, D)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1]))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.lm = nn.Linear(D, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(self.ln(x))


def gpt_layers(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [Embed()] + [Block() for _ in range(BLOCKS)] + [Head()]


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def timed(world: MPI.Comm, fn, steps: int) -> float:
    """Seconds per step (max over ranks), after one untimed warm-up step.

    The barriers sleep while they wait (mpimp.barrier), so an idle rank does not steal the
    core of a computing one (MPI_Barrier spins: the single-process run took 2x longer).
    """
    fn()
    mpimp.barrier(world)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    mpimp.barrier(world)
    return world.allreduce(time.perf_counter() - t0, op=MPI.MAX) / steps


def torch_peer(world: MPI.Comm, layers: list[nn.Module], balance: list[int], m: int):
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    rank = world.Get_rank()
    if not dist.is_initialized():
        port = world.bcast(29500 + (os.getpid() % 2000) if rank == 0 else None)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world.Get_size())
    start = sum(balance[:rank])
    stage = PipelineStage(nn.Sequential(*layers[start:start + balance[rank]]), rank, world.Get_size(),
                          torch.device("cpu"))
    return Schedule1F1B(stage, n_microbatches=m, loss_fn=loss_fn)


def throughput(world: MPI.Comm, rounds: int, steps: int, framed_peer: bool = False) -> dict:
    p, rank = world.Get_size(), world.Get_rank()
    m, nseq = 8, 16
    x, y = batch(nseq)
    tokens = nseq * SEQ
    topo = mpimp.init(pp=p, comm=world)
    balance = [5, 5]
    contenders = {}
    pipes = {}
    for name, kw in (("mpimp 1f1b", dict(schedule="1f1b", balance=balance)),
                     ("mpimp gpipe", dict(schedule="gpipe", balance=balance)),
                     ("mpimp zb-h1", dict(schedule="zb-h1", balance=balance)),
                     ("mpimp interleaved-1f1b v=2", dict(schedule="interleaved-1f1b", virtual_stages=2,
                                                         balance=[3, 2, 2, 3])),
                     ("mpimp interleaved-zb v=2", dict(schedule="interleaved-zb", virtual_stages=2,
                                                       balance=[3, 2, 2, 3])),
                     # the V: rank 0 embedding + 2 blocks | 2 blocks + head, rank 1 2 | 2 blocks
                     ("mpimp zb-v", dict(schedule="zb-v", virtual_stages=2, balance=[3, 2, 2, 3])),
                     # rank 0: embedding + 4 blocks, rank 1: 4 blocks + head, as for v = 2
                     ("mpimp interleaved-1f1b v=4", dict(schedule="interleaved-1f1b", virtual_stages=4,
                                                         balance=[2, 1, 1, 1, 1, 1, 1, 2])),
                     ("mpimp interleaved-1f1b v=5", dict(schedule="interleaved-1f1b", virtual_stages=5,
                                                         balance=[1] * 10))):
        pipe = mpimp.Pipeline(gpt_layers(), topo, chunks=m, loss_fn=loss_fn, **kw)
        pipes[name] = pipe
        contenders[name] = (lambda pipe=pipe: pipe.train_step(x, y))
    if framed_peer:  # the same v = 2 pipeline with every stage message framed (no header elided)
        from mpimp import comm as transport
        framed = mpimp.Pipeline(gpt_layers(), topo, chunks=m, loss_fn=loss_fn, schedule="interleaved-1f1b",
                                virtual_stages=2, balance=[3, 2, 2, 3])
        pipes["mpimp interleaved-1f1b v=2, headers framed"] = framed

        def framed_step() -> None:
            transport._ELIDE = False  # this rank's sends carry their header; receivers read both
            try:
                framed.train_step(x, y)
            finally:
                transport._ELIDE = True
        contenders["mpimp interleaved-1f1b v=2, headers framed"] = framed_step
    sched = torch_peer(world, gpt_layers(), balance, m)

    def torch_step() -> None:
        if rank == 0:
            sched.step(x)
        else:
            sched.step(target=y, losses=[])
    contenders["torch Schedule1F1B (gloo)"] = torch_step
    full = nn.Sequential(*gpt_layers()) if rank == 0 else None

    def sol_step() -> None:  # whole model on rank 0, same 8 micro-batches; rank 1 waits
        if full is not None:
            for xi, yi in zip(x.chunk(m), y.chunk(m)):
                (loss_fn(full(xi), yi) / m).backward()
    contenders["single process (x2 = speed of light)"] = sol_step
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(rounds):
        for name, fn in (list(contenders.items()) if r % 2 == 0 else list(reversed(contenders.items()))):
            times[name].append(timed(world, fn, steps))
    peaks = {name: world.gather(pipe.peak_inflight) for name, pipe in pipes.items()}
    limits = {name: ceiling(world, pipes[name], x, y, torch_step, sol_step)
              for name in ("mpimp 1f1b", "mpimp interleaved-zb v=2", "mpimp zb-v")}
    out = {"p": p, "m": m, "tokens_per_step": tokens, "rounds": rounds, "steps": steps,
           "seconds_per_step": {k: statistics.median(v) for k, v in times.items()}, "peak_inflight": peaks,
           "seconds_per_round": times, "ceiling": limits}
    # paired: each round's ratio against the peers timed next to it (the machine's speed
    # drifts by 10-20% within a minute; pairing removes the drift a ratio of medians keeps)
    sol, peer = times["single process (x2 = speed of light)"], times["torch Schedule1F1B (gloo)"]
    out["paired_median"] = {k: {"vs_torch": statistics.median(b / a for a, b in zip(v, peer)),
                                "vs_speed_of_light": statistics.median(s / 2 / a for a, s in zip(v, sol))}
                            for k, v in times.items()}
    sps = out["seconds_per_step"]
    tps = {k: tokens / v for k, v in sps.items()}
    tps["speed of light"] = 2 * tps.pop("single process (x2 = speed of light)")
    out["tokens_per_s"] = tps
    for pipe in pipes.values():
        pipe.close()
    topo.free()
    return out


def ceiling(world: MPI.Comm, pipe: mpimp.Pipeline, x: torch.Tensor, y: torch.Tensor,
            torch_step: Callable[[], None], sol_step: Callable[[], None], rounds: int = 5) -> dict | None:
    """What bounds a schedule's step here, from its timeline; medians over ``rounds``
    rounds, each an untimed step of the pipeline (as ``timed`` warms up every contender),
    one traced step, then one timed step each of the torch peer and the single process,
    so that every ratio pairs numbers of the same round.

    ``compute``: each rank's F, B and W time; ``start``: when its first compute action
    began (the fill: rank 1 waits for stage 0's first forward); ``ceiling``: the step if
    no rank idled after that, ``max_r(start_r + compute_r)``; ``span``: the traced step.
    ``inflation``: the ranks' compute over the single process's step for the same work
    (both cores busy, more micro-batches in flight).  None off rank 0.
    """
    rows = []
    for _ in range(rounds):
        pipe.train_step(x, y)
        mpimp.barrier(world)
        pipe.train_step(x, y)
        tls = trace.gather(pipe)
        peer, sol = timed(world, torch_step, 1), timed(world, sol_step, 1)
        if tls is not None:
            comp = [[e for e in tl if e["kind"] in COMPUTE] for tl in tls]
            compute = [sum(e["end"] - e["start"] for e in c) for c in comp]
            start = [min(e["start"] for e in c) for c in comp]
            span = max(e["end"] for tl in tls for e in tl) - min(e["start"] for tl in tls for e in tl)
            rows.append({"compute": compute, "start": start, "span": span, "torch": peer, "sol": sol,
                         "ceiling": max(s + c for s, c in zip(start, compute))})
    if not rows:
        return None

    def med(f: Callable[[dict], float]) -> float:
        return statistics.median(f(r) for r in rows)
    ranks = len(rows[0]["compute"])
    return {"compute": [med(lambda r, k=k: r["compute"][k]) for k in range(ranks)],
            "start": [med(lambda r, k=k: r["start"][k]) for k in range(ranks)],
            "ceiling": med(lambda r: r["ceiling"]), "span": med(lambda r: r["span"]),
            "span_over_ceiling": med(lambda r: r["span"] / r["ceiling"]),
            "vs_torch": med(lambda r: r["torch"] / r["span"]),
            "ceiling_vs_torch": med(lambda r: r["torch"] / r["ceiling"]),
            "ceiling_vs_light": med(lambda r: r["sol"] / 2 / r["ceiling"]),
            "inflation": med(lambda r: sum(r["compute"]) / r["sol"]), "rounds": rows}


def fit_quantum(world: MPI.Comm, topo: mpimp.Topology, cores: int, placement: tuple[int, ...]) -> float:
    """With more ranks than cores: the scheduler's effective time slice, fitted once on a
    GPipe step with m = 12 (a calibration step, not one of the measured points; GPipe's
    bubble depends on the slice, 1F1B's hardly above 12 ms)."""
    m = 12
    x, y = batch(2 * m, seed=99)
    pipe = mpimp.Pipeline(gpt_layers(), topo, chunks=m, loss_fn=loss_fn, schedule="gpipe")
    pipe.train_step(x, y)
    mpimp.barrier(world)
    pipe.train_step(x, y)
    tls = trace.gather(pipe)
    q = trace.fit_quantum(tls, pipe.compute_table, pipe.num_stages, m, cores, placement) if world.Get_rank() == 0 else 0.0
    pipe.close()
    return world.bcast(q)


def bind_to_cores(world: MPI.Comm) -> tuple[int, tuple[int, ...]]:
    """With more ranks than cores, bind rank r to core r % cores (adjacent pipeline stages on
    different cores); returns the cores and every rank's core index (empty: not bound).
    The cores are the union of the ranks' CPU masks, so every rank agrees on them; ranks
    the launcher already bound to one core each keep their binding.  Unbound, the operating
    system moves ranks between cores and the measured p = 4 bubble moved by up to 7 points
    between runs (docs/benchmarks.md)."""
    masks = world.allgather(sorted(os.sched_getaffinity(0)))
    allowed = sorted(set().union(*masks))
    cores, p = len(allowed), world.Get_size()
    if p <= cores:
        return cores, ()
    if all(len(mask) == 1 for mask in masks):
        return cores, tuple(allowed.index(mask[0]) for mask in masks)
    os.sched_setaffinity(0, {allowed[world.Get_rank() % cores]})
    return cores, tuple(r % cores for r in range(p))


def bubbles(world: MPI.Comm, ms: list[int], steps: int) -> list[dict]:
    p = world.Get_size()
    topo = mpimp.init(pp=p, comm=world)
    cores, placement = bind_to_cores(world)
    quantum = fit_quantum(world, topo, cores, placement) if p > cores else 0.0
    if world.Get_rank() == 0 and p > cores:
        print(f"  {p} ranks on {cores} cores, bound to cores {list(placement)}: effective time slice "
              f"fitted on a calibration step (gpipe, m=12): {quantum * 1e3:g} ms", flush=True)
    rows = []
    for schedule in BUBBLE_SCHEDULES:
        costs: dict[int, list] = {}  # m -> each traced step's calibrated cost model
        tables: dict[int, list] = {}
        for m in ms:
            v = default_virtual_stages(schedule)
            if schedule.startswith("interleaved") and m % p:
                continue
            x, y = batch(2 * m, seed=m)  # micro-batches of 2 sequences
            pipe = mpimp.Pipeline(gpt_layers(), topo, chunks=m, loss_fn=loss_fn, schedule=schedule,
                                  virtual_stages=v)
            pipe.train_step(x, y)  # warm-up
            measured, predicted, shared = [], [], []
            for _ in range(steps):
                mpimp.barrier(world)
                pipe.train_step(x, y)
                tls = trace.gather(pipe)
                if world.Get_rank() == 0:
                    measured.append(trace.bubble_fraction(tls)[0])
                    # the prediction: F, B, W, message and executor times of this step (wall clock:
                    # with ranks sharing cores, each action's time includes its share of waiting
                    # for the core), the simulator running the schedule's dependencies on them
                    cost = trace.calibrate(tls, pipe.num_stages)
                    costs.setdefault(m, []).append(cost)
                    tables[m] = pipe.compute_table
                    predicted.append(simulate(pipe.compute_table, cost, m).bubble)
                    if p > cores:  # and from CPU times, the simulator sharing the cores itself
                        cost = trace.calibrate(tls, pipe.num_stages, cores=cores, placement=placement)
                        shared.append(simulate(pipe.compute_table, dataclasses.replace(cost, quantum=quantum), m).bubble)
                    if schedule in ("1f1b", "zb-h1") and m == 8 and _ == steps - 1:
                        RESULTS.mkdir(exist_ok=True)
                        trace.write_chrome_trace(tls, RESULTS / f"pipeline_{schedule}_p{p}_m{m}.json")
                        trace.plot_gantt(tls, RESULTS / f"pipeline_{schedule}_p{p}_m{m}.png",
                                         title=f"{schedule}, p={p}, m={m}")
            if world.Get_rank() == 0:
                meas, pred = statistics.median(measured), statistics.median(predicted)
                row = {"schedule": schedule, "p": p, "m": m, "v": v, "measured": meas, "predicted": pred,
                       "rel_error": abs(pred - meas) / meas if meas else math.nan}
                line = (f"  {schedule:<17} m={m:<3} measured bubble {meas:6.1%}  predicted {pred:6.1%}  "
                        f"rel. error {row['rel_error']:5.1%}")
                if shared:
                    sh = statistics.median(shared)
                    row.update(predicted_shared=sh, rel_error_shared=abs(sh - meas) / meas if meas else math.nan,
                               quantum=quantum, placement=list(placement))
                    line += f"  | shared-core model {sh:6.1%} ({row['rel_error_shared']:5.1%})"
                rows.append(row)
                print(line, flush=True)
            pipe.close()
        if world.Get_rank() == 0 and TRANSFER_FROM in costs:
            # out of sample: the costs measured at m = TRANSFER_FROM predict the other m (run
            # minutes apart); its own m is the in-sample prediction above
            own = [r for r in rows if r["schedule"] == schedule and r["m"] != TRANSFER_FROM]
            for row in own:
                m, meas = row["m"], row["measured"]
                pred = statistics.median(simulate(tables[m], c, m).bubble for c in costs[TRANSFER_FROM])
                row.update(transfer_from=TRANSFER_FROM, predicted_transfer=pred,
                           rel_error_transfer=abs(pred - meas) / meas if meas else math.nan)
            print(f"  {schedule:<17} from m={TRANSFER_FROM}'s costs: " + "  ".join(
                f"m={r['m']} {r['predicted_transfer']:6.1%} ({r['rel_error_transfer']:5.1%})" for r in own), flush=True)
    topo.free()
    return rows


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the latest run per p (``pipeline_p{p}.json``), not the dated copies
    files = sorted((f for f in RESULTS.glob("pipeline_p*.json") if re.fullmatch(r"pipeline_p\d+\.json", f.name)),
                   key=lambda f: int(f.stem[len("pipeline_p"):]))
    fig, axes = plt.subplots(1, len(files), figsize=(5.5 * len(files), 4), squeeze=False)
    for ax, path in zip(axes[0], files):
        data = json.loads(path.read_text())
        for i, schedule in enumerate(BUBBLE_SCHEDULES):
            rows = [r for r in data["bubbles"] if r["schedule"] == schedule]
            if not rows:
                continue
            ms = [r["m"] for r in rows]
            color = f"C{i}"
            ax.plot(ms, [r["measured"] for r in rows], "o-", color=color, label=f"{schedule} measured")
            ax.plot(ms, [r["predicted"] for r in rows], "x--", color=color, label=f"{schedule} predicted")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("micro-batches m")
        ax.set_ylabel("bubble fraction")
        bound = next((r["placement"] for r in data["bubbles"] if r.get("placement")), None)
        ax.set_title(f"p = {data['p']}" + (f" on {1 + max(bound)} cores, rank r on core r % {1 + max(bound)}"
                                          if bound else "") + (f" ({data['bubbles_at']})" if "bubbles_at" in data else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(__file__).parent.parent / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "pipeline_bubble.png", dpi=120)
    print(f"wrote {out / 'pipeline_bubble.png'}")


def split_cost(rounds: int) -> dict:
    """What splitting the backward costs: the second stage (4 blocks + head + loss) on one
    rank, m = 8, as ``1f1b`` (one full backward per micro-batch) and as ``zb-h1`` (B, then
    W), alternating; seconds of backward work per step from the executor's timeline."""
    topo = mpimp.init(pp=1, comm=MPI.COMM_SELF)
    x, y = batch(16)
    stage = gpt_layers()[5:]
    h = torch.randn(x.shape[0], SEQ, D, generator=torch.Generator().manual_seed(1))  # as the first stage's output
    pipes = {name: mpimp.Pipeline([copy.deepcopy(layer) for layer in stage], topo, chunks=8, loss_fn=loss_fn,
                                  schedule=name) for name in ("1f1b", "zb-h1")}
    backward: dict[str, list[float]] = {name: [] for name in pipes}
    for r in range(rounds + 1):
        for name in (list(pipes) if r % 2 == 0 else list(reversed(list(pipes)))):
            pipes[name].train_step(h, y)
            if r:  # the first round warms up
                backward[name].append(sum(e["end"] - e["start"] for e in pipes[name].timeline()
                                          if e["kind"] in ("B", "W")))
    out = {name: statistics.median(v) for name, v in backward.items()}
    print(f"backward work per step (median of {rounds}): full {out['1f1b'] * 1e3:.0f} ms, "
          f"B + W {out['zb-h1'] * 1e3:.0f} ms ({out['zb-h1'] / out['1f1b']:.3f}x); per round "
          + " ".join(f"{b / a:.3f}" for a, b in zip(backward["1f1b"], backward["zb-h1"])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bubble-only", action="store_true")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("--split-only", action="store_true", help="B + W against one full backward, one process")
    ap.add_argument("--framed-peer", action="store_true",
                    help="add interleaved v = 2 with every stage message framed (header elision off)")
    args = ap.parse_args()
    if args.plot:
        plot()
        return
    if args.split_only:
        split_cost(max(args.rounds, 5))
        return
    world = MPI.COMM_WORLD
    p, rank = world.Get_size(), world.Get_rank()
    result: dict = {"p": p}
    if not args.bubble_only:
        if p != 2:
            sys.exit("the throughput comparison runs on 2 ranks; use --bubble-only for other sizes")
        result["throughput"] = tp = throughput(world, args.rounds, args.steps, args.framed_peer)
        if rank == 0:
            t = tp["tokens_per_s"]
            peer = t["torch Schedule1F1B (gloo)"]
            print(f"p=2, m=8, {tp['tokens_per_step']} tokens/step, median of {args.rounds} alternating rounds "
                  f"x {args.steps} steps")
            paired = tp["paired_median"]
            for name, value in t.items():
                pair = paired.get(name)
                extra = "" if pair is None else (f"   paired: {pair['vs_torch']:5.2f}x torch, "
                                                 f"{pair['vs_speed_of_light']:5.2f}x light")
                print(f"  {name:<32} {value:9.0f} tokens/s   {value / peer:5.2f}x torch 1F1B   "
                      f"{value / t['speed of light']:5.2f}x speed of light{extra}", flush=True)
            print(f"  peak in-flight micro-batches per rank: {tp['peak_inflight']}")
            for name, c in tp["ceiling"].items():
                # (the traced rounds run slower than the alternating ones, the torch peer too, and
                # not by the same factor: the ceiling against torch is the measured ratio scaled
                # by the traced step's own step / ceiling)
                c["projected_vs_torch"] = paired[name]["vs_torch"] * c["span_over_ceiling"]
                print(f"  {name}: compute per rank {[round(v * 1e3, 1) for v in c['compute']]} ms "
                      f"({c['inflation']:.3f}x the single process's), first compute at "
                      f"{[round(v * 1e3, 1) for v in c['start']]} ms; ceiling {c['ceiling'] * 1e3:.1f} ms = "
                      f"{c['ceiling_vs_light']:.3f}x light, {c['ceiling_vs_torch']:.3f}x torch; in the same rounds "
                      f"the step {c['span'] * 1e3:.1f} ms = {c['vs_torch']:.3f}x torch, "
                      f"{c['span_over_ceiling']:.3f}x the ceiling; the ceiling projected onto the paired "
                      f"ratio: {c['projected_vs_torch']:.3f}x torch")
    if args.throughput_only:
        if rank == 0:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"pipeline_throughput_{time.strftime('%Y%m%d_%H%M')}.json").write_text(json.dumps(result, indent=1))
        return
    ms = [4, 8, 16] if p > 2 else [2, 4, 8, 16]
    if rank == 0:
        print(f"bubble, p={p}: measured (timeline) vs predicted (simulator on the calibrated cost model)")
    started = time.localtime()
    result["bubbles"] = bubbles(world, ms, args.steps)
    result["bubbles_at"] = time.strftime("%Y-%m-%d %H:%M", started)
    if rank == 0:
        RESULTS.mkdir(exist_ok=True)
        # this run alone, under its start time (a later run in the same minute adds seconds)
        dated = RESULTS / f"pipeline_p{p}_{time.strftime('%Y%m%d_%H%M', started)}.json"
        if dated.exists():
            dated = RESULTS / f"pipeline_p{p}_{time.strftime('%Y%m%d_%H%M%S', started)}.json"
        dated.write_text(json.dumps(result, indent=1))
        path = RESULTS / f"pipeline_p{p}.json"  # the latest run (the plot's), merged into the kept figures
        if path.exists() and args.bubble_only:
            old = json.loads(path.read_text())
            result = {**old, **result}
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path} and {dated}")
    if "throughput" in result:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
