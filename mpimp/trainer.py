"""`mpimp.Trainer`: train the reference GPT on any dp x pp x tp layout, driven by rank 0.

Problem: a training job is more than a step function.  Every rank has to agree on the
batch, the learning rate and when to stop (:mod:`mpimp.coordinator`); each rank loads
only its own slice of the data (:mod:`mpimp.data`); the optimizer must see one model
although its parameters are spread over pp x tp ranks and replicated over dp; and the
user wants progress, metrics, plots and a model file at the end.

One step, on every rank::

    msg = coordinator.next(step)            # rank 0: step, sample indices, lr, control
    mine = msg.indices[dp_rank*b:(dp_rank+1)*b]       # b = batch_size / dp
    x = data.inputs(mine)  if first stage else None   # nobody else touches the inputs
    y = data.targets(mine) if last stage  else None
    loss = pipeline/GPT forward+backward over `chunks` micro-batches (tp inside the layers)
    gradients averaged over dp (DataParallel reduction)
    clip by the global norm:  sqrt(sum over model_comm of |g|^2), where a parameter
          replicated over tp (LayerNorm, biases of row-parallel layers) is counted on
          tp rank 0 only, and a tied embedding once
    AdamW step with msg.lr (warm-up, then cosine to lr * min_lr_ratio)
    loss (last stage) reduced to rank 0, which logs and writes metrics.jsonl

Same seed and same global batch give the same losses at any layout: the model is
initialised identically (each tp shard is a slice of the tp = 1 weights, each
pipeline stage builds its layers from per-layer seeds), the batch is a pure function
of (seed, step), and every replica's loss is the mean over the same number of scored
tokens per sample.

Precision ``bf16``: the forward runs under ``torch.autocast(bfloat16)`` while the
parameters, gradients and AdamW state stay fp32 (master weights); each pipeline
layer hands its output on as bf16, so activations and their gradients cross the
pipeline as bf16 (half the bytes); the dp gradient average travels as bf16 at every pp
(``reduce_gradients``, or ``Pipeline(reduce_dtype=bf16)``).  The loss is computed in fp32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from .coordinator import Control, Coordinator, StepMessage, StopFlag, reduce_to_root
from .data import IGNORE_INDEX, DataError, Dataset, ReverseTask, open_dataset
from .errors import ConfigError
from .schedule import default_virtual_stages
from .topology import Topology, init
from .watchdog import guarded

__all__ = ["TrainConfig", "Trainer", "lr_schedule", "CONFIG_HELP"]


def _f(default: Any, help: str, group: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, "group": group, **kw})


@dataclass
class TrainConfig:
    """Every option of ``mpimp train`` (also the keys of ``--config FILE.toml``)."""

    # layout
    dp: int | None = _f(None, "data-parallel replicas (default: world size / (pp*tp))", "layout")
    pp: int = _f(1, "pipeline stages", "layout")
    tp: int = _f(1, "tensor-parallel ranks per stage", "layout")
    schedule: str = _f("1f1b", "pipeline schedule: gpipe, 1f1b, interleaved-1f1b, zb-h1, interleaved-zb, zb-v", "layout")
    chunks: int = _f(1, "micro-batches per data-parallel replica and step", "layout")
    virtual_stages: int | None = _f(None, "model chunks per pipeline rank (default: the schedule's own, 2 for "
                                          "interleaved-1f1b, interleaved-zb and zb-v, 1 for the others)", "layout")
    # model
    layers: int = _f(2, "transformer blocks", "model")
    d_model: int = _f(64, "model width", "model")
    heads: int = _f(4, "attention heads (divisible by tp)", "model")
    seq_len: int = _f(12, "tokens per sequence (default task: 2 x digits)", "model")
    vocab_size: int | None = _f(None, "vocabulary size (default: the data's: 11 for the task, 256 for text, max id + 1 for .bin)", "model")
    # data
    data: str | None = _f(None, "a text file (byte-level tokens) or a nanoGPT flat uint16 .bin token file "
                          "(tokens:PATH / text:PATH force the kind); default: the embedded digit-reversal "
                          "task", "data")
    # optimisation
    lr: float = _f(3e-3, "peak learning rate (AdamW)", "optimisation")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr (cosine decay)", "optimisation")
    warmup: int = _f(50, "linear warm-up steps", "optimisation")
    weight_decay: float = _f(0.01, "AdamW weight decay (matrices and embeddings only)", "optimisation")
    grad_clip: float = _f(1.0, "clip gradients to this global norm (0: off)", "optimisation")
    batch_size: int = _f(16, "global batch in sequences per step (split over dp, then chunks)", "optimisation")
    precision: str = _f("fp32", "fp32, or bf16 (autocast, fp32 master weights)", "optimisation")
    steps: int = _f(300, "training steps", "run")
    seed: int = _f(0, "seed of the initial weights and of the batch order", "run")
    eval_every: int = _f(100, "evaluate every N steps (and at the end; 0: only at the end)", "run")
    eval_samples: int = _f(256, "held-out samples per evaluation", "run")
    log_every: int = _f(10, "progress line every N steps", "run")
    checkpoint_every: int = _f(0, "also save model.safetensors every N steps (0: only at the end)", "run")
    out: str = _f("runs/train", "output directory (metrics, plots, trace, summary, model)", "run")
    progress: str = _f("auto", "progress output: bar (redrawn in place), lines, or auto (bar on a terminal)",
                       "run")

    def stages_per_rank(self) -> int:
        """``virtual_stages``, or when not given the schedule's own
        (:func:`mpimp.schedule.default_virtual_stages`: 2 for the interleaved schedules and
        ``zb-v``, 1 for the others), as ``mpimp plan`` takes it."""
        if self.virtual_stages is not None:
            return self.virtual_stages
        return default_virtual_stages(self.schedule)

    def validate(self, world_size: int | None = None) -> None:
        """Raise ConfigError for options that cannot work (pure: same verdict on every rank)."""
        for name in ("pp", "tp", "chunks", "virtual_stages", "layers", "d_model", "heads", "seq_len",
                     "batch_size", "eval_samples", "log_every"):
            v = getattr(self, name)
            if name == "virtual_stages" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        for name in ("steps", "warmup", "eval_every", "seed", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
        if self.progress not in ("auto", "bar", "lines"):
            raise ConfigError(f"--progress must be auto, bar or lines, got {self.progress!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"need --lr > 0, 0 <= --min-lr-ratio <= 1, --weight-decay >= 0, --grad-clip >= 0; "
                              f"got {self.lr}, {self.min_lr_ratio}, {self.weight_decay}, {self.grad_clip}")
        if world_size is not None:
            dp = self.dp if self.dp is not None else world_size // (self.pp * self.tp)
            if dp < 1 or dp * self.pp * self.tp != world_size:
                return  # topology.init reports the layout with its suggestions
            per = self.batch_size // dp
            if self.batch_size % dp:
                raise ConfigError(f"--batch-size {self.batch_size} does not split over dp={dp} replicas; "
                                  f"use a multiple of {dp}")
            if per % self.chunks:
                raise ConfigError(f"each replica's batch of {per} sequences (--batch-size {self.batch_size} / "
                                  f"dp {dp}) does not split into --chunks {self.chunks}; "
                                  f"use a batch size that is a multiple of {dp * self.chunks}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CONFIG_HELP = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}


def lr_schedule(cfg: TrainConfig) -> Any:
    """``lr(step)``: linear warm-up over ``warmup`` steps, then cosine from lr to lr * min_lr_ratio."""

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        span = max(1, cfg.steps - cfg.warmup)
        t = min(1.0, (step - cfg.warmup) / span)
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return lr_at


def _agree(comm: MPI.Comm, fn: Any) -> Any:
    """Run ``fn`` on rank 0; broadcast its result or its user-facing error to every rank."""
    verdict: tuple[str, Any] = ("ok", None)
    if comm.Get_rank() == 0:
        try:
            verdict = ("ok", fn())
        except ConfigError as exc:
            verdict = ("error", str(exc))
    verdict = guarded("trainer: broadcast of the configuration check", lambda: comm.bcast(verdict, root=0))
    if verdict[0] == "error":
        raise DataError(verdict[1])
    return verdict[1]


def _make_out_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".mpimp-write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write the output directory --out {path!r}: {exc.strerror or exc}") from None


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


class _Bf16Boundary(torch.nn.Module):
    """Wrap a pipeline layer so its float output leaves it as bf16 (and enters the next as fp32).

    Under autocast the residual stream stays fp32 inside a block; rounding it to bf16
    only where it leaves a layer makes the pipeline send bf16 activations (and receive
    bf16 gradients) without changing the master weights.
    """

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16:
            x = x.float()
        out = self.layer(x)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            out = out.to(torch.bfloat16)
        return out


def _launcher_on_terminal() -> bool:
    """Whether the launcher's own stdout is a terminal.

    Open MPI gives each local rank a pseudo-terminal even when ``mpirun``'s output goes to a
    batch log, so the rank's ``isatty()`` is not enough: look at where the parent process
    (the launcher or its daemon) writes.  Elsewhere (not Linux, no /proc) trust isatty.
    """
    try:
        target = os.readlink(f"/proc/{os.getppid()}/fd/1")
    except OSError:
        return True
    return target.startswith("/dev/pts/") or target.startswith("/dev/tty")


class _Progress:
    """Rank 0's progress output: a bar redrawn in place on a terminal, plain lines otherwise."""

    def __init__(self, total: int, every: int, stream: Any = None, mode: str = "auto") -> None:
        self.total, self.every = total, every
        self.stream = stream if stream is not None else sys.stdout
        tty = hasattr(self.stream, "isatty") and self.stream.isatty() and _launcher_on_terminal()
        self.tty = mode == "bar" or (mode == "auto" and tty)
        self.start = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float, bubble: float | None) -> None:
        done = step + 1
        if not self.tty and done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done)
        bub = "-" if bubble is None else f"{100 * bubble:.0f}%"
        text = (f"step {done:>{len(str(self.total))}}/{self.total}  loss {loss:.4f}  "
                f"{tokens_per_s:,.0f} tok/s  bubble {bub}  ETA {_hms(eta)}")
        if self.tty:
            width = 24
            fill = int(width * done / max(1, self.total))
            end = "\n" if done % self.every == 0 or done == self.total else ""
            self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {text}\x1b[K{end}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Trainer:
    """Train :class:`mpimp.models.GPT` on a dp x pp x tp layout of ``comm`` (default COMM_WORLD).

    Collective: every rank of ``comm`` constructs it with the same config and calls
    :meth:`fit`.  Rank 0 coordinates and writes the outputs under ``config.out``::

        trainer = mpimp.Trainer(mpimp.TrainConfig(pp=2, tp=2, steps=300))
        summary = trainer.fit()        # the summary dict on rank 0, None elsewhere

    Bad options or data raise :class:`ConfigError` on every rank (rank 0 checks the data
    and broadcasts its verdict), before any rank starts communicating in a step.
    """

    def __init__(self, config: TrainConfig, *, comm: MPI.Comm | None = None,
                 topo: Topology | None = None, stream: Any = None) -> None:
        base = comm if comm is not None else (topo.world if topo is not None else MPI.COMM_WORLD)
        config.validate(base.Get_size())
        self.cfg = config
        self.topo = topo if topo is not None else init(config.dp, config.pp, config.tp, comm=base)
        self._own_topo = topo is None
        self.stream = stream
        world = self.topo.world
        self.data: Dataset = _agree(world, self._open_data)
        self.vocab_size = config.vocab_size if config.vocab_size is not None else self.data.vocab_size
        self.dtype = torch.bfloat16 if config.precision == "bf16" else None
        self._build_model()
        self.optimizer = self._build_optimizer()
        self.history: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._train_timeline: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up

    def _open_data(self) -> Dataset:
        ds = open_dataset(self.cfg.data, self.cfg.seq_len)
        if self.cfg.vocab_size is not None:
            ds.check_vocab(self.cfg.vocab_size)
        if ds.num_samples("train") < 1:
            raise DataError(f"{ds.name} yields no training samples of {self.cfg.seq_len + 1} tokens")
        return ds

    def _build_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for p in self.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.95), eps=1e-8)

    # ------------------------------------------------------------------ one step

    def _local_indices(self, indices: np.ndarray) -> np.ndarray:
        b = len(indices) // self.topo.dp
        return indices[self.topo.dp_rank * b:(self.topo.dp_rank + 1) * b]

    def _counted_in_norm(self, p: torch.nn.Parameter) -> bool:
        """Whether this rank counts ``p`` in the global gradient norm (each element once)."""
        if getattr(p, "mpimp_shard", None) is None and self.topo.tp_rank != 0:
            return False  # replicated over tp: tp rank 0 counts it
        return not getattr(p, "mpimp_tied_copy", False)  # the second copy of a tied weight

    def clip_gradients(self) -> float:
        """Global gradient norm over all shards of one replica; scale the gradients to ``grad_clip``."""
        sq = torch.zeros(1, dtype=torch.float64)
        grads = []
        for p in self.parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            if self._counted_in_norm(p):
                sq += p.grad.detach().double().pow(2).sum()
        if self.topo.model_comm.Get_size() > 1:
            guarded("trainer: all-reduce of the gradient norm",
                    lambda: self.topo.model_comm.Allreduce(MPI.IN_PLACE, sq.numpy(), op=MPI.SUM))
        norm = float(sq.sqrt())
        if self.cfg.grad_clip > 0:
            coef = self.cfg.grad_clip / (norm + 1e-6)
            if coef < 1:
                for g in grads:
                    g.mul_(coef)
        return norm

    def _autocast(self) -> Any:
        if self.dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cpu", dtype=self.dtype)

    def train_step(self, msg: StepMessage) -> tuple[float, float]:
        """Forward, backward, clip and update for the message's batch; (loss, grad norm)."""
        mine = self._local_indices(msg.indices)
        x = self.data.inputs(mine) if self.first_stage else None
        y = self.data.targets(mine) if self.last_stage else None
        for group in self.optimizer.param_groups:
            group["lr"] = msg.lr
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self._forward_backward(x, y)
        norm = self.clip_gradients()
        self.optimizer.step()
        return loss, norm

    # ------------------------------------------------------------------ evaluation

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Argmax over the vocabulary of vocab-parallel logits ``[..., V/tp]`` (first maximum wins)."""
        rows = logits.shape[-1]
        start = self.topo.tp_rank * rows
        z = logits.float()
        if start + rows > self.vocab_size:  # padding columns never win
            pad = torch.arange(start, start + rows) >= self.vocab_size
            z = z.masked_fill(pad, float("-inf"))
        vals, idx = z.max(dim=-1)
        if self.topo.tp == 1:
            return idx
        parts = guarded("sample: allgather of the top-k over tp",
                        lambda: self.topo.tp_comm.allgather((vals.numpy(), (idx + start).numpy())))
        v = torch.from_numpy(np.stack([p[0] for p in parts]))
        i = torch.from_numpy(np.stack([p[1] for p in parts]))
        return i.gather(0, v.argmax(dim=0, keepdim=True)).squeeze(0)

    @torch.no_grad()
    def evaluate(self, samples: int | None = None) -> dict[str, float] | None:
        """Loss and accuracy on held-out samples (collective); the results on rank 0.

        For the default task ``accuracy`` is the exact-match rate of the answers: with
        teacher forcing every answer token is predicted by argmax from the true prefix,
        and the answer is exact iff all of them are right, which is exactly when greedy
        decoding reproduces the whole answer.  For files it is next-token accuracy.
        """
        from .nn import vocab_parallel_cross_entropy

        topo = self.topo
        # whole batches of the training micro-batch layout (the pipeline splits them into chunks)
        per = self.cfg.batch_size // topo.dp
        n = samples if samples is not None else self.cfg.eval_samples
        n = min(n, max(1, self.data.num_samples("eval")))
        n = max(1, n // (topo.dp * per)) * per  # samples per replica
        mine = np.arange(topo.dp_rank * n, (topo.dp_rank + 1) * n, dtype=np.int64)
        sums = {"loss_sum": 0.0, "tokens": 0.0, "correct_tokens": 0.0, "exact": 0.0, "rows": 0.0}
        self._set_train(False)
        for start in range(0, len(mine), per):
            idx = mine[start:start + per]
            x = self.data.inputs(idx, "eval") if self.first_stage else None
            y = self.data.targets(idx, "eval") if self.last_stage else None
            with self._autocast():
                logits = self._forward_logits(x, len(idx))
            if not self.last_stage:
                continue
            losses = vocab_parallel_cross_entropy(logits.float(), y, topo.tp_comm, vocab_size=self.vocab_size,
                                                  ignore_index=IGNORE_INDEX, reduction="none")
            scored = y != IGNORE_INDEX
            pred = self._argmax(logits)
            right = (pred == y) | ~scored
            sums["loss_sum"] += float(losses[scored].sum())
            sums["tokens"] += float(scored.sum())
            sums["correct_tokens"] += float(((pred == y) & scored).sum())
            sums["exact"] += float(right.all(dim=-1).sum())
            sums["rows"] += len(idx)
        self._set_train(True)
        keys = list(sums)
        total = reduce_to_root(topo.world, sums, self.last_stage and topo.tp_rank == 0, keys)
        if total is None:
            return None
        exact = isinstance(self.data, ReverseTask)
        return {
            "eval_loss": total["loss_sum"] / max(1.0, total["tokens"]),
            "accuracy": (total["exact"] / max(1.0, total["rows"])) if exact
            else total["correct_tokens"] / max(1.0, total["tokens"]),
            "metric": "exact_match" if exact else "token_accuracy",
            "eval_samples": int(total["rows"]),
        }

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any] | None:
        """Train for ``config.steps`` steps or until a stop; write the outputs; the summary on rank 0."""
        cfg, topo = self.cfg, self.topo
        root = topo.rank == 0
        out = cfg.out
        _agree(topo.world, lambda: _make_out_dir(out))
        progress = _Progress(cfg.steps, cfg.log_every, self.stream, cfg.progress) if root else None
        metrics = open(os.path.join(out, "metrics.jsonl"), "w") if root else None
        tokens_per_step = cfg.batch_size * cfg.seq_len
        if root:
            progress.line(f"mpimp train: {self.describe()}")
        stop_reason = "done"
        times: list[float] = []
        t_start = time.perf_counter()
        try:
            with StopFlag() as flag:
                coord = Coordinator(topo.world, steps=cfg.steps, batch_size=cfg.batch_size,
                                    n_samples=self.data.num_samples("train"), seed=cfg.seed,
                                    lr_at=lr_schedule(cfg), eval_every=cfg.eval_every,
                                    checkpoint_every=cfg.checkpoint_every, flag=flag)
                step = 0
                while True:
                    msg = coord.next(step)
                    if msg.control == Control.STOP:
                        stop_reason = msg.reason
                        break
                    t0 = time.perf_counter()
                    loss, norm = self.train_step(msg)
                    dt = time.perf_counter() - t0
                    times.append(dt)
                    bubble = self._bubble()
                    self._train_timeline = self.timeline()  # before an evaluation's forward replaces it
                    # the loss from the last stages (tp rank 0 of each replica), the bubble from all
                    last = self.last_stage and topo.tp_rank == 0
                    local = np.array([loss if last else 0.0, float(last), bubble or 0.0])
                    total = np.zeros(3) if root else None
                    guarded(f"step {step}: Reduce of the loss and bubble onto rank 0",
                            lambda a=local, b=total: topo.world.Reduce(a, b, op=MPI.SUM, root=0))
                    if root:
                        rec = {"step": step, "loss": total[0] / total[1], "lr": msg.lr, "grad_norm": norm,
                               "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                               "bubble": None if bubble is None else total[2] / topo.size}
                        self.history.append(rec)
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                        progress.update(step, rec["loss"], rec["tokens_per_s"], rec["bubble"])
                    if msg.control == Control.CHECKPOINT:
                        state = self.full_state_dict()
                        if root:
                            self._save_model(state)
                    if msg.control == Control.EVALUATE:
                        ev = self.evaluate()
                        if root:
                            ev = {"step": step, **ev}
                            self.evals.append(ev)
                            metrics.write(json.dumps(ev) + "\n")
                            metrics.flush()
                            progress.line(f"eval @ step {step + 1}: loss {ev['eval_loss']:.4f}  "
                                          f"{ev['metric']} {ev['accuracy']:.3f} on {ev['eval_samples']} held-out samples")
                    step += 1
        finally:
            if metrics is not None:
                metrics.close()
        elapsed = time.perf_counter() - t_start
        if root and stop_reason != "done":
            progress.line(f"stopped at step {len(self.history)}: {stop_reason}")
        return self._finish(stop_reason, times, elapsed)

    # ------------------------------------------------------------------ outputs

    def describe(self) -> str:
        cfg, t = self.cfg, self.topo
        n_params = self.num_parameters_cached
        return (f"{t.size} ranks as dp={t.dp} x pp={t.pp} x tp={t.tp} ({cfg.schedule}, {cfg.chunks} chunks); "
                f"GPT {cfg.layers} blocks, d_model {cfg.d_model}, {cfg.heads} heads, vocab {self.vocab_size}, "
                f"{n_params:,} parameters; {self.data.describe()}; "
                f"{cfg.batch_size} sequences x {cfg.seq_len} tokens = {cfg.batch_size * cfg.seq_len:,} tokens "
                f"per step; {cfg.precision}")

    def num_parameters(self) -> int:
        """Parameters of the whole model (each element once), from this rank's shards (collective)."""
        n = sum(p.numel() for p in self.parameters() if self._counted_in_norm(p))
        return int(guarded("trainer: all-reduce of the parameter count", lambda: self.topo.model_comm.allreduce(n)))

    def _finish(self, stop_reason: str, times: list[float], elapsed: float) -> dict[str, Any] | None:
        cfg, topo = self.cfg, self.topo
        root = topo.rank == 0
        self._write_trace()
        state = self.full_state_dict()
        peak = guarded("trainer: gather of peak memory", lambda: topo.world.gather(_peak_rss_mb(), root=0))
        if not root:
            return None
        self._save_model(state)
        steady = times[1:] if len(times) > 1 else times
        mean_dt = float(np.mean(steady)) if steady else float("nan")
        last_eval = self.evals[-1] if self.evals else {}
        bubbles = [h["bubble"] for h in self.history[1:] if h.get("bubble") is not None]
        summary = {
            "layout": {"world": topo.size, "dp": topo.dp, "pp": topo.pp, "tp": topo.tp,
                       "schedule": cfg.schedule, "chunks": cfg.chunks, "virtual_stages": cfg.stages_per_rank()},
            "model": {"layers": cfg.layers, "d_model": cfg.d_model, "heads": cfg.heads, "seq_len": cfg.seq_len,
                      "vocab_size": self.vocab_size, "parameters": self.num_parameters_cached},
            "data": self.data.name,
            "precision": cfg.precision,
            "steps": len(self.history),
            "stop_reason": stop_reason,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "eval_loss": last_eval.get("eval_loss"),
            "task_metric": last_eval.get("metric"),
            "task_accuracy": last_eval.get("accuracy"),
            "tokens_per_s": cfg.batch_size * cfg.seq_len / mean_dt if steady else None,
            "step_time_s": mean_dt if steady else None,
            "bubble": float(np.mean(bubbles)) if bubbles else None,
            "wall_time_s": elapsed,
            "peak_memory_mb_per_rank": [round(m, 1) for m in peak],
            "config": cfg.to_dict(),
        }
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        self._plot_loss()
        out = self.stream if self.stream is not None else sys.stdout
        acc = summary["task_accuracy"]
        out.write(
            f"summary: {summary['steps']} steps ({stop_reason}) in {_hms(elapsed)}; final loss "
            f"{summary['final_loss'] if summary['final_loss'] is None else round(summary['final_loss'], 4)}; "
            + (f"held-out task accuracy {acc:.3f} ({summary['task_metric'].replace('_', ' ')}); "
               if acc is not None else "")
            + (f"{summary['tokens_per_s']:,.0f} tokens/s; " if summary["tokens_per_s"] else "")
            + f"peak memory {max(peak):.0f} MB/rank; outputs in {cfg.out}/\n")
        out.flush()
        return summary

    def _plot_loss(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        if self.history:
            ax.plot([h["step"] + 1 for h in self.history], [h["loss"] for h in self.history], label="train loss")
        if self.evals:
            ax.plot([e["step"] + 1 for e in self.evals], [e["eval_loss"] for e in self.evals], "o-",
                    label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy")
        ax.set_yscale("log")
        t = self.topo
        ax.set_title(f"mpimp train: dp={t.dp} pp={t.pp} tp={t.tp}, {self.data.name}, {self.cfg.precision}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.cfg.out, "loss.png"), dpi=100)
        plt.close(fig)

    def _save_model(self, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(self.cfg.out, "model.safetensors"))
        meta = {"model": self.model_config_dict(), "data": self.cfg.data, "seq_len": self.cfg.seq_len,
                "train_config": self.cfg.to_dict()}
        with open(os.path.join(self.cfg.out, "model.json"), "w") as f:
            json.dump(meta, f, indent=2)

    # ------------------------------------------------------------------ the model (GPT, pipelined or not)

    def model_config(self) -> Any:
        from .models import GPTConfig

        c = self.cfg
        return GPTConfig(vocab_size=self.vocab_size, seq_len=c.seq_len, d_model=c.d_model, n_heads=c.heads,
                         n_layers=c.layers)

    def model_config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.model_config())

    def _build_model(self) -> None:
        """pp = 1: one GPT (tp inside), gradients averaged over dp after the micro-batches.
        pp > 1: the GPT's layer factories in a :class:`mpimp.Pipeline` (which also averages over dp)."""
        from .models import GPT, gpt_pipeline_layers
        from .models.gpt import GPTHead

        cfg, topo = self.cfg, self.topo
        mc = self.model_config()
        torch.manual_seed(cfg.seed)
        self.pipe = None
        self.gpt = None
        if topo.pp == 1:
            self.gpt = GPT(mc, topo)
        else:
            from .pipeline import Pipeline

            parts = gpt_pipeline_layers(mc, topo)
            layers, shared = parts.layers, parts.shared
            if self.dtype is not None:  # (each layer inside a wrapper: its parameters' names gain "layer.")
                layers = [lambda f=f: _Bf16Boundary(f()) for f in layers]
                shared = [[name.replace(".", ".layer.", 1) for name in group] for group in shared]
            self.pipe = Pipeline(layers, topo, chunks=cfg.chunks, loss_fn=self._loss, schedule=cfg.schedule,
                                 virtual_stages=cfg.stages_per_rank(), shared=shared,
                                 reduce_dtype=self.dtype)
            if mc.tied_embeddings:
                # the last stage's copy of the tied token table: same gradient as the first's
                for m in self._modules():
                    if isinstance(m, GPTHead):
                        m.weight.mpimp_tied_copy = True  # type: ignore[attr-defined]
        # which pipeline rank holds the first and the last stage: the schedule's placement (zb-v's
        # V puts both on pipeline rank 0), not pp rank 0 and pp - 1
        self.first_stage = self.pipe is None or self.pipe.is_first_stage
        self.last_stage = self.pipe is None or self.pipe.is_last_stage
        self.num_parameters_cached = self.num_parameters()

    def _modules(self) -> list[torch.nn.Module]:
        if self.gpt is not None:
            return list(self.gpt.modules())
        return [m for s in self.pipe.local_stages for m in self.pipe.stages[s].modules()]

    def parameters(self) -> list[torch.nn.Parameter]:
        """This rank's parameters (its pipeline stages' tp shards)."""
        if self.gpt is not None:
            return list(self.gpt.parameters())
        return list(self.pipe.parameters())

    def _set_train(self, mode: bool) -> None:
        for m in self._modules():
            m.training = mode

    def _forward_backward(self, x: torch.Tensor | None, y: torch.Tensor | None) -> float:
        if self.pipe is not None:
            return self.pipe.train_step(x, y)
        total = 0.0
        chunks = self.cfg.chunks
        events = []
        t0 = time.perf_counter()
        base = {"rank": 0, "world_rank": self.topo.rank, "stage": 0}
        for mb, (xi, yi) in enumerate(zip(x.chunk(chunks), y.chunk(chunks))):
            a = time.perf_counter() - t0
            loss = self._loss(self.gpt(xi), yi)
            b = time.perf_counter() - t0
            (loss / chunks).backward()
            c = time.perf_counter() - t0
            events += [dict(base, action=f"0F{mb}", kind="F", mb=mb, start=a, end=b),
                       dict(base, action=f"0B{mb}", kind="B", mb=mb, start=b, end=c)]
            total += float(loss.detach())
        if self.topo.dp > 1:
            from .data_parallel import reduce_gradients

            reduce_gradients(self.parameters(), self.topo.dp_comm, reduce_dtype=self.dtype)
        self._events = events
        return total / chunks

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the scored targets, from vocabulary-parallel logits, in fp32."""
        from .nn import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits.float(), targets, self.topo.tp_comm,
                                            vocab_size=self.vocab_size, ignore_index=IGNORE_INDEX)

    def _forward_logits(self, x: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Vocabulary-parallel logits on the last stage (None elsewhere)."""
        if self.pipe is not None:
            return self.pipe.forward(x)
        return self.gpt(x)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-process GPT state dict (names of ``GPT(config, topo)`` at tp = 1), on rank 0.

        Collective over the world: tp shards are gathered within each stage, and the
        stages of replica 0 send their layers to rank 0.
        """
        from .nn.sharding import full_state_dict

        topo = self.topo
        if self.gpt is not None:
            state = self.gpt.export_state_dict()
        else:
            state = {}
            L = self.cfg.layers
            for i, layer in self._layers():
                part = full_state_dict(layer, topo.tp_comm)
                prefix = "embed." if i == 0 else ("head." if i == L + 1 else f"blocks.{i - 1}.")
                for k, v in part.items():
                    state[prefix + k] = v
        mine = state if (topo.dp_rank == 0 and topo.tp_rank == 0) else {}
        parts = guarded("trainer: gather of the model shards", lambda: topo.world.gather(mine, root=0))
        if topo.rank != 0:
            return {}
        out: dict[str, torch.Tensor] = {}
        for p in parts:
            out.update(p)
        return out

    def _layers(self) -> list[tuple[int, torch.nn.Module]]:
        """(index in the GPT's layer sequence, module) of this rank's pipeline layers."""
        mods = [m for s in self.pipe.local_stages for m in self.pipe.stages[s]]
        mods = [m.layer if isinstance(m, _Bf16Boundary) else m for m in mods]
        return list(zip(self.pipe.layer_indices, mods))

    def _bubble(self) -> float | None:
        """This step's idle fraction of this rank's pipeline step (None at pp = 1)."""
        if self.pipe is None:
            return None
        events = self.pipe.timeline()
        span = max((e["end"] for e in events), default=0.0)
        busy = sum(e["end"] - e["start"] for e in events if e["kind"] in ("F", "B", "W"))
        return max(0.0, 1.0 - busy / span) if span > 0 else 0.0

    def timeline(self) -> list[dict[str, Any]]:
        """This rank's actions of the last step (the pipeline's, or F/B per micro-batch at pp = 1)."""
        return self.pipe.timeline() if self.pipe is not None else list(self._events)

    def _write_trace(self) -> None:
        """``trace.json`` (merged Chrome trace) and ``timeline.png`` (Gantt) of the last training step (collective)."""
        from . import trace

        topo = self.topo
        mine = [dict(e, dp_rank=topo.dp_rank, tp_rank=topo.tp_rank) for e in self._train_timeline]
        timelines = guarded("trainer: gather of the timelines", lambda: topo.world.gather(mine, root=0))
        if topo.rank != 0:
            return
        trace.write_chrome_trace(timelines, os.path.join(self.cfg.out, "trace.json"))
        t = self.topo
        trace.plot_gantt(timelines, os.path.join(self.cfg.out, "timeline.png"),
                         title=f"last step: dp={t.dp} pp={t.pp} tp={t.tp}, {self.cfg.schedule}, "
                         f"{self.cfg.chunks} micro-batches")

    def close(self) -> None:
        """Free the topology's communicators if this trainer created them (collective)."""
        if self._own_topo:
            self.topo.free()


# ----------------------------------------------------------------------------- single-process use


def load_trained(directory: str) -> tuple[torch.nn.Module, dict[str, Any], Dataset]:
    """The GPT a ``mpimp train`` run saved in ``directory`` (single process, tp = 1), its metadata
    and its dataset (for prompts and formatting)."""
    from safetensors.torch import load_file

    from .models import GPT, GPTConfig

    path, meta_path = os.path.join(directory, "model.safetensors"), os.path.join(directory, "model.json")
    for p in (path, meta_path):
        if not os.path.isfile(p):
            raise ConfigError(f"{p!r} does not exist; train first with `mpimp train --out {directory}`")
    with open(meta_path) as f:
        meta = json.load(f)
    topo = init(comm=MPI.COMM_SELF)
    model = GPT(GPTConfig(**meta["model"]), topo)
    model.import_state_dict(load_file(path))
    model.eval()
    data = open_dataset(meta["data"], meta["seq_len"])
    return model, meta, data


@torch.no_grad()
def greedy(model: torch.nn.Module, context: list[int], new_tokens: int, seq_len: int) -> list[int]:
    """Greedy decoding: append the argmax token ``new_tokens`` times (context cropped to seq_len)."""
    ids = list(int(t) for t in context)
    out = []
    for _ in range(new_tokens):
        x = torch.tensor([ids[-seq_len:]], dtype=torch.int64)
        nxt = int(model(x, gather=True)[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
    return out
