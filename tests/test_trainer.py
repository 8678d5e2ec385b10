"""The trainer: same losses at every layout as a plain single-process torch loop; the outputs;
the coordinator's stop on a signal; bad input -> one message and exit status 2 on every rank."""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import threading

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpimp
from mpimp.cli import main as cli_main
from mpimp.coordinator import Control, Coordinator
from mpimp.data import IGNORE_INDEX, batch_indices, open_dataset
from mpimp.trainer import TrainConfig, Trainer, lr_schedule

# tiny: 2 blocks, d_model 32, 4 heads (2 per tp rank), 4-digit reversal, 8 sequences in 2 micro-batches
TINY = dict(layers=2, d_model=32, heads=4, seq_len=8, batch_size=8, chunks=2, steps=10, lr=3e-3,
            warmup=3, eval_every=5, eval_samples=32, log_every=5, progress="lines")
LAYOUTS = [(1, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 1), (1, 2, 2)]


def _shared_tmpdir(comm: MPI.Comm) -> str:
    path = tempfile.mkdtemp(prefix="mpimp_trainer_") if comm.Get_rank() == 0 else None
    return comm.bcast(path, root=0)


def _reference_losses(cfg: TrainConfig) -> list[float]:
    """Plain single-process torch: the tp = 1 GPT, torch AdamW, torch's clip_grad_norm_."""
    from mpimp.models import GPT, GPTConfig

    data = open_dataset(cfg.data, cfg.seq_len)
    with mpimp.init(comm=MPI.COMM_SELF) as topo:
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(vocab_size=data.vocab_size, seq_len=cfg.seq_len, d_model=cfg.d_model,
                              n_heads=cfg.heads, n_layers=cfg.layers), topo)
        params = list(model.parameters())
        opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                                 {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
        lr_at = lr_schedule(cfg)
        losses = []
        for step in range(cfg.steps):
            x, y = data.sample(batch_indices(cfg.seed, step, cfg.batch_size, data.num_samples()))
            logits = model(x, gather=True)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                     ignore_index=IGNORE_INDEX)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.mpi(min_size=1)
