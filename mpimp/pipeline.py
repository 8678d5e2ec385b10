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

Execution.  The schedule (``"gpipe"``, ``"1f1b"``, ``"interleaved-1f1b"``, ``"zb-h1"``,
``"interleaved-zb"``, ``"zb-v"`` or a user table, see :mod:`mpimp.schedule`) is verified offline on every rank, lowered, and
this rank's row is run by one loop: all receives are posted (as matched probes) at the
start of the step and tested between computations, sends are ``isend`` and overlap the
following compute, every wait has the transport's deadline.  Tags encode (direction,
micro-batch, virtual stage) so messages cannot be mismatched.  An exception on one rank
(e.g. a non-scalar loss on the last stage) is sent to every stage of the pipeline on a
separate tag and re-raised there, so no rank waits for the deadline.

Shared weights: a parameter that layers on different pipeline ranks share (a GPT's head
reading its embedding's table; found by identity among the modules passed in, named by
``shared=`` for layer factories) is one weight: its copies start equal (broadcast from
the first owner at construction) and their gradients are summed over the owners after
every backward, so each copy holds the whole gradient and identical optimizer steps
keep them equal (Megatron's embedding group).

Tensor parallelism: a stage may consist of tp ranks (its layers are tensor-parallel
modules built by factories); each tp rank talks to the same tp rank of the neighbouring
stage through its own ``topo.pp_comm``.  Data parallelism: at the end of ``train_step``
the shared weights' gradients are summed, the optional ``after_backward(pipe)`` hook
runs, then, when ``topo.dp > 1``, gradients
are averaged over ``topo.dp_comm`` by :func:`mpimp.data_parallel.reduce_gradients`
(``reduce_dtype`` on the wire; ``reduce_grads=False`` leaves that to a ZeRO optimizer).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from .comm import iall_reduce, ibroadcast
from .errors import ConfigError
from .schedule import Action, build, format_table, lower, parse_table, stage_owners, verify
from .schedule.executor import TAG_BASE, StageExecutor, as_leaf, detach_all, flat_tensors
from .schedule.partition import balance_by_cost, check_balance, stage_bounds
from .topology import Topology
from .watchdog import guarded

__all__ = ["Pipeline", "CHECKPOINT_MODES", "SCHEDULES"]

CHECKPOINT_MODES = ("always", "except_last", "never")
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "interleaved-zb", "zb-v")
LayerSpec = Union[nn.Module, Callable[[], nn.Module]]


def _uses(uses: Sequence[tuple[int, str]]) -> str:
    """``layer 0 weight = layer 8 weight``: where one shared weight is used."""
    return " = ".join(f"layer {i} {name}" for i, name in uses)


def _named_groups(shared: Sequence[Sequence[str]], n: int) -> tuple[list[tuple[tuple[int, str], ...]], str | None]:
    """``shared``'s groups as ``((layer, name), ...)``, and what is wrong with it (None: nothing)."""
    groups: list[tuple[tuple[int, str], ...]] = []
    for group in shared:
        if isinstance(group, str) or len(group) < 2:
            return [], (f"shared={list(shared)!r}: give groups of two or more parameter names, "
                        f"e.g. [['0.tok.weight', '{n - 1}.weight']]")
        uses = []
        for text in group:
            head, _, name = str(text).partition(".")
            if not head.isdigit() or not name or not 0 <= int(head) < n:
                return [], (f"shared: {text!r} is not '<layer index>.<parameter name>' with a layer index in "
                            f"0..{n - 1} (the names of Pipeline.named_parameters())")
            uses.append((int(head), name))
        groups.append(tuple(uses))
    return groups, None


