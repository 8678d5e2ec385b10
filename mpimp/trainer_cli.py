"""``mpimp train``, ``mpimp sample`` and ``mpimp export``: the command-line face of the trainer.

Problem: one set of options has three sources (built-in defaults, a ``--config``
TOML file, the command line, in increasing priority) and must be checked identically
on every rank, so that a typo gives one message and exit status 2 instead of a
traceback per rank or a hang.  The options are the fields of
:class:`mpimp.trainer.TrainConfig`; the parser, the TOML keys and the help text are
all generated from them, so they cannot drift apart.

    mpirun -n 4 mpimp train --pp 2 --tp 2 --steps 300 --out runs/demo
    mpimp train --config jobs/demo.toml --steps 50      # the command line wins
    mpimp sample --model runs/demo -n 8                  # answer held-out prompts
    mpimp export --model runs/demo --to gpt.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from typing import Any

from .cli import UsageError

__all__ = ["COMMANDS", "load_config", "config_from_args"]

_GROUPS = {
    "layout": "layout (dp x pp x tp must equal the number of ranks)",
    "model": "model (the reference GPT)",
    "data": "data",
    "optimisation": "optimisation (AdamW, warm-up then cosine learning rate)",
    "run": "run",
}


def _base_type(tp: Any) -> type:
    """``int`` for ``int`` and ``int | None`` (dataclass annotations are strings here)."""
    if isinstance(tp, str):
        tp = eval(tp, {"__builtins__": {}}, {"int": int, "float": float, "str": str, "None": None})
    args = [a for a in typing.get_args(tp) if a is not type(None)] if isinstance(tp, types.UnionType) else [tp]
    return args[0]


def _fields() -> list[dataclasses.Field]:
    from .trainer import TrainConfig

    return list(dataclasses.fields(TrainConfig))


def _add_train(p: argparse.ArgumentParser) -> None:
    from .trainer import TrainConfig

    p.description = ("Train the reference GPT on a dp x pp x tp layout of the MPI ranks. Rank 0 "
                     "decides each step (batch indices, learning rate, evaluate/stop) and every rank "
                     "loads its own slice of the data. Outputs in --out: metrics.jsonl, loss.png, "
                     "timeline.png, trace.json, summary.json, model.safetensors. SIGTERM, SIGUSR1 or "
                     "Ctrl-C on any rank stop all ranks at the next step boundary.")
    p.epilog = "example: mpirun -n 4 mpimp train --pp 2 --tp 2 --steps 300 --out runs/demo"
    defaults = TrainConfig()
    groups = {name: p.add_argument_group(title) for name, title in _GROUPS.items()}
    groups["run"].add_argument("--config", metavar="FILE.toml", default=None,
                               help="read options from a TOML file (keys as below, with _ for -); "
                               "command-line flags override it")
    for f in _fields():
        kind = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        default = getattr(defaults, f.name)
        if default is not None:
            kw["help"] += f" (default: {default})"
        if f.name == "precision":
            kw["choices"] = ["fp32", "bf16"]
        elif f.name == "progress":
            kw["choices"] = ["auto", "bar", "lines"]
        elif f.name == "schedule":
            kw["metavar"] = "NAME"
        kw["type"] = kind
        if "choices" not in kw:
            kw.setdefault("metavar", {int: "N", float: "X", str: "S"}[kind])
        if f.name == "data":
            kw["metavar"] = "PATH"
        elif f.name == "out":
            kw["metavar"] = "DIR"
        groups[f.metadata["group"]].add_argument(flag, **kw)


def load_config(path: str) -> dict[str, Any]:
    """Options from a TOML file: flat keys, or grouped in tables ([layout], [model], ...)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path!r} is not valid TOML: {exc}") from None
    fields = {f.name: f for f in _fields()}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in _GROUPS:
            items = value.items()
        else:
            items = [(key, value)]
        for k, v in items:
            name = k.replace("-", "_")
            if name not in fields:
                raise UsageError(f"config file {path!r}: unknown key {k!r}; known keys: {', '.join(sorted(fields))}")
            kind = _base_type(fields[name].type)
            ok = isinstance(v, kind) and not isinstance(v, bool) or (kind is float and isinstance(v, int)
                                                                     and not isinstance(v, bool))
            if not ok:
                raise UsageError(f"config file {path!r}: {k} = {v!r} should be of type {kind.__name__}")
            flat[name] = kind(v)
    return flat


def config_from_args(args: argparse.Namespace) -> Any:
    """TrainConfig from defaults < --config file < command-line flags."""
    from .trainer import TrainConfig

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config(args.config))
    for f in _fields():
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return TrainConfig(**values)


def _run_train(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    cfg = config_from_args(args)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return 0


# ----------------------------------------------------------------------------- sample / export


def _add_model_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default="runs/train",
                   help="output directory of `mpimp train` (holds model.safetensors and model.json)")


def _add_sample(p: argparse.ArgumentParser) -> None:
    _add_model_dir(p)
    p.add_argument("-n", "--num", type=int, default=10, help="held-out prompts to answer (default task)")
    p.add_argument("--prompt", default=None, help="text to continue (text-file models)")
    p.add_argument("--tokens", type=int, default=100, help="tokens to generate after --prompt")


def _run_sample(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() != 0:
        return 0  # generation is a single-process job; the other ranks have nothing to do
    from .trainer import load_trained

    model, meta, data = load_trained(args.model)
    from .data import ReverseTask

    if isinstance(data, ReverseTask):
        import numpy as np

        from .trainer import greedy

        if args.num < 1:
            raise UsageError(f"-n must be >= 1, got {args.num}")
        prompts = data.prompts(np.arange(args.num), "eval")
        right = 0
        for p in prompts:
            ctx = list(p) + [ReverseTask.SEP]
            out = greedy(model, ctx, data.digits, meta["seq_len"])
            ok = out == list(p[::-1])
            right += ok
            print(f"{data.format(ctx)} {data.format(out)}  {'ok' if ok else 'WRONG (want ' + data.format(p[::-1]) + ')'}")
        print(f"exact match on {args.num} held-out prompts: {right / args.num:.3f}")
    else:
        from .trainer import greedy

        text = (args.prompt or "\n").encode()
        out = greedy(model, list(text), args.tokens, meta["seq_len"])
        sys.stdout.write((text + bytes(t % 256 for t in out)).decode(errors="replace") + "\n")
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    _add_model_dir(p)
    p.add_argument("--to", metavar="FILE", required=True, help="safetensors file to write")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the exported weights")


def _run_export(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() != 0:
        return 0
    import torch
    from safetensors.torch import load_file, save_file

    src = os.path.join(args.model, "model.safetensors")
    if not os.path.isfile(src):
        raise UsageError(f"{src!r} does not exist; run `mpimp train --out {args.model}` first")
    state = load_file(src)
    if args.dtype == "bf16":
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    with open(os.path.join(args.model, "model.json")) as f:
        meta = json.load(f)
    save_file(state, args.to, metadata={"mpimp_model": json.dumps(meta["model"])})
    n = sum(v.numel() for v in state.values())
    print(f"wrote {args.to}: {len(state)} tensors, {n:,} parameters ({args.dtype}), single-process layout")
    return 0


COMMANDS = [
    ("train", "train the reference GPT (layout, model, data, optimisation options)", _add_train, _run_train),
    ("sample", "generate from a trained model (default task: answer held-out prompts)", _add_sample, _run_sample),
    ("export", "write a trained model's single-process state dict (safetensors)", _add_export, _run_export),
]
