"""Pipeline parallelism for any sequence of layers: one executor runs any action table.

Problem: a model too big (or too slow) for one rank is cut layer-wise into stages on
consecutive ranks; the batch is split into ``chunks`` micro-batches along dim 0 that flow
through the stages, forward then backward, so that stages work concurrently.  Users
keep their own ``nn.Sequential`` (or list of layers, or of zero-argument layer
factories); no rewrite into "stage modules" is needed.

The math.  With micro-batches ``x_1..x_m`` of equal size and ``loss_fn`` a mean over the
batch, the whole-batch loss is ``L = (1/m) sum_i loss_fn(f(x_i), y_i)``, so each
micro-batch backward starts from ``loss_i / m`` and the gradients accumulate in the
local layers' ``.grad`` exactly as one plain-torch backward over the whole batch.  Layers
are split by stage; nothing is replicated (parameters of stage s live only on the ranks
of stage s, activations and their gradients travel between neighbouring stages).

Execution.  The schedule (``"gpipe"``, ``"1f1b"``, ``"interleaved-1f1b"``, ``"zb-h1"`` or
a user table, see :mod:`mpimp.schedule`) is verified offline on every rank, lowered, and
this rank's row is run by one loop: all receives are posted (as matched probes) at the
start of the step and tested between computations, sends are ``isend`` and overlap the
following compute, every wait has the transport's deadline.  Tags encode (direction,
micro-batch, virtual stage) so messages cannot be mismatched.  An exception on one rank
(e.g. a non-scalar loss on the last stage) is sent to every stage of the pipeline on a
separate tag and re-raised there, so no rank waits for the deadline.

Tensor parallelism: a stage may consist of tp ranks (its layers are tensor-parallel
modules built by factories); each tp rank talks to the same tp rank of the neighbouring
stage through its own ``topo.pp_comm``.  Data parallelism: at the end of ``train_step``
the optional ``after_backward(pipe)`` hook runs (the GPT uses it to sum the tied
embedding gradient between first and last stage), then, when ``topo.dp > 1``, gradients
are averaged over ``topo.dp_comm`` by :func:`mpimp.data_parallel.reduce_gradients`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from .comm import Request, _wait_until, broadcast, default_timeout, irecv, isend
from .errors import ConfigError, MpimpError
from .schedule import Action, build, lower, parse_table, stage_owners, verify
from .schedule.partition import balance_by_cost, check_balance, stage_bounds
from .topology import Topology

__all__ = ["Pipeline", "CHECKPOINT_MODES", "SCHEDULES"]

CHECKPOINT_MODES = ("always", "except_last", "never")
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")
_ERR_TAG = 1
_PROGRESS_TAG = 2
_TAG_BASE = 16
Tensors = Union[torch.Tensor, tuple[torch.Tensor, ...]]
LayerSpec = Union[nn.Module, Callable[[], nn.Module]]


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    return []


def _split(x: Any, chunks: int, what: str) -> list[Any]:
    """Split a tensor (or tuple of tensors) into ``chunks`` equal parts along dim 0."""
    items = _flat(x)
    if x is None or not items or (isinstance(x, (tuple, list)) and len(items) != len(x)):
        raise ConfigError(f"{what} must be a tensor or a tuple of tensors, got {type(x).__name__}")
    for t in items:
        if t.dim() == 0 or t.shape[0] % chunks:
            raise ConfigError(
                f"{what} of shape {list(t.shape)} does not split into chunks={chunks} equal micro-batches "
                f"along dim 0; use a batch size divisible by {chunks} or change chunks"
            )
    if isinstance(x, torch.Tensor):
        return list(x.chunk(chunks))
    parts = [t.chunk(chunks) for t in items]
    return [tuple(p[i] for p in parts) for i in range(chunks)]


def _leaf(x: Tensors) -> Tensors:
    """Detached copy-free leaf of a received value; floating tensors require grad."""
    def one(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.requires_grad_(True) if t.is_floating_point() or t.is_complex() else t
    if isinstance(x, torch.Tensor):
        return one(x)
    return tuple(one(t) for t in x)


def _detach(x: Tensors) -> Tensors:
    return x.detach() if isinstance(x, torch.Tensor) else tuple(t.detach() for t in x)


class _MB:
    """State of one (stage, micro-batch) between its F and the end of its backward."""

    __slots__ = ("x", "out", "ckpt", "rng", "split", "captures", "cap_grads", "target")

    def __init__(self) -> None:
        self.x: Any = None
        self.out: Any = None
        self.ckpt = False
        self.rng: torch.Tensor | None = None
        self.split = False
        self.captures: list[tuple[nn.Module, list[torch.Tensor]]] | None = None
        self.cap_grads: Sequence[torch.Tensor | None] = ()
        self.target: Any = None


class Pipeline:
    """Run a sequence of layers as a pipeline over ``topo.pp_comm``.

    Args:
        model: an ``nn.Sequential``, a list of modules, or a list of zero-argument layer
            factories.  Factories are called only on the rank that owns the layer; with
            ``balance=None`` they are also called once under ``torch.device("meta")`` to
            count parameters (no memory is allocated).  A tuple returned by a layer is
            passed as one argument to the next, as ``nn.Sequential`` does.
        topo: the :class:`~mpimp.Topology`; this rank runs the stages of ``topo.pp_rank``.
        chunks: number of micro-batches per batch (the batch dim 0 must divide by it).
        loss_fn: ``loss_fn(output, target) -> scalar tensor`` (a mean over the micro-batch).
        schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved-1f1b"``, ``"zb-h1"`` or an
            action table (text or one list of actions per rank, see :mod:`mpimp.schedule`).
        balance: layers per stage (p x v entries, model order), ``None`` to balance by
            parameter count, or ``"time"`` to balance by forward+backward time measured on
            ``sample`` (then every rank builds and times every layer once).
        virtual_stages: v; rank s holds virtual stages s, s + p, ... (interleaved).
        checkpoint: ``"always"``, ``"except_last"`` (every micro-batch but the last) or
            ``"never"``: a checkpointed micro-batch keeps only its stage input and reruns
            the forward (same CPU RNG state) just before its backward.
        after_backward: called as ``after_backward(pipe)`` after the last backward of a
            step, before the data-parallel gradient average.
        sample: one micro-batch of input, needed only for ``balance="time"``.
    """

    def __init__(self, model: nn.Sequential | Sequence[LayerSpec], topo: Topology, *, chunks: int,
                 loss_fn: Callable[[Any, Any], torch.Tensor], schedule: str | Sequence[Sequence[Any]] = "1f1b",
                 balance: Sequence[int] | str | None = None, virtual_stages: int = 1,
                 checkpoint: str = "never", after_backward: Callable[[Pipeline], None] | None = None,
                 sample: Any = None) -> None:
        p, me = topo.pp, topo.pp_rank
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
            raise ConfigError(f"chunks={chunks!r} must be an integer >= 1 (number of micro-batches)")
        if checkpoint not in CHECKPOINT_MODES:
            raise ConfigError(f"checkpoint={checkpoint!r}: use one of {', '.join(CHECKPOINT_MODES)}")
        if not isinstance(virtual_stages, int) or isinstance(virtual_stages, bool) or virtual_stages < 1:
            raise ConfigError(f"virtual_stages={virtual_stages!r} must be an integer >= 1")
        if not callable(loss_fn):
            raise ConfigError("loss_fn must be callable as loss_fn(output, target) -> scalar tensor")
        specs = list(model.children()) if isinstance(model, nn.Sequential) else list(model)
        bad = [i for i, s in enumerate(specs) if not callable(s)]
        if not specs or bad:
            raise ConfigError("model must be an nn.Sequential or a non-empty list of modules / zero-argument "
                              f"layer factories{f'; entry {bad[0]} is not callable' if bad else ''}")
        self.topo, self.chunks, self.loss_fn = topo, chunks, loss_fn
        self.checkpoint, self.after_backward = checkpoint, after_backward

        # ---- the table: built or given, verified offline (identically on every rank)
        named = isinstance(schedule, str) and "\n" not in schedule and ":" not in schedule
        if named:
            table = build(str(schedule), p, chunks, virtual_stages)
            self.schedule_name = str(schedule)
        else:
            table = parse_table(schedule)  # type: ignore[arg-type]
            self.schedule_name = "custom"
            if len(table) != p:
                raise ConfigError(f"the action table has {len(table)} rows but the pipeline has p={p} "
                                  f"stages (topo.pp); give one list of actions per rank")
        report = verify(table, chunks)
        self.compute_table = [list(row) for row in table]
        self.table = table if any(a.kind not in ("F", "B", "W") for row in table for a in row) else lower(table)
        self.owner = stage_owners(self.table)
        self.num_stages = report.num_stages
        self.predicted_peak_inflight = report.peak_inflight
        self.virtual_stages = virtual_stages if named else max(1, self.num_stages // p)
        idle = [r for r in range(p) if r not in self.owner.values()]
        if idle:
            raise ConfigError(f"the schedule gives pipeline rank {idle[0]} no stage; every one of the "
                              f"p={p} ranks needs at least one stage")
        self._has_w = {(a.stage, a.mb) for a in self.table[me] if a.kind == "W"}

        # ---- partition
        n = len(specs)
        if balance is None:
            costs = [self._param_count(s) for s in specs]
            balance = balance_by_cost(costs, self.num_stages)
        elif isinstance(balance, str):
            if balance != "time":
                raise ConfigError(f"balance={balance!r}: use a list of layer counts, None or 'time'")
            balance = self._balance_by_time(specs, sample)
        self.balance = check_balance(balance, n, self.num_stages)
        bounds = stage_bounds(self.balance)
        self.local_stages = sorted(s for s, r in self.owner.items() if r == me)
        self.stages: dict[int, nn.ModuleList] = {}
        self.layer_indices: list[int] = []
        failure = None
        try:
            for s in self.local_stages:
                lo, hi = bounds[s]
                layers = [spec if isinstance(spec, nn.Module) else spec() for spec in specs[lo:hi]]
                for i, layer in zip(range(lo, hi), layers):
                    if not isinstance(layer, nn.Module):
                        raise ConfigError(f"layer factory {i} returned {type(layer).__name__}, not an nn.Module")
                self.stages[s] = nn.ModuleList(layers)
                self.layer_indices.extend(range(lo, hi))
        except Exception as exc:  # a factory failing on one rank must fail every rank
            failure = f"rank {topo.rank} (stage {me}): building its layers failed: {type(exc).__name__}: {exc}"
        failures = [f for f in topo.world.allgather(failure) if f]
        if failures:
            raise ConfigError(failures[0])
        self.device = next((q.device for q in self.parameters()), torch.device("cpu"))
        self._capture: list[tuple[nn.Module, list[torch.Tensor]]] | None = None
        self._owners_of_params: dict[int, list[nn.Module]] = {}
        for s, mods in self.stages.items():
            owners = [mod for mod in mods.modules() if any(True for _ in mod.parameters(recurse=False))]
            self._owners_of_params[s] = owners
            for mod in owners:
                mod.register_forward_hook(self._hook)
        # a private duplicate: messages of a failed step can never reach another Pipeline
        self.comm: MPI.Comm = topo.pp_comm.Dup()
        tag_ub = self.comm.Get_attr(MPI.TAG_UB) or 32767
        top = _TAG_BASE + 2 * (chunks * self.num_stages) + 2
        if top > tag_ub:
            raise ConfigError(f"chunks x stages = {chunks} x {self.num_stages} needs MPI tags up to {top} "
                              f"but this MPI allows {tag_ub}; use fewer micro-batches or stages")
        self._err_req: Request | None = irecv(MPI.ANY_SOURCE, self.comm, _ERR_TAG) if p > 1 else None
        self._broken: str | None = None
        self._progress_thread = p > 1 and _progress_wanted()
        self._events: list[tuple[Action, float, float]] = []
        self._step_start = 0.0
        self.peak_inflight = 0  # measured in the last step: micro-batches held between F and B/W
        self.split_weight_passes = 0  # W actions of the last step that ran a separate weight pass
        self.last_loss: float | None = None

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _param_count(spec: LayerSpec) -> float:
        if isinstance(spec, nn.Module):
            layer = spec
        else:
            with torch.device("meta"):
                layer = spec()
        return float(sum(q.numel() for q in layer.parameters())) + 1.0

    def _balance_by_time(self, specs: list[LayerSpec], sample: Any) -> list[int]:
        if sample is None:
            raise ConfigError("balance='time' needs sample= (one micro-batch of input) to time the layers")
        times = []
        x = sample
        for spec in specs:
            layer = spec if isinstance(spec, nn.Module) else spec()
            best = float("inf")
            for _ in range(3):
                xin = _leaf(_detach(x)) if _flat(x) else x
                t0 = time.perf_counter()
                y = layer(xin)
                outs = [t for t in _flat(y) if t.requires_grad]
                if outs:
                    torch.autograd.backward([t.float().sum() for t in outs])
                best = min(best, time.perf_counter() - t0)
            for q in layer.parameters():
                q.grad = None
            times.append(best)
            x = _detach(y)
        # every rank must cut at the same places: average the measurements over the world
        total = self.topo.world.allreduce(np.asarray(times, dtype=np.float64), op=MPI.SUM)
        return balance_by_cost([float(t) / self.topo.size for t in total], self.num_stages)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._capture is not None:
            self._capture.append((module, [t for t in _flat(output) if t.requires_grad]))

    # ------------------------------------------------------------------ public surface
    def parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the layers this rank owns (for the optimizer)."""
        for s in self.local_stages:
            yield from self.stages[s].parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``("<layer index>.<name>", parameter)`` with the layer's index in the original sequence."""
        bounds = stage_bounds(self.balance)
        for s in self.local_stages:
            lo, _ = bounds[s]
            for j, layer in enumerate(self.stages[s]):
                for name, q in layer.named_parameters():
                    yield f"{lo + j}.{name}", q

    def close(self) -> None:
        """Free the pipeline's private communicator (collective over ``topo.pp_comm``)."""
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()
            self.comm = MPI.COMM_NULL

    def timeline(self) -> list[dict[str, Any]]:
        """This rank's actions of the last step: start/end seconds since the step began."""
        return [{"rank": self.topo.pp_rank, "world_rank": self.topo.rank, "action": str(a), "stage": a.stage,
                 "kind": a.kind, "mb": a.mb, "start": t0, "end": t1} for a, t0, t1 in self._events]

    def train_step(self, inputs: Any, targets: Any) -> float:
        """Forward and backward of one batch in ``chunks`` micro-batches; returns the mean loss.

        ``inputs`` are needed on the first stage, ``targets`` on the last (others may pass
        None).  Gradients accumulate into the local parameters' ``.grad``.
        """
        me = self.topo.pp_rank
        first, last = self.owner[0] == me, self.owner[self.num_stages - 1] == me
        self._start_step(inputs if first else None, targets if last else None, first, last, True)
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._run(self.table[me], train=True)
        if self.after_backward is not None:
            self.after_backward(self)
        if self.topo.dp > 1:
            from .data_parallel import reduce_gradients

            reduce_gradients(list(self.parameters()), self.topo.dp_comm)
        loss = (self._loss_sum / self.chunks).reshape(1)
        if self.topo.pp > 1:
            broadcast(loss, self.comm, root=self.owner[self.num_stages - 1])
        self.last_loss = float(loss.item())
        return self.last_loss

    def forward(self, inputs: Any) -> Any:
        """Inference: the output for ``inputs`` on the rank holding the last stage, None elsewhere."""
        me = self.topo.pp_rank
        first = self.owner[0] == me
        self._start_step(inputs if first else None, None, first, False, False)
        stages_of = [sorted(s for s, o in self.owner.items() if o == r) for r in range(self.topo.pp)]
        rows = [[Action(s, "F", i) for i in range(self.chunks) for s in stages_of[r]] for r in range(self.topo.pp)]
        self._outputs: list[Any] = []
        with torch.no_grad():
            self._run(lower(rows)[me], train=False)
        if self.owner[self.num_stages - 1] != me:
            return None
        outs = self._outputs
        if isinstance(outs[0], torch.Tensor):
            return torch.cat(outs)
        return tuple(torch.cat([o[j] for o in outs]) for j in range(len(outs[0])))

    __call__ = forward

    # ------------------------------------------------------------------ the executor
    def _start_step(self, inputs: Any, targets: Any, first: bool, last: bool, train: bool) -> None:
        if self._broken is not None:
            raise MpimpError(f"rank {self.topo.rank}: this Pipeline failed earlier ({self._broken}); "
                             f"messages of that step may still be in flight, build a new Pipeline")
        err = None
        try:
            self._inputs = _split(inputs, self.chunks, "inputs") if first else None
            self._targets = _split(targets, self.chunks, "targets") if last and train else None
        except ConfigError as exc:
            err = f"rank {self.topo.rank} (stage {self.topo.pp_rank}): {exc}"
        errors = [e for e in self.topo.world.allgather(err) if e]
        if errors:
            raise ConfigError(errors[0])
        self._state: dict[tuple[int, int], _MB] = {}
        self._local: dict[tuple[int, str, int], Any] = {}
        self._events = []
        self._inflight = 0
        self.peak_inflight = 0
        self.split_weight_passes = 0
        self._step_start = time.perf_counter()

    def _tag(self, stage: int, direction: int, mb: int) -> int:
        return _TAG_BASE + 2 * (mb * self.num_stages + stage) + direction

    def _wait(self, req: Request) -> Any:
        err = self._err_req
        _wait_until(lambda: req.test() or (err is not None and err.test()), req.describe, default_timeout())
        self._check_remote_error()
        return req.result()

    def _check_remote_error(self) -> None:
        if self._err_req is not None and self._err_req.test():
            data = self._err_req.result()
            assert isinstance(data, torch.Tensor)
            self._broken = bytes(data.numpy()).decode()
            raise ConfigError(self._broken)

    def _run(self, row: list[Action], train: bool) -> None:
        progress = _Progress(self.comm) if self._progress_thread else None
        try:
            self._run_row(row, train)
        except MpimpError as exc:
            if self._broken is None:  # a local failure: tell every other stage, then raise
                self._broken = str(exc)
                self._announce(str(exc))
            raise
        except Exception as exc:
            self._broken = f"rank {self.topo.rank}: {type(exc).__name__}: {exc}"
            self._announce(self._broken)
            raise
        finally:
            if progress is not None:
                progress.stop()

    def _announce(self, text: str) -> None:
        payload = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
        reqs = [isend(payload, r, self.comm, _ERR_TAG) for r in range(self.topo.pp) if r != self.topo.pp_rank]
        deadline = time.monotonic() + 5.0
        while reqs and time.monotonic() < deadline:  # eager sends complete at once; do not block on others
            reqs = [q for q in reqs if not q.test()]

    def _run_row(self, row: list[Action], train: bool) -> None:
        recvs: dict[tuple[int, str, int], Request] = {}
        for a in row:
            if a.kind == "RECV_F":
                recvs[a] = irecv(self.owner[a.stage - 1], self.comm, self._tag(a.stage, 0, a.mb), device=self.device)
            elif a.kind == "RECV_B":
                recvs[a] = irecv(self.owner[a.stage + 1], self.comm, self._tag(a.stage, 1, a.mb), device=self.device)
        order = [a for a in row if a in recvs]
        sends: list[Request] = []
        clock = time.perf_counter
        for a in row:
            t0 = clock()
            if a.kind in ("RECV_F", "RECV_B"):
                self._local[a] = self._wait(recvs.pop(a))
                order.remove(a)
            elif a.kind == "SEND_F":
                sends.append(isend(self._local.pop((a.stage, "OUT", a.mb)), self.owner[a.stage + 1],
                                   self.comm, self._tag(a.stage + 1, 0, a.mb)))
            elif a.kind == "SEND_B":
                sends.append(isend(self._local.pop((a.stage, "DX", a.mb)), self.owner[a.stage - 1],
                                   self.comm, self._tag(a.stage - 1, 1, a.mb)))
            elif a.kind == "F":
                self._forward(a.stage, a.mb, train)
            elif a.kind == "B":
                self._backward(a.stage, a.mb)
            else:
                self._weight(a.stage, a.mb)
            self._events.append((a, t0 - self._step_start, clock() - self._step_start))
            for key in order[:4]:  # drive the next receives while we compute
                recvs[key].test()
            sends = [q for q in sends if not q.test()]
            if self._err_req is not None and a.kind in ("F", "B", "W"):
                self._check_remote_error()
        while sends:
            self._wait(sends[0])
            sends = [q for q in sends if not q.test()]

    def _input(self, s: int, i: int) -> Any:
        if s == 0:
            assert self._inputs is not None
            return self._inputs[i]
        if self.owner[s - 1] == self.topo.pp_rank:
            return self._local.pop((s - 1, "OUT", i))
        return self._local.pop(Action(s, "RECV_F", i))

    def _run_layers(self, s: int, x: Any) -> Any:
        for layer in self.stages[s]:
            x = layer(x)
        return x

    def _loss(self, out: Any, target: Any) -> torch.Tensor:
        loss = self.loss_fn(out, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ConfigError(
                f"rank {self.topo.rank} (last stage): loss_fn returned {shape}, not a scalar tensor; "
                f"reduce it (e.g. .mean()) so that loss_fn(output, target) is a scalar"
            )
        return loss.reshape(())

    def _forward(self, s: int, i: int, train: bool) -> None:
        x = self._input(s, i)
        last = s == self.num_stages - 1
        if not train:
            out = self._run_layers(s, x)
            if last:
                self._outputs.append(out)
            else:
                self._local[(s, "OUT", i)] = out
            return
        st = _MB()
        st.x = x if s == 0 else _leaf(x)
        st.ckpt = self.checkpoint == "always" or (self.checkpoint == "except_last" and i < self.chunks - 1)
        st.split = (s, i) in self._has_w
        if last:
            st.target = self._targets[i] if self._targets is not None else None
        if st.ckpt:
            st.rng = torch.get_rng_state()
            with torch.no_grad():
                out = self._run_layers(s, st.x)
                if last:
                    self._loss_sum += self._loss(out, st.target).detach().double()
        else:
            out = self._run_forward(s, st)
        if not last:
            self._local[(s, "OUT", i)] = _detach(out)
        self._state[(s, i)] = st
        self._inflight += 1
        self.peak_inflight = max(self.peak_inflight, self._inflight)

    def _run_forward(self, s: int, st: _MB) -> Any:
        """Forward with autograd (capturing module outputs when W is split off); stores st.out."""
        self._capture = [] if st.split else None
        try:
            out = self._run_layers(s, st.x)
        finally:
            captured, self._capture = self._capture, None
        if s == self.num_stages - 1:
            loss = self._loss(out, st.target)
            if not st.ckpt:
                self._loss_sum += loss.detach().double()
            out = loss / self.chunks
        st.out = out
        if st.split:
            mods = [m for m, _ in (captured or [])]
            # the B/W split is exact when every parameter-owning module ran exactly once
            if len(set(map(id, mods))) != len(mods) or len(mods) != len(self._owners_of_params[s]):
                st.split = False
            else:
                st.captures = captured
        return out

    def _backward(self, s: int, i: int) -> None:
        st = self._state[(s, i)]
        if st.ckpt:
            with torch.random.fork_rng(devices=[]):
                assert st.rng is not None
                torch.set_rng_state(st.rng)
                self._run_forward(s, st)
        last = s == self.num_stages - 1
        if last:
            outs, grads = [st.out], [None]
        else:
            g = self._local.pop((s + 1, "DX", i)) if self.owner[s + 1] == self.topo.pp_rank \
                else self._local.pop(Action(s, "RECV_B", i))
            pairs = [(o, d) for o, d in zip(_flat(st.out), _flat(g)) if o.requires_grad and d.numel() == o.numel()]
            outs, grads = [o for o, _ in pairs], [d for _, d in pairs]
        xs = _flat(st.x)
        need = [t for t in xs if t.requires_grad]
        if st.split and st.captures is not None:
            caps = [t for _, ts in st.captures for t in ts]
            res = torch.autograd.grad(outs, need + caps, grads, retain_graph=True, allow_unused=True) \
                if outs and (need or caps) else [None] * (len(need) + len(caps))
            dx = dict(zip(map(id, need), res[: len(need)]))
            st.cap_grads = res[len(need):]
        else:
            if outs:
                torch.autograd.backward(outs, grads)
            dx = {id(t): t.grad for t in need}
            st.split = False
        if s > 0:
            def grad_of(t: torch.Tensor) -> torch.Tensor:
                if not t.requires_grad:
                    return torch.empty(0, dtype=torch.float32, device=t.device)
                d = dx.get(id(t))
                return torch.zeros_like(t) if d is None else d
            value = grad_of(st.x) if isinstance(st.x, torch.Tensor) else tuple(grad_of(t) for t in xs)
            self._local[(s, "DX", i)] = value
        st.x = st.out = st.target = None
        if not st.split:
            self._release(s, i)

    def _weight(self, s: int, i: int) -> None:
        st = self._state.get((s, i))
        if st is None:  # the B fell back to a full backward (already released)
            return
        k = 0
        self.split_weight_passes += 1
        for module, outs in st.captures or []:
            pairs = [(o, g) for o, g in zip(outs, st.cap_grads[k : k + len(outs)]) if g is not None]
            k += len(outs)
            params = [q for q in module.parameters(recurse=False) if q.requires_grad]
            if not pairs or not params:
                continue
            res = torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs],
                                      retain_graph=True, allow_unused=True)
            for q, g in zip(params, res):
                if g is not None:
                    q.grad = g if q.grad is None else q.grad + g
        self._release(s, i)

    def _release(self, s: int, i: int) -> None:
        del self._state[(s, i)]
        self._inflight -= 1


def _progress_wanted() -> bool:
    """``MPIMP_PROGRESS_THREAD`` (default 1) and an MPI initialised with MPI_THREAD_MULTIPLE."""
    raw = os.environ.get("MPIMP_PROGRESS_THREAD", "1")
    if raw not in ("0", "1"):
        raise ConfigError(f"MPIMP_PROGRESS_THREAD={raw!r}: use 0 or 1")
    return raw == "1" and MPI.Query_thread() == MPI.THREAD_MULTIPLE


class _Progress:
    """A thread that enters MPI every ~200 us while a step runs, so large sends make progress.

    Why: for a large message the receiver can only finish once the sender's MPI library
    has been called again (rendezvous protocol; Open MPI's shared-memory path does so for
    derived datatypes), and the sender is busy computing its next micro-batch: without
    this, every receive waits a whole compute step.  The probe is on a tag nobody uses.
    """

    def __init__(self, comm: MPI.Comm) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(comm,), name="mpimp-progress", daemon=True)
        self._thread.start()

    def _loop(self, comm: MPI.Comm) -> None:
        while not self._stop.wait(2e-4):
            comm.Iprobe(MPI.ANY_SOURCE, _PROGRESS_TAG)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
