"""DataParallel and reduce_gradients: equal to a single process on the global batch, at any dp.

Every test builds the same model with the same seed on every rank and trains an
unparallelised copy on the whole global batch (or replays every rank's share in this
process) as the reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from mpi4py import MPI
from torch import nn

import mpimp
from mpimp.data_parallel import DataParallel, reduce_gradients, split_batch


class Tied(nn.Module):
    """Embedding and output projection share one weight; a LayerNorm and a skip path."""

    def __init__(self, vocab: int = 11, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.unused = nn.Parameter(torch.ones(3))  # never receives a gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.mix(h)
        h = h + self.mlp(self.norm(h))
        return self.head(h)


def _seeded(seed: int) -> Tied:
    torch.manual_seed(seed)
    return Tied()


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# every fp32 test runs on both transports: MPI collectives and the shared-memory window
both_paths = pytest.mark.parametrize("shm", [False, True], ids=["mpi", "shm"])


def batch(n: int, seq: int = 5, vocab: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    return x, (x * 3 + 1) % vocab


def assert_grads_match(model: DataParallel, ref: nn.Module) -> None:
    """Every gradient of the replica equals the single-process reference's (where it has one)."""
    for p, q in zip(model.module.parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("bucket_mb", [25, 0.001])
@pytest.mark.parametrize("set_to_none", [True, False])
@both_paths
def test_training_equals_single_process_on_the_global_batch(comm: MPI.Comm, bucket_mb: float,
                                                            set_to_none: bool, shm: bool) -> None:
    with mpimp.init(comm=comm) as topo, DataParallel(copy.deepcopy(ref := _seeded(1)), topo, bucket_mb=bucket_mb,
                                                     shm=shm) as model:
        dp = topo.dp
        assert model.shared_memory == shm
        if bucket_mb < 1:
            assert len(model.buckets) >= 5  # about one per parameter, the tied weight once
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(3):
            x, y = batch(12, seed=step)  # the global batch: 12 = 2*2*3 sequences, divisible by dp 1..4
            opt_ref.zero_grad()
            loss_ref = loss_fn(ref, x, y)
            loss_ref.backward()
            opt.zero_grad(set_to_none=set_to_none)  # False: the bucket views are zeroed and accumulated into
            lx, ly = model.split_batch(x, y)
            assert lx.shape[0] == 12 // dp
            loss = loss_fn(model, lx, ly)
            loss.backward()
            # the mean of the local losses is the global loss
            total = torch.tensor([loss.item()], dtype=torch.float64)
            mpimp.all_reduce(total, comm, op="avg")
            assert abs(total.item() - loss_ref.item()) < 1e-5
            for (name, p), q in zip(model.module.named_parameters(), ref.parameters()):
                if q.grad is None:
                    assert p.grad is None, name
                else:
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
            opt_ref.step()
            opt.step()
        for p, q in zip(model.module.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        grads = [p.grad for p in model.parameters()]
        model.close()  # .grad views into the window become private copies
        model.close()
        for p, g in zip(model.parameters(), grads):
            assert (p.grad is None) == (g is None)
            if g is not None:
                assert p.grad.sum().item() == p.grad.sum().item()  # readable after the window is gone


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("wire", ["bf16", torch.float16])
def test_16bit_gradients_on_the_wire(comm: MPI.Comm, wire: object) -> None:
    with mpimp.init(comm=comm) as topo:
        torch.manual_seed(2)
        ref = Tied()
        model = DataParallel(copy.deepcopy(ref), topo, bucket_mb=0.002, reduce_dtype=wire)
        assert all(b.buffer.dtype in (torch.bfloat16, torch.float16) for b in model.buckets)
        x, y = batch(12, seed=7)
        loss_fn(ref, x, y).backward()
        loss_fn(model, *model.split_batch(x, y)).backward()
        tol = 2.0 ** -7 if wire == "bf16" else 2.0 ** -10
        for p, q in zip(model.module.parameters(), ref.parameters()):
            if q.grad is None:
                assert p.grad is None
                continue
            assert p.grad.dtype == torch.float32
            # per-element error of a few 16-bit roundings of the local gradients
            scale = q.grad.abs().max().item() + 1e-6
            assert (p.grad - q.grad).abs().max().item() <= 4 * tol * scale


@pytest.mark.mpi(min_size=1)
@both_paths
def test_buckets_start_during_backward(comm: MPI.Comm, shm: bool) -> None:
    with mpimp.init(comm=comm) as topo:
        torch.manual_seed(3)
        module = Tied()
        module.unused.requires_grad_(False)  # a bucket waiting for an unused gradient waits until the end
        model = DataParallel(module, topo, bucket_mb=0.001, shm=shm)
        seen = []

        def early(grad: torch.Tensor) -> None:  # fires when backward reaches the embedding output
            seen.append([b.request is not None for b in model.buckets])

        x, y = batch(4 * topo.dp, seed=1)
        lx, ly = model.split_batch(x, y)
        h = model.module.emb(lx)
        h.register_hook(early)
        h = h + model.module.mix(h)
        h = h + model.module.mlp(model.module.norm(h))
        logits = model.module.head(h)
        nn.functional.cross_entropy(logits.reshape(-1, 11), ly.reshape(-1)).backward()
        # by then the buckets of the layers after the embedding were already on the wire
        assert seen and sum(seen[0]) >= 3, seen
        assert all(b.request is None for b in model.buckets)  # all completed and reset
        model.close()


@pytest.mark.mpi(min_size=1)
@both_paths
@pytest.mark.parametrize("views", [False, True], ids=["copy", "views"])
def test_no_sync_accumulates_then_averages(comm: MPI.Comm, shm: bool, views: bool) -> None:
    with mpimp.init(comm=comm) as topo:
        torch.manual_seed(4)
        ref = Tied()
        model = DataParallel(copy.deepcopy(ref), topo, shm=shm, gradient_as_bucket_view=views)
        # micro-batches 0, 1 local then 2 and 3 synchronised; then 4 local and 5 synchronised,
        # never zeroed: with views .grad is after a synchronised step a view into its bucket
        # that backward accumulates into
        for micro in range(6):
            x, y = batch(4 * topo.dp, seed=10 + micro)
            loss_fn(ref, x, y).backward()
            lx, ly = model.split_batch(x, y)
            if micro in (0, 1, 4):
                with model.no_sync():
                    loss_fn(model, lx, ly).backward()
            else:
                loss_fn(model, lx, ly).backward()
                assert_grads_match(model, ref)
        for b in model.buckets:  # views: every gradient lives in its bucket; else in its own tensor
            for j, p in enumerate(b.params):
                assert p.grad is None or (p.grad.data_ptr() == b.view(j).data_ptr()) == views
        model.close()


@pytest.mark.mpi(min_size=1)
@both_paths
def test_parameters_unused_on_some_ranks(comm: MPI.Comm, shm: bool) -> None:
    """A branch only some replicas take: missing gradients count as zeros in the mean."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
            return self.b(self.a(x)) if use_b else self.a(x)

    with mpimp.init(comm=comm) as topo:
        dp, rank = topo.dp, topo.dp_rank
        torch.manual_seed(5)
        ref = Branchy()
        model = DataParallel(copy.deepcopy(ref), topo, bucket_mb=0.0001, shm=shm)
        x = torch.randn(dp, 3, 4, generator=torch.Generator().manual_seed(0))
        model(x[rank], rank % 2 == 1).sum().backward()
        # reference: replay every replica here and average
        for r in range(dp):
            (ref(x[r], r % 2 == 1).sum() / dp).backward()
        for (name, p), q in zip(model.module.named_parameters(), ref.parameters()):
            if q.grad is None:  # dp == 1: b unused everywhere
                assert p.grad is None, name
            else:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
        model.close()


@pytest.mark.mpi(min_size=1)
def test_reduce_gradients(comm: MPI.Comm) -> None:
    p, rank = comm.Get_size(), comm.Get_rank()
    shapes = [(3, 5), (7,), (2, 2, 2), (1,), (4,)]

    def grads_of(r: int) -> list[torch.Tensor | None]:
        g = torch.Generator().manual_seed(100 + r)
        out: list[torch.Tensor | None] = [torch.randn(s, generator=g) for s in shapes]
        if r % 2 == 1:
            out[1] = None  # missing on odd ranks
        out[3] = None      # missing everywhere
        return out

    for reduce_dtype, tol in ((None, 1e-6), ("bf16", 2e-2)):
        params = [nn.Parameter(torch.zeros(s)) for s in shapes]
        for q, g in zip(params, grads_of(rank)):
            q.grad = g
        reduce_gradients(params + [params[0]], comm, bucket_mb=1e-4, reduce_dtype=reduce_dtype)
        everyone = [grads_of(r) for r in range(p)]
        for i, q in enumerate(params):
            present = [e[i] for e in everyone if e[i] is not None]
            if not present:
                assert q.grad is None
                continue
            expected = sum(present) / p  # missing gradients count as zero
            torch.testing.assert_close(q.grad, expected, rtol=tol, atol=tol)


@pytest.mark.mpi(min_size=1)
def test_global_batch_not_divisible_by_dp(comm: MPI.Comm) -> None:
    with mpimp.init(comm=comm) as topo:
        if topo.dp == 1:
            pytest.skip("every batch is divisible by dp = 1")
        x, y = batch(topo.dp * 2 + 1)
        with pytest.raises(mpimp.ConfigError, match=rf"global batch of {x.shape[0]} samples .* not divisible by dp = {topo.dp}"):
            split_batch((x, y), topo)
        with pytest.raises(mpimp.ConfigError, match="reduce_dtype"):
            DataParallel(Tied(), topo, reduce_dtype=torch.int8)
        with pytest.raises(mpimp.ConfigError, match="bucket_mb"):
            DataParallel(Tied(), topo, bucket_mb=0)
        mpimp.barrier(comm)  # nobody is left behind


@pytest.mark.mpi(min_size=2)
def test_replicas_with_different_parameters_name_the_first_mismatch(comm: MPI.Comm) -> None:
    with mpimp.init(comm=comm) as topo:
        torch.manual_seed(6)
        model = Tied()
        if topo.dp_rank == 1:
            model.mlp[2] = nn.Linear(32, 17)  # this rank built a different model
        with pytest.raises(mpimp.ConfigError, match=r"first mismatch at parameter #8: dp rank 0 has 'mlp.2.weight' \[16, 32\] float32, dp rank 1 has 'mlp.2.weight' \[17, 32\]"):
            DataParallel(model, topo)
        model = Tied()
        if topo.dp_rank == topo.dp - 1:
            model.extra = nn.Linear(2, 2)  # one more parameter at the end
        with pytest.raises(mpimp.ConfigError, match=rf"dp rank {topo.dp - 1} has 12; first mismatch at parameter #10: dp rank 0 has nothing"):
            DataParallel(model, topo)
        mpimp.barrier(comm)


@pytest.mark.mpi(min_size=2)
def test_construction_broadcasts_dp_rank_0_weights(comm: MPI.Comm) -> None:
    with mpimp.init(comm=comm) as topo:
        torch.manual_seed(7 + topo.dp_rank)  # different initial weights per rank
        model = DataParallel(Tied(), topo)
        torch.manual_seed(7)
        ref = Tied()
        for p, q in zip(model.module.parameters(), ref.parameters()):
            assert torch.equal(p, q)


@pytest.mark.mpi(min_size=1)
@both_paths
def test_a_backward_that_raised_does_not_poison_the_next_step(comm: MPI.Comm, shm: bool) -> None:
    with mpimp.init(comm=comm) as topo:
        torch.manual_seed(8)
        ref = Tied()
        model = DataParallel(copy.deepcopy(ref), topo, bucket_mb=0.001, shm=shm)
        x, y = batch(4 * topo.dp, seed=3)
        lx, ly = model.split_batch(x, y)

        def boom(grad: torch.Tensor) -> None:
            raise RuntimeError("boom")

        h = model.module.emb(lx)
        h.register_hook(boom)  # fails every rank at the same point, after some buckets launched
        out = model.module.head(h + model.module.mix(h))
        with pytest.raises(RuntimeError, match="boom"):
            nn.functional.cross_entropy(out.reshape(-1, 11), ly.reshape(-1)).backward()
        for p in model.parameters():
            p.grad = None
        loss_fn(model, lx, ly).backward()
        loss_fn(ref, x, y).backward()
        assert_grads_match(model, ref)
        assert all(b.request is None and b.pending == len(b.params) for b in model.buckets)
        model.close()


@pytest.mark.mpi(min_size=1)
def test_transport_choice(comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    with mpimp.init(comm=comm) as topo:
        monkeypatch.delenv("MPIMP_SHM", raising=False)
        with DataParallel(Tied(), topo) as model:  # default: MPI collectives
            assert not model.shared_memory
        monkeypatch.setenv("MPIMP_SHM", "1")
        with DataParallel(Tied(), topo) as model:  # asked for: shared memory from dp = 2 on one node
            assert model.shared_memory == (topo.dp > 1)
            assert model._worker._thread is None if topo.dp == 1 else model._worker._thread.is_alive()
            thread = model._worker._thread
        assert thread is None or not thread.is_alive()  # closed on leaving the block
        with DataParallel(Tied(), topo, reduce_dtype="bf16") as model:
            assert not model.shared_memory  # 16-bit wire types use MPI
        monkeypatch.setenv("MPIMP_SHM", "0")
        with DataParallel(Tied(), topo) as model:
            assert not model.shared_memory
        with pytest.raises(mpimp.ConfigError, match=r"gradient_as_bucket_view='yes': use False"):
            DataParallel(Tied(), topo, gradient_as_bucket_view="yes")  # type: ignore[arg-type]
        with pytest.raises(mpimp.ConfigError, match=r"shm=True\) reduces CPU fp32 gradients only"):
            DataParallel(Tied(), topo, reduce_dtype="bf16", shm=True)
        with DataParallel(Tied(), topo, shm=True) as model:  # an explicit request ignores MPIMP_SHM=0
            assert model.shared_memory
            x, y = batch(2 * topo.dp)
            loss_fn(model, *model.split_batch(x, y)).backward()
            b = model.buckets[0]
            assert b.params[0].grad.data_ptr() != b.view(0).data_ptr()  # .grad stays autograd's own tensor


@pytest.mark.mpi(min_size=2)
def test_a_rank_that_skips_backward_is_a_deadline_not_a_hang(comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of a dp = 2 pair never runs backward: rank 0's bucket rendezvous (a polled
    Ibarrier, asleep) raises DeadlineError naming it after MPIMP_TIMEOUT instead of
    entering an all-reduce that would block forever."""
    import time

    from mpimp.errors import DeadlineError

    sub = comm.Split(0 if comm.Get_rank() < 2 else MPI.UNDEFINED, comm.Get_rank())
    if sub == MPI.COMM_NULL:
        return
    monkeypatch.setenv("MPIMP_TIMEOUT", "1.5")
    with mpimp.init(comm=sub) as topo:
        torch.manual_seed(3)
        dp = DataParallel(nn.Linear(4, 2), topo)
        if topo.rank == 0:
            start = time.monotonic()
            with pytest.raises(DeadlineError, match="rank 0: data-parallel bucket rendezvous over 2 ranks"):
                dp(torch.randn(3, 4)).sum().backward()
            assert time.monotonic() - start < 30
            # the failure is latched: the next backward fails at once, entering no collective
            with pytest.raises(mpimp.MpimpError, match="out of step"):
                dp(torch.randn(3, 4)).sum().backward()
        sub.Barrier()
        dp.close()
        # as the error says: a new DataParallel on the same topology works (the barrier rank
        # 0 abandoned stays on the old one's private communicator)
        monkeypatch.setenv("MPIMP_TIMEOUT", "60")
        torch.manual_seed(3)
        ref = nn.Linear(4, 2)
        dp = DataParallel(copy.deepcopy(ref), topo)
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(topo.rank))
        dp(x).sum().backward()
        xs = torch.cat([torch.randn(3, 4, generator=torch.Generator().manual_seed(r)) for r in range(2)])
        (ref(xs).sum() / 2).backward()  # the mean over the two replicas' batches
        torch.testing.assert_close(dp.module.weight.grad, ref.weight.grad, atol=1e-6, rtol=0)
        dp.close()
    sub.Free()


class _Checkpointed(nn.Module):
    """Blocks run under reentrant activation checkpointing: their parameters' gradients are
    computed in nested backwards, one per block."""

    def __init__(self, blocks: int = 4, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(blocks))
        self.out = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = self.inp(x)
        for blk in self.blocks:
            h = checkpoint(blk, h, use_reentrant=True)
        # the last layer too: backward meets a parameter first inside a nested backward
        return checkpoint(self.out, h, use_reentrant=True)


@pytest.mark.mpi(min_size=1)
@both_paths
def test_reentrant_checkpointing_reduces_each_bucket_once(comm: MPI.Comm, shm: bool) -> None:
    """With reentrant checkpointing the gradients still equal the single process on the
    global batch, and each backward all-reduces each bucket once (the end of backward was
    taken from the first nested backward, which reduced every bucket once per segment)."""
    with mpimp.init(comm=comm) as topo:
        torch.manual_seed(8)
        ref = _Checkpointed()
        model = DataParallel(copy.deepcopy(ref), topo, bucket_mb=0.001, shm=shm)
        submitted = []
        submit = model._worker.submit

        def counting(*args: object, **kwargs: object) -> object:
            submitted.append(1)
            return submit(*args, **kwargs)

        model._worker.submit = counting  # type: ignore[method-assign]
        for step in range(2):
            g = torch.Generator().manual_seed(30 + step)
            x, y = torch.randn(4 * topo.dp, 8, generator=g), torch.randn(4 * topo.dp, 3, generator=g)
            ref.zero_grad()
            model.zero_grad()
            nn.functional.mse_loss(ref(x), y).backward()
            lx, ly = model.split_batch(x, y)
            submitted.clear()
            nn.functional.mse_loss(model(lx), ly).backward()
            assert len(submitted) == len(model.buckets), (len(submitted), len(model.buckets))
            for (name, q), r in zip(model.module.named_parameters(), ref.parameters()):
                torch.testing.assert_close(q.grad, r.grad, atol=1e-6, rtol=1e-5, msg=name)
        model.close()


@pytest.mark.mpi(min_size=2)
def test_shm_true_that_one_rank_cannot_use_fails_on_every_rank(comm: MPI.Comm) -> None:
    """DataParallel(shm=True) where one rank cannot take the shared-memory path (here its
    reduce_dtype, a per-rank argument, is bf16): a ConfigError on every rank at once (the
    others waited forever in the window's collective set-up)."""
    import time

    with mpimp.init(comm=comm) as topo:
        wire = "bf16" if topo.dp_rank == 1 else None
        start = time.monotonic()
        with pytest.raises(mpimp.ConfigError, match=r"shm=True"):
            DataParallel(_seeded(1), topo, shm=True, reduce_dtype=wire)
        assert time.monotonic() - start < 30


@pytest.mark.mpi(min_size=1)
def test_a_backward_for_input_gradients_only_communicates_nothing(comm: MPI.Comm) -> None:
    """torch.autograd.grad of the outputs with respect to the inputs alone (on one rank
    only) starts no all-reduce, so the next real backward still pairs with the other
    ranks' and equals the single process (an all-reduce of empty buckets paired with
    another rank's real one and corrupted its gradients)."""
    with mpimp.init(comm=comm) as topo:
        torch.manual_seed(9)
        ref = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        model = DataParallel(copy.deepcopy(ref), topo)
        submitted = []
        submit = model._worker.submit
        model._worker.submit = lambda *a, **k: submitted.append(1) or submit(*a, **k)  # type: ignore[method-assign]
        if topo.dp_rank == 0:
            x = torch.randn(3, 4, requires_grad=True)
            (gx,) = torch.autograd.grad(model(x).sum(), x)
            assert gx.shape == x.shape and not submitted
            assert all(q.grad is None for q in model.parameters())
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(4 * topo.dp, 4, generator=g), torch.randn(4 * topo.dp, 2, generator=g)
        nn.functional.mse_loss(ref(x), y).backward()
        lx, ly = model.split_batch(x, y)
        nn.functional.mse_loss(model(lx), ly).backward()
        assert submitted
        for q, r in zip(model.module.parameters(), ref.parameters()):
            torch.testing.assert_close(q.grad, r.grad, atol=1e-6, rtol=1e-5)
        model.close()
