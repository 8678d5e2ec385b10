"""The executor: runs one rank's row of a lowered action table on its pipeline stages.

Problem: every schedule (fill-drain, 1F1B, interleaved, zero-bubble, a user's table)
needs the same mechanics: post the receives, run forwards and backwards in the table's
order, send activations and gradients without blocking the compute, never hang when a
peer fails.  This module is that one loop, shared by all schedules; :class:`StageExecutor`
is mixed into :class:`mpimp.Pipeline`, which provides the stages and communicator.

* Receives are created for every RECV action at the start of the step (a matched probe:
  nothing is allocated until the message arrives) and the next four are tested after
  every action; sends are ``isend``, tested after every action, completed at the end.
* Tags are ``16 + 2 * (mb * stages + receiving stage) + direction`` (0 forward, 1
  backward): unique per (kind, micro-batch, virtual stage).  Tag 1 carries errors: a rank
  that fails sends its message to every other stage, which raise the same ConfigError.
* Stage messages are sent packed (``isend(pack=True)``: one contiguous copy the receiver
  pulls by itself, so the busy sender need not call MPI for it to move); a progress
  thread entering MPI every ~200 us runs only with ``MPIMP_PROGRESS_THREAD=1``
  (:class:`mpimp.comm.ProgressThread`).
* Zero-bubble split: with a W for (stage, mb), the forward records the output of every
  module that directly owns parameters (hooks on the modules during that forward only); B takes one
  ``autograd.grad`` with respect to the stage input, the outputs of the plain
  ``nn.Linear`` s (the engine then skips their weight-gradient kernels) and the
  parameters of every other module, which it accumulates (a LayerNorm's come out of the
  same kernel as its input gradient; one ``autograd.grad`` per such module at W made B +
  W 9% slower than one full backward, 5% now); W computes each plain Linear's
  ``dW += g^T x`` and ``db += sum g`` over the flattened leading dims (one ``addmm_``,
  no autograd call), or uses ``autograd.grad`` for one that stopped being plain between
  B and W; both accumulate into ``.grad`` in place, as autograd does.
* Checkpointing: the forward runs under ``no_grad`` keeping only the stage input and the
  RNG state (CPU, and the device's for a stage on CUDA); B reruns it with that state,
  then backpropagates.
"""

from __future__ import annotations

import os
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn, Union

import torch
from mpi4py import MPI
from torch import nn

from ..comm import (
    ProgressThread,
    Request,
    _trace,
    _wait_until,
    all_reduce,
    default_timeout,
    irecv,
    isend,
    progress_thread_wanted,
)
from ..errors import ConfigError, DeadlineError, MpimpError
from ..watchdog import guarded
from .actions import Action

__all__ = ["StageExecutor", "ERR_TAG", "TAG_BASE", "split_batch", "flat_tensors", "as_leaf", "detach_all"]

ERR_TAG = 1
TAG_BASE = 16
Tensors = Union[torch.Tensor, tuple[torch.Tensor, ...]]


def flat_tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    return []


def split_batch(x: Any, chunks: int, what: str) -> list[Any]:
    """Split a tensor (or tuple of tensors) into ``chunks`` equal parts along dim 0."""
    items = flat_tensors(x)
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


