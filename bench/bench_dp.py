"""Data parallelism: mpimp DataParallel vs torch DDP (gloo), 16-bit all-reduce, ZeRO-1 state.

    OMP_NUM_THREADS=1 timeout 1200 .venv/bin/mpirun --oversubscribe -n 2 \\
        .venv/bin/python bench/bench_dp.py --rounds 10 --steps 1
    OMP_NUM_THREADS=1 timeout 900 .venv/bin/mpirun --oversubscribe -n 4 \\
        .venv/bin/python bench/bench_dp.py --parts allreduce,zero

Three measurements, one torch thread per rank, peers alternating in one invocation:

* ``dp``: tokens/s of the GPT of the tensor benchmark (8 blocks, d_model 256, 4 heads,
  sequence 128, vocabulary 256, untied head; global batch 16 = 16 x 128 = 2,048 tokens
  per step, 16/dp sequences per rank) under ``mpimp.DataParallel`` (fp32 and bf16 on the
  wire; fp32 through MPI collectives, the default, with ``.grad`` as views into the
  buckets, ``mpimp-views``, and through the opt-in shared-memory window of mpimp.shm,
  ``mpimp-shm``) and under
  ``torch.nn.parallel.DistributedDataParallel`` on gloo.  Both wrap the
  same module class with the same weights (checked: equal first losses); a step is
  forward, backward, SGD update.  Rounds alternate the order of the peers.
  ``--keep-grads`` adds both with ``.grad`` as views into their buckets and
  ``zero_grad(set_to_none=False)`` (``mpimp-views-keep``, ``ddp-views-keep``): autograd then
  accumulates straight into the buckets, neither copies a gradient.
* ``allreduce``: wall time of ``mpimp.all_reduce`` of 16M (``--elements``) bf16 elements
  (native fp32-accumulating operator) against 16M fp32 elements, alternating, median.
* ``zero``: optimizer-state bytes per rank of ``mpimp.ShardedOptimizer(AdamW)`` over the
  same GPT after one step, against the unsharded AdamW's total / dp.
* ``overhead`` (opt-in): where DataParallel's time goes.  Backward of the same model and
  batch, interleaved: under ``no_sync`` (compute only), synchronised, and synchronised
  with the all-reduce replaced by a no-op (so the remainder is bucket copies and the
  rendezvous); plus the per-step time of the copies into the buckets and back.

Not a test: no assertions on timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mpi4py import MPI  # noqa: E402

import mpimp  # noqa: E402
from mpimp.models import GPT, GPTConfig  # noqa: E402

torch.set_num_threads(1)

# 16 sequences x 128 tokens = 2,048 tokens per step (global)
CFG = GPTConfig(vocab_size=256, seq_len=128, d_model=256, n_heads=4, n_layers=8, tied_embeddings=False)


def median_time(fn, world: MPI.Comm, repeat: int, cpu: list[float] | None = None) -> list[float]:
    """Wall time of each call (slowest rank); with ``cpu``, also append the slowest rank's
    process CPU time (all threads: gloo's included), which time-sharing with other jobs
    on the machine inflates far less than wall time."""
    out = []
    for _ in range(repeat):
        world.Barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        out.append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        if cpu is not None:
            cpu.append(world.allreduce(time.process_time() - c0, op=MPI.MAX))
    return out


def bench_dp(args: argparse.Namespace, world: MPI.Comm) -> None:
    rank, size = world.Get_rank(), world.Get_size()
    port = world.bcast(29600 + os.getpid() % 1000 if rank == 0 else None, root=0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    topo = mpimp.init()  # dp = size
    one = mpimp.init(comm=MPI.COMM_SELF)  # the module itself is not tensor-parallel
    torch.manual_seed(0)
    base = GPT(CFG, one)
    state = base.state_dict()

    def fresh() -> GPT:
        torch.manual_seed(0)
        m = GPT(CFG, one)
        m.load_state_dict(state)
        return m

    peers = {
        "mpimp": mpimp.DataParallel(fresh(), topo),  # the default: MPI collectives
        "mpimp-views": mpimp.DataParallel(fresh(), topo, gradient_as_bucket_view=True),
        "mpimp-shm": mpimp.DataParallel(fresh(), topo, shm=True),  # the opt-in shared-memory all-reduce
        "mpimp-bf16": mpimp.DataParallel(fresh(), topo, reduce_dtype="bf16"),
        "ddp-gloo": torch.nn.parallel.DistributedDataParallel(fresh()),
        "no-comm": mpimp.DataParallel(fresh(), topo),  # run under no_sync(): compute only
    }
    keep = set()  # peers whose .grad stays allocated between steps (zero_grad(set_to_none=False))
    if args.keep_grads:  # both with .grad as views into their buckets, zeroed in place: no copies
        peers["mpimp-views-keep"] = mpimp.DataParallel(fresh(), topo, gradient_as_bucket_view=True)
        peers["ddp-views-keep"] = torch.nn.parallel.DistributedDataParallel(fresh(), gradient_as_bucket_view=True)
        keep = {"mpimp-views-keep", "ddp-views-keep"}
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (args.batch, CFG.seq_len), generator=g)
    tgt = torch.randint(0, CFG.vocab_size, (args.batch, CFG.seq_len), generator=g)
    lidx, ltgt = mpimp.data_parallel.split_batch((idx, tgt), topo)
    tokens = idx.numel()
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in peers.items()}
    first = {}

    def stepper(name: str):
        model, opt = peers[name], opts[name]

        def step() -> None:
            opt.zero_grad(set_to_none=name not in keep)
            loss = model(lidx, ltgt)
            if name == "no-comm":
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
            opt.step()
            first.setdefault(name, loss.item())
        return step

    steps = {k: stepper(k) for k in peers}
    for fn in steps.values():  # warm-up (and the first losses, from identical weights)
        fn()
    if max(first.values()) - min(first.values()) > 1e-5:
        raise SystemExit(f"the peers disagree before training: {first}")
    rates: dict[str, list[float]] = {k: [] for k in peers}
    cpu_rates: dict[str, list[float]] = {k: [] for k in peers}
    for r in range(args.rounds):
        order = list(peers)
        if r % 2:
            order.reverse()
        for name in order:
            cpu: list[float] = []
            dt = sum(median_time(steps[name], world, args.steps, cpu))
            rates[name].append(args.steps * tokens / dt)
            cpu_rates[name].append(args.steps * tokens / sum(cpu))
    if rank == 0:
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"== dp={size}: GPT 8 x d256, global batch {args.batch} x {CFG.seq_len} = {tokens} tokens/step, "
              f"{args.rounds} rounds x {args.steps} steps, alternating")
        for k, v in rates.items():
            print(f"{k:11s} tokens/s median {med[k]:7.0f}   rounds: {' '.join(f'{x:.0f}' for x in v)}")
        print(f"mpimp transport: {'shared memory' if peers['mpimp'].shared_memory else 'MPI'}")
        pairs = [(k, "ddp-gloo") for k in ("mpimp", "mpimp-views", "mpimp-shm", "mpimp-bf16", "no-comm")]
        if keep:
            pairs += [("mpimp-views-keep", "ddp-gloo"), ("mpimp-views-keep", "ddp-views-keep"),
                      ("ddp-views-keep", "ddp-gloo")]
        for k, ref in pairs:
            per_round = [a / b for a, b in zip(rates[k], rates[ref])]  # neighbours in time
            print(f"ratio {k} / {ref}: medians {med[k] / med[ref]:.2f}x, per-round median "
                  f"{statistics.median(per_round):.2f}x  ({' '.join(f'{x:.2f}' for x in per_round)})")
        cmed = {k: statistics.median(v) for k, v in cpu_rates.items()}
        print("tokens per CPU-second (slowest rank, all threads): "
              + "  ".join(f"{k} {cmed[k]:.0f}" for k in peers)
              + f";  mpimp / ddp-gloo {cmed['mpimp'] / cmed['ddp-gloo']:.2f}x, "
              f"mpimp-bf16 / ddp-gloo {cmed['mpimp-bf16'] / cmed['ddp-gloo']:.2f}x")
        step = {k: tokens / v for k, v in med.items()}
        print("step time over compute only (exposed gradient communication): "
              + "  ".join(f"{k} {1000 * (step[k] - step['no-comm']):+.0f} ms" for k in peers if k != "no-comm"))
    # the gradient all-reduce alone: one buffer of all the parameters, mpimp vs gloo, alternating
    flat = torch.randn(sum(p.numel() for p in base.parameters()))
    comm = topo.dp_comm
    alone: dict[str, list[float]] = {"mpimp": [], "gloo": []}
    for r in range(2 * args.rounds):
        order = ["mpimp", "gloo"] if r % 2 == 0 else ["gloo", "mpimp"]
        for k in order:
            fn = (lambda: mpimp.all_reduce(flat, comm)) if k == "mpimp" else (lambda: dist.all_reduce(flat))
            alone[k] += median_time(fn, world, 1)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in alone.items()}
        print(f"all-reduce of the {flat.numel() * 4 / 2**20:.1f} MiB fp32 gradient alone: "
              f"mpimp {1000 * med['mpimp']:.1f} ms, gloo {1000 * med['gloo']:.1f} ms "
              f"(gloo / mpimp {med['gloo'] / med['mpimp']:.2f}x)")
    for m in peers.values():
        if isinstance(m, mpimp.DataParallel):
            m.close()  # collective: frees the shared windows
    topo.free()
    one.free()
    dist.destroy_process_group()


def bench_allreduce(args: argparse.Namespace, world: MPI.Comm) -> None:
    size, n = world.Get_size(), args.elements
    comm = world.Dup()
    bufs = {"fp32": torch.randn(n), "bf16": torch.randn(n).to(torch.bfloat16)}
    for t in bufs.values():  # warm-up (builds the native operator on first use)
        mpimp.all_reduce(t.clone(), comm)
    times: dict[str, list[float]] = {k: [] for k in bufs}
    for r in range(args.repeat):
        order = list(bufs) if r % 2 == 0 else list(reversed(bufs))
        for k in order:
            work = bufs[k].clone()
            times[k] += median_time(lambda w=work: mpimp.all_reduce(w, comm), world, 1)
    if world.Get_rank() == 0:
        from mpimp.native_ops import _default_ops

        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"== all_reduce of {n / 2**20:.0f}M elements on {size} ranks ({args.repeat} alternating rounds; "
              f"16-bit operator backend: {_default_ops().backend})")
        for k, v in times.items():
            print(f"{k}: median {1000 * med[k]:.1f} ms   all: {' '.join(f'{1000 * x:.0f}' for x in v)}")
        per_round = [b / f for b, f in zip(times["bf16"], times["fp32"])]
        print(f"ratio bf16 / fp32 time: medians {med['bf16'] / med['fp32']:.2f}x, per-round median "
              f"{statistics.median(per_round):.2f}x  ({' '.join(f'{x:.2f}' for x in per_round)})")
    comm.Free()


def bench_zero(args: argparse.Namespace, world: MPI.Comm) -> None:
    topo = mpimp.init()
    one = mpimp.init(comm=MPI.COMM_SELF)
    torch.manual_seed(0)
    model = GPT(CFG, one)
    opt = mpimp.ShardedOptimizer(torch.optim.AdamW, model.parameters(), topo, lr=1e-3)
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=torch.Generator().manual_seed(2))
    model(idx, idx).backward()
    opt.step()
    mine = opt.state_bytes()
    # unsharded AdamW: two fp32 moments per element and one fp32 step counter per parameter
    n_params = sum(1 for _ in model.parameters())
    total = 2 * 4 * sum(p.numel() for p in model.parameters()) + 4 * n_params
    everyone = world.gather(mine, root=0)
    if world.Get_rank() == 0:
        dp = topo.dp
        print(f"== ZeRO-1 AdamW state, dp={dp}: total (unsharded) {total} B, total/dp {total / dp:.0f} B")
        print(f"per rank: {everyone} B; max / (total/dp) = {max(everyone) / (total / dp):.4f}x")
    topo.free()
    one.free()


def bench_overhead(args: argparse.Namespace, world: MPI.Comm) -> None:
    import mpimp.data_parallel as dpm

    topo, one = mpimp.init(), mpimp.init(comm=MPI.COMM_SELF)
    torch.manual_seed(0)
    dp = mpimp.DataParallel(GPT(CFG, one), topo)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (args.batch, CFG.seq_len), generator=g)
    tgt = torch.randint(0, CFG.vocab_size, (args.batch, CFG.seq_len), generator=g)
    lidx, ltgt = dpm.split_batch((idx, tgt), topo)
    copies = {"into buckets": 0.0, "back into .grad": 0.0}
    originals = {"put": dpm._Bucket.put, "write_back": dpm._Bucket.write_back}

    def timed_copy(name: str, label: str):
        def run(self, *a):  # the bucket's own method, timed
            t = time.perf_counter()
            originals[name](self, *a)
            copies[label] += time.perf_counter() - t
        return run

    real_reduce = dpm.all_reduce
    kinds = ("compute only", "synchronised", "no-op all-reduce")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    steps = 4 + args.rounds * 2
    dpm._Bucket.put = timed_copy("put", "into buckets")
    dpm._Bucket.write_back = timed_copy("write_back", "back into .grad")
    try:
        for step in range(steps):
            for k in (kinds if step % 2 else tuple(reversed(kinds))):
                dp.zero_grad(set_to_none=True)
                dpm.all_reduce = (lambda t, comm, op="sum": t) if k == "no-op all-reduce" else real_reduce
                world.Barrier()
                loss = dp(lidx, ltgt)
                t0 = time.perf_counter()
                if k == "compute only":
                    with dp.no_sync():
                        loss.backward()
                else:
                    loss.backward()
                dt = world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
                if step >= 4:
                    times[k].append(dt)
                if step == 3:
                    copies = dict.fromkeys(copies, 0.0)
    finally:
        dpm.all_reduce = real_reduce
        dpm._Bucket.put, dpm._Bucket.write_back = originals["put"], originals["write_back"]
    if world.Get_rank() == 0:
        n = len(times["synchronised"])
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"== DataParallel overhead, dp={topo.dp}: backward of the GPT, {n} steps per variant, interleaved")
        for k in kinds:
            print(f"{k:18s} backward median {1000 * med[k]:6.1f} ms   +{1000 * (med[k] - med['compute only']):5.1f} ms")
        print("per synchronised step (rank 0): " + ", ".join(
            f"copies {k} {1000 * v / (2 * n):.1f} ms" for k, v in copies.items()))
    dp.close()
    topo.free()
    one.free()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="dp,allreduce,zero")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per peer per round")
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--elements", type=int, default=16 * 2**20)
    ap.add_argument("--repeat", type=int, default=10, help="all-reduce rounds")
    ap.add_argument("--keep-grads", action="store_true",
                    help="dp: add mpimp and DDP with gradient_as_bucket_view=True and zero_grad(set_to_none=False)")
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    parts = args.parts.split(",")
    if "dp" in parts:
        bench_dp(args, world)
    if "allreduce" in parts:
        bench_allreduce(args, world)
    if "zero" in parts:
        bench_zero(args, world)
    if "overhead" in parts:
        bench_overhead(args, world)


if __name__ == "__main__":
    main()
