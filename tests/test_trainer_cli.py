"""`mpimp train / sample / export` as a user runs them: separate processes under mpirun.

Serial-only tests (they launch their own ``mpirun -n 2`` with a timeout); under
``mpirun -n K pytest -m mpi`` they are not selected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from conftest import child_env, mpirun

MPIMP = os.path.join(os.path.dirname(sys.executable), "mpimp")
TINY = ["--layers", "2", "--d-model", "32", "--heads", "4", "--seq-len", "8", "--batch-size", "8",
        "--chunks", "2", "--warmup", "3", "--eval-every", "0", "--eval-samples", "16", "--progress", "lines"]


def _mpirun(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return mpirun(n, MPIMP, *args, timeout=timeout, MPIMP_TIMEOUT="60")


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([MPIMP, *args], capture_output=True, text=True, timeout=timeout,
                          env=child_env(MPIMP_TIMEOUT="60"))


def test_help_lists_every_option() -> None:
    out = _run("train", "--help")
    assert out.returncode == 0
    for flag in ("--dp", "--pp", "--tp", "--schedule", "--chunks", "--virtual-stages", "--layers", "--d-model",
                 "--heads", "--seq-len", "--vocab-size", "--data", "--lr", "--warmup", "--weight-decay",
                 "--grad-clip", "--batch-size", "--steps", "--seed", "--eval-every", "--out", "--config",
                 "--precision"):
        assert flag in out.stdout, flag


def test_bad_data_exits_2_with_one_message_from_rank_0(tmp_path) -> None:
    out = _mpirun(2, "train", *TINY, "--data", str(tmp_path / "missing.txt"), timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if "error" in line]
    assert lines == [f"mpimp train: error: data file {str(tmp_path / 'missing.txt')!r} does not exist"]
    assert "Traceback" not in out.stderr


def test_train_sample_export_end_to_end(tmp_path, capsys) -> None:
    """`mpirun -n 2 mpimp train` as a separate job; then sample and export in this process
    (through the same `mpimp` entry point, without paying another interpreter start-up)."""
    from mpimp.cli import main as cli_main

    run = tmp_path / "run"
    out = _mpirun(2, "train", *TINY, "--pp", "2", "--steps", "5", "--out", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "summary: 5 steps (done)" in out.stdout and "held-out task accuracy" in out.stdout
    assert out.stdout.count("summary:") == 1  # rank 0 only
    for name in ("metrics.jsonl", "loss.png", "timeline.png", "trace.json", "summary.json", "model.safetensors"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["layout"]["pp"] == 2 and summary["steps"] == 5

    capsys.readouterr()
    assert cli_main(["sample", "--model", str(run), "-n", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("exact match on 3 held-out prompts:")
    assert all("=" in line for line in lines[:3])

    from safetensors.numpy import load_file

    exported = tmp_path / "gpt.safetensors"
    assert cli_main(["export", "--model", str(run), "--to", str(exported)]) == 0
    a, b = load_file(str(exported)), load_file(str(run / "model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert "embed.tok.weight" in a and a["embed.tok.weight"].shape == (11, 32)

    capsys.readouterr()
    assert cli_main(["sample", "--model", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
