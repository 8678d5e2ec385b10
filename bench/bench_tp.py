"""Tensor parallelism, tp = 2: mpimp's GPT against torch DTensor ``parallelize_module`` (gloo).

    OMP_NUM_THREADS=1 timeout 900 .venv/bin/mpirun --oversubscribe -n 2 \\
        .venv/bin/python bench/bench_tp.py --rounds 10 --steps 1

Both peers train the same GPT (8 blocks, d_model 256, 4 heads, sequence 128, vocabulary
256, untied head, batch 16: 16 sequences x 128 tokens = 2,048 tokens per step) with the
same weights (mpimp's initial weights are loaded into the peer, and the first losses
are checked to agree), one torch thread per rank, in one invocation: rounds alternate
``--steps`` timed steps of mpimp and of the peer.  A step is forward, backward and an
SGD update.  The peer: ``ColwiseParallel`` on q, k, v and fc1, ``RowwiseParallel`` on the
attention output and fc2 (torch's documented Megatron-style plan); embeddings,
LayerNorms and the head replicated, loss ``F.cross_entropy`` on the full logits.

Reported: tokens/s of each (median over rounds), the ratio of the medians and the
median of the per-round ratios (the two halves of a round run back to back, so they
see the same background load: the robust figure on a shared machine) and the ratio of
the best rounds (the least disturbed ones); the share of mpimp's
step time spent inside its collectives (measured in a separate pass by timing every
all-reduce / all-gather / reduce-scatter the tensor-parallel layers call); parameter
bytes per rank against total / tp.  Not a test: no assertions on timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mpi4py import MPI  # noqa: E402
from torch import nn  # noqa: E402

import mpimp  # noqa: E402
from mpimp.models import GPT, GPTConfig  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- the peer

class _TimedRequest:
    """A request whose ``wait`` adds its time to a meter (requests have fixed slots)."""

    def __init__(self, req, meter) -> None:
        self._req, self._meter = req, meter

    def test(self) -> bool:
        return self._req.test()

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._req.wait(*args, **kwargs)
        finally:
            self._meter.seconds += time.perf_counter() - t0
            self._meter.calls += 1

    def __getattr__(self, name: str):
        return getattr(self._req, name)

class PeerAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.head_dim = d // heads
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # after ColwiseParallel the local width is d/tp: the head count follows from it
        q, k, v = (f(x).view(b, s, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, -1))


class PeerMLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PeerBlock(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.attn = PeerAttention(c.d_model, c.n_heads)
        self.mlp = PeerMLP(c.d_model, c.mlp_ratio * c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PeerGPT(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Parameter(torch.zeros(c.seq_len, c.d_model))
        self.blocks = nn.ModuleList(PeerBlock(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def peer_state(full: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    """mpimp's single-process state dict in the peer's names (qkv split into q, k, v)."""
    out = {"tok.weight": full["embed.tok.weight"], "pos": full["embed.pos"],
           "ln_f.weight": full["head.ln_f.weight"], "ln_f.bias": full["head.ln_f.bias"],
           "head.weight": full["head.weight"]}
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "attn.proj.weight", "attn.proj.bias",
                     "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            out[p + name] = full[p + name]
        for kind in ("weight", "bias"):
            q, k, v = full[f"{p}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{p}attn.q.{kind}"], out[f"{p}attn.k.{kind}"], out[f"{p}attn.v.{kind}"] = q, k, v
    return out


def build_peer(c: GPTConfig, full: dict[str, torch.Tensor], tp: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model = PeerGPT(c)
    model.load_state_dict(peer_state(full, c))
    mesh = init_device_mesh("cpu", (tp,))
    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(), "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}
    for blk in model.blocks:
        parallelize_module(blk, mesh, plan)
    return model


# ----------------------------------------------------------------------------- measurement
def param_bytes(model: nn.Module) -> int:
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def timed_steps(step, n: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process, all threads: gloo's included) of n steps."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return time.perf_counter() - start, time.process_time() - cpu


class CommTimer:
    """Wraps the collectives the tensor-parallel code calls, summing their wall time."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> CommTimer:
        import mpimp.autograd as ag
        import mpimp.nn.loss as loss

        for module, name in ((ag, "all_reduce"), (ag, "all_gather"), (ag, "reduce_scatter"), (loss, "all_reduce"),
                             (ag, "iall_reduce")):
            fn = getattr(module, name)
            self._saved.append((module, name, fn))
            setattr(module, name, self._wrap_nonblocking(fn) if name.startswith("i") else self._wrap(fn))
        return self

    def _wrap_nonblocking(self, fn):
        """Time the start and the wait (not the compute overlapped in between)."""
        def started(*args, **kwargs):
            t0 = time.perf_counter()
            req = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return _TimedRequest(req, self)
        return started

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed

    def __exit__(self, *exc: object) -> None:
        for module, name, fn in self._saved:
            setattr(module, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per peer per round")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sequence-parallel", action="store_true", help="mpimp with sequence parallelism")
    args = ap.parse_args()

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    tp = size
    port = world.bcast(29500 + os.getpid() % 1000 if rank == 0 else None, root=0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)

    # 16 sequences x 128 tokens = 2,048 tokens per step
    cfg = GPTConfig(vocab_size=256, seq_len=128, d_model=256, n_heads=4, n_layers=8, tied_embeddings=False,
                    sequence_parallel=args.sequence_parallel)
    topo = mpimp.init(tp=tp)
    torch.manual_seed(0)
    ours = GPT(cfg, topo)
    full = ours.export_state_dict()
    peer = build_peer(cfg, full, tp)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len), generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len), generator=g)
    tokens = idx.numel()

    with torch.no_grad():
        l_ours, l_peer = ours(idx, tgt).item(), peer(idx, tgt).item()
    if abs(l_ours - l_peer) > 1e-4:
        raise SystemExit(f"the two models disagree before training: mpimp {l_ours} vs peer {l_peer}")

    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-3)
    opt_peer = torch.optim.SGD(peer.parameters(), lr=1e-3)

    def step_ours() -> None:
        opt_ours.zero_grad(set_to_none=True)
        ours(idx, tgt).backward()
        opt_ours.step()

    def step_peer() -> None:
        opt_peer.zero_grad(set_to_none=True)
        peer(idx, tgt).backward()
        opt_peer.step()

    for fn in (step_ours, step_peer):  # warm-up
        fn()
    rates: dict[str, list[float]] = {"mpimp": [], "dtensor": []}
    cpu_rates: dict[str, list[float]] = {"mpimp": [], "dtensor": []}
    pair_ratios: list[float] = []
    for r in range(args.rounds):
        order = [("mpimp", step_ours), ("dtensor", step_peer)]
        if r % 2:
            order.reverse()
        got = {}
        for name, fn in order:
            world.Barrier()
            wall, cpu = timed_steps(fn, args.steps)
            dt, cpu = world.allreduce(wall, op=MPI.MAX), world.allreduce(cpu, op=MPI.MAX)
            got[name] = args.steps * tokens / dt
            rates[name].append(got[name])
            cpu_rates[name].append(args.steps * tokens / cpu)  # tokens per CPU-second, slowest rank
        pair_ratios.append(got["mpimp"] / got["dtensor"])  # neighbours in time see the same load

    n_comm = max(args.steps, 3)
    with CommTimer() as timer:  # includes waiting for the other rank inside the collective
        world.Barrier()
        t0 = time.perf_counter()
        for _ in range(n_comm):
            step_ours()
        step_time = (time.perf_counter() - t0) / n_comm
    comm_share = world.allreduce(timer.seconds / n_comm / step_time, op=MPI.SUM) / size
    calls = timer.calls // n_comm

    ours_bytes = param_bytes(ours)
    peer_bytes = param_bytes(peer)
    total = cfg.n_params * 4
    replicated = sum(p.numel() * 4 for n, p in ours.named_parameters()
                     if getattr(p, "mpimp_shard", None) is None and n != "embed.pos")
    pos_bytes = ours.embed.pos.numel() * 4
    per_rank = world.gather(ours_bytes, root=0)

    if rank == 0:
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"tp={tp}{' with sequence parallelism' if cfg.sequence_parallel else ''}, 1 torch thread per rank, batch {args.batch} x seq {cfg.seq_len} = {tokens} tokens/step, "
              f"{args.rounds} rounds x {args.steps} steps, alternating")
        print(f"first-step loss: mpimp {l_ours:.6f}  dtensor {l_peer:.6f}")
        for k, v in rates.items():
            print(f"{k:8s} tokens/s median {med[k]:8.0f}   rounds: {' '.join(f'{x:.0f}' for x in v)}")
        cmed = {k: statistics.median(v) for k, v in cpu_rates.items()}
        print(f"tokens per CPU-second (slowest rank, all threads; insensitive to preemption by other "
              f"jobs, counts mpimp's polling): mpimp {cmed['mpimp']:.0f}  dtensor {cmed['dtensor']:.0f}: "
              f"{cmed['mpimp'] / cmed['dtensor']:.2f}x")
        best = {k: max(v) for k, v in rates.items()}
        print(f"best round (least disturbed, as timeit reports): mpimp {best['mpimp']:.0f}  dtensor "
              f"{best['dtensor']:.0f} tokens/s: {best['mpimp'] / best['dtensor']:.2f}x")
        print(f"ratio mpimp / dtensor: {med['mpimp'] / med['dtensor']:.2f}x of the medians; "
              f"median of the {len(pair_ratios)} per-round ratios {statistics.median(pair_ratios):.2f}x "
              f"(rounds: {' '.join(f'{x:.2f}' for x in pair_ratios)})")
        print(f"mpimp communication share of step time: {100 * comm_share:.1f}% "
              f"({calls} collectives per step, step {1000 * step_time:.0f} ms)")
        print(f"parameter bytes per rank: mpimp {per_rank} (dtensor {peer_bytes} on rank 0); "
              f"total {total}, total/tp {total // tp}, replicated LayerNorm+bias {replicated}, "
              f"replicated positions {pos_bytes}; "
              f"bound 1.05*total/tp + LN/bias = {int(1.05 * total / tp) + replicated}: "
              f"{'holds' if max(per_rank) <= 1.05 * total / tp + replicated else 'exceeded'}")
    topo.free()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