class Pipeline(StageExecutor):
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
        schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved-1f1b"``, ``"zb-h1"``,
            ``"interleaved-zb"``, ``"zb-v"`` (needs ``virtual_stages=2``) or an action table (text or one
            list of actions per rank, see :mod:`mpimp.schedule`).
        balance: layers per stage (p x v entries, model order), ``None`` to balance by
            parameter count, or ``"time"`` to balance by forward+backward time measured on
            ``sample`` (then every rank builds every layer once and times its forward + backward,
            the fastest of 3 runs).
        virtual_stages: v; rank s holds virtual stages s, s + p, ... (the interleaved schedules),
            or with ``"zb-v"`` (v = 2) stages s and 2p - 1 - s, a V: rank 0 holds the first and
            the last stage.  A user's table places each stage on the rank whose row runs it.
        checkpoint: ``"always"``, ``"except_last"`` (every micro-batch but the last) or
            ``"never"``: a checkpointed micro-batch keeps only its stage input and reruns
            the forward just before its backward, with the random state of the first run
            (CPU and, for a stage on a GPU, the device's: the same dropout masks).  Unlike
            ``torch.utils.checkpoint``, the rerun leaves the running statistics of batch
            and instance norms (``track_running_stats``) as the first run left them, so
            each micro-batch counts once; other state a layer updates in its forward is
            updated again in the rerun.
        after_backward: called as ``after_backward(pipe)`` after the last backward of a
            step, before the data-parallel gradient average.
        sample: one micro-batch of input, needed only for ``balance="time"``.
        reduce_grads: with ``topo.dp > 1``, average the gradients over ``topo.dp_comm`` at
            the end of :meth:`train_step` (default).  ``False`` leaves the local sums for an
            optimizer that reduces them itself (:class:`mpimp.ShardedOptimizer`), so the
            work is not done twice.
        reduce_dtype: the gradients' type on the wire for that average (None = their own;
            ``"bf16"``/``"fp16"`` use the native fp32-accumulating operators).
        shared: weights that layers built by factories share, as groups of parameter names
            ``"<layer index>.<name in the layer>"`` (e.g. ``[["0.tok.weight", "9.weight"]]``,
            a GPT's token table and its tied head): each group is one weight, kept as
            equal copies on the ranks (or layers) holding them.  Sharing among modules
            passed in is found by identity without it.

    Attributes (read-only): ``layer_indices`` (indices into the original sequence of the
    layers this rank owns), ``local_stages`` (this rank's virtual stages, ascending),
    ``stages`` (stage -> ``nn.ModuleList`` of its layers), ``balance``, ``num_stages``,
    ``owner`` (stage -> pipeline rank), ``compute_table`` / ``table`` (every rank's actions,
    before / after lowering), ``predicted_peak_inflight`` (the verifier's, per rank),
    ``peak_inflight`` and ``split_weight_passes`` (measured in the last step).

    Every rank of ``topo.world`` must call the constructor, :meth:`train_step` and
    :meth:`forward` together (they start with a small collective that checks the inputs
    on every rank, so a bad batch fails everywhere before any message is sent).  After an
    exception inside a step the pipeline refuses further steps; build a new one.
    """

    def __init__(self, model: nn.Sequential | Sequence[LayerSpec], topo: Topology, *, chunks: int,
                 loss_fn: Callable[[Any, Any], torch.Tensor], schedule: str | Sequence[Sequence[Any]] = "1f1b",
                 balance: Sequence[int] | str | None = None, virtual_stages: int = 1,
                 checkpoint: str = "never", after_backward: Callable[[Pipeline], None] | None = None,
                 sample: Any = None, reduce_grads: bool = True,
                 reduce_dtype: torch.dtype | str | None = None, shared: Sequence[Sequence[str]] = ()) -> None:
        p, me = topo.pp, topo.pp_rank
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
            raise ConfigError(f"chunks={chunks!r} must be an integer >= 1 (number of micro-batches)")
        if checkpoint not in CHECKPOINT_MODES:
            raise ConfigError(f"checkpoint={checkpoint!r}: use one of {', '.join(CHECKPOINT_MODES)}")
        if not isinstance(virtual_stages, int) or isinstance(virtual_stages, bool) or virtual_stages < 1:
            raise ConfigError(f"virtual_stages={virtual_stages!r} must be an integer >= 1")
        if not callable(loss_fn):
            raise ConfigError("loss_fn must be callable as loss_fn(output, target) -> scalar tensor")
        if after_backward is not None and not callable(after_backward):
            raise ConfigError(f"after_backward must be callable as after_backward(pipe), got "
                              f"{type(after_backward).__name__} (GPT.pipeline_layers' third part is now "
                              f"shared=, the names of its tied weights)")
        specs = list(model)  # a Sequential's children in order, repeats included (children() lists each once)
        bad = [i for i, s in enumerate(specs) if not callable(s)]
        if not specs or bad:
            raise ConfigError("model must be an nn.Sequential or a non-empty list of modules / zero-argument "
                              f"layer factories{f'; entry {bad[0]} is not callable' if bad else ''}")
        self.topo, self.chunks, self.loss_fn = topo, chunks, loss_fn
        self.checkpoint, self.after_backward = checkpoint, after_backward
        from .data_parallel import _reduce_dtype

        self.reduce_grads, self.reduce_dtype = bool(reduce_grads), _reduce_dtype(reduce_dtype)

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
        # what every rank must agree on: a rank with another schedule, chunks or balance (or
        # another mpimp building another table) would otherwise wait for messages that never come
        digest = hashlib.sha256(format_table(self.compute_table).encode()).hexdigest()[:12]
        plan = (self.schedule_name, chunks, tuple(self.balance), digest)
        gathered = guarded("Pipeline: allgather of construction errors and plans",
                           lambda: topo.world.allgather((failure, plan)))
        failures = [f for f, _ in gathered if f]
        if failures:
            raise ConfigError(failures[0])
        odd = next((r for r, (_, other) in enumerate(gathered) if other != gathered[0][1]), None)
        if odd is not None:
            def show(pl: tuple) -> str:
                return f"schedule {pl[0]!r}, chunks={pl[1]}, balance={list(pl[2])}, table {pl[3]}"
            raise ConfigError(f"the ranks disagree on the pipeline: world rank 0 has "
                              f"{show(gathered[0][1])}, world rank {odd} has {show(gathered[odd][1])}; every rank "
                              f"must pass the same schedule, chunks and balance, and run the same mpimp")
        self.device = next((q.device for q in self.parameters()), torch.device("cpu"))
        # a private duplicate: messages of a failed step can never reach another Pipeline
        self.comm: MPI.Comm = guarded("Pipeline: Dup of pp_comm", topo.pp_comm.Dup)
        tag_ub = self.comm.Get_attr(MPI.TAG_UB) or 32767
        top = TAG_BASE + 2 * (chunks * self.num_stages) + 2
        if top > tag_ub:
            raise ConfigError(f"chunks x stages = {chunks} x {self.num_stages} needs MPI tags up to {top} "
                              f"but this MPI allows {tag_ub}; use fewer micro-batches or stages")
        self._tied: list[tuple[list[nn.Parameter], MPI.Comm | None, str]] = []  # (copies here, owners' comm, uses)
        self._tie_comms: list[MPI.Comm] = []
        self._tie(specs, bounds, shared)
        self._init_executor({(a.stage, a.mb) for a in self.table[me] if a.kind == "W"})
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

    def _tie(self, specs: list[LayerSpec], bounds: list[tuple[int, int]], shared: Sequence[Sequence[str]]) -> None:
        """Make each weight that several layers share one weight: the copies start from the
        first owner's values (a broadcast here, then a copy into this rank's other copies)
        and their gradients are summed after every backward (:meth:`_sum_tied_gradients`),
        as one parameter's gradient sums over its uses.

        The groups: parameters that modules passed in share by identity (a GPT's head
        reading its embedding's table, one module at two places) and sit on two or more
        pipeline ranks; and the ``shared`` name groups (layer factories are built on their
        owner only, so their sharing cannot be seen).  Every pipeline rank must see the
        same groups (collective over the pipeline; a rank that cannot find a named
        parameter makes every rank raise).
        """
        me = self.topo.pp_rank
        rank_of = {i: self.owner[s] for s, (lo, hi) in enumerate(bounds) for i in range(lo, hi)}
        local = dict(zip(self.layer_indices, [m for s in self.local_stages for m in self.stages[s]]))
        named, problem = _named_groups(shared, len(specs))
        uses: dict[int, list[tuple[int, str]]] = {}
        for i, spec in enumerate(specs):
            if isinstance(spec, nn.Module):
                for name, q in spec.named_parameters():
                    uses.setdefault(id(q), []).append((i, name))
        identity = [tuple(u) for u in uses.values() if len(u) > 1]
        # a named group takes in the other uses of a parameter it names (one module at two places)
        named = [g + tuple(use for h in identity if set(h) & set(g) for use in h if use not in g) for g in named]
        counted = Counter(use for g in named for use in g)  # (a name listed twice, or the same module twice)
        twice = [use for use, n in counted.items() if n > 1]
        if twice and problem is None:
            problem = (f"shared: layer {twice[0][0]} {twice[0][1]} is in two groups (a parameter the modules "
                       f"already share counts as the same weight); put everything that is one weight in one group")
        taken = set(counted)
        found = [h for h in identity if len({rank_of[i] for i, _ in h}) > 1 and not taken.intersection(h)]
        groups = sorted(found) + named  # (found ones in a canonical order, then the named ones)
        copies: list[list[nn.Parameter]] = []
        for u in groups:
            mine: dict[int, nn.Parameter] = {}
            for i, name in u:
                if rank_of[i] == me:
                    q = dict(local[i].named_parameters()).get(name)
                    if q is None and problem is None:
                        problem = (f"rank {self.topo.rank} (pp rank {me}): layer {i} has no parameter {name!r} "
                                   f"(shared=...; it has {sorted(dict(local[i].named_parameters()))})")
                    elif q is not None:
                        mine.setdefault(id(q), q)
            copies.append(list(mine.values()))
        kinds = [sorted({(tuple(q.shape), str(q.dtype).removeprefix("torch.")) for q in mine}) for mine in copies]
        owners = [tuple(sorted({rank_of[i] for i, _ in u})) for u in groups]
        if self.topo.pp > 1:
            seen = guarded("Pipeline: allgather of the weights shared between stages",
                           lambda: self.comm.allgather((groups, problem, kinds)))
        else:
            seen = [(groups, problem, kinds)]
        problems = [why for _, why, _ in seen if why is not None]
        differ = next((r for r, (theirs, _, _) in enumerate(seen) if theirs != groups), None)
        if not problems and differ is None:  # one shape and dtype for all copies of each weight
            for k, u in enumerate(groups):
                every = sorted({kind for _, _, theirs in seen for kind in theirs[k]})
                if len(every) > 1:
                    problems.append(f"the copies of the shared weight {_uses(u)} differ in shape or dtype: "
                                    f"{', '.join(f'{list(shape)} {dtype}' for shape, dtype in every)}; "
                                    f"only copies of one weight can be tied")
                    break
        if problems or differ is not None:  # (seen by every rank: each raises, after freeing the private comm)
            self.comm.Free()
            if problems:
                raise ConfigError(problems[0])
            raise ConfigError(
                f"pipeline ranks disagree on which layers share a weight: pp rank {me} sees "
                f"{'; '.join(map(_uses, groups)) or 'none'}, pp rank {differ} sees "
                f"{'; '.join(map(_uses, seen[differ][0])) or 'none'}; build the model the same way on every rank "
                f"(the same modules shared, the same shared=)")
        comms: dict[tuple[int, ...], MPI.Comm] = {}
        for ranks in sorted({r for r in owners if len(r) > 1}):  # collective over the pipeline, in one order
            sub = guarded("Pipeline: Split of pp_comm for shared weights",
                          lambda ranks=ranks: self.comm.Split(0 if me in ranks else MPI.UNDEFINED, key=me))
            if sub != MPI.COMM_NULL:
                comms[ranks] = sub
                self._tie_comms.append(sub)
        with torch.no_grad():
            for u, ranks, mine in zip(groups, owners, copies):
                if not mine:
                    continue
                comm = comms.get(ranks)
                if comm is not None:
                    ibroadcast(mine[0].data, comm, root=0).wait()  # (the transport's deadline)
                for q in mine[1:]:
                    q.data.copy_(mine[0].data)
                if comm is not None or len(mine) > 1:  # (frozen or not: may be unfrozen later)
                    self._tied.append((mine, comm, _uses(u)))

    def _balance_by_time(self, specs: list[LayerSpec], sample: Any) -> list[int]:
        if sample is None:
            raise ConfigError("balance='time' needs sample= (one micro-batch of input) to time the layers")
        times = []
        x = sample
        for spec in specs:
            layer = spec if isinstance(spec, nn.Module) else spec()
            best = float("inf")
            for _ in range(3):
                xin = as_leaf(detach_all(x)) if flat_tensors(x) else x
                t0 = time.perf_counter()
                y = layer(xin)
                outs = [t for t in flat_tensors(y) if t.requires_grad]
                if outs:
                    torch.autograd.backward([t.float().sum() for t in outs])
                best = min(best, time.perf_counter() - t0)
            for q in layer.parameters():
                q.grad = None
            times.append(best)
            x = detach_all(y)
        # every rank must cut at the same places: average the measurements over the world
        total = guarded("Pipeline: all-reduce of layer times (balance='time')",
                        lambda: self.topo.world.allreduce(np.asarray(times, dtype=np.float64), op=MPI.SUM))
        return balance_by_cost([float(t) / self.topo.size for t in total], self.num_stages)

    # ------------------------------------------------------------------ public surface
    def parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the layers this rank owns (for the optimizer), each once: a module
        in two of this rank's (virtual) stages, or a weight tied between them, is one
        parameter (torch optimizers would otherwise step it twice)."""
        for _, q in self.named_parameters():
            yield q

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``("<layer index>.<name>", parameter)`` with the layer's index in the original
        sequence; a parameter this rank holds in several places is named once, by its first."""
        bounds = stage_bounds(self.balance)
        seen: set[int] = set()
        for s in self.local_stages:
            lo, _ = bounds[s]
            for j, layer in enumerate(self.stages[s]):
                for name, q in layer.named_parameters():
                    if id(q) not in seen:
                        seen.add(id(q))
                        yield f"{lo + j}.{name}", q

    def close(self) -> None:
        """Free the pipeline's private communicator (collective over ``topo.pp_comm``) and
        take the capture hooks off a stage with a compiled layer (they can then serve a new
        Pipeline; other stages' hooks exist only while a split forward runs).

        After a failed step the communicator is left allocated on every rank (the ranks
        agree on that first): messages of that step may still be in flight or waiting
        unmatched, and MPI may give a freed communicator's context to the next one, where
        a stale activation would be taken for the new pipeline's (seen with Open MPI: the
        first step of a pipeline built after a failed one received the old step's micro-batch).
        """
        self._remove_layer_hooks()
        if self.comm != MPI.COMM_NULL:
            broken = self._broken is not None
            if self.topo.pp > 1:
                broken = guarded("Pipeline.close: whether any stage failed",
                                 lambda: self.topo.pp_comm.allreduce(broken, op=MPI.LOR))
            if not broken:
                self.comm.Free()
                for sub in self._tie_comms:
                    sub.Free()
            self.comm = MPI.COMM_NULL
            self._tie_comms, self._tied = [], []

    @property
    def step_origin(self) -> float:
        """``time.perf_counter()`` at the start of the last step (the timeline's origin)."""
        return self._step_start

    def timeline(self) -> list[dict[str, Any]]:
        """This rank's actions of the last step: start/end seconds since the step began;
        ``cpu_start``/``cpu_end``, the CPU seconds the rank's thread had used since the step
        began, and ``cpu``, their difference (below ``end - start`` when ranks share cores,
        or while a receive waits without spinning)."""
        return [{"rank": self.topo.pp_rank, "world_rank": self.topo.rank, "action": str(a), "stage": a.stage,
                 "kind": a.kind, "mb": a.mb, "start": t0, "end": t1, "cpu": c1 - c0, "cpu_start": c0,
                 "cpu_end": c1} for a, t0, t1, c0, c1 in self._events]

    @property
    def is_first_stage(self) -> bool:
        """True on the pipeline rank holding stage 0 (it takes the inputs): pp rank 0 for the
        built-in schedules; a user's table may place it elsewhere."""
        return self.owner[0] == self.topo.pp_rank

    @property
    def is_last_stage(self) -> bool:
        """True on the pipeline rank holding the last stage (it takes the targets and computes
        the loss; :meth:`forward` returns the output there): pp rank p - 1, but 0 for ``zb-v``."""
        return self.owner[self.num_stages - 1] == self.topo.pp_rank

    def train_step(self, inputs: Any, targets: Any) -> float:
        """Forward and backward of one batch in ``chunks`` micro-batches; returns the mean loss.

        ``inputs`` are needed on the rank holding the first stage (:attr:`is_first_stage`),
        ``targets`` on the one holding the last (:attr:`is_last_stage`; pipeline rank 0 for
        ``zb-v``); others may pass None.  Gradients accumulate into the local parameters' ``.grad``.
        """
        first, last = self.is_first_stage, self.is_last_stage
        self._start_step(inputs if first else None, targets if last else None, first, last, True)
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        earlier = self._set_aside_tied_gradients()
        try:
            self._run(self.table[self.topo.pp_rank], train=True)
            try:  # a failure from here on is announced to the other stages too, as in the loop
                self._sum_tied_gradients()
            except Exception as exc:
                self._fail(exc)
        finally:  # (also after a failure: the earlier steps' gradients are kept)
            self._add_back(earlier)
        try:
            if self.after_backward is not None:
                self.after_backward(self)
            if self.topo.dp > 1 and self.reduce_grads:
                from .data_parallel import reduce_gradients

                reduce_gradients(list(self.parameters()), self.topo.dp_comm, reduce_dtype=self.reduce_dtype)
            loss = (self._loss_sum / self.chunks).reshape(1)
            if self.topo.pp > 1:  # waiting on it and on the other stages' failures
                self._wait(ibroadcast(loss, self.comm, root=self.owner[self.num_stages - 1]))
        except Exception as exc:
            self._fail(exc)
        self.last_loss = float(loss.item())
        return self.last_loss

    def _set_aside_tied_gradients(self) -> list[list[torch.Tensor | None]]:
        """Take the shared weights' gradients of earlier steps off them, so that the sum over
        their copies covers this step's only (:meth:`_add_back` returns them)."""
        earlier = [[q.grad for q in copies] for copies, _, _ in self._tied]
        for copies, _, _ in self._tied:
            for q in copies:
                q.grad = None
        return earlier

    def _add_back(self, earlier: list[list[torch.Tensor | None]]) -> None:
        for (copies, _, _), grads in zip(self._tied, earlier):
            for q, g in zip(copies, grads):
                if g is not None:
                    q.grad = g if q.grad is None else g.add_(q.grad)

    def _sum_tied_gradients(self) -> None:
        """Sum this step's gradient of each shared weight over all its copies (this rank's,
        then over the pipeline ranks holding one), so every copy gets the whole gradient,
        as one weight's sums over its uses.

        The owners first agree (a small all-reduce per weight) on how many of them train it
        and how many used it this step: frozen everywhere, or used nowhere, it keeps no
        gradient (as in torch: ``.grad`` stays None); frozen on some copies only is an
        error (the copies would drift apart); a rank whose layers did not use it counts zero.
        """
        counts = []
        for copies, comm, uses in self._tied:
            trains = {q.requires_grad for q in copies}
            if len(trains) > 1:
                raise ConfigError(f"rank {self.topo.rank} (pp rank {self.topo.pp_rank}): the copies of the shared "
                                  f"weight {uses} on this rank are frozen on some layers only; set requires_grad "
                                  f"the same on all of them")
            trained = trains == {True}
            used = trained and any(q.grad is not None for q in copies)
            mine = torch.tensor([float(trained), float(used)], dtype=torch.float64)
            counts.append(self._wait(iall_reduce(mine, comm)) if comm is not None else mine)
        for (_, comm, uses), (trained, _) in zip(self._tied, counts):
            owners = comm.Get_size() if comm is not None else 1
            if 0 < int(trained) < owners:
                raise ConfigError(
                    f"rank {self.topo.rank} (pp rank {self.topo.pp_rank}): the weight {uses}, shared by "
                    f"{owners} pipeline ranks, is frozen on {owners - int(trained)} of them and trained on "
                    f"{int(trained)}; set its requires_grad the same on every rank")
        sums = []
        for (copies, comm, _), (_, used) in zip(self._tied, counts):
            if int(used) == 0:
                continue
            grads = [q.grad for q in copies if q.grad is not None]  # (then every copy is trained)
            if not grads:  # (this rank's layers did not use it: it adds zero)
                total = torch.zeros_like(copies[0])
            elif len(grads) == 1:
                total = grads[0]
            else:
                total = grads[0].clone()
                for g in grads[1:]:
                    total += g
            sums.append((copies, total, iall_reduce(total, comm) if comm is not None else None))
        for copies, total, req in sums:
            if req is not None:
                self._wait(req)
            for k, q in enumerate(copies):
                q.grad = total if k == 0 else total.clone()

    def forward(self, inputs: Any) -> Any:
        """Inference: the output for ``inputs`` on the rank holding the last stage, None elsewhere."""
        me = self.topo.pp_rank
        first = self.is_first_stage
        self._start_step(inputs if first else None, None, first, False, False)
        # each rank's forwards in wavefront order (stage + micro-batch, then stage): F(s, i)
        # follows F(s - 1, i) on every placement, and a V's rank 0 runs 0F1 before the first
        # micro-batch has come back to its last stage, so the micro-batches pipeline
        stages_of = [sorted(s for s, o in self.owner.items() if o == r) for r in range(self.topo.pp)]
        rows = [[Action(s, "F", i) for s, i in sorted(((s, i) for s in stages_of[r] for i in range(self.chunks)),
                                                        key=lambda si: (si[0] + si[1], si[0]))]
                for r in range(self.topo.pp)]
        self._outputs: list[Any] = []
        with torch.no_grad():
            self._run(lower(rows)[me], train=False)
        if not self.is_last_stage:
            return None
        outs = self._outputs
        if isinstance(outs[0], torch.Tensor):
            return torch.cat(outs)
        return tuple(torch.cat([o[j] for o in outs]) for j in range(len(outs[0])))

    __call__ = forward