def as_leaf(x: Tensors) -> Tensors:
    """Detached copy-free leaf of a received value; floating tensors require grad."""
    def one(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.requires_grad_(True) if t.is_floating_point() or t.is_complex() else t
    if isinstance(x, torch.Tensor):
        return one(x)
    return tuple(one(t) for t in x)


def detach_all(x: Tensors) -> Tensors:
    return x.detach() if isinstance(x, torch.Tensor) else tuple(t.detach() for t in x)


class _MB:
    """State of one (stage, micro-batch) between its F and the end of its backward."""

    __slots__ = ("x", "out", "ckpt", "rng", "device_rng", "split", "captures", "cap_grads", "target")

    def __init__(self) -> None:
        self.x: Any = None
        self.out: Any = None
        self.ckpt = False
        self.rng: torch.Tensor | None = None
        self.device_rng: torch.Tensor | None = None  # the CUDA generator's, for a stage on a GPU
        self.split = False
        self.captures: list[Capture] | None = None
        self.cap_grads: Sequence[torch.Tensor | None] = ()
        self.target: Any = None


class Capture(NamedTuple):
    """One call of a parameter-owning module in a split forward: its outputs that need a
    gradient; for a plain ``nn.Linear`` that W may differentiate directly, its input and
    the version counters of input and output when the call returned."""

    module: nn.Module
    outputs: list[torch.Tensor]
    linear_input: torch.Tensor | None
    versions: tuple[int, int] = (0, 0)


# the autograd nodes F.linear leaves as its output (addmm / mm, reshaped for inputs of other
# than 2 dims, plus the bias for a strided input): any other node means a hook or an
# in-place op replaced the output, and W goes through autograd
_LINEAR_NODES = frozenset({"AddmmBackward0", "MmBackward0", "ViewBackward0", "UnsafeViewBackward0",
                           "SqueezeBackward4", "AddBackward0"})


def _direct_linear_input(module: nn.Module, args: Any, output: Any) -> torch.Tensor | None:
    """The input of a call that W may differentiate directly, else None (autograd then).

    Only an exact ``nn.Linear`` with a trainable real floating-point weight, whose own
    parameters are its ``weight`` and ``bias`` Parameters (not computed by a pre-hook, as
    old-style ``weight_norm`` does), called on one plain tensor, with input, output and
    weight of one dtype (not under autocast, where the matmul runs in another dtype), the
    output straight from ``F.linear`` (no global forward hook; mpimp's hook runs before the
    module's own): then ``out = x W^T + b`` and the weight gradient is ``g^T x`` over the
    flattened leading dimensions.  A frozen weight keeps nothing alive for W (autograd
    handles its bias).  :func:`_still_direct` re-checks at W what may have changed since.
    """
    if type(module) is not nn.Linear or len(args) != 1 or type(output) is not torch.Tensor:
        return None
    x, weight, bias = args[0], module.weight, module.bias
    if type(x) is not torch.Tensor or type(weight) is not nn.Parameter or not weight.requires_grad:
        return None
    if not weight.dtype.is_floating_point or weight.layout != torch.strided or not (x.dtype == output.dtype == weight.dtype):
        return None
    own = {id(q) for q in module.parameters(recurse=False)}
    if own != {id(weight)} | ({id(bias)} if bias is not None else set()):
        return None
    if output.grad_fn is None or type(output.grad_fn).__name__ not in _LINEAR_NODES:
        return None
    if getattr(nn.modules.module, "_global_forward_hooks", None):
        return None
    return x


def _still_direct(cap: Capture) -> bool:
    """Whether the direct W of ``cap`` still equals autograd's: input and output not changed
    in place since the forward (an in-place ReLU on the output moves the captured gradient
    past its mask; autograd would raise for a changed input) and no gradient hooks on the
    weight or bias (autograd runs them, the direct formula would not)."""
    x, out = cap.linear_input, cap.outputs[0] if cap.outputs else None
    if x is None or out is None or (x._version, out._version) != cap.versions:
        return False
    weight, bias = cap.module.weight, cap.module.bias
    return not weight._backward_hooks and (bias is None or not bias._backward_hooks)


def _linear_weight_grad(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    """``weight.grad += g^T x``, ``bias.grad += sum(g)`` over the flattened leading dims."""
    with torch.no_grad():
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.detach().reshape(-1, x.shape[-1])
        weight, bias = module.weight, module.bias
        if weight.requires_grad:
            if weight.grad is None:
                weight.grad = g2.t().mm(x2)
            else:
                weight.grad.addmm_(g2.t(), x2)
        if bias is not None and bias.requires_grad:
            if bias.grad is None:
                bias.grad = g2.sum(0)
            else:
                bias.grad.add_(g2.sum(0))


def _split_is_exact(out: Any, captured: list[Capture], inputs: list[torch.Tensor]) -> bool:
    """Whether splitting this stage's backward into B and W gives every parameter its whole gradient.

    B computes the gradients of the stage inputs, of each plain Linear's output and of
    every other module's parameters (those in the same backward, always whole); W then
    computes each plain Linear M's weight gradient from its output gradient, ``g^T x``, or
    ``grad(M's outputs, M's own parameters)`` if its call stopped being plain (an in-place
    change), which follows every path below M's outputs.  That is exact when each parameter enters the
    graph only in its owner's *region* (the ops between M's outputs and the next captured
    outputs or stage inputs below them): a parameter read in another region (a tied
    weight read by another layer of the stage, a functional use) would lose that share,
    one owned by two captured modules would be counted twice, and one read above every
    captured output would get none.  Otherwise the stage runs full backwards.
    """
    owner: dict[int, nn.Module] = {}
    for mod, *_ in captured:
        for q in mod.parameters(recurse=False):
            if owner.setdefault(id(q), mod) is not mod:
                return False  # one Parameter registered in two modules
    cut: dict[Any, nn.Module] = {}  # captured output nodes: the region boundaries
    for mod, ts, *_ in captured:
        for t in ts:
            if t.grad_fn is not None and cut.setdefault(t.grad_fn, mod) is not mod:
                return False  # one node is the output of two modules
    allowed = {id(t) for t in inputs}
    regions: list[tuple[nn.Module | None, list[Any]]] = [
        (None, [t.grad_fn for t in flat_tensors(out) if t.grad_fn is not None])]
    regions += [(mod, [n for t in ts if t.grad_fn is not None for n, _ in t.grad_fn.next_functions if n is not None])
                for mod, ts, *_ in captured]
    for mod, stack in regions:
        seen: set[Any] = set()
        while stack:
            node = stack.pop()
            if node in seen or node in cut:
                continue
            seen.add(node)
            leaf = getattr(node, "variable", None)  # AccumulateGrad: a leaf that wants a gradient
            if leaf is not None and id(leaf) not in allowed and owner.get(id(leaf)) is not mod:
                return False
            stack.extend(n for n, _ in node.next_functions if n is not None)
    return True


def _accumulate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """``q.grad += g`` for each pair, as autograd's own accumulation does."""
    with torch.no_grad():
        for q, g in zip(params, grads):
            if g is None:
                continue
            if q.grad is None:  # a copy: g may be another tensor's gradient passed through
                q.grad = g.clone()
            else:
                q.grad.add_(g)


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` runs through ``torch.compile`` (the wrapper ``torch.compile(m)``
    returns, or ``m.compile()`` in place): hooks added after its first compiled call are not
    seen (torch skips the guards on module hooks), so the capture hooks cannot come and go."""
    return hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None


def _remove_hooks(handles: list[Any]) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class StageExecutor:
    """Mixin running a row of actions; the host class provides the attributes below.

    ``topo``, ``comm`` (private pp communicator), ``owner`` (stage -> pp rank),
    ``num_stages``, ``stages`` (stage -> ModuleList), ``chunks``, ``loss_fn``,
    ``checkpoint``, ``device``, and calls :meth:`_init_executor` once.
    """

    topo: Any
    comm: MPI.Comm
    owner: dict[int, int]
    num_stages: int
    stages: dict[int, nn.ModuleList]
    chunks: int
    loss_fn: Any
    checkpoint: str
    device: torch.device

    def _init_executor(self, has_w: set[tuple[int, int]]) -> None:
        self._has_w = has_w
        self._capture: list[Capture] | None = None
        self._owners_of_params: dict[int, list[nn.Module]] = {}
        self._hook_handles: list[Any] = []  # (only while a split forward runs)
        self._life_hooks: list[Any] = []  # (for the pipeline's life: stages with a compiled layer)
        self._hooked_for_life: set[int] = set()
        self._warned_uncaptured: set[int] = set()  # stages whose split fell back for a module not seen
        # norms whose training-mode forward updates running statistics (BatchNorm, InstanceNorm
        # with track_running_stats): a checkpointed micro-batch's recompute restores them, so
        # each forward counts once, as in plain torch
        self._norms: dict[int, list[nn.Module]] = {}
        me = weakref.ref(self)

        def life_hook(module: nn.Module, args: Any, output: Any) -> None:
            ex = me()
            if ex is not None:
                ex._hook(module, args, output)

        for s, mods in self.stages.items():
            self._owners_of_params[s] = [mod for mod in mods.modules() if any(True for _ in mod.parameters(recurse=False))]
            self._norms[s] = [mod for mod in mods.modules()
                              if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats]
            if any(stage == s for stage, _ in has_w) and any(_compiled(mod) for mod in mods.modules()):
                # a compiled layer does not see hooks added after its first compiled call:
                # its modules keep theirs, held weakly (the modules outlive the pipeline)
                self._hooked_for_life.add(s)
                self._life_hooks += [mod.register_forward_hook(life_hook, prepend=True) for mod in self._owners_of_params[s]]
        weakref.finalize(self, _remove_hooks, self._life_hooks)
        p = self.topo.pp
        self._err_req: Request | None = irecv(MPI.ANY_SOURCE, self.comm, ERR_TAG) if p > 1 else None
        self._broken: str | None = None
        self._progress_thread = p > 1 and progress_thread_wanted()
        # action, start, end (wall seconds), CPU seconds of this thread at start and end (since the step began)
        self._events: list[tuple[Action, float, float, float, float]] = []
        self._cpu_start = 0.0
        self._step_start = 0.0
        self.peak_inflight = 0  # measured in the last step: micro-batches held between F and B/W
        self.split_weight_passes = 0  # W actions of the last step that ran a separate weight pass

    def _remove_layer_hooks(self) -> None:
        _remove_hooks(self._life_hooks)

    def _add_capture_hooks(self, s: int) -> None:
        """Hooks recording the outputs of stage ``s``'s parameter-owning modules, for one
        split forward (prepended: the output before users' hooks).  They are on the modules
        only during that forward: a module with a hook leaves torch's hook-free fast path on
        every call (0.4% of the benchmark's interleaved-zb step).  A stage with a compiled
        layer keeps its hooks for the pipeline's life instead (:func:`_compiled`)."""
        if s in self._hooked_for_life:
            return
        for mod in self._owners_of_params[s]:
            self._hook_handles.append(mod.register_forward_hook(self._hook, prepend=True))

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._capture is not None:
            x = _direct_linear_input(module, args, output)
            versions = (x._version, output._version) if x is not None else (0, 0)
            self._capture.append(Capture(module, [t for t in flat_tensors(output) if t.requires_grad], x, versions))

    def _start_step(self, inputs: Any, targets: Any, first: bool, last: bool, train: bool) -> None:
        err = broken = None
        if self._broken is not None:  # still joins the check below: a rank whose last step
            # ended well (its part of the failed step was done) learns of it here
            broken = err = (f"rank {self.topo.rank}: this Pipeline failed earlier ({self._broken}); "
                            f"messages of that step may still be in flight, build a new Pipeline")
        else:
            try:
                self._inputs = split_batch(inputs, self.chunks, "inputs") if first else None
                self._targets = split_batch(targets, self.chunks, "targets") if last and train else None
            except ConfigError as exc:
                err = f"rank {self.topo.rank} (pipeline rank {self.topo.pp_rank}, stages {self.local_stages}): {exc}"
                # (the placement decides which rank that is: zb-v holds the last stage on pipeline rank 0)
                if first and inputs is None:
                    err += "; this rank holds the first stage (Pipeline.is_first_stage): pass the inputs here"
                elif last and train and targets is None:
                    err += "; this rank holds the last stage (Pipeline.is_last_stage): pass the targets here"
        # a blocking all-reduce (under the watchdog's deadline) tells every rank whether any
        # rank's input is bad or its pipeline broken; only then are the messages gathered
        flag = all_reduce(torch.tensor([2 if broken else 1 if err else 0], dtype=torch.int32),
                          self.topo.world, op="max")
        if int(flag.item()):
            gathered = guarded("pipeline step: allgather of input errors",
                               lambda: self.topo.world.allgather((err, broken is not None)))
            if int(flag.item()) == 2:  # a broken pipeline: every rank refuses the step
                if self._broken is None:
                    self._broken = next(e for e, was_broken in gathered if was_broken)
                raise MpimpError(broken or self._broken)
            raise ConfigError(next(e for e, _ in gathered if e))
        self._state: dict[tuple[int, int], _MB] = {}
        self._local: dict[tuple[int, str, int], Any] = {}
        self._events = []
        self._inflight = 0
        self.peak_inflight = 0
        self.split_weight_passes = 0
        self._step_start = time.perf_counter()
        self._cpu_start = time.thread_time()

    def _tag(self, stage: int, direction: int, mb: int) -> int:
        return TAG_BASE + 2 * (mb * self.num_stages + stage) + direction

    def _action_tag(self, a: Action) -> int | str:
        if a.kind == "RECV_F":
            return self._tag(a.stage, 0, a.mb)
        if a.kind == "RECV_B":
            return self._tag(a.stage, 1, a.mb)
        if a.kind == "SEND_F":
            return self._tag(a.stage + 1, 0, a.mb)
        if a.kind == "SEND_B":
            return self._tag(a.stage - 1, 1, a.mb)
        return "-"

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
        progress = ProgressThread(self.comm) if self._progress_thread else None
        self._position = 0
        try:
            self._run_row(row, train)
        except Exception as exc:
            self._fail(exc, row)
        finally:
            if progress is not None:
                progress.stop()

    def _fail(self, exc: Exception, row: list[Action] | None = None) -> NoReturn:
        """Mark this pipeline broken and tell every other stage (their waits watch for it),
        unless the failure came from one of them; then raise (a deadline with this rank's
        position in ``row``)."""
        if isinstance(exc, DeadlineError):
            if self._broken is None:  # this rank's stall report: where in its table it waited
                self._broken = f"{exc}\n{self._where(row)}" if row is not None else str(exc)
                self._announce(self._broken)
            raise DeadlineError(self._broken) from exc
        if self._broken is None:  # a local failure
            self._broken = str(exc) if isinstance(exc, MpimpError) else \
                f"rank {self.topo.rank}: {type(exc).__name__}: {exc}"
            self._announce(self._broken)
        raise exc

    def _where(self, row: list[Action]) -> str:
        """This rank's position in its action table, for a stall report.

        Every rank whose wait passes the deadline prints its own, so together they show
        where the ranks' tables disagree (or which rank stopped).
        """
        i, n = self._position, len(row)
        if i >= n:
            here = f"all {n} actions done, waiting for its sends to complete"
        else:
            a = row[i]
            here = f"action {i + 1} of {n}, {a}"
            if a.kind in ("RECV_F", "RECV_B"):
                send = a.matching_send()
                here += f": waits for rank {self.owner[send.stage]}'s {send}"
        done = " ".join(str(b) for b in row[max(0, i - 3):i]) or "nothing"
        after = " ".join(str(b) for b in row[i + 1:i + 4]) or "nothing"
        return (f"  pipeline position of rank {self.topo.rank} (pp rank {self.topo.pp_rank}): {here}; "
                f"done before it: {done}; next: {after}")

    def _announce(self, text: str) -> None:
        payload = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
        reqs = [isend(payload, r, self.comm, ERR_TAG) for r in range(self.topo.pp) if r != self.topo.pp_rank]
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
        clock, cpu = time.perf_counter, time.thread_time
        debug = os.environ.get("MPIMP_DEBUG", "0") not in ("", "0")
        for i, a in enumerate(row):
            self._position = i
            if debug:  # e.g. "r1 | pipeline 1RECV_F3 (mb 3, stage 1, tag 23)"
                _trace(self.comm, f"pipeline {a} (mb {a.mb}, stage {a.stage}, tag {self._action_tag(a)})")
            t0, c0 = clock(), cpu()
            if a.kind in ("RECV_F", "RECV_B"):
                self._local[a] = self._wait(recvs.pop(a))
                order.remove(a)
            elif a.kind == "SEND_F":
                sends.append(isend(self._local.pop((a.stage, "OUT", a.mb)), self.owner[a.stage + 1],
                                   self.comm, self._tag(a.stage + 1, 0, a.mb), pack=True))
            elif a.kind == "SEND_B":
                sends.append(isend(self._local.pop((a.stage, "DX", a.mb)), self.owner[a.stage - 1],
                                   self.comm, self._tag(a.stage - 1, 1, a.mb), pack=True))
            elif a.kind == "F":
                self._forward(a.stage, a.mb, train)
            elif a.kind == "B":
                self._backward(a.stage, a.mb)
            else:
                self._weight(a.stage, a.mb)
            self._events.append((a, t0 - self._step_start, clock() - self._step_start,
                                 c0 - self._cpu_start, cpu() - self._cpu_start))
            for key in order[:4]:  # drive the next receives while we compute
                recvs[key].test()
            sends = [q for q in sends if not q.test()]
            if self._err_req is not None and a.kind in ("F", "B", "W"):
                self._check_remote_error()
        self._position = len(row)
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
        st.x = x if s == 0 else as_leaf(x)
        st.ckpt = self.checkpoint == "always" or (self.checkpoint == "except_last" and i < self.chunks - 1)
        st.split = (s, i) in self._has_w
        if last:
            st.target = self._targets[i] if self._targets is not None else None
        if st.ckpt:  # the recompute must draw what this forward draws (dropout masks)
            st.rng = torch.get_rng_state()
            if self.device.type == "cuda":
                st.device_rng = torch.cuda.get_rng_state(self.device)
            with torch.no_grad():
                out = self._run_layers(s, st.x)
                if last:
                    self._loss_sum += self._loss(out, st.target).detach().double()
        else:
            out = self._run_forward(s, st)
        if not last:
            self._local[(s, "OUT", i)] = detach_all(out)
        self._state[(s, i)] = st
        self._inflight += 1
        self.peak_inflight = max(self.peak_inflight, self._inflight)

    def _run_forward(self, s: int, st: _MB) -> Any:
        """Forward with autograd (capturing module outputs when W is split off); stores st.out."""
        self._capture = [] if st.split else None
        try:
            if st.split:
                self._add_capture_hooks(s)
            out = self._run_layers(s, st.x)
        finally:
            captured, self._capture = self._capture, None
            _remove_hooks(self._hook_handles)
        if s == self.num_stages - 1:
            loss = self._loss(out, st.target)
            if not st.ckpt:
                self._loss_sum += loss.detach().double()
            out = loss / self.chunks
        st.out = out
        if st.split:
            mods = [c.module for c in (captured or [])]
            # the B/W split is exact when every parameter-owning module ran exactly once and
            # no parameter is used outside its module (a tied weight read by another layer)
            owners, ran = len(self._owners_of_params[s]), len(set(map(id, mods)))
            if ran != len(mods) or ran != owners or not _split_is_exact(out, captured or [], flat_tensors(st.x)):
                st.split = False
                if ran < owners and s not in self._warned_uncaptured:
                    self._warned_uncaptured.add(s)
                    warnings.warn(
                        f"rank {self.topo.rank} (stage {s}): a split forward saw {ran} of the "
                        f"stage's {owners} parameter-owning modules run, so its micro-batches take full "
                        f"backwards and their W's do nothing (gradients are exact; the zero-bubble gain is lost): "
                        f"a module that owns parameters but does not run in forward, or a torch.compile'd layer "
                        f"whose compiled code skips the capture hooks",
                        RuntimeWarning, stacklevel=2)
            else:
                st.captures = captured
        return out

    def _backward(self, s: int, i: int) -> None:
        st = self._state[(s, i)]
        if st.ckpt:
            on_gpu = st.device_rng is not None
            # the forward has counted them (read now: moving a module to a device or dtype
            # replaces its buffers)
            stats = [(b, b.clone()) for mod in self._norms[s]
                     for b in (mod.running_mean, mod.running_var, mod.num_batches_tracked) if b is not None]
            with torch.random.fork_rng(devices=[self.device] if on_gpu else []):
                assert st.rng is not None
                torch.set_rng_state(st.rng)
                if on_gpu:
                    torch.cuda.set_rng_state(st.device_rng, self.device)
                self._run_forward(s, st)
            # through .data: the recomputed graph saved these buffers (a training-mode batch
            # norm's backward does not read them), so a tracked in-place copy would fail its
            # version check at backward
            for b, saved in stats:
                b.data.copy_(saved)
        last = s == self.num_stages - 1
        if last:
            outs, grads = [st.out], [None]
        else:
            g = self._local.pop((s + 1, "DX", i)) if self.owner[s + 1] == self.topo.pp_rank \
                else self._local.pop(Action(s, "RECV_B", i))
            pairs = [(o, d) for o, d in zip(flat_tensors(st.out), flat_tensors(g)) if o.requires_grad and d.numel() == o.numel()]
            outs, grads = [o for o, _ in pairs], [d for _, d in pairs]
        xs = flat_tensors(st.x)
        need = [t for t in xs if t.requires_grad]
        if st.split and st.captures is not None:
            # W keeps only the plain linears' weight passes (g^T x, the deferrable matmul
            # half); every other module's parameters get their gradient here, in the same
            # backward (a layer norm's costs nothing extra there, a separate pass per
            # module later cost more than the whole B)
            direct: list[Capture] = []
            params: list[torch.Tensor] = []
            for c in st.captures:
                if _still_direct(c):
                    direct.append(c)
                else:
                    params += [q for q in c.module.parameters(recurse=False) if q.requires_grad]
            caps = [t for c in direct for t in c.outputs]
            wanted = need + caps + params
            res = torch.autograd.grad(outs, wanted, grads, retain_graph=True, allow_unused=True) \
                if outs and wanted else [None] * len(wanted)
            dx = dict(zip(map(id, need), res[: len(need)]))
            st.captures = direct
            st.cap_grads = res[len(need): len(need) + len(caps)]
            _accumulate(params, res[len(need) + len(caps):])
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
        for cap in st.captures or []:
            module, outs, x = cap.module, cap.outputs, cap.linear_input
            pairs = [(o, g) for o, g in zip(outs, st.cap_grads[k : k + len(outs)]) if g is not None]
            k += len(outs)
            if x is not None and _still_direct(cap):
                if pairs:
                    _linear_weight_grad(module, x, pairs[0][1])
                continue
            params = [q for q in module.parameters(recurse=False) if q.requires_grad]
            if not pairs or not params:
                continue
            _accumulate(params, torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs],
                                                    retain_graph=True, allow_unused=True))
        self._release(s, i)

    def _release(self, s: int, i: int) -> None:
        del self._state[(s, i)]
        self._inflight -= 1