def test_losses_agree_across_layouts_and_outputs_are_valid(comm: MPI.Comm) -> None:
    """Each layout runs at the world size equal to its number of ranks (the suite runs at 1, 2, 3
    and 4 ranks), against the single-process torch reference computed here."""
    size, rank = comm.Get_size(), comm.Get_rank()
    todo = [layout for layout in LAYOUTS if math.prod(layout) == size]
    if not todo:
        pytest.skip(f"no layout of {LAYOUTS} uses exactly {size} ranks")
    out_root = _shared_tmpdir(comm)
    cfg0 = TrainConfig(**TINY)
    ref = _reference_losses(cfg0) if rank == 0 else None
    ran = []
    for layout in todo:
        k = math.prod(layout)
        sub = comm.Split(0 if rank < k else MPI.UNDEFINED, key=rank)
        out = os.path.join(out_root, "x".join(map(str, layout)))
        if sub != MPI.COMM_NULL:
            dp, pp, tp = layout
            trainer = Trainer(TrainConfig(**TINY, dp=dp, pp=pp, tp=tp, out=out), comm=sub)
            summary = trainer.fit()
            trainer.close()
            sub.Free()
            if rank == 0:
                assert summary["layout"]["dp"] == dp and summary["steps"] == TINY["steps"]
        comm.Barrier()
        ran.append((layout, out))
    if rank != 0:
        return
    for layout, out in ran:
        rows = _read_jsonl(os.path.join(out, "metrics.jsonl"))
        losses = [r["loss"] for r in rows if "loss" in r]
        assert len(losses) == TINY["steps"]
        np.testing.assert_allclose(losses, ref, atol=1e-4, rtol=0, err_msg=f"layout (dp, pp, tp) = {layout}")
        assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in rows if "loss" in r)
        evals = [r for r in rows if "eval_loss" in r]
        assert [e["step"] for e in evals] == [4, 9] and all(0 <= e["accuracy"] <= 1 for e in evals)
    # outputs of the largest layout that ran: valid JSON, PNGs that open, a trace with every rank
    import matplotlib.image

    layout, out = ran[-1]
    k = math.prod(layout)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["layout"] == {"world": k, "dp": layout[0], "pp": layout[1], "tp": layout[2],
                                 "schedule": "1f1b", "chunks": 2, "virtual_stages": 1}
    assert abs(summary["final_loss"] - ref[-1]) < 1e-4
    assert summary["task_metric"] == "exact_match" and 0 <= summary["task_accuracy"] <= 1
    assert len(summary["peak_memory_mb_per_rank"]) == k and summary["tokens_per_s"] > 0
    for png in ("loss.png", "timeline.png"):
        img = matplotlib.image.imread(os.path.join(out, png))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    trace = json.load(open(os.path.join(out, "trace.json")))
    pids = {e["pid"] for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert pids == set(range(k))
    # the saved single-process model reproduces the trained model's held-out loss
    from mpimp.trainer import greedy, load_trained

    model, meta, data = load_trained(out)
    x, y = data.sample(np.arange(32), "eval")
    logits = model(x, gather=True)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    assert abs(float(loss.detach()) - summary["eval_loss"]) < 1e-4
    prompt = list(data.prompts(np.arange(1), "eval")[0]) + [10]
    assert len(greedy(model, prompt, 4, meta["seq_len"])) == 4


@pytest.mark.mpi(min_size=2)
def test_zb_v_puts_the_loss_on_pipeline_rank_0_and_trains_like_one_process(comm: MPI.Comm) -> None:
    """zb-v's V holds the first and the last stage on pipeline rank 0: the trainer feeds the
    targets there and takes the loss and the evaluation from there, at pp = 2 (and pp = 2 x
    tp = 2 on 4 ranks), matching the single-process torch losses step by step."""
    size, rank = comm.Get_size(), comm.Get_rank()
    tp = 2 if size >= 4 else 1
    k = 2 * tp
    out_root = _shared_tmpdir(comm)
    cfg = dict(TINY, schedule="zb-v")  # no virtual_stages: zb-v takes its 2
    ref = _reference_losses(TrainConfig(**TINY)) if rank == 0 else None
    sub = comm.Split(0 if rank < k else MPI.UNDEFINED, key=rank)
    if sub != MPI.COMM_NULL:
        trainer = Trainer(TrainConfig(**cfg, pp=2, tp=tp, out=out_root), comm=sub)
        assert trainer.pipe.virtual_stages == 2
        assert trainer.pipe.owner[0] == trainer.pipe.owner[trainer.pipe.num_stages - 1] == 0
        assert trainer.first_stage == trainer.last_stage == (trainer.topo.pp_rank == 0)
        trainer.fit()
        trainer.close()
        sub.Free()
    comm.Barrier()
    if rank == 0:
        rows = _read_jsonl(os.path.join(out_root, "metrics.jsonl"))
        np.testing.assert_allclose([r["loss"] for r in rows if "loss" in r], ref, atol=1e-4, rtol=0)
        evals = [r for r in rows if "eval_loss" in r]
        assert [e["step"] for e in evals] == [4, 9] and all(0 <= e["accuracy"] <= 1 for e in evals)


@pytest.mark.mpi(min_size=2)
def test_bf16_tracks_fp32(comm: MPI.Comm) -> None:
    """bf16 autocast with fp32 master weights at pp = 2 (activations cross as bf16): close to fp32."""
    rank = comm.Get_rank()
    sub = comm.Split(0 if rank < 2 else MPI.UNDEFINED, key=rank)
    out_root = _shared_tmpdir(comm)
    if sub != MPI.COMM_NULL:
        curves = {}
        for precision in ("fp32", "bf16"):
            t = Trainer(TrainConfig(**dict(TINY, steps=20, eval_every=0), pp=2, precision=precision,
                                    out=os.path.join(out_root, precision)), comm=sub)
            if precision == "bf16":
                # what crosses the pipeline is bf16: the stage's layers hand on bf16 outputs
                x = torch.zeros(2, TINY["seq_len"], dtype=torch.int64)
                first = t.pipe.stages[t.pipe.local_stages[0]][0]
                if t.topo.is_first_stage:
                    with t._autocast():
                        assert first(x).dtype == torch.bfloat16
            t.fit()
            t.close()
            curves[precision] = [r["loss"] for r in t.history]
        sub.Free()
        if rank == 0:
            fp32, bf16 = np.array(curves["fp32"]), np.array(curves["bf16"])
            assert not np.array_equal(fp32, bf16)  # bf16 really ran
            assert np.max(np.abs(fp32 - bf16)) < 0.05, (fp32, bf16)
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_signal_on_any_rank_stops_every_rank_at_a_step_boundary(comm: MPI.Comm) -> None:
    size, rank = comm.Get_size(), comm.Get_rank()
    out = os.path.join(_shared_tmpdir(comm), "sig")
    dp = size if TINY["batch_size"] % size == 0 and (TINY["batch_size"] // size) % 2 == 0 else None
    sub = comm.Split(0 if (dp is not None or rank < 2) else MPI.UNDEFINED, key=rank)
    if sub != MPI.COMM_NULL:
        last = sub.Get_size() - 1
        t = Trainer(TrainConfig(**dict(TINY, steps=100000, eval_every=0), out=out), comm=sub)
        if sub.Get_rank() == last:  # the signal arrives on the last rank only, mid-training
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        summary = t.fit()
        t.close()
        steps = sub.bcast(len(t.history) if sub.Get_rank() == 0 else None, root=0)
        sub.Free()
        assert 0 < steps < 100000
        if rank == 0:
            assert summary["stop_reason"] == f"SIGUSR1 on rank {last}"
            assert summary["steps"] == steps and os.path.exists(os.path.join(out, "model.safetensors"))
    comm.Barrier()


def test_virtual_stages_default_to_the_schedules_own() -> None:
    """Not given: 2 for the interleaved schedules and zb-v (its V needs two stages per rank),
    1 for the others, as `mpimp plan` takes them; given, it is kept; 0 is still an error."""
    for name in ("zb-v", "interleaved-1f1b", "interleaved-zb"):
        assert TrainConfig(schedule=name).stages_per_rank() == 2
    for name in ("gpipe", "1f1b", "zb-h1"):
        assert TrainConfig(schedule=name).stages_per_rank() == 1
    assert TrainConfig(schedule="interleaved-1f1b", virtual_stages=3).stages_per_rank() == 3
    TrainConfig(schedule="zb-v").validate()
    with pytest.raises(mpimp.ConfigError, match="--virtual-stages must be an integer >= 1"):
        TrainConfig(virtual_stages=0).validate()


def test_coordinator_decisions_and_lr_schedule() -> None:
    cfg = TrainConfig(steps=10, warmup=2, lr=1.0, min_lr_ratio=0.1, eval_every=4)
    lr = lr_schedule(cfg)
    assert [round(lr(s), 6) for s in (0, 1)] == [0.5, 1.0]
    assert lr(2) == pytest.approx(1.0) and lr(10) == pytest.approx(0.1)
    assert lr(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    c = Coordinator(MPI.COMM_SELF, steps=10, batch_size=4, n_samples=100, seed=1, lr_at=lr, eval_every=4)
    controls = [c._decide(s, []).control for s in range(11)]
    assert controls == ["continue"] * 3 + ["evaluate"] + ["continue"] * 3 + ["evaluate", "continue", "evaluate",
                                                                             "stop"]
    msg = c._decide(3, [])
    assert np.array_equal(msg.indices, batch_indices(1, 3, 4, 100)) and msg.lr == lr(3)
    stop = c._decide(5, [(3, "SIGTERM")])
    assert stop.control == Control.STOP and stop.reason == "SIGTERM on rank 3"
    ck = Coordinator(MPI.COMM_SELF, steps=10, batch_size=4, n_samples=100, seed=1, lr_at=lr, eval_every=5,
                     checkpoint_every=3)
    assert [s for s in range(10) if ck._decide(s, []).control == Control.CHECKPOINT] == [2, 5, 8]
    assert c.next(0).control == Control.CONTINUE
    c.flag.set("SIGINT")
    assert c.next(1).reason == "SIGINT on rank 0"


@pytest.mark.mpi(min_size=1)
def test_bad_input_gives_one_message_and_exit_2_on_every_rank(comm: MPI.Comm, capfd) -> None:
    rank = comm.Get_rank()
    tmp = _shared_tmpdir(comm)
    if rank == 0:
        open(os.path.join(tmp, "empty.txt"), "w").close()
        open(os.path.join(tmp, "short.txt"), "w").write("abc")
        np.array([1, 2, 300, 4] * 10, dtype=np.uint16).tofile(os.path.join(tmp, "tok.bin"))
        open(os.path.join(tmp, "bad.toml"), "w").write("[model]\nlayerz = 3\n")
        open(os.path.join(tmp, "badtype.toml"), "w").write("steps = 'ten'\n")
    comm.Barrier()
    base = ["train", "--batch-size", "12", "--seq-len", "8", "--out", os.path.join(tmp, "o")]
    cases = [
        (["--data", os.path.join(tmp, "missing.txt")], "does not exist"),
        (["--data", os.path.join(tmp, "empty.txt")], "is empty"),
        (["--data", os.path.join(tmp, "short.txt")], "shorter than one sequence"),
        (["--data", os.path.join(tmp, "tok.bin"), "--vocab-size", "256"], "token id 300"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--config", os.path.join(tmp, "bad.toml")], "unknown key 'layerz'"),
        (["--config", os.path.join(tmp, "badtype.toml")], "should be of type int"),
        (["--config", os.path.join(tmp, "nope.toml")], "does not exist"),
        (["--pp", "7"], "world size"),
        (["--steps", "1", "--out", os.path.join(tmp, "empty.txt", "sub")], "cannot write the output directory"),
    ]
    for extra, expect in cases:
        capfd.readouterr()
        assert cli_main(base + extra) == 2, extra
        err = capfd.readouterr().err
        if rank == 0:
            assert expect in err and err.count("error") == 1 and "Traceback" not in err, (extra, err)
        else:
            assert err == "", (extra, err)
    comm.Barrier()
