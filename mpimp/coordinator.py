"""The rank-0 control loop: one small message per step, signals, metrics to rank 0.

Problem: every rank of a model-parallel job must agree, step by step, on what to do
(train on which samples, at which learning rate, evaluate now, stop now).  Letting each
rank decide for itself drifts as soon as one rank sees a signal, a clock or a file the
others do not; shipping the batch itself from rank 0 turns rank 0 into a data pipe and
a bottleneck.  So world rank 0 decides and broadcasts a few dozen bytes per step::

    StepMessage(step, indices of the global batch, lr, control)   control in
                                                                  continue | evaluate |
                                                                  checkpoint | stop

and every rank loads its own slice of those samples (:mod:`mpimp.data`).

Signals: SIGTERM (the scheduler's preemption notice), SIGUSR1 (SLURM's
``--signal=USR1@60``) and SIGINT (Ctrl-C) only set a flag on the rank that receives
them.  Each step starts with a gather of the flags to rank 0 (an OR that also says who), so a signal seen by
any one rank becomes a ``stop`` that every rank obeys at the same step boundary (never
in the middle of a pipeline schedule, where the peers would wait for messages that
never come).  A second Ctrl-C on the same rank interrupts at once.

Metrics: the loss is known on the last pipeline stage; :func:`reduce_to_root` sums
named values from the contributing ranks (the last stage's tp rank 0 of every replica)
to world rank 0, which logs them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import numpy as np
from mpi4py import MPI

from .data import batch_indices
from .watchdog import guarded

__all__ = ["Control", "StepMessage", "Coordinator", "StopFlag", "reduce_to_root"]


class Control:
    """The control words of a :class:`StepMessage`."""

    CONTINUE = "continue"
    EVALUATE = "evaluate"
    CHECKPOINT = "checkpoint"
    STOP = "stop"


@dataclass(frozen=True)
class StepMessage:
    """What rank 0 tells every rank before a step.

    ``indices`` are the global batch's sample indices (``batch_size`` of them); dp
    replica ``d`` trains on ``indices[d * b : (d + 1) * b]`` with ``b = batch_size / dp``.
    ``control`` says what to do after (or, for ``stop``, instead of) the step;
    ``reason`` says why a stop was decided (``"signal SIGTERM on rank 3"``, ``"done"``).
    """

    step: int
    indices: np.ndarray
    lr: float
    control: str
    reason: str = ""


class StopFlag:
    """Catch SIGTERM, SIGUSR1 and SIGINT on this rank and remember them (a context manager).

    The handlers only record the signal; :class:`Coordinator` turns it into a stop at the
    next step boundary.  A second SIGINT raises KeyboardInterrupt immediately.  Handlers
    can only be installed from the main thread; elsewhere the flag is inert.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._old: dict[int, object] = {}

    def set(self, name: str) -> None:
        if self.signal_name is None:
            self.signal_name = name

    @property
    def raised(self) -> bool:
        return self.signal_name is not None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.set(name)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()


class Coordinator:
    """World rank 0 decides each step; :meth:`next` is collective over ``comm``.

    ``lr_at(step)`` is the learning-rate schedule, ``n_samples`` the number of training
    samples the indices are drawn from.  Rank 0 evaluates every ``eval_every`` steps (0:
    never in between) and after the last one, and stops after ``steps`` steps or when any rank's
    :class:`StopFlag` is raised.
    """

    def __init__(self, comm: MPI.Comm, *, steps: int, batch_size: int, n_samples: int, seed: int,
                 lr_at: Callable[[int], float], eval_every: int = 0, checkpoint_every: int = 0,
                 flag: StopFlag | None = None) -> None:
        self.comm = comm
        self.steps = steps
        self.batch_size = batch_size
        self.n_samples = n_samples
        self.seed = seed
        self.lr_at = lr_at
        self.eval_every = eval_every
        self.checkpoint_every = checkpoint_every
        self.flag = flag if flag is not None else StopFlag()

    def _decide(self, step: int, signalled: list[tuple[int, str]]) -> StepMessage:
        empty = np.zeros(0, dtype=np.int64)
        if signalled:
            rank, name = signalled[0]
            return StepMessage(step, empty, 0.0, Control.STOP, f"{name} on rank {rank}")
        if step >= self.steps:
            return StepMessage(step, empty, 0.0, Control.STOP, "done")
        control = Control.CONTINUE
        last = step == self.steps - 1
        if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0 and not last:
            control = Control.CHECKPOINT
        if last or (self.eval_every and (step + 1) % self.eval_every == 0):
            control = Control.EVALUATE
        idx = batch_indices(self.seed, step, self.batch_size, self.n_samples)
        return StepMessage(step, idx, float(self.lr_at(step)), control)

    def next(self, step: int) -> StepMessage:
        """The message for ``step`` (collective: the same object on every rank)."""
        # one tiny allgather doubles as the OR-reduction of the stop flags and tells
        # rank 0 who was signalled and by what
        flags = guarded("coordinator: gather of the stop flags", lambda: self.comm.gather(self.flag.signal_name, root=0))
        msg = None
        if self.comm.Get_rank() == 0:
            signalled = [(r, name) for r, name in enumerate(flags) if name is not None]
            msg = self._decide(step, signalled)
        return guarded("coordinator: broadcast of the step message", lambda: self.comm.bcast(msg, root=0))


def reduce_to_root(comm: MPI.Comm, values: dict[str, float], contributes: bool,
                   keys: list[str]) -> dict[str, float] | None:
    """Sum ``values[k]`` for ``k`` in ``keys`` over the contributing ranks onto rank 0.

    Ranks that do not contribute pass zeros; every rank must call it with the same
    ``keys``.  Returns the sums on rank 0 and None elsewhere.
    """
    local = np.array([float(values.get(k, 0.0)) if contributes else 0.0 for k in keys] + [float(contributes)])
    out = np.zeros_like(local) if comm.Get_rank() == 0 else None
    guarded(f"Reduce of {', '.join(keys)} onto rank 0", lambda: comm.Reduce(local, out, op=MPI.SUM, root=0))
    if out is None:
        return None
    result = dict(zip(keys, out[:-1].tolist()))
    result["_contributors"] = float(out[-1])
    return result
